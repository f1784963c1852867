"""``cso search`` as a library and a command: trials stored, pruned, failed, resumed, shared."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from helpers import assert_clean_failure, cso_executable, files_under, write_json
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import FrozenTrial, TrialState

import calling_score_opt.stacked as stacked_module
from calling_score_opt.data import load_dataset, split_dataset
from calling_score_opt.errors import ConfigError, StudyError, TrainingError
from calling_score_opt.search import SearchSettings, run_search
from calling_score_opt.space import GRID_CHOICES, VARIANTS, baseline_params
from calling_score_opt.stacked import train_one
from calling_score_opt.study import (
    BASELINE_ATTR,
    CHECKPOINT_FILENAME,
    DATA_CACHE_DIR,
    LEARNING_CURVE_FILENAME,
    artifact_store,
    open_storage,
    read_checkpoint,
)
from calling_score_opt.train import TrainConfig, train_model
from calling_score_opt.trials import baseline_trial, learning_curve
from calling_score_opt.weights import read_checkpoint_bytes

EPOCHS = 2
PRUNE_EPOCHS = 8  # the median pruner waits 5 epochs (and 5 complete trials) before it prunes

BASELINE_GRID = {
    "learning_rate": 0.001,
    "batch_size": 32,
    "hidden_sizes": "128,64",
    "dropout": 0.2,
    "pair_features": False,
}
BASELINE_CONTINUOUS = {
    "learning_rate": 0.001,
    "batch_size": 32,
    "n_layers": 2,
    "units_l0": 128,
    "units_l1": 64,
    "dropout": 0.2,
    "pair_features": False,
}


def _grid(lr: float, batch: int, hidden: str, dropout: float) -> dict[str, Any]:
    return {
        "learning_rate": lr,
        "batch_size": batch,
        "hidden_sizes": hidden,
        "dropout": dropout,
        "pair_features": False,
    }


#: Four configurations that learn fast on the tiny data (val ~0.012 at epoch 5) and one that
#: barely moves in 5 epochs (val ~0.09): the median pruner must stop the last one.
GOOD = [
    _grid(0.005, 16, "128,64", 0.1),
    _grid(0.002, 16, "128,64", 0.2),
    _grid(0.005, 32, "128,64", 0.1),
    _grid(0.002, 32, "256,128", 0.2),
]
BAD = _grid(0.0001, 128, "96,48", 0.4)


def settings_in(root: Path, data: Path, **changes: Any) -> SearchSettings:
    """Search settings with the study under ``root`` (absolute), tiny and inline by default."""
    values: dict[str, Any] = {
        "data_path": data,
        "trials": 4,
        "epochs": EPOCHS,
        "jobs": 1,
        "study_name": "search",
        "storage_url": f"sqlite:///{root}/studies/search.db",
    }
    values.update(changes)
    return SearchSettings(**values)


def load(settings: SearchSettings) -> optuna.Study:
    return optuna.load_study(study_name=settings.study_name, storage=settings.storage)


def finished(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def states(trials: list[FrozenTrial]) -> list[str]:
    return [t.state.name for t in trials]


def assert_no_repeated_configuration(trials: list[FrozenTrial]) -> None:
    """No two trials hold the same parameters (training is deterministic: a copy is waste)."""
    configs = [tuple(sorted(t.params.items())) for t in trials if t.params]
    repeated = {c for c in configs if configs.count(c) > 1}
    assert not repeated, f"repeated configurations: {repeated}"


# --- one study with a pruned trial, shared by the module's read-only tests ------------------


@pytest.fixture(scope="module")
def pruned_search(tmp_path_factory: pytest.TempPathFactory, synth_file: Path) -> SearchSettings:
    """Grid space, 8 epochs: the baseline, 4 good trials, 1 bad one (pruned), 2 sampled."""
    root = tmp_path_factory.mktemp("search")
    settings = settings_in(root, synth_file, trials=1, space="grid", epochs=PRUNE_EPOCHS)
    run_search(settings)
    study = load(settings)
    for params in [*GOOD, BAD]:
        study.enqueue_trial(params)
    settings = settings_in(root, synth_file, trials=8, space="grid", epochs=PRUNE_EPOCHS)
    outcome = run_search(settings)
    assert outcome.finished == 8
    return settings


@pytest.fixture(scope="module")
def pruned_trials(pruned_search: SearchSettings) -> list[FrozenTrial]:
    return load(pruned_search).get_trials()


def test_search_stores_exactly_n_finished_trials(
    pruned_search: SearchSettings, pruned_trials: list[FrozenTrial]
) -> None:
    assert len(finished(pruned_trials)) == 8
    assert len(pruned_trials) == 8  # nothing failed, nothing left running
    assert [t.number for t in pruned_trials] == list(range(8))


def test_the_first_trial_is_the_baseline_grid(pruned_trials: list[FrozenTrial]) -> None:
    first = pruned_trials[0]
    assert first.number == 0
    assert first.state == TrialState.COMPLETE
    assert first.params == BASELINE_GRID
    assert first.user_attrs["hidden_sizes"] == [128, 64]
    assert first.user_attrs["parameters"] == 13_441
    assert baseline_params("grid") == BASELINE_GRID
    assert {**VARIANTS[0].params(), "pair_features": False} == BASELINE_GRID


def test_grid_space_params_are_documented_choices(pruned_trials: list[FrozenTrial]) -> None:
    for trial in pruned_trials:
        assert set(trial.params) == {*GRID_CHOICES, "pair_features"}
        for name, choices in GRID_CHOICES.items():
            assert trial.params[name] in choices, (trial.number, name)
        assert trial.params["pair_features"] in (False, True)
        expected = [int(s) for s in trial.params["hidden_sizes"].split(",")]
        assert trial.user_attrs["hidden_sizes"] == expected


def test_a_bad_configuration_is_pruned(pruned_trials: list[FrozenTrial]) -> None:
    bad, good = pruned_trials[5], pruned_trials[:5]
    assert bad.params == BAD
    assert bad.state == TrialState.PRUNED
    at = bad.user_attrs["pruned_at_epoch"]
    assert 5 <= at < PRUNE_EPOCHS
    assert sorted(bad.intermediate_values) == list(range(1, at + 1))
    assert len(bad.intermediate_values) < PRUNE_EPOCHS
    assert bad.values == [bad.intermediate_values[at]]  # Optuna keeps the last reported value
    assert bad.intermediate_values[at] > 2 * max(t.intermediate_values[at] for t in good)
    assert "val_loss" not in bad.user_attrs
    assert "test_loss" not in bad.user_attrs
    for trial in good:
        assert trial.state == TrialState.COMPLETE
        assert "pruned_at_epoch" not in trial.user_attrs
    for trial in pruned_trials:
        if trial.state == TrialState.PRUNED:
            assert trial.user_attrs["pruned_at_epoch"] == len(trial.intermediate_values)
            assert trial.user_attrs["pruned_at_epoch"] < PRUNE_EPOCHS


def test_complete_trials_report_every_epoch_and_return_val_loss(
    pruned_search: SearchSettings, pruned_trials: list[FrozenTrial]
) -> None:
    storage = open_storage(pruned_search.storage)
    store = artifact_store(pruned_search.artifacts)
    complete = [t for t in pruned_trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 5
    for trial in complete:
        attrs = trial.user_attrs
        assert len(trial.values) == 1
        assert trial.values[0] == attrs["val_loss"]  # the objective is validation loss ...
        assert 0.0 < attrs["test_loss"] < 0.25  # ... and test loss is recorded, for people
        assert attrs["test_loss"] != attrs["val_loss"]
        assert 0.0 < attrs["train_loss"] < 0.25
        assert sorted(trial.intermediate_values) == list(range(1, attrs["epochs_run"] + 1))
        # the value is the restored best epoch's validation loss
        assert trial.values[0] == pytest.approx(min(trial.intermediate_values.values()), rel=1e-6)
        assert trial.intermediate_values[attrs["best_epoch"]] == pytest.approx(
            trial.values[0], rel=1e-6
        )
        assert attrs["epochs_run"] == PRUNE_EPOCHS
        curve = learning_curve(trial, storage, store)
        assert curve is not None
        assert curve.epoch == tuple(range(1, PRUNE_EPOCHS + 1))
        assert list(curve.val_loss) == [trial.intermediate_values[e] for e in curve.epoch]
        assert len(curve.train_loss) == PRUNE_EPOCHS
        assert "train_losses" not in attrs  # long lists stay out of `optuna trials`
        assert attrs["seed"] == 0
        assert attrs["training_time_s"] >= 0


def test_every_complete_trial_has_its_checkpoint_under_the_default_folder(
    pruned_search: SearchSettings, pruned_trials: list[FrozenTrial]
) -> None:
    storage = open_storage(pruned_search.storage)
    db = Path(pruned_search.storage.removeprefix("sqlite:///"))
    folder = db.with_name("search.artifacts")
    assert pruned_search.artifacts == folder
    for trial in pruned_trials:
        metas = get_all_artifact_meta(trial, storage=storage)
        names = sorted(m.filename for m in metas)
        if trial.state == TrialState.COMPLETE:
            assert names == [LEARNING_CURVE_FILENAME, CHECKPOINT_FILENAME]
        else:  # a pruned trial keeps its curve so far, and no weights
            assert names == [LEARNING_CURVE_FILENAME]
        assert all((folder / m.artifact_id).is_file() for m in metas)
    complete = sum(t.state == TrialState.COMPLETE for t in pruned_trials)
    artifacts = [f for f in files_under(folder) if f.parent.name != DATA_CACHE_DIR]
    assert len(artifacts) == complete + len(pruned_trials)
    assert len(list((folder / DATA_CACHE_DIR).glob("parsed-data-*.npz"))) == 1  # the parse


# --- the continuous space ------------------------------------------------------------------


def test_continuous_search_starts_at_the_baseline_and_stays_in_range(
    tmp_path: Path, synth_file: Path
) -> None:
    settings = settings_in(tmp_path, synth_file, trials=10, sampler="random")
    outcome = run_search(settings)
    assert outcome.finished == 10
    trials = load(settings).get_trials()
    assert len(finished(trials)) == 10
    assert trials[0].params == BASELINE_CONTINUOUS
    assert trials[0].user_attrs["hidden_sizes"] == [128, 64]
    assert baseline_params("continuous") == BASELINE_CONTINUOUS
    for trial in trials:
        p = trial.params
        assert 1e-4 <= p["learning_rate"] <= 1e-2
        assert p["batch_size"] in GRID_CHOICES["batch_size"]
        assert 1 <= p["n_layers"] <= 3
        units = [p[f"units_l{i}"] for i in range(p["n_layers"])]
        assert all(16 <= u <= 512 for u in units)
        assert not any(f"units_l{i}" in p for i in range(p["n_layers"], 3))
        assert trial.user_attrs["hidden_sizes"] == units
        assert 0.0 <= p["dropout"] <= 0.5
        assert p["pair_features"] in (False, True)
    # the random sampler really explores: not every trial is the baseline again
    assert len({t.params["learning_rate"] for t in trials}) == 10


# --- resuming, seeds and worker processes --------------------------------------------------


def test_resume_adds_only_the_missing_trials(tmp_path: Path, synth_file: Path) -> None:
    run_search(settings_in(tmp_path, synth_file, trials=4))
    before = load(settings_in(tmp_path, synth_file)).get_trials()
    assert len(finished(before)) == len(before) == 4

    outcome = run_search(settings_in(tmp_path, synth_file, trials=6))
    assert outcome.finished == 6
    after = load(settings_in(tmp_path, synth_file)).get_trials()
    assert len(finished(after)) == len(after) == 6
    for old, new in zip(before, after[:4], strict=True):
        assert (new.number, new.state, new.params) == (old.number, old.state, old.params)
        assert new.values == old.values
        assert new.user_attrs == old.user_attrs
        assert new.datetime_complete == old.datetime_complete  # not retrained

    # asking for what the study already holds trains nothing
    again = run_search(settings_in(tmp_path, synth_file, trials=6))
    assert again.finished == 6
    assert len(load(settings_in(tmp_path, synth_file)).get_trials()) == 6


def test_the_same_seed_gives_the_same_trials(tmp_path: Path, synth_file: Path) -> None:
    def sequence(name: str, seed: int) -> list[tuple[Any, ...]]:
        settings = settings_in(
            tmp_path, synth_file, trials=4, seed=seed, study_name=name, storage_url=None
        )
        run_search(settings)
        return [(t.number, t.state, t.params, t.values) for t in load(settings).get_trials()]

    first = sequence("a", 3)
    assert first == sequence("b", 3)
    other = sequence("c", 4)
    assert other[0][2] == first[0][2]  # the baseline is always first
    assert [t[2] for t in other[1:]] != [t[2] for t in first[1:]]


def test_two_worker_processes_share_the_default_sqlite_storage(
    tmp_path: Path, synth_file: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = settings_in(tmp_path, synth_file, trials=6, jobs=2, storage_url=None)
    assert settings.storage == "sqlite:///studies/search.db"
    outcome = run_search(settings)
    assert outcome.finished == 6
    assert outcome.counts.get("FAIL", 0) == 0
    trials = load(settings).get_trials()
    assert len(trials) == 6
    assert len(finished(trials)) == 6
    assert trials[0].params == BASELINE_CONTINUOUS
    assert (tmp_path / "studies" / "search.db").is_file()
    folder = tmp_path / "studies" / "search.artifacts"  # the workers' stored weights, too
    storage = open_storage(settings.storage)
    for trial in trials:
        metas = get_all_artifact_meta(trial, storage=storage)
        expected = 2 if trial.state == TrialState.COMPLETE else 1  # weights only when complete
        assert len(metas) == expected, trial.number
        assert all((folder / m.artifact_id).is_file() for m in metas)
    assert_no_repeated_configuration(trials)
    output = capfd.readouterr()
    logs = output.out + output.err
    assert "database is locked" not in logs
    assert "Traceback" not in logs


def test_resume_never_repeats_a_configuration(tmp_path: Path, synth_file: Path) -> None:
    """A resumed study draws new configurations (its sampler is not replaying old draws)."""
    run_search(settings_in(tmp_path, synth_file, trials=4, sampler="random"))
    run_search(settings_in(tmp_path, synth_file, trials=8, sampler="random"))
    trials = load(settings_in(tmp_path, synth_file)).get_trials()
    assert len(finished(trials)) == 8
    assert_no_repeated_configuration(trials)


def test_two_cso_search_processes_on_one_study_never_repeat(
    tmp_path: Path, synth_file: Path
) -> None:
    """Two separate ``cso search`` commands (two machines, say) with the same seed on one
    study: every trial they run together is a new configuration, and they stop at N."""
    db = tmp_path / "shared.db"
    command = [
        cso_executable(),
        "search",
        "--trials=8",
        "--sampler=random",
        "--epochs=2",
        f"--data-path={synth_file}",
        "--study=shared",
        f"--storage=sqlite:///{db}",
        "--quiet",
    ]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [p.communicate(timeout=240)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    trials = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}").get_trials()
    assert len(finished(trials)) == 8
    assert_no_repeated_configuration(trials)


# --- the baseline ----------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in cso catches it, the trial is left RUNNING."""


#: A fifth good configuration, so that the median pruner (5 startup trials) is active.
GOOD_FIFTH = _grid(0.005, 16, "256,128", 0.1)


def _fail_training(monkeypatch: pytest.MonkeyPatch, exc: BaseException, calls: int = 1) -> None:
    """The first ``calls`` epochs of training (of whichever trials run) raise ``exc``."""
    real = stacked_module.StackedTrainer.run_epoch
    seen: list[int] = []

    def run_epoch(self: stacked_module.StackedTrainer) -> Any:
        seen.append(1)
        if len(seen) <= calls:
            raise exc
        return real(self)

    monkeypatch.setattr(stacked_module.StackedTrainer, "run_epoch", run_epoch)


def _diverge(monkeypatch: pytest.MonkeyPatch, trial_numbers: set[int] | None) -> None:
    """The training loss of these trials (all: None) becomes NaN in their first epoch, as a
    diverging run's does: the trainer fails them with its own message."""
    real = stacked_module._Stack.train_epoch

    def train_epoch(self: stacked_module._Stack, data: Any) -> list[float]:
        losses = real(self, data)
        return [
            math.nan if trial_numbers is None or member.key in trial_numbers else loss
            for member, loss in zip(self.members, losses, strict=True)
        ]

    monkeypatch.setattr(stacked_module._Stack, "train_epoch", train_epoch)


def test_a_baseline_killed_mid_trial_survives_its_retry_and_is_never_pruned(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CSO_HEARTBEAT_INTERVAL", "1")  # stale after 4 s
    with monkeypatch.context() as patch:
        _fail_training(patch, Killed())
        with pytest.raises(Killed):
            run_search(
                settings_in(tmp_path, synth_file, trials=1, space="grid", epochs=PRUNE_EPOCHS)
            )
    settings = settings_in(tmp_path, synth_file, trials=6, space="grid", epochs=PRUNE_EPOCHS)
    study = load(settings)
    assert states(study.get_trials()) == ["RUNNING"]
    time.sleep(4.5)  # the heartbeat goes stale; the next run fails the trial and retries it
    for params in [*GOOD, GOOD_FIFTH]:
        study.enqueue_trial(params)
    run_search(settings)

    trials = load(settings).get_trials()
    assert trials[0].state == TrialState.FAIL
    retried = [t for t in trials if t.params == BASELINE_GRID and t.number > 0]
    assert len(retried) == 1
    assert retried[0].number == 6  # after the five good ones: the median pruner was active
    baseline = baseline_trial(load(settings))
    assert baseline is not None
    assert baseline.number == retried[0].number
    assert baseline.state == TrialState.COMPLETE  # run to the end, never pruned
    assert baseline.user_attrs[BASELINE_ATTR] is True
    assert baseline.user_attrs["epochs_run"] == PRUNE_EPOCHS
    # ... although the pruner would have stopped it: it is worse than the median of the others
    others = [t for t in trials if t.state == TrialState.COMPLETE and t.number != baseline.number]
    at = 5
    median = sorted(t.intermediate_values[at] for t in others)[len(others) // 2]
    assert baseline.intermediate_values[at] > median


def test_ctrl_c_fails_every_running_trial_at_once_and_queues_them_again(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_in(tmp_path, synth_file, trials=2)
    with monkeypatch.context() as patch:
        _fail_training(patch, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            run_search(settings)
    trials = load(settings).get_trials()
    # both trials were training (together): both failed, both queued again, none RUNNING
    assert states(trials) == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert all(t.user_attrs["error"].startswith("interrupted") for t in trials[:2])
    assert [t.params for t in trials[2:]] == [t.params for t in trials[:2]]
    assert trials[2].params == BASELINE_CONTINUOUS
    assert trials[2].user_attrs[BASELINE_ATTR] is True
    assert all("error" not in t.user_attrs for t in trials[2:])

    started = time.monotonic()
    run_search(settings)
    assert time.monotonic() - started < 15  # no wait for a grace period
    trials = load(settings).get_trials()
    assert states(trials) == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    baseline = baseline_trial(load(settings))
    assert baseline is not None and baseline.number == 2


def test_every_running_trial_keeps_its_heartbeat(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several trials train at once: each one's heartbeat goes on while they train, so none of
    them looks dead to another worker, however long an epoch takes."""
    from optuna.storages import fail_stale_trials

    monkeypatch.setenv("CSO_HEARTBEAT_INTERVAL", "1")  # stale after 4 s of silence
    settings = settings_in(tmp_path, synth_file, trials=3)
    real = stacked_module.StackedTrainer.run_epoch
    looked: list[list[str]] = []

    def slow_epoch(self: stacked_module.StackedTrainer) -> Any:
        if not looked:
            time.sleep(5)  # longer than the grace period
            other = optuna.load_study(study_name=settings.study_name, storage=settings.storage)
            with pytest.warns(optuna.exceptions.ExperimentalWarning):
                fail_stale_trials(other)  # what another worker would do
            looked.append(states(other.get_trials()))
        return real(self)

    monkeypatch.setattr(stacked_module.StackedTrainer, "run_epoch", slow_epoch)
    run_search(settings)
    assert looked == [["RUNNING"] * 3]  # all three trained at once, none failed as stale
    assert states(load(settings).get_trials()) == ["COMPLETE"] * 3


# --- failures ------------------------------------------------------------------------------


def test_a_failing_trial_is_recorded_and_the_search_still_reaches_n(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _diverge(monkeypatch, {1})  # the first trial after the baseline
    settings = settings_in(tmp_path, synth_file, trials=3)
    outcome = run_search(settings)
    assert outcome.finished == 3
    assert outcome.counts == {"COMPLETE": 3, "FAIL": 1}
    trials = load(settings).get_trials()
    assert states(trials) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    failed = trials[1]
    assert failed.user_attrs["error"].startswith("loss became non-finite at epoch 1 (train nan")
    assert failed.values is None
    assert get_all_artifact_meta(failed, storage=open_storage(settings.storage)) == []


def test_an_unexpected_error_fails_the_trials_it_hit_and_the_search_goes_on(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = stacked_module._Stack.train_epoch

    def out_of_memory(self: stacked_module._Stack, data: Any) -> list[float]:
        if any(m.config.learning_rate == 0.001 for m in self.members):  # the baseline's stack
            raise RuntimeError("CUDA out of memory")
        return real(self, data)

    monkeypatch.setattr(stacked_module._Stack, "train_epoch", out_of_memory)
    settings = settings_in(tmp_path, synth_file, trials=2)
    run_search(settings)
    trials = load(settings).get_trials()
    assert trials[0].state == TrialState.FAIL  # the baseline
    assert trials[0].user_attrs["error"] == "RuntimeError: CUDA out of memory"
    assert len(finished(trials)) == 2


def test_a_search_where_every_trial_fails_stops_with_an_error(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _diverge(monkeypatch, None)
    settings = settings_in(tmp_path, synth_file, trials=1)
    with pytest.raises(TrainingError, match="trials failed in this run"):
        run_search(settings)
    trials = load(settings).get_trials()
    assert trials
    assert all(t.state == TrialState.FAIL for t in trials)
    assert all(t.user_attrs["error"].startswith("loss became non-finite") for t in trials)


# --- stacked trials equal their runs alone -------------------------------------------------


def _continuous(lr: float, batch: int, units: tuple[int, ...], dropout: float) -> dict[str, Any]:
    return {
        "learning_rate": lr,
        "batch_size": batch,
        "n_layers": len(units),
        **{f"units_l{i}": u for i, u in enumerate(units)},
        "dropout": dropout,
        "pair_features": False,
    }


def test_trials_trained_together_equal_their_runs_alone(tmp_path: Path, synth_file: Path) -> None:
    """A search trains several trials as one stack; each trial's losses, epochs and stored
    weights are still those of its run alone: with dropout 0 those of train_model (the plain
    autograd loop), with dropout those of train_one (the same masks)."""
    settings = settings_in(tmp_path, synth_file, trials=1, epochs=6)
    run_search(settings)  # the baseline, alone
    study = load(settings)
    configs = [
        _continuous(0.003, 32, (128, 64), 0.0),
        _continuous(0.002, 32, (96, 40), 0.0),
        _continuous(0.004, 32, (64,), 0.0),
        _continuous(0.001, 16, (128, 64, 32), 0.0),
        _continuous(0.005, 32, (80, 60), 0.25),
    ]
    for params in configs:
        study.enqueue_trial(params)
    run_search(settings_in(tmp_path, synth_file, trials=6, epochs=6))
    trials = load(settings).get_trials()[1:]
    assert states(trials) == ["COMPLETE"] * 5
    assert max(t.user_attrs["stack_size"] for t in trials) > 1, "precondition: stacked"
    split = split_dataset(load_dataset(synth_file), settings.seed)
    store, storage = artifact_store(settings.artifacts), open_storage(settings.storage)
    for trial in trials:
        config = TrainConfig(
            learning_rate=trial.params["learning_rate"],
            batch_size=trial.params["batch_size"],
            hidden_sizes=tuple(trial.user_attrs["hidden_sizes"]),
            dropout=trial.params["dropout"],
            epochs=6,
        )
        alone = train_model(split, config) if config.dropout == 0 else train_one(split, config)
        attrs = trial.user_attrs
        assert (attrs["best_epoch"], attrs["epochs_run"]) == (alone.best_epoch, alone.epochs_run)
        for name in ("val_loss", "test_loss", "train_loss"):
            assert attrs[name] == pytest.approx(getattr(alone, name), rel=1e-5), name
        for stats in alone.history:
            assert trial.intermediate_values[stats.epoch] == pytest.approx(stats.val_loss, rel=1e-6)
        weights = read_checkpoint_bytes(read_checkpoint(store, storage, trial)).weights
        np.testing.assert_allclose(
            weights.predict(split.x_test), alone.predict(split.x_test), rtol=0, atol=1e-5
        )


# --- several objectives --------------------------------------------------------------------


@pytest.mark.parametrize("objectives", ["val_loss,params", "val_loss,latency"])
def test_two_objectives_give_two_values_and_no_pruning(
    tmp_path: Path, synth_file: Path, objectives: str
) -> None:
    settings = settings_in(tmp_path, synth_file, trials=6, epochs=6, objectives=objectives)
    run_search(settings)
    study = load(settings)
    assert len(study.directions) == 2
    trials = study.get_trials()
    assert states(trials) == ["COMPLETE"] * 6  # Optuna cannot prune on several objectives
    for trial in trials:
        assert len(trial.values) == 2
        assert trial.values[0] == trial.user_attrs["val_loss"]
        assert trial.intermediate_values == {}
        if objectives == "val_loss,params":
            assert trial.values[1] == trial.user_attrs["parameters"]
        else:
            assert trial.values[1] == trial.user_attrs["latency_ms"]
            assert math.isfinite(trial.values[1]) and trial.values[1] > 0
    if objectives == "val_loss,params":
        assert trials[0].values[1] == 13_441  # the baseline's parameter count
    # optuna-dashboard and Optuna's plots name the objectives instead of "Objective 0"
    assert study.metric_names == objectives.split(",")


# --- samplers ------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["tpe", "gp", "cmaes", "random"])
def test_every_sampler_runs_a_short_search(tmp_path: Path, synth_file: Path, sampler: str) -> None:
    settings = settings_in(tmp_path, synth_file, trials=3, sampler=sampler)
    outcome = run_search(settings)
    assert outcome.finished == 3
    trials = load(settings).get_trials()
    assert states(trials) == ["COMPLETE"] * 3
    assert trials[0].params == BASELINE_CONTINUOUS


# --- data and settings ---------------------------------------------------------------------


def test_pair_features_are_not_searched_on_data_without_the_app_features(
    tmp_path: Path,
) -> None:
    csv = _csv(tmp_path)
    settings = settings_in(tmp_path, csv, trials=3, target="score")
    run_search(settings)
    study = load(settings)
    assert study.user_attrs["pair_features"] == "off"
    trials = study.get_trials()
    assert states(trials) == ["COMPLETE"] * 3
    assert all("pair_features" not in t.params for t in trials)
    assert trials[0].params == {
        k: v for k, v in BASELINE_CONTINUOUS.items() if k != "pair_features"
    }
    with pytest.raises(ConfigError, match="pair_features needs the app's 39 features"):
        run_search(settings_in(tmp_path, csv, trials=3, target="score", pair_features="on"))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"space": "grid"}, "space = 'continuous', this run has 'grid'"),
        ({"epochs": 3}, "epochs = 2, this run has 3"),
        ({"seed": 1}, "split_seed = 0, this run has 1"),
        ({"pair_features": "off"}, "pair_features = 'search', this run has 'off'"),
        ({"objectives": "val_loss,params"}, "has 1 objective(s)"),
    ],
    ids=["space", "epochs", "seed", "pair-features", "objectives"],
)
def test_a_study_refuses_other_settings(
    tmp_path: Path, synth_file: Path, changes: dict[str, Any], fragment: str
) -> None:
    run_search(settings_in(tmp_path, synth_file, trials=1))
    with pytest.raises(StudyError, match="--study NEW_NAME") as caught:
        run_search(settings_in(tmp_path, synth_file, trials=2, **changes))
    assert fragment in str(caught.value)
    assert len(load(settings_in(tmp_path, synth_file)).get_trials()) == 1


def test_a_study_refuses_other_data(
    tmp_path: Path, synth_file: Path, synth_file_other: Path
) -> None:
    run_search(settings_in(tmp_path, synth_file, trials=1))
    with pytest.raises(StudyError, match="data_fingerprint"):
        run_search(settings_in(tmp_path, synth_file_other, trials=2))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"sampler": "nope"}, "--sampler must be one of tpe, gp, cmaes, random"),
        ({"pruner": "nope"}, "--pruner must be one of median, hyperband, none"),
        ({"objectives": "x"}, "--objectives must be one of"),
        ({"space": "cube"}, "--space must be one of continuous, grid"),
        ({"pair_features": "maybe"}, "--pair-features must be one of search, on, off"),
        ({"trials": 0}, "--trials must be at least 1"),
        ({"jobs": 0}, "--jobs must be at least 1"),
        ({"timeout": 0}, "--timeout must be a positive number"),
    ],
)
def test_bad_settings_are_refused(
    tmp_path: Path, synth_file: Path, changes: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_in(tmp_path, synth_file, **changes)
    assert fragment in str(caught.value)


# --- the command line ----------------------------------------------------------------------


def _csv(folder: Path) -> Path:
    rows = [
        f"u{i},{i % 13 / 13:.4f},{i % 7 / 7:.4f},{(i % 13 / 13 + i % 7 / 7) / 2:.4f}"
        for i in range(60)
    ]
    path = folder / "t.csv"
    path.write_text("user,a,b,score\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def _search(run_cli: Any, data: Path | str, *extra: str) -> Any:
    return run_cli(
        "search", "--data-path", data, "--trials", "3", "--epochs", str(EPOCHS), "--quiet", *extra
    )


def test_search_command_prints_counts_and_the_best_trial(
    run_cli: Any, data_copy: Path, tmp_path: Path
) -> None:
    result = _search(run_cli, data_copy)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Study 'calling-score-search' in sqlite:///studies/calling-score-search.db" in out
    assert "3 complete" in out
    assert "Best trial (lowest validation loss)" in out
    assert result.stderr == ""
    study = optuna.load_study(
        study_name="calling-score-search",
        storage="sqlite:///studies/calling-score-search.db",
    )
    best = min(study.get_trials(), key=lambda t: t.values[0])
    assert f"{best.values[0]:.5f}" in out
    assert (tmp_path / "studies" / "calling-score-search.artifacts").is_dir()

    again = _search(run_cli, data_copy, "--trials", "4")
    assert again.exit_code == 0, again.output
    assert "4 complete" in again.stdout
    assert len(study.get_trials()) == 4


def test_search_command_with_two_objectives_prints_the_pareto_front(
    run_cli: Any, data_copy: Path
) -> None:
    result = _search(run_cli, data_copy, "--objectives", "val_loss,params", "--study", "mo")
    assert result.exit_code == 0, result.output
    assert "Pareto front (validation loss vs parameters)" in result.stdout


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (("--sampler", "nope"), ("--sampler must be one of", "'nope'")),
        (("--pruner", "nope"), ("--pruner must be one of", "'nope'")),
        (("--objectives", "x"), ("--objectives must be one of", "'x'")),
        (("--space", "cube"), ("--space must be one of",)),
        (("--study", "no spaces"), ("study name 'no spaces'",)),
        (("--device", "tpu"), ("--device must be cpu, cuda or auto",)),
    ],
    ids=["sampler", "pruner", "objectives", "space", "study", "device"],
)
def test_search_bad_options_fail_cleanly(
    run_cli: Any,
    data_copy: Path,
    tmp_path: Path,
    options: tuple[str, ...],
    fragments: tuple[str, ...],
) -> None:
    result = _search(run_cli, data_copy, *options)
    assert_clean_failure(result, *fragments)
    assert files_under(tmp_path) == [data_copy]  # no study, no weights


def test_search_pair_features_on_with_csv_data_fails_cleanly(run_cli: Any, tmp_path: Path) -> None:
    csv = _csv(tmp_path)
    result = _search(run_cli, csv, "--target", "score", "--pair-features", "on")
    assert_clean_failure(result, "pair_features needs the app's 39 features")
    assert files_under(tmp_path) == [csv]

    default = _search(run_cli, csv, "--target", "score")
    assert default.exit_code == 0, default.output
    assert "3 complete" in default.stdout
    assert "pair_features" not in default.stdout


@pytest.mark.parametrize(
    ("rerun", "fragments"),
    [
        (("--space", "grid"), ("space = 'continuous', this run has 'grid'", "--study")),
        (("--objectives", "val_loss,params"), ("has 1 objective(s)", "--study")),
        (("--data-path", "OTHER"), ("data_fingerprint", "--study")),
    ],
    ids=["space", "objectives", "data"],
)
def test_search_rerun_with_other_settings_fails_cleanly(
    run_cli: Any,
    data_copy: Path,
    synth_file_other: Path,
    rerun: tuple[str, ...],
    fragments: tuple[str, ...],
) -> None:
    first = _search(run_cli, data_copy, "--trials", "1")
    assert first.exit_code == 0, first.output
    args = tuple(str(synth_file_other) if a == "OTHER" else a for a in rerun)
    result = _search(run_cli, data_copy, *args)
    assert_clean_failure(result, "study 'calling-score-search'", *fragments)


def test_search_on_untrainable_data_fails_cleanly(run_cli: Any, tmp_path: Path) -> None:
    path = write_json(tmp_path / "empty.json", {"training_data": []})
    result = _search(run_cli, path)
    assert_clean_failure(result, "empty.json", "contains no records")
    assert not (tmp_path / "studies").exists()


def test_a_storage_error_mid_trial_fails_the_trial_at_once_and_queues_it_again(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error from outside the trial (the database, the disk) ends the search, but does not
    leave its trial RUNNING for the next run to wait on."""
    from optuna.exceptions import StorageInternalError

    real = optuna.Trial.report
    calls: list[int] = []

    def flaky(self: optuna.Trial, value: float, step: int) -> None:
        calls.append(step)
        if len(calls) == 2:
            raise StorageInternalError("the database went away")
        real(self, value, step)

    monkeypatch.setattr(optuna.Trial, "report", flaky)
    settings = settings_in(tmp_path, synth_file, trials=2)
    with pytest.raises(StorageInternalError):
        run_search(settings)
    trials = load(settings).get_trials()
    assert states(trials) == ["FAIL", "FAIL", "WAITING", "WAITING"]  # both that were training
    for trial in trials[:2]:
        error = trial.user_attrs["error"]
        assert error == "stopped by StorageInternalError: the database went away"
    assert trials[2].user_attrs[BASELINE_ATTR] is True  # the retry is still the baseline
