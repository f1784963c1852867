"""The registry's records and the rules for single values: what a version, a test and an event are.

Everything else in the package builds on these: the file format reads and writes them, the
lifecycle changes them, routing and the A/B report read them. Nothing here touches a file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from calling_score_opt.errors import CsoError

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
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class RegistryError(CsoError):
    """Raised when the registry file cannot be used or a command would break its rules.

    For example: an unknown version, a traffic share outside (0, 1], an illegal state change
    (archiving the active version), a model that breaks the app's ONNX contract, or a
    hand-edited file that is not a registry. Nothing is written when it is raised.
    """


def utc_now() -> str:
    """Now, as every time in the file is written: UTC, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def show_value(value: object) -> str:
    """A value as an error message quotes it: its repr, cut at 60 characters."""
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
    # which inputs it takes (registry/featurespec.py); None: unknown, or registered before cso
    # recorded it. The change is set when it was registered with --new-feature-spec.
    feature_spec_hash: str | None = None
    feature_spec_change: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys others wrote; kept as they are

    def to_json(self) -> dict[str, Any]:
        spec: dict[str, Any] = {}  # left out when unset, so older records are rewritten as read
        if self.feature_spec_hash is not None:
            spec["featureSpecHash"] = self.feature_spec_hash
        if self.feature_spec_change is not None:
            spec["featureSpecChange"] = self.feature_spec_change
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
            **spec,
            **self.extra,
        }


@dataclass
class ABTest:
    """The running A/B test of one model type: ``traffic`` of users get ``candidate``.

    ``min_effect`` is the smallest difference worth shipping, fixed when the test starts: it
    sizes the test (users needed), so it must not be chosen after seeing the outcomes.
    """

    candidate: str
    traffic: float
    salt: str
    started: str
    min_effect: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "traffic": self.traffic,
            "salt": self.salt,
            "started": self.started,
            "min_effect": self.min_effect,
        }


@dataclass
class HistoryEvent:
    """One change: what happened to ``version``, and the active version before and after.

    An ``ab-start`` also keeps the test's salt and ``min_effect``, so a stopped test can still
    be routed again (and its assignment checked) after its ``ab_test`` entry is gone.
    """

    at: str
    event: str
    version: str | None
    active: str | None
    previous: str | None
    traffic: float | None = None
    salt: str | None = None
    min_effect: float | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "at": self.at,
            "event": self.event,
            "version": self.version,
            "active": self.active,
            "previous": self.previous,
            "traffic": self.traffic,
        }
        if self.salt is not None:
            document["salt"] = self.salt
        if self.min_effect is not None:
            document["min_effect"] = self.min_effect
        return document


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


# --- checks of single values ----------------------------------------------------------------


def check_model_type(model_type: str) -> str:
    if model_type not in MODEL_TYPES:
        raise RegistryError(
            f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {show_value(model_type)}"
        )
    return model_type


def check_version_name(version: str) -> str:
    if not _VERSION_NAME.match(version):
        raise RegistryError(
            f"--version must be 1-64 letters, digits, '.', '_', '+' or '-', starting with a "
            f"letter or digit (it names a folder), got {show_value(version)}"
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


def check_min_effect(min_effect: float) -> float:
    """The smallest difference worth shipping: a positive, finite number in outcome units."""
    if not (
        isinstance(min_effect, int | float)
        and not isinstance(min_effect, bool)
        and math.isfinite(min_effect)
        and min_effect > 0
    ):
        raise RegistryError(
            "--min-effect must be a positive number, the smallest difference in mean outcome "
            f"worth shipping (e.g. 0.02), got {min_effect!r}"
        )
    return float(min_effect)


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
            f"--data-source must be one of {', '.join(DATA_SOURCES)}, got {show_value(source)}"
        )
    return source
