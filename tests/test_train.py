"""One training run: early stopping, best weights, determinism, divergence, callbacks."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from calling_score_opt.data import Split
from calling_score_opt.errors import ConfigError, TrainingError
from calling_score_opt.train import (
    EpochStats,
    TrainConfig,
    TrainResult,
    checkpoint_bytes,
    load_checkpoint,
    mean_predictor_loss,
    prediction_errors,
    resolve_device,
    train_model,
)

# lr 0.01 overfits 140 records within a few epochs: with patience 3 the run stops early.
EARLY_STOP = TrainConfig(learning_rate=0.01, batch_size=16, epochs=60, patience=3, seed=0)


@pytest.fixture(scope="module")
def early_stopped(tiny_split: Split) -> TrainResult:
    return train_model(tiny_split, EARLY_STOP)


def test_early_stopping_stops_patience_epochs_after_the_best(early_stopped: TrainResult) -> None:
    result = early_stopped
    assert result.epochs_run < EARLY_STOP.epochs, "precondition: the run must stop early"
    assert result.epochs_run == result.best_epoch + EARLY_STOP.patience
    assert len(result.history) == result.epochs_run
    assert [s.epoch for s in result.history] == list(range(1, result.epochs_run + 1))
    vals = [s.val_loss for s in result.history]
    assert result.best_epoch == 1 + int(np.argmin(vals))
    # the epochs after the best were all worse
    assert all(v >= vals[result.best_epoch - 1] for v in vals[result.best_epoch :])


def test_early_stopping_restores_the_best_epochs_weights(
    early_stopped: TrainResult, tiny_split: Split
) -> None:
    result = early_stopped
    best = result.history[result.best_epoch - 1]
    last = result.history[-1]
    assert last.val_loss > best.val_loss + 1e-6, "precondition: the last epoch was worse"
    assert result.val_loss == pytest.approx(best.val_loss, abs=1e-6)
    predicted = result.predict(tiny_split.x_val).astype(np.float64)
    recomputed = float(np.mean((predicted - tiny_split.y_val.astype(np.float64)) ** 2))
    assert recomputed == pytest.approx(best.val_loss, abs=1e-6)


def test_reported_losses_are_exact_mse_of_the_returned_model(
    trained: TrainResult, tiny_split: Split
) -> None:
    for x, y, loss in (
        (tiny_split.x_train, tiny_split.y_train, trained.train_loss),
        (tiny_split.x_val, tiny_split.y_val, trained.val_loss),
        (tiny_split.x_test, tiny_split.y_test, trained.test_loss),
    ):
        assert float(prediction_errors(trained, x, y).mean()) == pytest.approx(loss, rel=1e-6)


def test_returned_model_is_in_eval_mode_on_cpu(trained: TrainResult, tiny_split: Split) -> None:
    assert not trained.model.training
    first = trained.predict(tiny_split.x_test)
    np.testing.assert_array_equal(first, trained.predict(tiny_split.x_test))  # no dropout
    assert first.shape == (len(tiny_split.y_test),)
    assert trained.model.feature_mean.device.type == "cpu"
    assert trained.parameters == 13_441


def test_runs_all_epochs_when_it_keeps_improving(trained: TrainResult) -> None:
    assert trained.epochs_run == 5
    assert 1 <= trained.best_epoch <= 5
    assert trained.training_time_s > 0


def test_same_seed_same_losses_other_seed_other_losses(tiny_split: Split) -> None:
    config = TrainConfig(epochs=3, seed=11)
    a = train_model(tiny_split, config)
    b = train_model(tiny_split, config)
    c = train_model(tiny_split, replace(config, seed=12))
    assert a.history == b.history
    assert (a.train_loss, a.val_loss, a.test_loss) == (b.train_loss, b.val_loss, b.test_loss)
    np.testing.assert_array_equal(a.predict(tiny_split.x_test), b.predict(tiny_split.x_test))
    assert a.history != c.history
    assert a.val_loss != c.val_loss


def test_thread_setting_is_restored(tiny_split: Split) -> None:
    before = torch.get_num_threads()
    train_model(tiny_split, TrainConfig(epochs=1))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("lr", [1e20, 1e30])
def test_huge_learning_rate_raises_training_error(tiny_split: Split, lr: float) -> None:
    with pytest.raises(TrainingError, match=r"non-finite at epoch 1 .*lower learning rate"):
        train_model(tiny_split, TrainConfig(learning_rate=lr, epochs=3))


def test_nan_in_features_raises_training_error(tiny_split: Split) -> None:
    x_train = tiny_split.x_train.copy()
    x_train[5, 3] = np.nan  # bypasses the loader's checks on purpose
    poisoned = replace(tiny_split, x_train=x_train)
    with pytest.raises(TrainingError, match="non-finite"):
        train_model(poisoned, TrainConfig(epochs=2))


def test_callback_sees_every_epoch(trained: TrainResult, tiny_split: Split) -> None:
    seen: list[EpochStats] = []
    result = train_model(tiny_split, TrainConfig(epochs=5, seed=0), on_epoch=seen.append)
    assert [s.epoch for s in seen] == [1, 2, 3, 4, 5]
    assert seen == result.history
    assert seen == trained.history  # the callback does not change the run
    assert all(math.isfinite(s.val_loss) and s.train_loss > 0 for s in seen)


def test_exception_in_callback_stops_training(tiny_split: Split) -> None:
    class Prune(Exception):
        pass

    calls: list[int] = []

    def stop_at_two(stats: EpochStats) -> None:
        calls.append(stats.epoch)
        if stats.epoch == 2:
            raise Prune("pruned")

    with pytest.raises(Prune, match="pruned"):
        train_model(tiny_split, TrainConfig(epochs=10), on_epoch=stop_at_two)
    assert calls == [1, 2]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"learning_rate": 0.0}, "learning rate"),
        ({"learning_rate": -1.0}, "learning rate"),
        ({"learning_rate": float("nan")}, "learning rate"),
        ({"learning_rate": float("inf")}, "learning rate"),
        ({"batch_size": 0}, "batch size"),
        ({"hidden_sizes": ()}, "hidden sizes"),
        ({"hidden_sizes": (64, 0)}, "hidden sizes"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"epochs": 0}, "epochs"),
        ({"patience": 0}, "patience"),
    ],
)
def test_bad_config_raises_config_error(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig(**changes)  # type: ignore[arg-type]


def test_config_defaults_are_the_documented_baseline() -> None:
    config = TrainConfig()
    assert config.hyperparameters() == {
        "learning_rate": 0.001,
        "batch_size": 32,
        "hidden_sizes": [128, 64],
        "dropout": 0.2,
    }
    assert (config.epochs, config.patience) == (100, 10)


def test_device_names() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="cpu, cuda or auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_checkpoint_round_trip(trained: TrainResult, tiny_split: Split) -> None:
    names = tuple(f"f{i}" for i in range(39))
    model, config, feature_names = load_checkpoint(checkpoint_bytes(trained, names))
    assert config == trained.config
    assert feature_names == names
    assert not model.training
    with torch.no_grad():
        restored = model(torch.from_numpy(tiny_split.x_test)).numpy()
    np.testing.assert_array_equal(restored, trained.predict(tiny_split.x_test))


def test_damaged_checkpoint_raises_training_error() -> None:
    with pytest.raises(TrainingError, match="stored weights cannot be read"):
        load_checkpoint(b"definitely not a torch file")


# --- no better than the mean -----------------------------------------------------------------


def test_the_mean_predictor_s_loss_is_exact(tiny_split: Split) -> None:
    y_train = [float(v) for v in tiny_split.y_train]
    mean = math.fsum(y_train) / len(y_train)
    expected = math.fsum((float(v) - mean) ** 2 for v in tiny_split.y_val) / len(tiny_split.y_val)
    assert mean_predictor_loss(tiny_split) == pytest.approx(expected, rel=1e-12)


def test_a_trained_model_beats_the_mean(trained: TrainResult, tiny_split: Split) -> None:
    assert trained.mean_predictor_val_loss == mean_predictor_loss(tiny_split)
    assert trained.val_loss < trained.mean_predictor_val_loss
    assert not trained.no_better_than_mean


def test_a_dead_model_is_no_better_than_the_mean(tiny_split: Split) -> None:
    # learning rate 10 kills the network on its first steps: one constant output
    dead = train_model(tiny_split, TrainConfig(learning_rate=10.0, epochs=3, seed=0))
    assert dead.best_epoch == 1
    assert dead.val_loss >= dead.mean_predictor_val_loss
    assert dead.no_better_than_mean


def test_cso_train_warns_when_the_model_learned_nothing(
    run_cli: Any, data_copy: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "train", "--data-path", data_copy, "--epochs", "3", "--learning-rate", "10",
        "--output-path", "dead.onnx",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "dead.onnx").is_file()  # written as asked, but said out loud
    warning = result.stderr.strip()
    assert warning.startswith(
        "warning: this model predicts no better than the training labels' mean (validation MSE "
    )
    assert "\n" not in warning
    assert "it learned nothing; try a lower --learning-rate (this run: 10)" in warning


def test_cso_train_says_nothing_more_when_the_model_learned(
    run_cli: Any, data_copy: Path, tmp_path: Path
) -> None:
    result = run_cli("train", "--data-path", data_copy, "--epochs", "3", "--output-path", "m.onnx")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
