"""The ONNX file the app loads (docs/contract.md): names, types, shapes, one file, scaling in."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from calling_score_opt import export
from calling_score_opt.data import Scaling, Split
from calling_score_opt.errors import ExportError
from calling_score_opt.export import (
    PARITY_TOLERANCE,
    ExportReport,
    contract_problems,
    export_onnx,
    onnx_predict,
    read_metadata,
)
from calling_score_opt.model import CallingScoreModel
from calling_score_opt.train import TrainConfig, TrainResult, train_model
from calling_score_opt.weights import MlpWeights

METADATA = {
    "variant": "unit_test",
    "hyperparameters": {"learning_rate": 0.001, "hidden_sizes": [128, 64]},
    "feature_names": [f"f{i}" for i in range(39)],
    "metrics": {"test_loss": 0.0123},
    "data_fingerprint": "sha256:abc",
}


@pytest.fixture(scope="module")
def exported(
    trained: TrainResult, tiny_split: Split, tmp_path_factory: pytest.TempPathFactory
) -> ExportReport:
    folder = tmp_path_factory.mktemp("onnx")
    return export_onnx(
        trained.model,
        folder / "model.onnx",
        tiny_split.x_test,
        METADATA,
        x_train=tiny_split.x_train,
    )


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --- the contract --------------------------------------------------------------------------


def test_export_obeys_the_contract(exported: ExportReport) -> None:
    assert exported.path.name == "model.onnx"
    assert contract_problems(exported.path) == []
    assert contract_problems(exported.path, n_features=39) == []
    onnx.checker.check_model(str(exported.path), full_check=True)


def test_input_and_output_names_types_and_dynamic_batch(exported: ExportReport) -> None:
    session = _session(exported.path)
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.name == "input"
    assert inp.type == "tensor(float)"
    assert len(inp.shape) == 2
    assert isinstance(inp.shape[0], str)  # a symbolic (dynamic) batch dimension
    assert inp.shape[1] == 39
    assert out.name == "output"
    assert out.type == "tensor(float)"
    assert len(out.shape) == 1
    assert isinstance(out.shape[0], str)


@pytest.mark.parametrize("n", [1, 2, 1000])
def test_onnxruntime_returns_a_flat_list_of_n_scores(exported: ExportReport, n: int) -> None:
    x = np.random.default_rng(n).random((n, 39), dtype=np.float32)
    (scores,) = _session(exported.path).run(None, {"input": x})
    assert scores.shape == (n,)
    assert scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))
    # what the app does: read outputs[0] as a flat list and take its first number
    assert isinstance(scores.tolist()[0], float)


def test_single_self_contained_file(exported: ExportReport) -> None:
    folder = exported.path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]  # no .onnx.data, no tmp
    assert exported.size_bytes == exported.path.stat().st_size
    proto = onnx.load(str(exported.path), load_external_data=False)
    assert proto.graph.initializer
    for init in proto.graph.initializer:
        assert init.data_location != TensorProto.EXTERNAL
        assert not init.external_data


def test_parity_with_pytorch_is_reported_and_within_tolerance(
    exported: ExportReport, trained: TrainResult, tiny_split: Split
) -> None:
    assert exported.parity_samples == len(tiny_split.y_test)
    assert 0.0 <= exported.parity_max_abs_diff <= PARITY_TOLERANCE <= 1e-5
    got = onnx_predict(exported.path, tiny_split.x_test)
    expected = trained.predict(tiny_split.x_test)
    assert float(np.max(np.abs(got - expected))) <= 1e-5


def test_metadata_is_stored_strings_as_is_others_as_json(exported: ExportReport) -> None:
    metadata = read_metadata(exported.path)
    assert metadata["variant"] == "unit_test"
    assert metadata["data_fingerprint"] == "sha256:abc"
    assert json.loads(metadata["hyperparameters"]) == METADATA["hyperparameters"]
    assert json.loads(metadata["feature_names"]) == METADATA["feature_names"]
    assert json.loads(metadata["metrics"]) == {"test_loss": 0.0123}


# --- scaling inside the graph --------------------------------------------------------------


def test_graph_holds_the_training_scaling(exported: ExportReport, trained: TrainResult) -> None:
    proto = onnx.load(str(exported.path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_array_equal(inits["feature_mean"], trained.model.feature_mean.numpy())
    np.testing.assert_array_equal(inits["feature_std"], trained.model.feature_std.numpy())
    first = proto.graph.node[0]
    assert first.op_type == "Sub" and list(first.input) == ["input", "feature_mean"]
    assert proto.graph.node[-1].op_type == "Squeeze"
    assert list(proto.graph.node[-1].output) == ["output"]


def test_raw_features_in_give_the_models_scores(
    exported: ExportReport, trained: TrainResult, tiny_split: Split
) -> None:
    raw = tiny_split.x_test
    got = onnx_predict(exported.path, raw)
    with torch.no_grad():
        expected = trained.model(torch.from_numpy(raw)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # feeding pre-standardised inputs instead would give other scores: scaling is not external
    scaled = (raw - trained.model.feature_mean.numpy()) / trained.model.feature_std.numpy()
    assert float(np.max(np.abs(onnx_predict(exported.path, scaled) - got))) > 1e-2


def test_model_trained_on_offset_features_predicts_right_from_raw_input(
    trained: TrainResult, tiny_split: Split, tmp_path: Path
) -> None:
    def offset(x: np.ndarray) -> np.ndarray:
        return (x * 100 + 50).astype(np.float32)

    shifted = replace(
        tiny_split,
        x_train=offset(tiny_split.x_train),
        x_val=offset(tiny_split.x_val),
        x_test=offset(tiny_split.x_test),
    )
    result = train_model(shifted, TrainConfig(epochs=5, seed=0))
    report = export_onnx(
        result.model, tmp_path / "offset.onnx", shifted.x_test, {}, x_train=shifted.x_train
    )
    scores = onnx_predict(report.path, shifted.x_test)
    # standardisation makes the offset irrelevant: same scores as the model on plain features
    np.testing.assert_allclose(scores, trained.predict(tiny_split.x_test), atol=1e-4)
    mse = float(np.mean((scores - tiny_split.y_test) ** 2))
    assert mse == pytest.approx(trained.test_loss, rel=1e-3)
    assert mse < float(np.var(tiny_split.y_test))
    # and the graph really expects the raw (offset) values
    wrong = onnx_predict(report.path, tiny_split.x_test)
    assert float(np.mean((wrong - tiny_split.y_test) ** 2)) > 2 * mse


# --- contract_problems on foreign files ----------------------------------------------------


def _handmade(
    path: Path,
    *,
    output_shape: list[int | str],
    input_name: str = "input",
    output_name: str = "output",
    input_shape: tuple[int | str, ...] = ("N", 39),
    elem_type: int = TensorProto.FLOAT,
    external: bool = False,
) -> Path:
    """A small valid model: ReduceMean over features, shaped [N] or [N, 1] by keepdims."""
    keepdims = 1 if len(output_shape) == 2 else 0
    weight = numpy_helper.from_array(np.ones((39, 39), np.float32), "w")
    nodes = [
        helper.make_node("MatMul", [input_name, "w"], ["h"]),
        helper.make_node("ReduceMean", ["h", "axes"], [output_name], keepdims=keepdims),
    ]
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        nodes,
        "handmade",
        [helper.make_tensor_value_info(input_name, elem_type, list(input_shape))],
        [helper.make_tensor_value_info(output_name, elem_type, output_shape)],
        [weight, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=0,
    )
    return path


def test_handmade_good_model_has_no_problems(tmp_path: Path) -> None:
    path = _handmade(tmp_path / "good.onnx", output_shape=["N"])
    assert contract_problems(path) == []
    assert onnx_predict(path, np.ones((3, 39), np.float32)).shape == (3,)


def test_output_of_shape_n_by_1_is_flagged(tmp_path: Path) -> None:
    path = _handmade(tmp_path / "n1.onnx", output_shape=["N", 1])
    assert onnx_predict(path, np.ones((3, 39), np.float32)).shape == (3, 1)  # what the app sees
    problems = contract_problems(path)
    assert len(problems) == 1
    assert "output must be [N]" in problems[0]
    assert "rank 2" in problems[0]


def test_scalar_output_is_flagged(tmp_path: Path) -> None:
    path = _handmade(tmp_path / "scalar.onnx", output_shape=[])
    assert any("output must be [N]" in p and "rank 0" in p for p in contract_problems(path))


def test_static_batch_is_flagged(tmp_path: Path) -> None:
    path = _handmade(tmp_path / "static.onnx", output_shape=["N"], input_shape=(1, 39))
    assert any("dynamic batch" in p for p in contract_problems(path))


def test_wrong_names_are_flagged(tmp_path: Path) -> None:
    path = _handmade(tmp_path / "names.onnx", output_shape=["N"], input_name="x", output_name="y")
    problems = contract_problems(path)
    assert any("inputs are ['x'], expected ['input']" in p for p in problems)
    assert any("outputs are ['y'], expected ['output']" in p for p in problems)


def test_wrong_feature_count_is_flagged(tmp_path: Path) -> None:
    path = _handmade(tmp_path / "good.onnx", output_shape=["N"])
    assert any("39 features, expected 40" in p for p in contract_problems(path, n_features=40))


def test_float64_is_flagged(tmp_path: Path) -> None:
    path = _handmade(tmp_path / "f64.onnx", output_shape=["N"], elem_type=TensorProto.DOUBLE)
    problems = contract_problems(path)
    assert "input is not float32" in problems
    assert "output is not float32" in problems


def test_external_weights_are_flagged(tmp_path: Path) -> None:
    path = _handmade(tmp_path / "ext.onnx", output_shape=["N"], external=True)
    assert (tmp_path / "ext.onnx.data").exists()
    assert any("external file" in p for p in contract_problems(path))


def test_unreadable_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"this is not protobuf \x00\xff")
    problems = contract_problems(path)
    assert len(problems) == 1 and "not a readable ONNX model" in problems[0]


# --- a failed export writes nothing --------------------------------------------------------


def test_parity_failure_writes_nothing(
    trained: TrainResult, tiny_split: Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph written says one thing, the weights another: parity must catch it."""
    write = export.onnx_bytes

    def drifting(weights: MlpWeights, metadata: dict[str, object]) -> bytes:
        (w0, b0), *rest = weights.layers
        return write(replace(weights, layers=((w0, b0 + 1e-2), *rest)), metadata)

    monkeypatch.setattr(export, "onnx_bytes", drifting)
    target = tmp_path / "out" / "model.onnx"
    with pytest.raises(ExportError, match=r"differs from the NumPy forward pass by .*not written"):
        export_onnx(trained.model, target, tiny_split.x_test, {}, x_train=tiny_split.x_train)
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left behind


def test_unsupported_layer_writes_nothing_and_keeps_the_old_file(
    trained: TrainResult, tiny_split: Split, tmp_path: Path
) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous model")
    network = nn.Sequential(nn.Linear(39, 4), nn.Tanh(), nn.Linear(4, 1), nn.Sigmoid())
    model = CallingScoreModel(network, _scaling_of(trained.model))
    with pytest.raises(ExportError, match="cannot export layer Tanh"):
        export_onnx(model, target, tiny_split.x_test, {}, x_train=tiny_split.x_train)
    assert target.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_export_replaces_an_existing_file(
    exported: ExportReport, trained: TrainResult, tiny_split: Split, tmp_path: Path
) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    export_onnx(trained.model, target, tiny_split.x_test, METADATA, x_train=tiny_split.x_train)
    assert target.read_bytes() == exported.path.read_bytes()  # and the export is reproducible


def _scaling_of(model: CallingScoreModel) -> Scaling:
    return Scaling(mean=model.feature_mean.numpy(), std=model.feature_std.numpy())


# --- a model with pair features: still 39 raw inputs in, [N] out ----------------------------


@pytest.fixture(scope="module")
def pair_exported(
    tiny_split: Split, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, ExportReport]:
    result = train_model(tiny_split, TrainConfig(epochs=3, pair_features=True))
    folder = tmp_path_factory.mktemp("pairs")
    report = export_onnx(
        result.model, folder / "pairs.onnx", tiny_split.x_test, METADATA, x_train=tiny_split.x_train
    )
    return result, report


def test_pair_features_export_obeys_the_contract(
    pair_exported: tuple[TrainResult, ExportReport],
) -> None:
    _, report = pair_exported
    assert contract_problems(report.path, n_features=39) == []
    onnx.checker.check_model(str(report.path), full_check=True)
    session = _session(report.path)
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("input", "tensor(float)", 39)
    assert isinstance(inp.shape[0], str)
    assert (out.name, out.type, len(out.shape)) == ("output", "tensor(float)", 1)
    ops = [node.op_type for node in onnx.load(str(report.path)).graph.node]
    assert {"Abs", "Concat"} <= set(ops)  # the differences are computed inside the graph
    assert sorted(p.name for p in report.path.parent.iterdir()) == ["pairs.onnx"]


@pytest.mark.parametrize("n", [1, 1000])
def test_pair_features_onnx_matches_pytorch(
    pair_exported: tuple[TrainResult, ExportReport], tiny_split: Split, n: int
) -> None:
    result, report = pair_exported
    assert 0.0 <= report.parity_max_abs_diff <= PARITY_TOLERANCE
    assert report.parity_samples == len(tiny_split.x_test)
    x = np.random.default_rng(n).random((n, 39), dtype=np.float32)
    scores = onnx_predict(report.path, x)
    assert scores.shape == (n,)
    np.testing.assert_allclose(scores, result.predict(x), rtol=0, atol=PARITY_TOLERANCE)
    test_scores = onnx_predict(report.path, tiny_split.x_test)
    mse = float(np.mean((test_scores.astype(np.float64) - tiny_split.y_test) ** 2))
    assert mse == pytest.approx(result.test_loss, abs=1e-6)
