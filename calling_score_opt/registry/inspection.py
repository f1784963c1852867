"""Model files: is this ONNX file one the app can run, what does it say about itself, is it intact.

Registration checks a file here before anything is recorded; the commands that send traffic to
a version check here that its file is still the registered one (its sha256).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from calling_score_opt.registry.fileformat import loads_json
from calling_score_opt.registry.records import (
    N_FEATURES,
    ModelVersion,
    RegistryError,
    check_model_type,
)

SMOKE_ROWS = 8


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_state(record: ModelVersion) -> str:
    """``ok``, ``missing`` or ``changed`` (the file is not the one that was registered)."""
    path = Path(record.model_path)
    if not path.is_file():
        return "missing"
    return "ok" if file_sha256(path) == record.sha256 else "changed"


def check_servable(record: ModelVersion) -> None:
    """Refuse to send traffic to a version whose file is gone or is not the registered one."""
    state = file_state(record)
    if state == "missing":
        raise RegistryError(
            f"{record.version}: its model file {record.model_path} is missing; restore it "
            "(the registry keeps its sha256) before it can serve traffic"
        )
    if state == "changed":
        raise RegistryError(
            f"{record.version}: {record.model_path} has changed since it was registered (its "
            "sha256 differs); restore the registered file, or register the new file as a new "
            "version"
        )


def stored_path(path: Path) -> str:
    """The path as the registry stores it: relative to the working directory when inside it."""
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd()).as_posix()
        except ValueError:
            return path.as_posix()
    return path.as_posix()


@dataclass(frozen=True)
class InspectedModel:
    """What registration learns from an ONNX file that obeys the contract."""

    path: Path
    sha256: str
    metadata: dict[str, str]
    training_metrics: dict[str, Any]
    parity: dict[str, Any]
    trained_date: str
    variant: str | None


def json_value(metadata: Mapping[str, str], key: str) -> Any:
    """A metadata value that holds JSON, decoded; None when absent or not usable JSON."""
    try:
        return loads_json(metadata[key], finite=False)
    except (KeyError, ValueError):
        return None


def _results_entry(model_path: Path, variant: str | None, fingerprint: str | None) -> Any:
    """This model's entry in the optimization_results.json beside it, when it is there.

    Only an entry of the same variant, trained on the same data (fingerprint), counts.
    """
    from calling_score_opt.results import RESULTS_FILENAME

    results_path = model_path.parent / RESULTS_FILENAME
    if variant is None or not results_path.is_file():
        return None
    try:
        results = loads_json(results_path.read_text(encoding="utf-8"), finite=False)
        if results["data"]["fingerprint"] != fingerprint:
            return None
        for entry in results["variants"]:
            if entry.get("name") == variant and entry.get("success", True):
                return entry
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # an unreadable results file only means fewer metrics
    return None


def inspect_model(model_path: Path, model_type: str) -> InspectedModel:
    """Check an ONNX file for registration and read what it says about itself.

    It must exist, obey the app's ONNX contract (39 raw inputs for ``calling_score``), and score
    a few rows with onnxruntime: shapes [N] and [1], finite values in [0, 1]. Training metrics come
    from its metadata; the improvement over the baseline and the export's parity from the
    ``optimization_results.json`` beside it, when that describes the same model.

    Raises:
        RegistryError: the file is missing, breaks the contract, or does not run.
    """
    import numpy as np

    from calling_score_opt.export import contract_problems, onnx_predict, read_metadata

    if not model_path.is_file():
        raise RegistryError(f"{model_path}: no such model file; check the path")
    sha256 = file_sha256(model_path)
    problems = contract_problems(model_path, N_FEATURES[check_model_type(model_type)])
    if problems:
        raise RegistryError(
            f"{model_path}: breaks the app's ONNX contract (docs/contract.md): "
            f"{'; '.join(problems)}"
        )
    metadata = read_metadata(model_path)
    declared = metadata.get("model_type")
    if declared is not None and declared != model_type:
        raise RegistryError(
            f"{model_path}: its metadata says model_type '{declared}', not '{model_type}'; "
            f"pass --model-type {declared}"
        )
    width = _input_width(model_path)
    if width < 1:
        raise RegistryError(f"{model_path}: the input's feature dimension must be a fixed number")
    rows = np.random.default_rng(0).random((SMOKE_ROWS, width), dtype=np.float32)
    try:
        scores = np.asarray(onnx_predict(model_path, rows), dtype=np.float64)
        single = onnx_predict(model_path, rows[:1])
    except Exception as exc:  # onnxruntime raises its own, unrelated exception types
        raise RegistryError(f"{model_path}: onnxruntime cannot run it ({exc})") from None
    if scores.shape != (SMOKE_ROWS,) or single.shape != (1,):
        raise RegistryError(
            f"{model_path}: scored {SMOKE_ROWS} rows as shape {scores.shape} and one as "
            f"{single.shape}; the contract needs [N] and [1]"
        )
    if not (np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 1))):
        raise RegistryError(f"{model_path}: scores outside [0, 1] on random inputs in [0, 1]")

    variant = metadata.get("variant")
    metrics = json_value(metadata, "metrics")
    training_metrics = {
        key: value
        for key, value in (metrics.items() if isinstance(metrics, dict) else ())
        if value is not None and not (isinstance(value, float) and not math.isfinite(value))
    }
    parity: dict[str, Any] = {
        "smoke_rows": SMOKE_ROWS,
        "smoke_output_range": [float(scores.min()), float(scores.max())],
        "export_max_abs_diff": None,
        "export_checked_against": None,
    }
    entry = _results_entry(model_path, variant, metadata.get("data_fingerprint"))
    if isinstance(entry, dict):
        improvement = entry.get("improvement_vs_baseline_pct")
        if isinstance(improvement, int | float):
            training_metrics["improvement_vs_baseline"] = improvement  # percent, as the guide
        if isinstance(entry.get("parity_max_abs_diff"), int | float):
            parity["export_max_abs_diff"] = entry["parity_max_abs_diff"]
            parity["export_checked_against"] = PARITY_REFERENCE
    if file_sha256(model_path) != sha256:
        raise RegistryError(f"{model_path}: changed while it was being checked; run it again")
    mtime = datetime.fromtimestamp(model_path.stat().st_mtime, UTC)
    return InspectedModel(
        path=model_path,
        sha256=sha256,
        metadata=metadata,
        training_metrics=training_metrics,
        parity=parity,
        trained_date=mtime.isoformat(timespec="seconds"),
        variant=variant,
    )


#: What an export's parity figure compares onnxruntime with (recorded with each version).
PARITY_REFERENCE = "the NumPy forward pass of the same weights on the test split (cso export check)"


def _input_width(model_path: Path) -> int:
    from calling_score_opt.export import input_width

    return input_width(model_path) or 0


def default_description(inspected: InspectedModel) -> str:
    """The guide's description: variant, hyperparameters and the gain over the baseline."""
    name = inspected.variant or inspected.path.name
    params = json_value(inspected.metadata, "hyperparameters")
    parts = []
    if isinstance(params, dict):
        labels = (
            ("learning_rate", "lr"),
            ("batch_size", "batch"),
            ("hidden_sizes", "hidden"),
            ("dropout", "dropout"),
        )
        parts = [f"{label}={params[key]}" for key, label in labels if key in params]
    text = f"{name} ({', '.join(parts)})" if parts else name
    improvement = inspected.training_metrics.get("improvement_vs_baseline")
    if isinstance(improvement, int | float):
        text += f", {_gain_text(improvement)}"
    return text


def _gain_text(improvement: float) -> str:
    if improvement >= 0:
        return f"improved test loss by {improvement:.2f}%"
    return f"test loss {-improvement:.2f}% worse than the baseline"
