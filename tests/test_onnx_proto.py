"""The ONNX bytes cso writes by hand are what the ``onnx`` package reads, checks and would write;
and reading foreign bytes never fails other than with one clear error."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from calling_score_opt import onnx_proto
from calling_score_opt.data import Split
from calling_score_opt.export import contract_problems, onnx_bytes
from calling_score_opt.model import weights_of
from calling_score_opt.train import TrainConfig, TrainResult, train_model
from calling_score_opt.weights import EnsembleWeights, MlpWeights

METADATA = {"variant": "unit", "hyperparameters": {"hidden_sizes": [128, 64]}, "note": "ü ✓"}


def _weights(trained: TrainResult) -> MlpWeights:
    weights = weights_of(trained.model)
    assert isinstance(weights, MlpWeights)
    return weights


def _check(data: bytes) -> onnx.ModelProto:
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_a_written_mlp_is_a_valid_onnx_model_holding_the_weights(trained: TrainResult) -> None:
    weights = _weights(trained)
    proto = _check(onnx_bytes(weights, METADATA))
    assert (proto.ir_version, proto.producer_name) == (8, "cso")
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    assert [n.op_type for n in proto.graph.node] == [
        "Sub", "Div", "Gemm", "Relu", "Gemm", "Relu", "Gemm", "Sigmoid", "Squeeze",
    ]  # fmt: skip
    assert all(n.name == n.output[0] for n in proto.graph.node)
    gemm = proto.graph.node[2]
    assert [(a.name, a.type, a.i) for a in gemm.attribute] == [
        ("transB", onnx.AttributeProto.INT, 1)
    ]
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_array_equal(arrays["feature_mean"], weights.feature_mean)
    np.testing.assert_array_equal(arrays["feature_std"], weights.feature_std)
    for index, (w, b) in enumerate(weights.layers):
        np.testing.assert_array_equal(arrays[f"linear{index}.weight"], w)
        np.testing.assert_array_equal(arrays[f"linear{index}.bias"], b)
    assert arrays["squeeze_axes"].dtype == np.int64
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp == helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 39])
    assert out == helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N"])
    stored = {p.key: p.value for p in proto.metadata_props}
    assert stored == {
        "variant": "unit",
        "hyperparameters": '{"hidden_sizes": [128, 64]}',
        "note": "ü ✓",  # strings as they are, UTF-8
    }


def test_pair_features_and_ensembles_are_valid_onnx_too(
    trained: TrainResult, tiny_split: Split
) -> None:
    pairs = train_model(tiny_split, TrainConfig(epochs=1, pair_features=True, hidden_sizes=(8,)))
    pair_weights = weights_of(pairs.model)
    assert isinstance(pair_weights, MlpWeights)
    proto = _check(onnx_bytes(pair_weights, {}))
    concat = next(n for n in proto.graph.node if n.op_type == "Concat")
    assert [(a.name, a.i) for a in concat.attribute] == [("axis", 1)]
    ensemble = EnsembleWeights((_weights(trained), pair_weights), (0.4, 0.6))
    proto = _check(onnx_bytes(ensemble, {}))
    assert proto.graph.node[-1].op_type == "Sum"
    assert sum(n.op_type == "Mul" for n in proto.graph.node) == 2


def test_what_onnx_writes_reads_back_the_same(tmp_path: Path) -> None:
    """read_summary on a model the onnx package wrote, with dims of every kind."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
        [numpy_helper.from_array(np.arange(3, dtype=np.float32), "unused")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"a": "1", "b": "two"})
    summary = onnx_proto.read_summary(model.SerializeToString())
    assert summary.metadata == {"a": "1", "b": "two"}
    assert summary.inputs == (onnx_proto.TensorValue("x", TensorProto.DOUBLE, ("batch", 3)),)
    assert summary.outputs == (onnx_proto.TensorValue("y", TensorProto.DOUBLE, None),)
    assert summary.external_initializers == ()


@pytest.mark.parametrize("data", [b"", b"\x08", b"\x08\x08", b"\xff" * 12, b"\x3a\x05abc"])
def test_malformed_bytes_are_one_format_error(data: bytes) -> None:
    with pytest.raises(onnx_proto.OnnxFormatError):
        onnx_proto.read_summary(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_no_bytes_make_the_reader_fail_other_than_clearly(data: bytes) -> None:
    with contextlib.suppress(onnx_proto.OnnxFormatError):
        onnx_proto.read_summary(data)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_damaged_model_is_a_contract_problem_not_a_crash(
    data: st.DataObject, trained: TrainResult, tmp_path_factory: pytest.TempPathFactory
) -> None:
    good = onnx_bytes(_weights(trained), METADATA)
    cut = data.draw(st.integers(0, len(good) - 1))
    flip = data.draw(st.integers(0, 255))
    damaged = bytearray(good[:cut] + good[cut + 1 :] if flip == 0 else good)
    if flip:
        damaged[cut] ^= flip
    path = tmp_path_factory.mktemp("damaged") / "m.onnx"
    path.write_bytes(bytes(damaged))
    problems = contract_problems(path, 39)  # any list of strings; never an exception
    assert all(isinstance(p, str) for p in problems)


def test_negative_dims_read_as_negative() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 39])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 39])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    summary = onnx_proto.read_summary(model.SerializeToString())
    assert summary.inputs[0].dims == (-1, 39)
