"""Stored weights without PyTorch: the NumPy forward pass, checkpoints, never-learned inputs,
and the commands that only read a study never importing PyTorch or onnx."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_small_grid
from typer.testing import Result

from calling_score_opt.data import FEATURE_NAMES, Split
from calling_score_opt.errors import TrainingError
from calling_score_opt.export import (
    NEVER_LEARNED_KEY,
    export_onnx,
    feature_spec_hash,
    onnx_predict,
    read_metadata,
)
from calling_score_opt.model import EnsembleModel, weights_of
from calling_score_opt.train import TrainConfig, TrainResult, checkpoint_bytes, train_model
from calling_score_opt.weights import (
    LEGACY_CHECKPOINT_FORMAT,
    EnsembleWeights,
    MlpWeights,
    never_learned_columns,
    read_checkpoint_bytes,
)


def _torch_scores(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out: np.ndarray = model(torch.from_numpy(x)).numpy()
    return out


# --- the NumPy forward pass is PyTorch's ------------------------------------------------------


def test_numpy_forward_matches_pytorch(trained: TrainResult, tiny_split: Split) -> None:
    weights = weights_of(trained.model)
    assert isinstance(weights, MlpWeights)
    got = weights.predict(tiny_split.x_test)
    assert got.dtype == np.float32 and got.shape == (len(tiny_split.x_test),)
    np.testing.assert_allclose(got, _torch_scores(trained.model, tiny_split.x_test), atol=1e-6)
    assert weights.parameters == trained.parameters == 13_441


def test_numpy_forward_matches_pytorch_with_pair_features_and_as_an_ensemble(
    trained: TrainResult, tiny_split: Split
) -> None:
    pairs = train_model(tiny_split, TrainConfig(epochs=2, pair_features=True, hidden_sizes=(8,)))
    ensemble = EnsembleModel([trained.model, pairs.model], [0.25, 0.75])
    weights = weights_of(ensemble)
    assert isinstance(weights, EnsembleWeights)
    expected = _torch_scores(ensemble, tiny_split.x_test)
    np.testing.assert_allclose(weights.predict(tiny_split.x_test), expected, atol=1e-6)


def test_a_saturated_unit_scores_0_or_1_without_a_warning() -> None:
    layer = (np.full((1, 2), 1e4, np.float32), np.zeros(1, np.float32))
    weights = MlpWeights(np.zeros(2, np.float32), np.ones(2, np.float32), (layer,))
    x = np.array([[-1.0, -1.0], [1.0, 1.0]], np.float32)
    np.testing.assert_array_equal(weights.predict(x), [0.0, 1.0])  # warnings are errors here


# --- checkpoints ------------------------------------------------------------------------------


def test_a_checkpoint_gives_back_exactly_what_was_stored(trained: TrainResult) -> None:
    stored = read_checkpoint_bytes(checkpoint_bytes(trained, FEATURE_NAMES))
    assert stored.config == trained.config
    assert stored.feature_names == FEATURE_NAMES
    original = weights_of(trained.model)
    assert isinstance(original, MlpWeights)
    np.testing.assert_array_equal(stored.weights.feature_mean, original.feature_mean)
    np.testing.assert_array_equal(stored.weights.feature_std, original.feature_std)
    for (w, b), (w0, b0) in zip(stored.weights.layers, original.layers, strict=True):
        np.testing.assert_array_equal(w, w0)
        np.testing.assert_array_equal(b, b0)


def test_a_checkpoint_of_an_earlier_release_still_loads(trained: TrainResult) -> None:
    """Studies written before checkpoints became .npz hold torch.save payloads."""
    model = trained.model
    payload = {
        "format": LEGACY_CHECKPOINT_FORMAT,
        "config": trained.config.to_dict(),
        "feature_names": list(FEATURE_NAMES),
        "feature_mean": model.feature_mean.clone(),
        "feature_std": model.feature_std.clone(),
        "network": {k: v.clone() for k, v in model.network.state_dict().items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    stored = read_checkpoint_bytes(buffer.getvalue())
    assert stored.config == trained.config
    x = np.full((4, 39), 0.3, np.float32)
    np.testing.assert_allclose(stored.weights.predict(x), _torch_scores(model, x), atol=1e-6)


@pytest.mark.parametrize(
    "data", [b"", b"not a checkpoint", b"PK\x03\x04 truncated zip", b"\x93NUMPY garbage"]
)
def test_damaged_checkpoints_are_one_clear_error(data: bytes) -> None:
    with pytest.raises(TrainingError, match=r"stored weights cannot be read.*retrain the trial"):
        read_checkpoint_bytes(data)


def test_a_checkpoint_whose_shapes_do_not_match_its_configuration_is_refused(
    trained: TrainResult,
) -> None:
    good = read_checkpoint_bytes(checkpoint_bytes(trained, FEATURE_NAMES))
    other = replace(trained, config=replace(trained.config, hidden_sizes=(64, 64)))
    with pytest.raises(TrainingError, match="layer shapes"):
        read_checkpoint_bytes(checkpoint_bytes(other, FEATURE_NAMES))
    assert good.weights.parameters == 13_441


# --- inputs the model never learned -----------------------------------------------------------


@pytest.fixture(scope="module")
def constant_context(tiny_split: Split) -> Split:
    """The tiny split with columns 30 and 38 held at 0.5 in training (as older app exports do)
    but live in the test split, as the app's feature builder sends them."""
    x_train = tiny_split.x_train.copy()
    x_train[:, [30, 38]] = 0.5
    return replace(tiny_split, x_train=x_train)


def test_never_learned_columns_are_the_constant_training_columns(
    constant_context: Split,
) -> None:
    assert never_learned_columns(constant_context.x_train) == (30, 38)
    assert never_learned_columns(constant_context.x_train, pair_features=True) == (30, 38)


def test_export_zeroes_never_learned_inputs_and_names_them(
    constant_context: Split, tmp_path: Path
) -> None:
    result = train_model(constant_context, TrainConfig(epochs=2, hidden_sizes=(16,)))
    weights = weights_of(result.model)
    assert isinstance(weights, MlpWeights)
    assert np.abs(weights.layers[0][0][:, [30, 38]]).min() > 0  # random initial weights, kept
    metadata = {"feature_names": list(FEATURE_NAMES)}
    report = export_onnx(
        result.model, tmp_path / "m.onnx", constant_context.x_test, metadata,
        x_train=constant_context.x_train,
    )  # fmt: skip
    stored = json.loads(read_metadata(report.path)[NEVER_LEARNED_KEY])
    assert stored == [FEATURE_NAMES[30], FEATURE_NAMES[38]]

    # On training-like inputs (0.5 there) the exported model is the trained one ...
    like_training = constant_context.x_test.copy()
    like_training[:, [30, 38]] = 0.5
    np.testing.assert_allclose(
        onnx_predict(report.path, like_training), weights.predict(like_training), atol=1e-6
    )
    # ... and whatever the app sends there changes nothing, where the trained weights would
    # have turned it into noise.
    live = like_training.copy()
    live[:, [30, 38]] = np.linspace(0, 1, len(live), dtype=np.float32)[:, None]
    np.testing.assert_allclose(
        onnx_predict(report.path, live), onnx_predict(report.path, like_training), atol=1e-6
    )
    assert np.max(np.abs(weights.predict(live) - weights.predict(like_training))) > 1e-3


def test_a_model_with_nothing_constant_lists_no_never_learned_inputs(
    trained: TrainResult, tiny_split: Split, tmp_path: Path
) -> None:
    report = export_onnx(
        trained.model, tmp_path / "m.onnx", tiny_split.x_test,
        {"feature_names": list(FEATURE_NAMES)}, x_train=tiny_split.x_train,
    )  # fmt: skip
    assert json.loads(read_metadata(report.path)[NEVER_LEARNED_KEY]) == []


def test_every_export_names_its_feature_spec(
    run_cli: Callable[..., Result], data_copy: Path
) -> None:
    run_small_grid(run_cli, data_copy, "--output-dir", "grid", max_variants=1)
    (path,) = Path("grid").glob("*.onnx")
    metadata = read_metadata(path)
    names = json.loads(metadata["feature_names"])
    assert names == list(FEATURE_NAMES)
    assert metadata["feature_spec_hash"] == feature_spec_hash(FEATURE_NAMES)
    assert feature_spec_hash(FEATURE_NAMES) != feature_spec_hash(FEATURE_NAMES[::-1])


# --- commands that train nothing import neither PyTorch nor onnx ------------------------------

_PROBE = """
import atexit, sys
def _heavy():
    loaded = [m for m in ("torch", "onnx") if m in sys.modules]
    sys.stderr.write("HEAVY=" + ",".join(loaded) + "\\n")
atexit.register(_heavy)
from calling_score_opt.cli import main
sys.argv = ["cso", *sys.argv[1:]]
main()
"""


def test_commands_that_train_nothing_never_import_pytorch_or_onnx(
    run_cli: Callable[..., Result], data_copy: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "search", "--data-path", data_copy, "--trials", "3", "--epochs", "2", "--jobs", "1",
        "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    commands = [
        ["studies"],
        ["trials"],
        ["best"],
        ["export", "--best", "--output-dir", "exported"],
        ["export", "--ensemble", "--output-dir", "exported"],
        ["report", "--study", "calling-score-search", "--output", "report.html"],
        ["registry", "register", "--version", "v1", "--trial", "1", "--data-source", "synthetic"],
    ]
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, *command],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert "HEAVY=\n" in done.stderr, (command, done.stderr)


def test_a_pair_feature_model_ignores_a_never_learned_vibe_input_entirely(
    constant_context: Split, tmp_path: Path
) -> None:
    """Zeroing the input's own weights is not enough when |user - spot| also reaches the
    network: the exported graph pins the input to its training value first."""
    x_train = constant_context.x_train.copy()
    x_train[:, 0] = 0.5  # user exploration_eagerness, constant in training
    split = replace(constant_context, x_train=x_train)
    result = train_model(split, TrainConfig(epochs=2, hidden_sizes=(16,), pair_features=True))
    report = export_onnx(
        result.model, tmp_path / "pairs.onnx", split.x_test, {"feature_names": list(FEATURE_NAMES)},
        x_train=split.x_train,
    )  # fmt: skip
    assert json.loads(read_metadata(report.path)[NEVER_LEARNED_KEY])[0] == FEATURE_NAMES[0]
    like_training = split.x_test.copy()
    like_training[:, [0, 30, 38]] = 0.5
    live = like_training.copy()
    live[:, 0] = np.linspace(0, 1, len(live), dtype=np.float32)
    np.testing.assert_allclose(
        onnx_predict(report.path, live), onnx_predict(report.path, like_training), atol=1e-6
    )
    trained = weights_of(result.model)
    np.testing.assert_allclose(
        onnx_predict(report.path, like_training), trained.predict(like_training), atol=1e-6
    )


def test_reported_losses_are_the_exported_models_even_where_test_records_vary(
    tmp_path: Path,
) -> None:
    """An input constant in the training split but not in the test split: the split holds it
    at its training value, so the losses cso reports are the shipped model's on raw records."""
    from helpers import make_records, write_json

    from calling_score_opt.data import load_dataset, split_dataset

    records = make_records(200, value=lambda i, c: i / 1000 if c == 0 else ((i + c) % 7) / 6)
    for record in records:
        record["context_features"]["energy_match"] = 0.5
    dataset = load_dataset(write_json(tmp_path / "d.json", records))
    ids = split_dataset(dataset, 0).x_test[:3, 0]  # column 0 names the record: i / 1000
    features = dataset.features.copy()
    rows = [round(float(v) * 1000) for v in ids]
    features[rows, 31] = [0.1, 0.9, 0.7]  # live values in three test records only
    varied = replace(dataset, features=features)
    split = split_dataset(varied, 0)
    assert 31 in split.pinned
    assert np.all(split.x_test[:, 31] == 0.5) and np.all(split.x_val[:, 31] == 0.5)
    assert varied.features[rows, 31].tolist() == pytest.approx([0.1, 0.9, 0.7])  # file kept
    result = train_model(split, TrainConfig(epochs=2, hidden_sizes=(8,)))
    report = export_onnx(result.model, tmp_path / "m.onnx", split.x_test, {}, x_train=split.x_train)
    test_ids = [round(float(v) * 1000) for v in split.x_test[:, 0]]
    shipped = onnx_predict(report.path, varied.features[test_ids])  # the raw records
    np.testing.assert_allclose(shipped, result.predict(split.x_test), atol=1e-6)
