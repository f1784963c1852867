"""ONNX export that honours the app's contract (docs/contract.md), checked before the file appears.

A file is written under a temporary name, checked (the contract's names, types and shapes, then
onnxruntime's scores against the NumPy forward pass of the same weights) and only then renamed
into place, so a reader never sees a model that has not passed.

Nothing here imports PyTorch or the ``onnx`` package: the graph is written from the weights'
NumPy arrays (weights.py) with onnx_proto.py, so exporting a stored trial takes a fraction of a
second. The tests hold every graph to ``onnx.checker`` and to PyTorch's scores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calling_score_opt import onnx_proto
from calling_score_opt.atomic import atomic_path
from calling_score_opt.data import Array, constant_columns, pinned_values
from calling_score_opt.errors import ExportError
from calling_score_opt.weights import (
    N_VIBE_DIMENSIONS,
    EnsembleWeights,
    MlpWeights,
    Weights,
    never_learned_columns,
)

if TYPE_CHECKING:
    from calling_score_opt.config import TrainConfig
    from calling_score_opt.model import CallingScoreModel, EnsembleModel

INPUT_NAME = "input"
OUTPUT_NAME = "output"
PARITY_TOLERANCE = 1e-5
#: The metadata key listing the inputs whose first-layer weights export zeroed.
NEVER_LEARNED_KEY = "never_learned_inputs"


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how closely onnxruntime reproduces the NumPy forward pass."""

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
    try:
        summary = onnx_proto.read_summary(model_path.read_bytes())
    except (OSError, onnx_proto.OnnxFormatError) as exc:
        return [f"not a readable ONNX model ({exc})"]
    problems: list[str] = []
    if summary.external_initializers:
        problems.append("weights are stored in an external file; the app ships one file only")
    inputs, outputs = summary.inputs, summary.outputs
    if [i.name for i in inputs] != [INPUT_NAME]:
        problems.append(f"inputs are {[i.name for i in inputs]}, expected ['{INPUT_NAME}']")
    if [o.name for o in outputs] != [OUTPUT_NAME]:
        problems.append(f"outputs are {[o.name for o in outputs]}, expected ['{OUTPUT_NAME}']")
    if inputs:
        dims = inputs[0].dims or ()
        if inputs[0].elem_type != onnx_proto.FLOAT:
            problems.append("input is not float32")
        if len(dims) != 2 or not isinstance(dims[0], str):
            problems.append("input must be [N, features] with a dynamic batch dimension N")
        elif n_features is not None and dims[1] != n_features:
            problems.append(f"input has {dims[1]} features, expected {n_features}")
    if outputs:
        dims = outputs[0].dims or ()
        if outputs[0].elem_type != onnx_proto.FLOAT:
            problems.append("output is not float32")
        if len(dims) != 1 or not isinstance(dims[0], str):
            problems.append(
                f"output must be [N] (a flat list of scores), got rank {len(dims)}; "
                "[N, 1] makes the app fall back to 0.5"
            )
    return problems


def input_width(model_path: Path) -> int | None:
    """The number of features the ONNX file's input declares (None: it declares none)."""
    summary = onnx_proto.read_summary(model_path.read_bytes())
    dims = summary.inputs[0].dims if summary.inputs else None
    return dims[1] if dims and len(dims) == 2 and isinstance(dims[1], int) else None


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


def _mlp_graph(
    weights: MlpWeights, prefix: str, score: str
) -> tuple[list[onnx_proto.Node], list[bytes]]:
    """Nodes and initializers that turn ``input`` into ``score`` ([N]) for one MLP.

    Every name the MLP introduces starts with ``prefix``, so several MLPs fit in one graph.
    """
    Node = onnx_proto.Node

    def p(name: str) -> str:
        return prefix + name

    def tensor(name: str, value: Any) -> bytes:
        return onnx_proto.tensor(p(name), value)

    initializers = [
        tensor("feature_mean", weights.feature_mean),
        tensor("feature_std", weights.feature_std),
        tensor("squeeze_axes", np.array([1], dtype=np.int64)),
    ]
    nodes: list[onnx_proto.Node] = []
    raw = INPUT_NAME
    if weights.pins is not None:  # inputs held at their training value: x * keep + fill
        keep, fill = weights.pins
        initializers += [tensor("pin_keep", keep), tensor("pin_fill", fill)]
        nodes += [
            Node("Mul", [INPUT_NAME, p("pin_keep")], p("kept")),
            Node("Add", [p("kept"), p("pin_fill")], p("pinned")),
        ]
        raw = p("pinned")
    features = raw
    if weights.pair_features:  # |user - spot| per vibe dimension, appended to the raw input
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
            Node(
                "Slice", [raw, p("user_start"), p("spot_start"), p("feature_axis")], p("user_vibes")
            ),
            Node(
                "Slice", [raw, p("spot_start"), p("spot_end"), p("feature_axis")], p("spot_vibes")
            ),
            Node("Sub", [p("user_vibes"), p("spot_vibes")], p("vibe_diff")),
            Node("Abs", [p("vibe_diff")], p("vibe_pairs")),
            Node("Concat", [raw, p("vibe_pairs")], p("features"), {"axis": 1}),
        ]
        features = p("features")
    nodes += [
        Node("Sub", [features, p("feature_mean")], p("centred")),
        Node("Div", [p("centred"), p("feature_std")], p("scaled")),
    ]
    current = p("scaled")
    for layer, (weight, bias) in enumerate(weights.layers):
        initializers += [
            tensor(f"linear{layer}.weight", weight),
            tensor(f"linear{layer}.bias", bias),
        ]
        out = p(f"linear{layer}")
        gemm_inputs = [current, p(f"linear{layer}.weight"), p(f"linear{layer}.bias")]
        nodes.append(Node("Gemm", gemm_inputs, out, {"transB": 1}))
        last = layer == len(weights.layers) - 1
        op = "Sigmoid" if last else "Relu"  # dropout is the identity at inference
        activated = p(f"{op.lower()}{layer + 1}")
        nodes.append(Node(op, [out], activated))
        current = activated
    nodes.append(Node("Squeeze", [current, p("squeeze_axes")], score))
    return nodes, initializers


def as_weights(model: Weights | CallingScoreModel | EnsembleModel) -> Weights:
    """NumPy weights of ``model`` (a PyTorch model is converted; that needs PyTorch loaded)."""
    if isinstance(model, MlpWeights | EnsembleWeights):
        return model
    from calling_score_opt.model import weights_of

    return weights_of(model)


def onnx_bytes(
    model: Weights | CallingScoreModel | EnsembleModel, metadata: Mapping[str, Any]
) -> bytes:
    """The serialized ONNX model: Sub, Div, (Gemm, Relu)*, Gemm, Sigmoid, Squeeze.

    Written from the weights instead of tracing with ``torch.onnx``: the architecture is fixed
    and tiny, tracing costs about a second per model (more than training some variants), and
    the result here is the same graph, byte for byte the same every time, with nothing in it
    but the scaling, the layers and the sigmoid. :func:`export_onnx` checks it in onnxruntime.

    An ensemble is each member's graph (names prefixed ``m0_``, ``m1_``, ...), every score
    multiplied by its weight (Mul) and the products added (Sum): still one input, one [N]
    output, one file. Metadata values that are not strings are stored as JSON.
    """
    weights = as_weights(model)
    if isinstance(weights, EnsembleWeights):
        nodes: list[onnx_proto.Node] = []
        initializers: list[bytes] = []
        weighted = []
        for index, (share, member) in enumerate(zip(weights.weights, weights.members, strict=True)):
            prefix = f"m{index}_"
            member_nodes, member_inits = _mlp_graph(member, prefix, f"{prefix}score")
            nodes += member_nodes
            initializers += [
                *member_inits,
                onnx_proto.tensor(f"{prefix}weight", np.array(share, dtype=np.float32)),
            ]
            nodes.append(
                onnx_proto.Node("Mul", [f"{prefix}score", f"{prefix}weight"], f"{prefix}weighted")
            )
            weighted.append(f"{prefix}weighted")
        nodes.append(onnx_proto.Node("Sum", weighted, OUTPUT_NAME))
        graph_name = "calling_score_ensemble"
    else:
        nodes, initializers = _mlp_graph(weights, "", OUTPUT_NAME)
        graph_name = "calling_score_mlp"
    return onnx_proto.model_bytes(
        graph_name=graph_name,
        nodes=nodes,
        initializers=initializers,
        inputs=[onnx_proto.value_info(INPUT_NAME, onnx_proto.FLOAT, ["N", weights.n_inputs])],
        outputs=[onnx_proto.value_info(OUTPUT_NAME, onnx_proto.FLOAT, ["N"])],
        metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()},
        ir_version=IR_VERSION,
        opset=OPSET,
        producer="cso",
    )


def without_unlearned_inputs(weights: Weights, x_train: Array) -> tuple[Weights, list[int]]:
    """``weights`` that ignore the inputs ``x_train`` holds constant, and those raw columns.

    A constant training input reaches the network as 0 in every training record, so its
    first-layer weights keep their random initial values: they are zeroed (see
    :meth:`weights.MlpWeights.ignoring`). With pair features the input is also pinned to its
    training value, so that it cannot reach the network through ``|user - spot|`` either. On
    inputs like the training data nothing changes.
    """
    raw = constant_columns(x_train)
    values = pinned_values(x_train, raw)

    def member(m: MlpWeights) -> MlpWeights:
        ignoring = m.ignoring(never_learned_columns(x_train, m.pair_features))
        return ignoring.pinning(raw, values) if m.pair_features else ignoring

    if isinstance(weights, EnsembleWeights):
        members = tuple(member(m) for m in weights.members)
        return EnsembleWeights(members, weights.weights), list(raw)
    return member(weights), list(raw)


def export_onnx(
    model: Weights | CallingScoreModel | EnsembleModel,
    path: Path,
    x_check: Array,
    metadata: Mapping[str, Any],
    *,
    x_train: Array,
) -> ExportReport:
    """Write ``model`` as one self-contained ONNX file at ``path``, verified before it appears.

    Inputs the training split ``x_train`` holds constant get zero first-layer weights, and the
    metadata lists them (``never_learned_inputs``, by name when ``metadata`` has
    ``feature_names``). ``x_check`` (raw features, e.g. the whole test split) is scored by the
    NumPy forward pass and by onnxruntime; the export fails when they differ by more than
    ``PARITY_TOLERANCE``. ``metadata`` values are stored as ONNX metadata (non-strings as JSON).

    Raises:
        ExportError: the graph breaks the contract, onnxruntime cannot run it, or parity fails.
    """
    weights, unlearned = without_unlearned_inputs(as_weights(model), x_train)
    names = metadata.get("feature_names")
    metadata = {
        **metadata,
        NEVER_LEARNED_KEY: [
            names[i] if isinstance(names, list) and i < len(names) else f"input {i}"
            for i in unlearned
        ],
    }
    with atomic_path(path) as tmp:
        try:
            tmp.write_bytes(onnx_bytes(weights, metadata))
        except ValueError as exc:
            raise ExportError(f"{path}: the model cannot be written as ONNX: {exc}") from exc
        problems = contract_problems(tmp, weights.n_inputs)
        if problems:
            raise ExportError(f"{path}: breaks the app's ONNX contract: {'; '.join(problems)}")
        x = np.ascontiguousarray(x_check, np.float32)
        expected = weights.predict(x)
        try:
            session = _ort_session(tmp)
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            single = session.run([OUTPUT_NAME], {INPUT_NAME: x[:1]})[0]
        except Exception as exc:  # onnxruntime raises its own unrelated types
            raise ExportError(f"{path}: onnxruntime cannot run the model: {exc}") from exc
        if got.shape != expected.shape or single.shape != (1,):
            raise ExportError(
                f"{path}: onnxruntime returned shape {got.shape} for {len(x)} records and "
                f"{single.shape} for one; the contract needs [N] and [1]"
            )
        diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if len(got) else 0.0
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(
                f"{path}: onnxruntime differs from the NumPy forward pass by {diff:.3g} "
                f"(tolerance {PARITY_TOLERANCE:g}) on {len(x)} records; not written"
            )
        size = tmp.stat().st_size
    return ExportReport(
        path=path, size_bytes=size, parity_max_abs_diff=diff, parity_samples=len(got)
    )


def read_metadata(model_path: Path) -> dict[str, str]:
    """The metadata stored in an ONNX file (what cso wrote: variant, hyperparameters, ...).

    Raises:
        ExportError: the file cannot be read or is no ONNX model.
    """
    try:
        return onnx_proto.read_summary(model_path.read_bytes()).metadata
    except (OSError, onnx_proto.OnnxFormatError) as exc:
        raise ExportError(f"{model_path}: not a readable ONNX model ({exc})") from exc
