"""ONNX export that honours the app's contract (docs/contract.md), checked before the file appears.

A file is written under a temporary name, checked (``onnx.checker``, the contract's names, types
and shapes, onnxruntime parity against PyTorch) and only then renamed into place, so a reader
never sees a model that has not passed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calling_score_opt.atomic import atomic_path
from calling_score_opt.data import Array
from calling_score_opt.errors import ExportError
from calling_score_opt.model import N_VIBE_DIMENSIONS, CallingScoreModel, EnsembleModel

if TYPE_CHECKING:
    from calling_score_opt.train import TrainConfig

INPUT_NAME = "input"
OUTPUT_NAME = "output"
PARITY_TOLERANCE = 1e-5
_FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how closely onnxruntime reproduces PyTorch."""

    path: Path
    size_bytes: int
    parity_max_abs_diff: float
    parity_samples: int


#: What the app must feed beside the order of the inputs: raw values, 0.5 where it has none.
FEATURE_SPEC_RULES = {"input": "raw float32 values, scaling is in the graph", "missing_value": 0.5}


def feature_spec_hash(feature_names: Sequence[str]) -> str:
    """``sha256:<hex>`` of the inputs a model takes, in order, and the rules for filling them.

    Two models with the same hash can be fed by the same feature builder; the registry refuses
    to swap in a model whose hash differs from the active one's unless told why.
    """
    spec = {"feature_names": list(feature_names), **FEATURE_SPEC_RULES}
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


METRIC_KEYS = ("val_loss", "test_loss", "train_loss", "best_epoch", "epochs_run", "parameters")


def model_metadata(
    name: str,
    config: TrainConfig,
    feature_names: Sequence[str],
    metrics: Mapping[str, Any],
    data_fingerprint: str,
    **extra: Any,
) -> dict[str, Any]:
    """What every exported model says about itself (stored as ONNX metadata_props)."""
    from calling_score_opt import __version__

    return {
        "producer": f"cso {__version__}",
        "model_type": "calling_score",
        "variant": name,
        "hyperparameters": {
            **config.hyperparameters(),
            "epochs": config.epochs,
            "seed": config.seed,
        },
        "feature_names": list(feature_names),
        "feature_spec_hash": feature_spec_hash(feature_names),
        "input": "raw features [N, F] float32 in feature_names order; scaling is in the graph",
        "metrics": {key: metrics.get(key) for key in METRIC_KEYS},
        "data_fingerprint": data_fingerprint,
        **extra,
    }


def contract_problems(model_path: Path, n_features: int | None = None) -> list[str]:
    """Every way the ONNX file at ``model_path`` breaks the app's ONNX contract (none: it obeys).

    ``n_features`` defaults to whatever the file declares (39 for the app's model).
    """
    import onnx

    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises several unrelated types for unreadable files
        return [f"not a readable ONNX model ({exc})"]
    problems: list[str] = []
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer):
        problems.append("weights are stored in an external file; the app ships one file only")
    inputs, outputs = list(proto.graph.input), list(proto.graph.output)
    if [i.name for i in inputs] != [INPUT_NAME]:
        problems.append(f"inputs are {[i.name for i in inputs]}, expected ['{INPUT_NAME}']")
    if [o.name for o in outputs] != [OUTPUT_NAME]:
        problems.append(f"outputs are {[o.name for o in outputs]}, expected ['{OUTPUT_NAME}']")
    if inputs:
        tensor = inputs[0].type.tensor_type
        dims = list(tensor.shape.dim)
        if tensor.elem_type != _FLOAT:
            problems.append("input is not float32")
        if len(dims) != 2 or not dims[0].dim_param:
            problems.append("input must be [N, features] with a dynamic batch dimension N")
        elif n_features is not None and dims[1].dim_value != n_features:
            problems.append(f"input has {dims[1].dim_value} features, expected {n_features}")
    if outputs:
        tensor = outputs[0].type.tensor_type
        dims = list(tensor.shape.dim)
        if tensor.elem_type != _FLOAT:
            problems.append("output is not float32")
        if len(dims) != 1 or not dims[0].dim_param:
            problems.append(
                f"output must be [N] (a flat list of scores), got rank {len(dims)}; "
                "[N, 1] makes the app fall back to 0.5"
            )
    return problems


def _ort_session(model_path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny graph: threads cost more than they give
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def onnx_predict(model_path: Path, x: Array) -> Array:
    """Run the ONNX file at ``model_path`` on raw features ``x`` with onnxruntime."""
    session = _ort_session(model_path)
    out: Array = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]
    return out


OPSET = 17  # what onnxruntime releases of the last years, mobile ones included, all run
IR_VERSION = 8  # the IR version that goes with opset 17


def _mlp_graph(model: CallingScoreModel, prefix: str, score: str) -> tuple[list[Any], list[Any]]:
    """Nodes and initializers that turn ``input`` into ``score`` ([N]) for one MLP.

    Every name the MLP introduces starts with ``prefix``, so several MLPs fit in one graph.
    """
    from onnx import helper, numpy_helper
    from torch import nn

    def tensor(name: str, value: Any) -> Any:
        return numpy_helper.from_array(np.ascontiguousarray(value), prefix + name)

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> Any:
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    def p(name: str) -> str:
        return prefix + name

    initializers = [
        tensor("feature_mean", model.feature_mean.detach().cpu().numpy()),
        tensor("feature_std", model.feature_std.detach().cpu().numpy()),
        tensor("squeeze_axes", np.array([1], dtype=np.int64)),
    ]
    nodes = []
    features = INPUT_NAME
    if model.pair_features:  # |user - spot| per vibe dimension, appended to the raw input
        n = N_VIBE_DIMENSIONS
        initializers += [
            tensor(name, np.array([value], dtype=np.int64))
            for name, value in (
                ("user_start", 0),
                ("spot_start", n),
                ("spot_end", 2 * n),
                ("feature_axis", 1),
            )
        ]
        nodes += [
            node(
                "Slice",
                [INPUT_NAME, p("user_start"), p("spot_start"), p("feature_axis")],
                p("user_vibes"),
            ),
            node(
                "Slice",
                [INPUT_NAME, p("spot_start"), p("spot_end"), p("feature_axis")],
                p("spot_vibes"),
            ),
            node("Sub", [p("user_vibes"), p("spot_vibes")], p("vibe_diff")),
            node("Abs", [p("vibe_diff")], p("vibe_pairs")),
            node("Concat", [INPUT_NAME, p("vibe_pairs")], p("features"), axis=1),
        ]
        features = p("features")
    nodes += [
        helper.make_node("Sub", [features, p("feature_mean")], [p("centred")], name=p("scale_sub")),
        helper.make_node(
            "Div", [p("centred"), p("feature_std")], [p("scaled")], name=p("scale_div")
        ),
    ]
    current, layer = p("scaled"), 0
    for module in model.network:
        if isinstance(module, nn.Linear):
            weight, bias = f"linear{layer}.weight", f"linear{layer}.bias"
            initializers += [
                tensor(weight, module.weight.detach().cpu().numpy()),
                tensor(bias, module.bias.detach().cpu().numpy()),
            ]
            out = p(f"linear{layer}")
            nodes.append(node("Gemm", [current, p(weight), p(bias)], out, transB=1))
            current, layer = out, layer + 1
        elif isinstance(module, nn.ReLU | nn.Sigmoid):
            op = "Relu" if isinstance(module, nn.ReLU) else "Sigmoid"
            out = p(f"{op.lower()}{layer}")
            nodes.append(node(op, [current], out))
            current = out
        elif not isinstance(module, nn.Dropout):  # dropout is the identity at inference
            raise ExportError(f"cannot export layer {type(module).__name__}: not part of the MLP")
    nodes.append(
        helper.make_node("Squeeze", [current, p("squeeze_axes")], [score], name=p("to_flat"))
    )
    return nodes, initializers


def build_onnx(model: CallingScoreModel | EnsembleModel, metadata: Mapping[str, Any]) -> Any:
    """The ONNX graph of ``model``: Sub, Div, (Gemm, Relu)*, Gemm, Sigmoid, Squeeze.

    Written from the weights with ``onnx.helper`` instead of tracing with ``torch.onnx``: the
    architecture is fixed and tiny, tracing it costs about a second per model (more than
    training some variants), and the result here is the same graph, byte for byte the same
    every time, with nothing in it but the scaling, the layers and the sigmoid. The parity check
    in :func:`export_onnx` holds it to PyTorch's numbers.

    An ensemble is each member's graph (names prefixed ``m0_``, ``m1_``, ...), every score
    multiplied by its weight (Mul) and the products added (Sum): still one input, one [N]
    output, one file.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if isinstance(model, EnsembleModel):
        nodes, initializers, weighted = [], [], []
        for index, (weight, member) in enumerate(zip(model.weights, model.members, strict=True)):
            prefix = f"m{index}_"
            member_nodes, member_inits = _mlp_graph(member, prefix, f"{prefix}score")  # type: ignore[arg-type]
            nodes += member_nodes
            initializers += [
                *member_inits,
                numpy_helper.from_array(np.array(weight, dtype=np.float32), f"{prefix}weight"),
            ]
            nodes.append(
                helper.make_node(
                    "Mul",
                    [f"{prefix}score", f"{prefix}weight"],
                    [f"{prefix}weighted"],
                    name=f"{prefix}weighted",
                )
            )
            weighted.append(f"{prefix}weighted")
        nodes.append(helper.make_node("Sum", weighted, [OUTPUT_NAME], name="ensemble_sum"))
        graph_name = "calling_score_ensemble"
    else:
        nodes, initializers = _mlp_graph(model, "", OUTPUT_NAME)
        graph_name = "calling_score_mlp"
    graph = helper.make_graph(
        nodes,
        graph_name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", model.n_inputs])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N"])],
        initializers,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="cso",
        ir_version=IR_VERSION,
    )
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    return proto


def export_onnx(
    model: CallingScoreModel | EnsembleModel,
    path: Path,
    x_check: Array,
    metadata: Mapping[str, Any],
) -> ExportReport:
    """Write ``model`` as one self-contained ONNX file at ``path``, verified before it appears.

    ``x_check`` (raw features, e.g. the whole test split) is scored by PyTorch and onnxruntime;
    the export fails when they differ by more than ``PARITY_TOLERANCE``. ``metadata`` values
    are stored as ONNX metadata (non-strings as JSON).

    Raises:
        ExportError: the graph cannot be built, breaks the contract, or parity fails.
    """
    import onnx
    import torch

    model = model.cpu().eval()
    n_features = model.n_inputs
    with atomic_path(path) as tmp:
        try:
            proto = build_onnx(model, metadata)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{path}: onnx.checker rejected the model: {exc}") from exc
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{path}: onnx.checker rejected the model: {exc}") from exc
        problems = contract_problems(tmp, n_features)
        if problems:
            raise ExportError(f"{path}: breaks the app's ONNX contract: {'; '.join(problems)}")

        x = np.ascontiguousarray(x_check, np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        session = _ort_session(tmp)
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        single = session.run([OUTPUT_NAME], {INPUT_NAME: x[:1]})[0]
        if got.shape != expected.shape or single.shape != (1,):
            raise ExportError(
                f"{path}: onnxruntime returned shape {got.shape} for {len(x)} records and "
                f"{single.shape} for one; the contract needs [N] and [1]"
            )
        diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if len(got) else 0.0
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(
                f"{path}: onnxruntime differs from PyTorch by {diff:.3g} "
                f"(tolerance {PARITY_TOLERANCE:g}) on {len(x)} records; not written"
            )
        size = tmp.stat().st_size
    return ExportReport(
        path=path, size_bytes=size, parity_max_abs_diff=diff, parity_samples=len(got)
    )


def read_metadata(model_path: Path) -> dict[str, str]:
    """The metadata stored in an ONNX file (what cso wrote: variant, hyperparameters, ...)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}
