"""The model version registry the app reads: versions, A/B tests, promotion and rollback.

One JSON file (``assets/models/registry.json`` by default) holds, per model type, every
registered version with the fields of the app's version record (docs/contract.md), the running
A/B test and a history of events. Every change is read-check-modify-write under a file lock and
written atomically, so concurrent commands never lose an update, a crash never leaves half a
file, and a refused change leaves the file byte for byte as it was. See docs/registry.md and
docs/routing.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import secrets
import shutil
import statistics
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from calling_score_opt.atomic import write_text_atomic
from calling_score_opt.errors import CsoError, DataError

SCHEMA_VERSION = 1
DEFAULT_REGISTRY = Path("assets/models/registry.json")
DEFAULT_VERSIONS_DIR = Path("assets/models/versions")
DEFAULT_GRID_DIR = Path("assets/models/optimized")
MODEL_TYPES = ("calling_score", "outcome")
DATA_SOURCES = ("synthetic", "hybrid_big_five", "real_data")
STATUSES = ("staging", "active", "deprecated", "archived")
EVENTS = ("register", "ab-start", "ab-set", "ab-stop", "promote", "rollback", "archive")
DEFAULT_WEIGHT = 0.1  # docs/contract.md: new versions start at 0.1
N_FEATURES: dict[str, int | None] = {"calling_score": 39, "outcome": None}
LOCK_TIMEOUT_S = 60.0
SMOKE_ROWS = 8
SRM_ALPHA = 0.001  # a sample-ratio mismatch this unlikely means the assignment is broken
Z_95 = 1.959963984540054  # two-sided 95%
Z_POWER_80 = 0.8416212335729143  # 80% power
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class RegistryError(CsoError):
    """Raised when the registry file cannot be used or a command would break its rules.

    For example: an unknown version, a traffic share outside (0, 1], an illegal state change
    (archiving the active version), a model that breaks the app's ONNX contract, or a
    hand-edited file that is not a registry. Nothing is written when it is raised.
    """


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the records ---------------------------------------------------------------------------


@dataclass
class ModelVersion:
    """One registered model: the app's fields (docs/contract.md) plus where it came from."""

    version: str
    model_path: str
    default_weight: float
    data_source: str
    status: str
    sha256: str
    trained_date: str | None = None
    description: str = ""
    training_metrics: dict[str, Any] = field(default_factory=dict)
    ab_test_traffic_percentage: float | None = None
    ab_test_start_date: str | None = None
    performance_metrics: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys others wrote; kept as they are

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "modelPath": self.model_path,
            "defaultWeight": self.default_weight,
            "dataSource": self.data_source,
            "trainedDate": self.trained_date,
            "status": self.status,
            "description": self.description,
            "trainingMetrics": self.training_metrics,
            "abTestTrafficPercentage": self.ab_test_traffic_percentage,
            "abTestStartDate": self.ab_test_start_date,
            "performanceMetrics": self.performance_metrics,
            "sha256": self.sha256,
            "source": self.source,
            "parity": self.parity,
            **self.extra,
        }


@dataclass
class ABTest:
    """The running A/B test of one model type: ``traffic`` of users get ``candidate``."""

    candidate: str
    traffic: float
    salt: str
    started: str

    def to_json(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "traffic": self.traffic,
            "salt": self.salt,
            "started": self.started,
        }


@dataclass
class HistoryEvent:
    """One change: what happened to ``version``, and the active version before and after."""

    at: str
    event: str
    version: str | None
    active: str | None
    previous: str | None
    traffic: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "event": self.event,
            "version": self.version,
            "active": self.active,
            "previous": self.previous,
            "traffic": self.traffic,
        }


@dataclass
class ModelTypeRegistry:
    """The versions of one model type, its active version and its A/B test."""

    active: str | None = None
    ab_test: ABTest | None = None
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    history: list[HistoryEvent] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "ab_test": self.ab_test.to_json() if self.ab_test else None,
            "versions": {name: record.to_json() for name, record in self.versions.items()},
            "history": [event.to_json() for event in self.history],
        }


@dataclass
class Registry:
    """The whole file. ``path`` is where it was read from (for messages; not stored)."""

    path: Path
    model_types: dict[str, ModelTypeRegistry] = field(
        default_factory=lambda: {name: ModelTypeRegistry() for name in MODEL_TYPES}
    )
    updated: str | None = None

    def to_json(self) -> dict[str, Any]:
        from calling_score_opt import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "producer": f"cso {__version__}",
            "updated": self.updated,
            "model_types": {name: state.to_json() for name, state in self.model_types.items()},
        }

    def of(self, model_type: str) -> ModelTypeRegistry:
        """The registry of ``model_type``; RegistryError when it is not one of MODEL_TYPES."""
        check_model_type(model_type)
        return self.model_types[model_type]

    def version(self, model_type: str, version: str) -> ModelVersion:
        """A registered version, or a RegistryError that lists the ones there are."""
        state = self.of(model_type)
        if version not in state.versions:
            known = ", ".join(state.versions) or "none yet"
            raise RegistryError(
                f"no {model_type} version '{version}' in {self.path} (versions: {known})"
            )
        return state.versions[version]


def registry_text(registry: Registry) -> str:
    """The file's exact text (2-space indented JSON, one trailing newline)."""
    return json.dumps(registry.to_json(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# --- checks of single values ----------------------------------------------------------------


def check_model_type(model_type: str) -> str:
    if model_type not in MODEL_TYPES:
        raise RegistryError(
            f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {_show(model_type)}"
        )
    return model_type


def check_version_name(version: str) -> str:
    if not _VERSION_NAME.match(version):
        raise RegistryError(
            f"--version must be 1-64 letters, digits, '.', '_', '+' or '-', starting with a "
            f"letter or digit (it names a folder), got {_show(version)}"
        )
    return version


def check_traffic(traffic: float) -> float:
    """A traffic share: a number in (0, 1], the fraction of users who get the candidate."""
    if not (isinstance(traffic, int | float) and math.isfinite(traffic) and 0 < traffic <= 1):
        hint = (
            f" (for {traffic:g}% write {traffic / 100:g})" if _looks_like_percent(traffic) else ""
        )
        raise RegistryError(
            f"--traffic must be in (0, 1], a share of users (0.1 = 10%), got {traffic!r}{hint}"
        )
    return float(traffic)


def _looks_like_percent(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and 1 < value <= 100


def check_default_weight(weight: float) -> float:
    if not (math.isfinite(weight) and 0 <= weight <= 1):
        raise RegistryError(
            f"--default-weight must be in [0, 1] (how much the neural score counts against the "
            f"formula score), got {weight!r}"
        )
    return float(weight)


def check_data_source(source: str) -> str:
    if source not in DATA_SOURCES:
        raise RegistryError(
            f"--data-source must be one of {', '.join(DATA_SOURCES)}, got {_show(source)}"
        )
    return source


# --- reading and validating the file --------------------------------------------------------


class _Object:
    """A JSON object being validated: every complaint names the file and the place."""

    def __init__(self, value: object, where: str, path: Path) -> None:
        self.path, self.where = path, where
        if not isinstance(value, dict):
            raise self._error(where, "must be a JSON object", value)
        self.data: dict[str, Any] = value

    def _error(self, where: str, rule: str, got: object) -> RegistryError:
        return RegistryError(
            f"{self.path}: {where} {rule}, got {_show(got)}; "
            "fix the file or restore a good copy (it is not a registry cso can use)"
        )

    def _at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, rule: str) -> RegistryError:
        return self._error(self._at(key), rule, self.data.get(key))

    def text(self, key: str, choices: Sequence[str] | None = None) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(key, "must be a non-empty string")
        if choices is not None and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}")
        return value

    def optional_text(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, "must be a string or null")
        return value

    def number(self, key: str, low: float, high: float, low_open: bool = False) -> float:
        value = self.data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            above_low = low < value if low_open else low <= value
            if math.isfinite(value) and above_low and value <= high:
                return float(value)
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise self.fail(key, f"must be a number in {interval}")

    def optional_number(
        self, key: str, low: float, high: float, low_open: bool = False
    ) -> float | None:
        return None if self.data.get(key) is None else self.number(key, low, high, low_open)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "must be a JSON object")
        return value

    def child(self, key: str) -> _Object:
        return _Object(self.data.get(key), self._at(key), self.path)

    def items(self, key: str) -> list[Any]:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.fail(key, "must be a JSON list")
        return value


_VERSION_KEYS = {
    "version",
    "modelPath",
    "defaultWeight",
    "dataSource",
    "trainedDate",
    "status",
    "description",
    "trainingMetrics",
    "abTestTrafficPercentage",
    "abTestStartDate",
    "performanceMetrics",
    "sha256",
    "source",
    "parity",
}


def _parse_version(obj: _Object, name: str) -> ModelVersion:
    if obj.text("version") != name:
        raise obj.fail("version", f"must equal its key '{name}'")
    sha = obj.text("sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise obj.fail("sha256", "must be 64 lowercase hex digits")
    description = obj.optional_text("description")
    return ModelVersion(
        version=name,
        model_path=obj.text("modelPath"),
        default_weight=obj.number("defaultWeight", 0, 1),
        data_source=obj.text("dataSource", DATA_SOURCES),
        status=obj.text("status", STATUSES),
        sha256=sha,
        trained_date=obj.optional_text("trainedDate"),
        description=description or "",
        training_metrics=obj.mapping("trainingMetrics"),
        ab_test_traffic_percentage=obj.optional_number(
            "abTestTrafficPercentage", 0, 1, low_open=True
        ),
        ab_test_start_date=obj.optional_text("abTestStartDate"),
        performance_metrics=obj.mapping("performanceMetrics"),
        source=obj.mapping("source"),
        parity=obj.mapping("parity"),
        extra={k: v for k, v in obj.data.items() if k not in _VERSION_KEYS},
    )


def _parse_model_type(obj: _Object, model_type: str) -> ModelTypeRegistry:
    versions: dict[str, ModelVersion] = {}
    if obj.data.get("versions") is not None:
        versions_obj = obj.child("versions")
        versions = {
            name: _parse_version(versions_obj.child(name), name) for name in versions_obj.data
        }
    state = ModelTypeRegistry(active=obj.optional_text("active"), versions=versions)
    active_ones = [name for name, record in versions.items() if record.status == "active"]
    if state.active is not None and state.active not in versions:
        raise obj.fail("active", "must name a registered version")
    if active_ones != ([state.active] if state.active else []):
        raise obj.fail(
            "active",
            f"must be the one version whose status is active (status active: "
            f"{', '.join(active_ones) or 'none'})",
        )
    if obj.data.get("ab_test") is not None:
        test_obj = obj.child("ab_test")
        test = ABTest(
            candidate=test_obj.text("candidate"),
            traffic=test_obj.number("traffic", 0, 1, low_open=True),
            salt=test_obj.text("salt"),
            started=test_obj.text("started"),
        )
        candidate = versions.get(test.candidate)
        if candidate is None or candidate.status != "staging":
            raise test_obj.fail("candidate", "must name a registered staging version")
        if state.active is None:
            raise obj.fail("ab_test", "needs an active version to test against")
        state.ab_test = test
    for name, record in versions.items():
        expected = (
            state.ab_test.traffic if state.ab_test and state.ab_test.candidate == name else None
        )
        if record.ab_test_traffic_percentage != expected:
            where = obj.child("versions").child(name)
            raise where.fail(
                "abTestTrafficPercentage",
                "must be the running A/B test's traffic for its candidate, else null",
            )
    for index, item in enumerate(obj.items("history")):
        event = _Object(item, f"{obj.where}.history[{index}]", obj.path)
        state.history.append(
            HistoryEvent(
                at=event.text("at"),
                event=event.text("event", EVENTS),
                version=event.optional_text("version"),
                active=event.optional_text("active"),
                previous=event.optional_text("previous"),
                traffic=event.optional_number("traffic", 0, 1, low_open=True),
            )
        )
    return state


def parse_registry(document: object, path: Path) -> Registry:
    """Validate a decoded registry document; RegistryError (naming the place) when it is not."""
    if not isinstance(document, dict):
        raise RegistryError(
            f"{path}: must hold a JSON object, got {_show(document)}; "
            "fix the file or restore a good copy (it is not a registry cso can use)"
        )
    top = _Object(document, "", path)
    schema = top.data.get("schema_version")
    if schema != SCHEMA_VERSION:
        newer = isinstance(schema, int) and not isinstance(schema, bool) and schema > 1
        hint = "; it was written by a newer cso: upgrade cso" if newer else ""
        raise RegistryError(
            f"{path}: schema_version must be {SCHEMA_VERSION}, got {_show(schema)}{hint}"
        )
    types_obj = top.child("model_types")
    registry = Registry(path=path, updated=top.optional_text("updated"))
    for name in types_obj.data:
        if name not in MODEL_TYPES:
            raise types_obj.fail(name, f"is not a model type ({', '.join(MODEL_TYPES)})")
        registry.model_types[name] = _parse_model_type(types_obj.child(name), name)
    return registry


def load_registry(path: Path) -> Registry:
    """The registry at ``path`` (an empty one when the file does not exist yet).

    Raises:
        RegistryError: the file cannot be read, is not JSON, or is not a valid registry.
    """
    if not path.exists():
        return Registry(path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read the registry ({exc})") from None
    try:
        document = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise RegistryError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix the file or restore a good copy"
        ) from None
    except ValueError as exc:
        raise RegistryError(f"{path}: not valid JSON ({exc}); fix the file") from None
    return parse_registry(document, path)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:30]} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


@contextmanager
def update_registry(path: Path) -> Iterator[Registry]:
    """Load the registry under its lock, let the caller change it, then write it atomically.

    Nothing is written when the body raises, so a refused change leaves the file byte for byte
    as it was. The lock (``<path>.lock``) serialises every writer, across processes.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise RegistryError(
            f"{path}.lock: another cso registry command has held the lock for "
            f"{LOCK_TIMEOUT_S:g} s; wait for it to finish and run the command again"
        ) from None
    except OSError as exc:
        raise RegistryError(f"{path}: cannot create or lock the registry ({exc})") from None
    try:
        registry = load_registry(path)
        yield registry
        registry.updated = _now()
        try:
            write_text_atomic(path, registry_text(registry))
        except OSError as exc:
            raise RegistryError(
                f"{path}: cannot write the registry ({exc}); it is unchanged"
            ) from None
    finally:
        lock.release()


# --- model files ----------------------------------------------------------------------------


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


def _check_servable(record: ModelVersion) -> None:
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


def _stored_path(path: Path) -> str:
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


def _json_value(metadata: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError):
        return None


def _results_entry(model_path: Path, variant: str | None, fingerprint: str | None) -> Any:
    """This model's entry in the optimization_results.json beside it, when it is there.

    Only an entry of the same variant, trained on the same data (fingerprint), counts.
    """
    from calling_score_opt.trials import RESULTS_FILENAME

    results_path = model_path.parent / RESULTS_FILENAME
    if variant is None or not results_path.is_file():
        return None
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
        if results["data"]["fingerprint"] != fingerprint:
            return None
        for entry in results["variants"]:
            if entry.get("name") == variant and entry.get("success", True):
                return entry
    except (OSError, ValueError, KeyError, TypeError):
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
    metrics = _json_value(metadata, "metrics")
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
            parity["export_checked_against"] = "PyTorch on the test split (cso export check)"
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


def _input_width(model_path: Path) -> int:
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return int(proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value)


def _default_description(inspected: InspectedModel) -> str:
    name = inspected.variant or inspected.path.name
    params = _json_value(inspected.metadata, "hyperparameters")
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


# --- registering ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What ``cso registry register`` was asked to record, besides the model file."""

    version: str
    data_source: str
    model_type: str = "calling_score"
    default_weight: float = DEFAULT_WEIGHT
    description: str | None = None

    def __post_init__(self) -> None:
        check_version_name(self.version)
        check_data_source(self.data_source)
        check_model_type(self.model_type)
        check_default_weight(self.default_weight)


def _refuse_existing(registry: Registry, registration: Registration) -> None:
    state = registry.of(registration.model_type)
    if registration.version in state.versions:
        record = state.versions[registration.version]
        raise RegistryError(
            f"{registration.model_type} version '{registration.version}' is already registered "
            f"({record.status}, {record.model_path}); versions are never overwritten: choose a "
            "new --version"
        )


def _add(
    registry_path: Path,
    registration: Registration,
    inspected: InspectedModel,
    model_path: Path,
    source: dict[str, Any],
    trained_date: str | None = None,
    staged_dir: Path | None = None,
    final_dir: Path | None = None,
) -> ModelVersion:
    """Record a checked model as a new staging version (under the lock).

    ``staged_dir`` (an export made for this version) is renamed to ``final_dir`` only once the
    version is known to be new, inside the lock.
    """
    metadata = inspected.metadata
    for key in ("variant", "study", "data_fingerprint"):
        if key in metadata and key not in source:
            source[key] = metadata[key]
    if "trial_number" in metadata and "trial_number" not in source:
        number = _json_value(metadata, "trial_number")
        source["trial_number"] = number if isinstance(number, int) else metadata["trial_number"]
    record = ModelVersion(
        version=registration.version,
        model_path=_stored_path(model_path),
        default_weight=registration.default_weight,
        data_source=registration.data_source,
        status="staging",
        sha256=inspected.sha256,
        trained_date=trained_date or inspected.trained_date,
        description=registration.description
        if registration.description is not None
        else _default_description(inspected),
        training_metrics=dict(inspected.training_metrics),
        source=source,
        parity=dict(inspected.parity),
    )
    moved = False
    try:
        with update_registry(registry_path) as registry:
            _refuse_existing(registry, registration)
            if staged_dir is not None and final_dir is not None:
                if final_dir.exists():
                    raise RegistryError(
                        f"{final_dir} already exists but is no registered version; move it "
                        "away or choose another --version"
                    )
                final_dir.parent.mkdir(parents=True, exist_ok=True)
                staged_dir.rename(final_dir)
                moved = True
            state = registry.of(registration.model_type)
            state.versions[record.version] = record
            state.history.append(
                HistoryEvent(_now(), "register", record.version, state.active, state.active)
            )
    except BaseException:
        if moved and staged_dir is not None and final_dir is not None:
            final_dir.rename(staged_dir)  # not registered after all: the caller removes it
        raise
    return record


def register_model(
    registry_path: Path, registration: Registration, model_path: Path
) -> ModelVersion:
    """Register any ONNX file that obeys the contract (``--model PATH``) as a staging version."""
    _refuse_existing(load_registry(registry_path), registration)
    inspected = inspect_model(model_path, registration.model_type)
    source: dict[str, Any] = {"kind": "file", "path": _stored_path(model_path)}
    return _add(registry_path, registration, inspected, model_path, source)


def register_variant(
    registry_path: Path, registration: Registration, variant: str, grid_dir: Path
) -> ModelVersion:
    """Register a grid variant's ONNX file (``--variant NAME``) as a staging version."""
    from calling_score_opt.grid import onnx_filename

    _refuse_existing(load_registry(registry_path), registration)
    model_path = grid_dir / onnx_filename(variant)
    if not model_path.is_file():
        found = sorted(
            p.name.removeprefix("calling_score_model_").removesuffix(".onnx")
            for p in grid_dir.glob("calling_score_model_*.onnx")
        )
        raise RegistryError(
            f"{model_path}: no such model file (variants in {grid_dir}: "
            f"{', '.join(found) or 'none'}); run cso grid or pass --grid-dir"
        )
    inspected = inspect_model(model_path, registration.model_type)
    if inspected.variant is not None and inspected.variant != variant:
        raise RegistryError(
            f"{model_path}: its metadata names variant '{inspected.variant}', not '{variant}'"
        )
    source: dict[str, Any] = {
        "kind": "grid_variant",
        "variant": variant,
        "grid_dir": _stored_path(grid_dir),
    }
    return _add(registry_path, registration, inspected, model_path, source)


def register_trial(
    registry_path: Path,
    registration: Registration,
    trial: int,
    study_name: str,
    storage_url: str,
    versions_dir: Path = DEFAULT_VERSIONS_DIR,
) -> ModelVersion:
    """Export a stored trial (``--trial N``) into ``<versions_dir>/<model_type>/<version>/``
    and register it as a staging version.

    The export is the verified one of ``cso export`` (parity against PyTorch on the study's
    test split); it goes to a temporary folder first, so a refused registration leaves nothing.
    """
    from calling_score_opt.trials import export_trials, load_study, select_trials

    _refuse_existing(load_registry(registry_path), registration)
    final_dir = versions_dir / registration.model_type / registration.version
    if final_dir.exists():
        raise RegistryError(
            f"{final_dir} already exists but is no registered version; move it away or choose "
            "another --version"
        )
    study = load_study(storage_url, study_name)
    chosen = select_trials(study, number=trial)
    staged_dir = versions_dir / f".staging-{registration.version}-{secrets.token_hex(4)}"
    try:
        exported = export_trials(study, chosen, staged_dir, storage_url)
        entry = exported.results["variants"][0]
        staged_model = Path(entry["onnx_path"])
        inspected = inspect_model(staged_model, registration.model_type)
        completed = chosen[0].datetime_complete
        trained_date = (
            completed.astimezone(UTC).isoformat(timespec="seconds") if completed else None
        )
        source: dict[str, Any] = {
            "kind": "study_trial",
            "study": study_name,
            "storage": storage_url,
            "trial_number": trial,
        }
        parity = {
            **inspected.parity,
            "export_max_abs_diff": entry["parity_max_abs_diff"],
            "export_checked_against": "PyTorch on the test split (cso export check)",
        }
        inspected = InspectedModel(
            path=inspected.path,
            sha256=inspected.sha256,
            metadata=inspected.metadata,
            training_metrics=inspected.training_metrics,
            parity=parity,
            trained_date=inspected.trained_date,
            variant=inspected.variant,
        )
        final_model = final_dir / staged_model.name
        for entry in exported.results["variants"]:  # the results file moves with the model
            entry["onnx_path"] = str(final_dir / Path(entry["onnx_path"]).name)
        write_text_atomic(exported.results_path, json.dumps(exported.results, indent=2) + "\n")
        return _add(
            registry_path,
            registration,
            inspected,
            final_model,
            source,
            trained_date=trained_date,
            staged_dir=staged_dir,
            final_dir=final_dir,
        )
    finally:
        shutil.rmtree(staged_dir, ignore_errors=True)  # gone already when it was registered


# --- the workflow: A/B test, promote, roll back, archive --------------------------------------


def default_salt(model_type: str, candidate: str) -> str:
    """A fresh salt for a new test: a new test reshuffles users, a ramp keeps them."""
    return f"{model_type}:{candidate}:{secrets.token_hex(8)}"


def _running_test(registry: Registry, model_type: str, version: str) -> ABTest:
    test = registry.of(model_type).ab_test
    registry.version(model_type, version)
    if test is None:
        raise RegistryError(f"no {model_type} A/B test is running (start one with ab-start)")
    if test.candidate != version:
        raise RegistryError(
            f"the running {model_type} A/B test is of '{test.candidate}', not '{version}'"
        )
    return test


def start_ab_test(
    registry: Registry, model_type: str, version: str, traffic: float, salt: str | None = None
) -> ABTest:
    """Start testing staging ``version`` on ``traffic`` of users against the active version."""
    check_traffic(traffic)
    state = registry.of(model_type)
    record = registry.version(model_type, version)
    if state.ab_test is not None:
        test = state.ab_test
        hint = (
            f"change its traffic with ab-set {version} --traffic T"
            if test.candidate == version
            else f"stop it first: cso registry ab-stop {test.candidate}"
        )
        raise RegistryError(
            f"an A/B test of '{test.candidate}' ({test.traffic:g} of traffic) is already running; "
            f"one test per model type: {hint}"
        )
    if record.status != "staging":
        raise RegistryError(
            f"'{version}' is {record.status}; only staging versions are A/B tested "
            "(register the file again under a new version to test it again)"
        )
    if state.active is None:
        raise RegistryError(
            f"no active {model_type} version to test '{version}' against; promote one first "
            "(the first version may be promoted directly)"
        )
    if salt is not None and not salt:
        raise RegistryError("--salt must not be empty")
    _check_servable(record)
    test = ABTest(version, float(traffic), salt or default_salt(model_type, version), _now())
    state.ab_test = test
    record.ab_test_traffic_percentage = test.traffic
    record.ab_test_start_date = test.started
    state.history.append(
        HistoryEvent(test.started, "ab-start", version, state.active, state.active, test.traffic)
    )
    return test


def set_ab_traffic(registry: Registry, model_type: str, version: str, traffic: float) -> float:
    """Ramp the running test of ``version`` up or down; the salt stays. Returns the old share."""
    check_traffic(traffic)
    test = _running_test(registry, model_type, version)
    state = registry.of(model_type)
    old, test.traffic = test.traffic, float(traffic)
    registry.version(model_type, version).ab_test_traffic_percentage = test.traffic
    state.history.append(
        HistoryEvent(_now(), "ab-set", version, state.active, state.active, test.traffic)
    )
    return old


def stop_ab_test(registry: Registry, model_type: str, version: str) -> ABTest:
    """End the running test of ``version``: every user gets the active version again."""
    test = _running_test(registry, model_type, version)
    state = registry.of(model_type)
    state.ab_test = None
    registry.version(model_type, version).ab_test_traffic_percentage = None
    state.history.append(
        HistoryEvent(_now(), "ab-stop", version, state.active, state.active, test.traffic)
    )
    return test


def _was_active(state: ModelTypeRegistry, version: str) -> bool:
    return any(e.active == version for e in state.history if e.event in ("promote", "rollback"))


def promote(
    registry: Registry, model_type: str, version: str, without_ab_test: bool = False
) -> HistoryEvent:
    """Make ``version`` the active one; the old active version becomes deprecated.

    Allowed for the first version of a model type, the candidate of the running test (which
    ends it), a version that was active before, or with ``without_ab_test``.
    """
    state = registry.of(model_type)
    record = registry.version(model_type, version)
    test = state.ab_test
    if record.status == "active":
        raise RegistryError(f"'{version}' is already the active {model_type} version")
    if record.status == "archived":
        raise RegistryError(
            f"'{version}' is archived, and archived versions are never served again; "
            "register the file again under a new version"
        )
    if test is not None and test.candidate != version:
        raise RegistryError(
            f"an A/B test of '{test.candidate}' is running; promote it or stop it first "
            f"(cso registry ab-stop {test.candidate})"
        )
    tested = test is not None or state.active is None or _was_active(state, version)
    if not tested and not without_ab_test:
        raise RegistryError(
            f"'{version}' has not been A/B tested against the active '{state.active}': "
            f"start with cso registry ab-start {version} --traffic 0.1, or pass --without-ab-test"
        )
    _check_servable(record)
    previous = state.active
    if previous is not None:
        state.versions[previous].status = "deprecated"
    record.status = "active"
    record.ab_test_traffic_percentage = None
    state.active, state.ab_test = version, None
    event = HistoryEvent(
        _now(), "promote", version, version, previous, test.traffic if test else None
    )
    state.history.append(event)
    return event


def active_stack(state: ModelTypeRegistry) -> list[str]:
    """The active versions in order, replayed from the history: promote pushes, rollback pops."""
    stack: list[str] = []
    for event in state.history:
        if event.event == "promote" and event.active is not None:
            stack.append(event.active)
        elif event.event == "rollback" and stack:
            stack.pop()
    return stack


def rollback(registry: Registry, model_type: str) -> HistoryEvent:
    """Make the previous active version (from the history) active again.

    The version rolled back from becomes deprecated; rolling back twice goes two steps back.
    """
    state = registry.of(model_type)
    current = state.active
    if state.ab_test is not None:
        cand = state.ab_test.candidate
        raise RegistryError(
            f"an A/B test of '{cand}' is running against '{current}'; to drop the candidate, "
            f"stop the test (cso registry ab-stop {cand}); rollback changes the active version"
        )
    if current is None:
        raise RegistryError(
            f"no active {model_type} version in {registry.path}: nothing to roll back"
        )
    stack = active_stack(state)
    if not stack or stack[-1] != current:
        raise RegistryError(
            f"the history of {model_type} does not end with the active version '{current}' "
            "(the file was edited by hand?): promote the version you want explicitly"
        )
    if len(stack) < 2:
        raise RegistryError(
            f"no previous active {model_type} version in the history ('{current}' is the first "
            "one promoted): nothing to roll back to"
        )
    target = stack[-2]
    record = registry.version(model_type, target)
    if record.status == "archived":
        raise RegistryError(
            f"the previous active version '{target}' is archived and is never served again; "
            "promote the version you want explicitly"
        )
    _check_servable(record)
    state.versions[current].status = "deprecated"
    record.status = "active"
    state.active = target
    event = HistoryEvent(_now(), "rollback", target, target, current)
    state.history.append(event)
    return event


def archive(registry: Registry, model_type: str, version: str) -> None:
    """Retire ``version`` for good: it is never served again (never the active one)."""
    state = registry.of(model_type)
    record = registry.version(model_type, version)
    if record.status == "active":
        raise RegistryError(
            f"'{version}' is the active {model_type} version and cannot be archived; "
            "promote another version first"
        )
    if state.ab_test is not None and state.ab_test.candidate == version:
        raise RegistryError(
            f"'{version}' is in a running A/B test; stop it first (cso registry ab-stop {version})"
        )
    if record.status == "archived":
        raise RegistryError(f"'{version}' is already archived")
    record.status = "archived"
    state.history.append(HistoryEvent(_now(), "archive", version, state.active, state.active))


# --- routing (docs/routing.md) --------------------------------------------------------------


def bucket_int(salt: str, user_id: str) -> int:
    """The first 8 bytes of SHA-256 over UTF-8 ``f"{salt}:{user_id}"``, big-endian unsigned."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{user_id}".encode()).digest()[:8], "big")


def bucket(salt: str, user_id: str) -> float:
    """The user's bucket in [0, 1): :func:`bucket_int` / 2^64."""
    return bucket_int(salt, user_id) / 2**64


def gets_candidate(salt: str, user_id: str, traffic: float) -> bool:
    """Whether the user is in the candidate's share: bucket < traffic.

    Compared exactly (the integer against ``traffic * 2^64``), so a share of 1 is everyone.
    """
    return bucket_int(salt, user_id) < traffic * 2**64


@dataclass(frozen=True)
class Route:
    """Which version a user gets, and why."""

    user_id: str
    version: str
    role: str  # "candidate" or "active"
    active: str
    bucket: float | None
    test: ABTest | None

    @property
    def reason(self) -> str:
        if self.test is None:
            return f"'{self.active}' is the active version and no A/B test is running"
        share = f"{self.test.traffic:g}"
        if self.role == "candidate":
            return (
                f"bucket {self.bucket:.6f} < traffic {share}: in the A/B test's share for "
                f"candidate '{self.test.candidate}'"
            )
        return (
            f"bucket {self.bucket:.6f} >= traffic {share} of candidate '{self.test.candidate}': "
            f"the active version '{self.active}'"
        )


def route_user(registry: Registry, model_type: str, user_id: str) -> Route:
    """The version ``user_id`` gets now (docs/routing.md)."""
    state = registry.of(model_type)
    if not user_id:
        raise RegistryError("--user-id must not be empty")
    if state.active is None:
        raise RegistryError(f"no active {model_type} version in {registry.path}: promote one first")
    test = state.ab_test
    if test is None:
        return Route(user_id, state.active, "active", state.active, None, None)
    inside = gets_candidate(test.salt, user_id, test.traffic)
    return Route(
        user_id,
        test.candidate if inside else state.active,
        "candidate" if inside else "active",
        state.active,
        bucket(test.salt, user_id),
        test,
    )


VECTOR_ACTIVE = "v1.0-hybrid"
VECTOR_CANDIDATE = "v1.1-hybrid"
VECTOR_SALTS = ("calling_score:v1.1-hybrid:9f2c4e6a1b3d5f70", "outcome:v2.0-real:0", "s")
VECTOR_USERS = (
    *(f"user_{i}" for i in range(12)),
    "42",
    "alice@example.com",
    "a:b",
    "ユーザー42",
    "550e8400-e29b-41d4-a716-446655440000",
    # found by search: below 0.01 for each salt; just under and just over 0.1 for the first
    "user_16",
    "user_59",
    "user_22",
    "user_1932909",
    "user_204404",
)
VECTOR_TRAFFIC = (0.01, 0.1, 0.5, 0.9, 1.0)


def routing_test_vectors() -> dict[str, Any]:
    """The cases docs/routing_test_vectors.json holds, for the app to prove it agrees."""
    vectors = []
    for salt in VECTOR_SALTS:
        for user_id in VECTOR_USERS:
            value = bucket_int(salt, user_id)
            for traffic in VECTOR_TRAFFIC:
                inside = gets_candidate(salt, user_id, traffic)
                vectors.append(
                    {
                        "salt": salt,
                        "user_id": user_id,
                        "traffic": traffic,
                        "hash_prefix_hex": f"{value:016x}",
                        "bucket": value / 2**64,
                        "expected_version": VECTOR_CANDIDATE if inside else VECTOR_ACTIVE,
                    }
                )
    return {
        "rule": (
            "bucket = first 8 bytes of SHA-256 over the UTF-8 bytes of salt + ':' + user_id, "
            "read as a big-endian unsigned integer, divided by 2^64; the user gets the "
            "candidate when bucket < traffic, else the active version"
        ),
        "active": VECTOR_ACTIVE,
        "candidate": VECTOR_CANDIDATE,
        "generated_by": "calling_score_opt.registry.routing_test_vectors()",
        "vectors": vectors,
    }


def routing_test_vectors_text() -> str:
    return json.dumps(routing_test_vectors(), indent=2, ensure_ascii=False) + "\n"


# --- deciding from outcomes -----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    user_id: str
    version: str
    outcome: float


def read_outcomes(path: Path) -> list[Outcome]:
    """Rows of a CSV with columns user_id, version, outcome (other columns are ignored).

    Raises:
        DataError: the file is missing, lacks a column, or a row is not usable (names the line).
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in ("user_id", "version", "outcome") if c not in columns]
            if missing:
                raise DataError(
                    f"{path}: no column {', '.join(missing)} (columns: {', '.join(columns)}); "
                    "the outcomes CSV needs user_id, version, outcome"
                )
            rows = []
            for line, raw in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
                try:
                    value = float(row["outcome"])
                except ValueError:
                    value = math.nan
                if not math.isfinite(value):
                    raise DataError(
                        f"{path}: line {line}: outcome {_show(row['outcome'])} is not a number"
                    )
                if not row["user_id"] or not row["version"]:
                    raise DataError(f"{path}: line {line}: user_id and version must not be empty")
                rows.append(Outcome(row["user_id"], row["version"], value))
    except FileNotFoundError:
        raise DataError(f"{path}: no such outcomes file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the outcomes CSV ({exc})") from None
    return rows


@dataclass(frozen=True)
class ArmSummary:
    """One version's side of the test: users (each counted once), rows, mean and sd."""

    version: str
    role: str
    users: int
    rows: int
    mean: float | None
    sd: float | None


@dataclass(frozen=True)
class ABReport:
    """What the outcomes say about the running test, and what to do next."""

    control: ArmSummary
    candidate: ArmSummary
    traffic: float
    higher_is_better: bool
    difference: float | None  # candidate mean - control mean
    ci95: tuple[float, float] | None
    srm_chi2: float
    srm_p: float
    srm_mismatch: bool
    observed_share: float
    users_in_both: int
    rows_ignored: int
    recommendation: str  # "promote", "keep testing", "roll back" or "check the assignment"
    reason: str
    further_users: int | None


def chi2_sf_1dof(chi2: float) -> float:
    """P(X >= chi2) for a chi-square variable with one degree of freedom."""
    return math.erfc(math.sqrt(max(chi2, 0.0) / 2))


def srm_test(control_users: int, candidate_users: int, traffic: float) -> tuple[float, float]:
    """Chi-square statistic and p-value of the observed split against the configured share."""
    total = control_users + candidate_users
    if total == 0 or not 0 < traffic < 1:
        return 0.0, 1.0
    expected = (total * (1 - traffic), total * traffic)
    observed = (control_users, candidate_users)
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    return chi2, chi2_sf_1dof(chi2)


def users_needed(sd_control: float, sd_candidate: float, effect: float, traffic: float) -> int:
    """Users in all that detect ``effect`` with 80% power at the 5% level (two-sided, Welch).

    With a share ``traffic`` of them in the candidate: N = (z_0.975 + z_0.8)^2 *
    (sd_candidate^2 / traffic + sd_control^2 / (1 - traffic)) / effect^2.
    """
    if effect == 0:
        raise ValueError("effect must not be zero")
    variance = sd_candidate**2 / traffic + sd_control**2 / (1 - traffic)
    return math.ceil((Z_95 + Z_POWER_80) ** 2 * variance / effect**2)


def _per_user(rows: Sequence[Outcome], version: str, excluded: set[str]) -> tuple[list[float], int]:
    by_user: dict[str, list[float]] = {}
    count = 0
    for row in rows:
        if row.version == version and row.user_id not in excluded:
            by_user.setdefault(row.user_id, []).append(row.outcome)
            count += 1
    return [statistics.fmean(values) for values in by_user.values()], count


def _arm(version: str, role: str, means: list[float], rows: int) -> ArmSummary:
    return ArmSummary(
        version,
        role,
        len(means),
        rows,
        statistics.fmean(means) if means else None,
        statistics.stdev(means) if len(means) > 1 else None,
    )


def ab_report(
    rows: Sequence[Outcome],
    control: str,
    candidate: str,
    traffic: float,
    higher_is_better: bool = True,
    min_effect: float | None = None,
) -> ABReport:
    """Compare the candidate with the control on per-user outcomes and recommend an action.

    Users are the unit: each user's outcomes are averaged first, and users seen under both
    versions are left out. The difference (candidate - control) gets a Welch 95% interval
    (normal approximation). The split of users is checked against ``traffic`` with a
    chi-square test (sample-ratio mismatch, flagged at p < 0.001). Then: a mismatch ->
    "check the assignment"; the interval entirely better -> "promote"; entirely worse ->
    "roll back"; else "keep testing", with the further users that would detect the observed
    difference (or ``min_effect``) with 80% power.

    Raises:
        RegistryError: ``traffic`` is not in (0, 1), or no rows are of either version.
    """
    if not 0 < traffic < 1:
        raise RegistryError(
            f"the expected candidate share must be in (0, 1) to compare, got {traffic:g}: at "
            "100% traffic there is no control group; pass --traffic with the share the outcomes "
            "were collected under"
        )
    if min_effect is not None and not (math.isfinite(min_effect) and min_effect > 0):
        raise RegistryError(f"--min-effect must be a positive number, got {min_effect!r}")
    seen: dict[str, set[str]] = {}
    for row in rows:
        if row.version in (control, candidate):
            seen.setdefault(row.user_id, set()).add(row.version)
    both = {user for user, versions in seen.items() if len(versions) > 1}
    ignored = sum(1 for row in rows if row.version not in (control, candidate))
    if not seen:
        raise RegistryError(
            f"no outcomes of '{control}' or '{candidate}' ({ignored} rows of other versions)"
        )
    control_means, control_rows = _per_user(rows, control, both)
    candidate_means, candidate_rows = _per_user(rows, candidate, both)
    arm_control = _arm(control, "active", control_means, control_rows)
    arm_candidate = _arm(candidate, "candidate", candidate_means, candidate_rows)
    n_control, n_candidate = len(control_means), len(candidate_means)
    chi2, p_value = srm_test(n_control, n_candidate, traffic)
    total = n_control + n_candidate
    observed = n_candidate / total if total else 0.0
    mismatch = p_value < SRM_ALPHA

    difference: float | None = None
    ci95: tuple[float, float] | None = None
    further: int | None = None
    if n_control >= 2 and n_candidate >= 2:
        assert arm_control.mean is not None and arm_candidate.mean is not None
        assert arm_control.sd is not None and arm_candidate.sd is not None
        difference = arm_candidate.mean - arm_control.mean
        se = math.sqrt(arm_candidate.sd**2 / n_candidate + arm_control.sd**2 / n_control)
        ci95 = (difference - Z_95 * se, difference + Z_95 * se)

    sign = 1.0 if higher_is_better else -1.0
    if mismatch:
        recommendation = "check the assignment"
        reason = (
            f"sample-ratio mismatch: {observed:.2%} of users got the candidate, {traffic:.2%} "
            f"expected (chi-square {chi2:.1f}, p = {p_value:.2g} < {SRM_ALPHA:g}); the "
            "assignment is broken and these outcomes are not to be trusted"
        )
    elif ci95 is None or difference is None:
        recommendation = "keep testing"
        reason = "too few users to compare (at least 2 per version are needed)"
    else:
        better_low = min(sign * ci95[0], sign * ci95[1])
        better_high = max(sign * ci95[0], sign * ci95[1])
        if better_low > 0:
            recommendation = "promote"
            reason = "the candidate is better: the 95% interval of the difference excludes zero"
        elif better_high < 0:
            recommendation = "roll back"
            reason = "the candidate is worse: the 95% interval of the difference excludes zero"
        else:
            recommendation = "keep testing"
            effect = min_effect if min_effect is not None else abs(difference)
            assert arm_control.sd is not None and arm_candidate.sd is not None
            if effect > 0 and (arm_control.sd > 0 or arm_candidate.sd > 0):
                needed = users_needed(arm_control.sd, arm_candidate.sd, effect, traffic)
                further = max(needed - total, 0)
                what = "--min-effect" if min_effect is not None else "the observed difference"
                reason = (
                    f"the 95% interval includes zero; about {further:,} more users would detect "
                    f"{what} ({effect:.4g}) with 80% power"
                )
            else:
                reason = (
                    "the 95% interval includes zero and no difference is observed; pass "
                    "--min-effect to size the test"
                )
    return ABReport(
        control=arm_control,
        candidate=arm_candidate,
        traffic=traffic,
        higher_is_better=higher_is_better,
        difference=difference,
        ci95=ci95,
        srm_chi2=chi2,
        srm_p=p_value,
        srm_mismatch=mismatch,
        observed_share=observed,
        users_in_both=len(both),
        rows_ignored=ignored,
        recommendation=recommendation,
        reason=reason,
        further_users=further,
    )


def report_metrics(report: ABReport, outcomes: str) -> dict[str, Any]:
    """An A/B report as stored in a version's performanceMetrics (``ab-report --save``)."""
    return {
        "at": _now(),
        "outcomes": outcomes,
        "against": report.control.version,
        "traffic": report.traffic,
        "higher_is_better": report.higher_is_better,
        "users": report.candidate.users,
        "mean_outcome": report.candidate.mean,
        "control_users": report.control.users,
        "control_mean_outcome": report.control.mean,
        "difference": report.difference,
        "ci95": list(report.ci95) if report.ci95 else None,
        "srm_p": report.srm_p,
        "srm_mismatch": report.srm_mismatch,
        "recommendation": report.recommendation,
    }
