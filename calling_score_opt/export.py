"""ONNX export that honours the app's contract (CONTRACTS §3), checked before the file appears.

A file is written under a temporary name, checked (``onnx.checker``, the contract's names, types
and shapes, onnxruntime parity against PyTorch) and only then renamed into place, so a reader
never sees a model that has not passed.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calling_score_opt.atomic import atomic_path
from calling_score_opt.data import Array
from calling_score_opt.errors import ExportError
from calling_score_opt.model import CallingScoreModel

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


def contract_problems(model_path: Path, n_features: int | None = None) -> list[str]:
    """Every way the ONNX file at ``model_path`` breaks CONTRACTS §3 (empty when it obeys it).

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


def export_onnx(
    model: CallingScoreModel,
    path: Path,
    x_check: Array,
    metadata: Mapping[str, Any],
) -> ExportReport:
    """Export ``model`` to one self-contained ONNX file at ``path`` and verify it.

    ``x_check`` (raw features, e.g. the whole test split) is scored by PyTorch and onnxruntime;
    the export fails when they differ by more than ``PARITY_TOLERANCE``. ``metadata`` values
    are stored as ONNX metadata (non-strings as JSON).

    Raises:
        ExportError: the exporter failed, the file breaks the contract, or parity fails.
    """
    import onnx
    import torch

    model = model.cpu().eval()
    n_features = int(model.feature_mean.shape[0])
    example = torch.from_numpy(np.ascontiguousarray(x_check[:2], np.float32))
    if example.shape[0] < 2:  # torch.export specialises a batch of 1; 2 keeps N symbolic
        example = torch.zeros(2, n_features)
    with atomic_path(path) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
                program = torch.onnx.export(
                    model,
                    (example,),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                    optimize=True,
                    verbose=False,
                )
        except Exception as exc:  # the exporter raises many types; all mean "no model"
            raise ExportError(f"{path}: torch.onnx export failed: {exc}") from exc
        assert program is not None
        proto = program.model_proto
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key = key
            entry.value = value if isinstance(value, str) else json.dumps(value)
        # Weights inside the one file: PyTorch's default (since 2.9) puts them in .onnx.data.
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{path}: onnx.checker rejected the model: {exc}") from exc
        problems = contract_problems(tmp, n_features)
        if problems:
            raise ExportError(f"{path}: breaks the app's ONNX contract: {'; '.join(problems)}")

        with torch.no_grad():
            expected = model(torch.from_numpy(np.ascontiguousarray(x_check, np.float32))).numpy()
        session = _ort_session(tmp)
        got = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x_check, np.float32)})[0]
        single = session.run(
            [OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x_check[:1], np.float32)}
        )[0]
        if got.shape != expected.shape or single.shape != (1,):
            raise ExportError(
                f"{path}: onnxruntime returned shape {got.shape} for {len(x_check)} records and "
                f"{single.shape} for one; the contract needs [N] and [1]"
            )
        diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if len(got) else 0.0
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(
                f"{path}: onnxruntime differs from PyTorch by {diff:.3g} "
                f"(tolerance {PARITY_TOLERANCE:g}) on {len(x_check)} records; not written"
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
