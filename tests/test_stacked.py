"""Stacked training: each member of the stack trains as train_model would train it alone."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from calling_score_opt import stacked
from calling_score_opt.data import Split, load_dataset, split_dataset
from calling_score_opt.errors import ConfigError, TrainingError
from calling_score_opt.export import export_onnx, onnx_predict
from calling_score_opt.model import CallingScoreModel
from calling_score_opt.stacked import StackedTrainer, plan_stacks, train_one, train_stacked
from calling_score_opt.synth import write_synthetic
from calling_score_opt.train import (
    EpochStats,
    TrainConfig,
    TrainResult,
    checkpoint_bytes,
    load_checkpoint,
    train_model,
)

BASE = TrainConfig(batch_size=32, epochs=6, patience=3, seed=0, dropout=0.0)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Split:
    """300 records: 210 to train on (7 batches of 32), 45 to validate, 45 to test."""
    path = tmp_path_factory.mktemp("stacked") / "data.json"
    write_synthetic(path, 300, 3)
    return split_dataset(load_dataset(path), 0)


def trained(results: list[TrainResult | TrainingError]) -> list[TrainResult]:
    out = []
    for result in results:
        assert isinstance(result, TrainResult), result
        out.append(result)
    return out


def assert_same_run(stacked_run: TrainResult, solo: TrainResult, split: Split) -> None:
    """The stacked member and its solo run agree up to float rounding."""
    assert stacked_run.config == solo.config
    assert stacked_run.best_epoch == solo.best_epoch
    assert stacked_run.epochs_run == solo.epochs_run
    assert [s.epoch for s in stacked_run.history] == [s.epoch for s in solo.history]
    for mine, theirs in zip(stacked_run.history, solo.history, strict=True):
        assert mine.val_loss == pytest.approx(theirs.val_loss, rel=1e-6)
        assert mine.train_loss == pytest.approx(theirs.train_loss, rel=5e-6)
    for name in ("train_loss", "val_loss", "test_loss"):
        assert getattr(stacked_run, name) == pytest.approx(getattr(solo, name), rel=1e-5)
    np.testing.assert_allclose(
        stacked_run.predict(split.x_test), solo.predict(split.x_test), rtol=0, atol=1e-5
    )


def assert_plain_model(result: TrainResult) -> None:
    """A normal CallingScoreModel: what the ONNX export and the checkpoints expect."""
    model = result.model
    assert isinstance(model, CallingScoreModel)
    assert not model.training and not model.network.training
    assert model.feature_mean.device.type == "cpu"
    kinds = [type(m) for m in model.network]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout] * len(result.config.hidden_sizes) + [
        nn.Linear,
        nn.Sigmoid,
    ]
    for module in model.network:
        if isinstance(module, nn.Dropout):
            assert module.p == result.config.dropout
        for parameter in module.parameters():
            assert parameter.device.type == "cpu" and parameter.is_contiguous()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adam", "hand-written-adam"])
def test_without_dropout_each_member_equals_its_solo_run(
    split: Split, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fused:
        monkeypatch.setattr(stacked, "_FUSED_ADAM", None)
    # lr 0.03 overfits 210 records quickly: that member stops early (patience 3)
    configs = [replace(BASE, learning_rate=lr, epochs=12) for lr in (0.001, 0.03, 0.0005, 0.005)]
    results = trained(train_stacked(split, configs))
    solos = [train_model(split, c) for c in configs]
    assert solos[1].epochs_run < 12, "precondition: one member stops early"
    assert any(s.epochs_run == 12 for s in solos), "precondition: one member runs to the end"
    for result, solo in zip(results, solos, strict=True):
        assert_same_run(result, solo, split)
        assert_plain_model(result)
        assert result.parameters == solo.parameters == 13_441


@pytest.mark.parametrize("pair_features", [False, True])
def test_stacked_models_checkpoint_and_export_like_solo_ones(
    split: Split, pair_features: bool, tmp_path: Path
) -> None:
    configs = [replace(BASE, dropout=d, epochs=2, pair_features=pair_features) for d in (0.2, 0)]
    for result in trained(train_stacked(split, configs)):
        model, config, _ = load_checkpoint(checkpoint_bytes(result, ("f",) * 39))
        assert config == result.config
        with torch.no_grad():
            scores = model(torch.from_numpy(split.x_test)).numpy()
        np.testing.assert_array_equal(scores, result.predict(split.x_test))
        path = tmp_path / f"model_{result.config.dropout}.onnx"
        export_onnx(result.model, path, split.x_test, {"source": "stacked"}, x_train=split.x_train)
        np.testing.assert_allclose(
            onnx_predict(path, split.x_test), result.predict(split.x_test), atol=1e-5
        )


def test_with_dropout_val_losses_match_solo_runs_statistically(split: Split) -> None:
    """Dropout masks differ from the solo run's; the outcome must not differ systematically.

    Per seed, the stacked and the solo run share the initial weights and the batch order, so
    their paired difference isolates the masks. Over the seeds its mean must be within 5
    standard errors of 0 (everything is seeded, so this is deterministic, not flaky); a wrong
    keep rate or scale (e.g. no 1 / (1 - p)) shifts it by many standard errors.
    """
    configs = [
        replace(BASE, dropout=0.2, learning_rate=0.003, epochs=5, patience=5),
        replace(BASE, dropout=0.4, learning_rate=0.001, epochs=5, patience=5),
    ]
    seeds = range(8)
    differences: list[list[float]] = [[] for _ in configs]
    spread: list[list[float]] = [[] for _ in configs]
    for seed in seeds:
        seeded = [replace(c, seed=seed) for c in configs]
        results = trained(train_stacked(split, seeded))
        for i, (mine, config) in enumerate(zip(results, seeded, strict=True)):
            solo = train_model(split, config)
            assert mine.epochs_run == solo.epochs_run == 5
            assert mine.history[0].val_loss != solo.history[0].val_loss, "masks differ"
            differences[i].append(mine.history[-1].val_loss - solo.history[-1].val_loss)
            spread[i].append(solo.history[-1].val_loss)
    for diffs, solos in zip(differences, spread, strict=True):
        mean, stderr = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
        assert abs(mean) <= 5 * stderr, (mean, stderr, diffs)
        # the masks matter about as much as the seed does, not orders of magnitude more
        assert statistics.stdev(diffs) <= 3 * statistics.stdev(solos) + 1e-4, (diffs, solos)


def test_a_diverging_member_fails_alone(split: Split) -> None:
    configs = [replace(BASE, learning_rate=lr, epochs=4) for lr in (0.001, 1e20, 0.003)]
    calls: list[tuple[int, EpochStats]] = []
    results = train_stacked(split, configs, on_epoch=lambda i, s: calls.append((i, s)))
    failed = results[1]
    assert isinstance(failed, TrainingError)
    with pytest.raises(TrainingError) as solo_error:
        train_model(split, configs[1])
    assert str(failed) == str(solo_error.value)
    assert str(failed).startswith("loss became non-finite at epoch 1 (train ")
    assert "with learning rate 1e+20; try a lower learning rate" in str(failed)
    assert all(i != 1 for i, _ in calls)
    for index in (0, 2):
        result = results[index]
        assert isinstance(result, TrainResult)
        assert_same_run(result, train_model(split, configs[index]), split)
        assert [s for i, s in calls if i == index] == result.history


#: Runs that differ in everything a stack lets them: batch size (micro-batches and gradients
#: added up), hidden sizes and depth (padding, identity layers), pair features (zero inputs),
#: epochs, patience and seed (their own batch order and initial weights).
UNLIKE = [
    replace(BASE, learning_rate=0.001, epochs=8),
    replace(BASE, learning_rate=0.03, batch_size=16, hidden_sizes=(64,), epochs=8),
    replace(BASE, learning_rate=0.005, batch_size=64, hidden_sizes=(96, 48, 32)),
    replace(BASE, learning_rate=0.002, batch_size=128, hidden_sizes=(200, 20), epochs=7),
    replace(BASE, learning_rate=0.004, seed=3, hidden_sizes=(50, 50, 50), epochs=8),
]
UNLIKE[2] = replace(UNLIKE[2], pair_features=True)
UNLIKE[3] = replace(UNLIKE[3], patience=2)
#: A dropout rate for each of them (0: one without).
DROPOUTS = (0.2, 0.0, 0.3, 0.1, 0.4)


def test_members_of_any_shape_batch_size_and_seed_equal_their_solo_runs(split: Split) -> None:
    results = trained(train_stacked(split, UNLIKE))
    assert len({c.batch_size for c in UNLIKE}) == 4 and len({c.hidden_sizes for c in UNLIKE}) == 5
    assert any(r.epochs_run < r.config.epochs for r in results), "precondition: one stops early"
    for result, config in zip(results, UNLIKE, strict=True):
        assert_same_run(result, train_model(split, config), split)
        assert_plain_model(result)
        assert result.parameters == train_model(split, replace(config, epochs=1)).parameters


def test_with_dropout_each_member_equals_its_run_alone_through_train_one(split: Split) -> None:
    """Each member draws its masks from its own stream, as a stack of one does: who trains
    beside it changes nothing, dropout included."""
    configs = [
        replace(c, dropout=p) for c, p in zip(UNLIKE, (0.2, 0.0, 0.3, 0.1, 0.4), strict=True)
    ]
    for result, config in zip(trained(train_stacked(split, configs)), configs, strict=True):
        assert_same_run(result, train_one(split, config), split)


def test_members_join_and_leave_at_any_epoch_and_equal_their_runs_alone(split: Split) -> None:
    """The search's way: members join a trainer epochs apart, are planned into stacks anew as
    they come and go (moving between stacks with their Adam state), and a callback stops one."""
    configs = [
        replace(c, dropout=p) for c, p in zip(UNLIKE, (0.2, 0.0, 0.3, 0.1, 0.4), strict=True)
    ]
    trainer = StackedTrainer(split)
    seen: list[tuple[int, int]] = []

    def watch(key: int) -> Any:
        def on_epoch(stats: EpochStats) -> bool:
            seen.append((key, stats.epoch))
            return key == 4 and stats.epoch == 3  # stop member 4 after its third epoch

        return on_epoch

    outcomes = {}
    joining = {0: [0], 1: [1, 2], 2: [3, 4]}  # epoch of the trainer -> members that join then
    epoch = 0
    while epoch in joining or trainer.active:
        for key in joining.get(epoch, []):
            trainer.add(key, configs[key], watch(key))
        for outcome in trainer.run_epoch():
            outcomes[outcome.key] = outcome
        epoch += 1
    stopped = outcomes[4]
    assert (stopped.result, stopped.error, stopped.stopped_at) == (None, None, 3)
    assert [s.epoch for s in stopped.history] == [1, 2, 3]
    assert [e for k, e in seen if k == 4] == [1, 2, 3]  # nothing after it stopped
    alone = train_one(split, configs[4])
    for mine, theirs in zip(stopped.history, alone.history, strict=False):
        assert mine.val_loss == pytest.approx(theirs.val_loss, rel=1e-6)
    for key in range(4):
        result = outcomes[key].result
        assert result is not None
        assert_same_run(result, train_one(split, configs[key]), split)


def test_members_that_step_together_then_apart_keep_their_own_adam_steps(split: Split) -> None:
    """Two members of one batch size join a stack of another at the same time: their step counts
    are equal there, and must stay their own when a plan moves them (a regression)."""
    configs = [
        replace(BASE, batch_size=16, hidden_sizes=(64,), learning_rate=0.004, epochs=5),
        replace(BASE, batch_size=32, learning_rate=0.002, epochs=5),
        replace(BASE, batch_size=32, learning_rate=0.003, epochs=5, hidden_sizes=(32, 32)),
    ]
    plans = iter([[[0, 1, 2]], [[0], [1, 2]], [[0, 1], [2]], [[0, 1, 2]]])

    def plan(configs_now: Any, *_: int) -> list[list[int]]:
        return next(plans, [list(range(len(configs_now)))])

    trainer = StackedTrainer(split, plan=plan)
    for key, config in enumerate(configs):
        trainer.add(key, config)
    results = {}
    while trainer.active:
        trainer._planned = False  # plan anew every epoch
        for outcome in trainer.run_epoch():
            results[outcome.key] = outcome.result
    for key, config in enumerate(configs):
        result = results[key]
        assert result is not None
        assert_same_run(result, train_model(split, config), split)


def test_the_plan_stacks_alike_runs_and_keeps_a_wide_one_apart() -> None:
    small = TrainConfig(batch_size=32, hidden_sizes=(64, 32), dropout=0.1)
    configs = [
        small,
        replace(small, learning_rate=0.01, dropout=0.3),
        replace(small, hidden_sizes=(48, 32)),
        replace(small, hidden_sizes=(512, 512, 512)),  # padding the others to it costs more
    ]
    plan = plan_stacks(configs, 39, 7000, 1500)
    assert plan == [[0, 1, 2], [3]]
    assert plan_stacks(configs, 39, 7000, 1500) == plan  # configurations only: no timings
    assert stacked.epoch_cost(configs[:3], 39, 7000, 1500) < 3 * stacked.epoch_cost(
        configs[:1], 39, 7000, 1500
    )


def test_learning_rate_and_dropout_may_differ(split: Split) -> None:
    configs = [replace(BASE, epochs=1), replace(BASE, learning_rate=0.01, dropout=0.3, epochs=1)]
    assert len(trained(train_stacked(split, configs))) == 2
    assert train_stacked(split, []) == []


def test_early_stopped_members_leave_the_stack_with_their_best_weights(
    split: Split, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = [
        replace(BASE, learning_rate=0.03, dropout=0.2, epochs=15, patience=2),
        replace(BASE, learning_rate=0.0005, dropout=0.1, epochs=15, patience=2),
        replace(BASE, learning_rate=0.05, dropout=0.3, epochs=15, patience=2),
    ]
    sizes: list[int] = []
    step = stacked._Stack._train_step

    def counting_step(self: stacked._Stack, *args: Any, **kwargs: Any) -> None:
        sizes.append(self.k)
        step(self, *args, **kwargs)

    monkeypatch.setattr(stacked._Stack, "_train_step", counting_step)
    calls: list[tuple[int, int]] = []
    results = trained(
        train_stacked(split, configs, on_epoch=lambda i, s: calls.append((i, s.epoch)))
    )
    stopped = [i for i, r in enumerate(results) if r.epochs_run < 15]
    assert stopped, "precondition: a member stops early"
    for index, result in enumerate(results):
        epochs = [epoch for i, epoch in calls if i == index]
        assert epochs == list(range(1, result.epochs_run + 1))  # nothing after it stopped
        if result.epochs_run < 15:
            assert result.epochs_run == result.best_epoch + 2
        best = result.history[result.best_epoch - 1]
        assert result.val_loss == pytest.approx(best.val_loss, rel=1e-6)
        assert_plain_model(result)
    # the stack shrank: 7 steps per epoch, with as many members as were still training
    expected = [sum(r.epochs_run >= e for r in results) for e in range(1, 16)]
    assert sizes == [k for k in expected if k > 0 for _ in range(7)]


def test_pair_features_stack(split: Split) -> None:
    configs = [
        replace(BASE, pair_features=True, learning_rate=lr, epochs=4) for lr in (0.001, 0.004)
    ]
    results = trained(train_stacked(split, configs))
    for result, config in zip(results, configs, strict=True):
        assert result.model.pair_features
        assert result.model.n_inputs == 39
        assert result.parameters == (39 + 12) * 128 + 128 + 128 * 64 + 64 + 64 + 1
        assert_same_run(result, train_model(split, config), split)


def test_unknown_device_is_a_config_error(split: Split) -> None:
    with pytest.raises(ConfigError):
        train_stacked(split, [BASE], device="tpu")


def test_a_stacked_run_with_dropout_is_deterministic(split: Split) -> None:
    configs = [replace(BASE, dropout=0.3, epochs=2), replace(BASE, dropout=0.1, epochs=2)]
    first, second = trained(train_stacked(split, configs)), trained(train_stacked(split, configs))
    for a, b in zip(first, second, strict=True):
        assert a.history == b.history
        np.testing.assert_array_equal(a.predict(split.x_val), b.predict(split.x_val))


# --- the private fused Adam kernel is checked before it is trusted -------------------------


def _same_results(a: list[TrainResult], b: list[TrainResult], split: Split) -> None:
    for mine, theirs in zip(a, b, strict=True):
        assert mine.history == theirs.history
        assert (mine.best_epoch, mine.test_loss) == (theirs.best_epoch, theirs.test_loss)
        np.testing.assert_array_equal(mine.predict(split.x_test), theirs.predict(split.x_test))


def _raises(*args: Any, **kwargs: Any) -> None:
    raise TypeError("_fused_adam_() got an unexpected keyword argument 'beta1'")


def _wrong(*args: Any, **kwargs: Any) -> None:
    real = torch._fused_adam_  # type: ignore[attr-defined]
    real(*args, **kwargs)
    args[0][0].mul_(1.5)  # the update 1.5 times too large: runs, but trains another model


@pytest.mark.skipif(not hasattr(torch, "_fused_adam_"), reason="this torch has no fused Adam")
@pytest.mark.parametrize("broken", [_raises, _wrong], ids=["raises-TypeError", "wrong-numbers"])
def test_a_broken_fused_adam_falls_back_to_the_hand_written_update(
    split: Split, monkeypatch: pytest.MonkeyPatch, broken: Any
) -> None:
    configs = [replace(BASE, learning_rate=lr, epochs=3) for lr in (0.001, 0.005)]
    monkeypatch.setattr(stacked, "_FUSED_ADAM", None)
    plain = trained(train_stacked(split, configs))

    calls: list[int] = []

    def fused(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        broken(*args, **kwargs)

    monkeypatch.setattr(stacked, "_FUSED_ADAM", fused)
    monkeypatch.setattr(stacked, "_FUSED_VERDICTS", {})
    _same_results(trained(train_stacked(split, configs)), plain, split)
    checked = len(calls)
    assert 1 <= checked <= 3  # tried on a tiny tensor, at first use
    _same_results(trained(train_stacked(split, configs)), plain, split)
    assert len(calls) == checked  # the verdict is kept for the process


@pytest.mark.skipif(not hasattr(torch, "_fused_adam_"), reason="this torch has no fused Adam")
def test_a_sound_fused_adam_is_used(split: Split, monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch._fused_adam_  # type: ignore[attr-defined]
    calls: list[int] = []

    def fused(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(stacked, "_FUSED_ADAM", fused)
    monkeypatch.setattr(stacked, "_FUSED_VERDICTS", {})
    trained(train_stacked(split, [replace(BASE, epochs=2)]))
    assert len(calls) >= 2 * 7  # one per batch (7 batches, 2 epochs), after the check


# --- time: each member's share -------------------------------------------------------------


def test_member_times_are_shares_that_add_up_to_the_stack_s_wall_time(split: Split) -> None:
    # lr 0.05 with patience 1 stops after a few epochs; lr 0.0001 trains all 12
    configs = [
        replace(BASE, learning_rate=lr, epochs=12, patience=1) for lr in (0.05, 0.001, 0.0001)
    ]
    started = time.perf_counter()
    results = trained(train_stacked(split, configs))
    measured = time.perf_counter() - started
    wall = results[0].stack_wall_time_s
    assert wall is not None
    assert 0 < wall <= measured
    for result in results:
        assert result.stack_size == 3
        assert result.stack_wall_time_s == wall
        assert 0 < result.training_time_s < wall
    assert math.fsum(r.training_time_s for r in results) == pytest.approx(wall, rel=1e-9)
    early, _, longest = results
    assert early.epochs_run < longest.epochs_run == 12
    assert early.training_time_s < longest.training_time_s  # it left the stack sooner


def test_a_stack_of_one_reports_its_plain_wall_time(split: Split) -> None:
    started = time.perf_counter()
    result = stacked.train_one(split, replace(BASE, epochs=3))
    measured = time.perf_counter() - started
    assert result.stack_size == 1
    assert result.training_time_s == result.stack_wall_time_s
    assert 0.5 * measured < result.training_time_s <= measured


def test_stacked_results_carry_the_mean_predictor_s_loss(split: Split) -> None:
    from calling_score_opt.train import mean_predictor_loss

    (result,) = trained(train_stacked(split, [replace(BASE, epochs=2)]))
    assert result.mean_predictor_val_loss == mean_predictor_loss(split)
