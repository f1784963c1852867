"""The registry file's format: JSON text in, validated records out, and back to the exact text.

A file that is not a registry cso can use (bad JSON, a missing field, two active versions, a
test of an archived version, nesting deep enough to exhaust Python's stack) is refused with one
line naming the file and the place; nothing here writes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calling_score_opt.registry.records import (
    DATA_SOURCES,
    EVENTS,
    MODEL_TYPES,
    SCHEMA_VERSION,
    STATUSES,
    ABTest,
    HistoryEvent,
    ModelTypeRegistry,
    ModelVersion,
    Registry,
    RegistryError,
    show_value,
)

#: Deeper than any registry cso or the app writes (about 8 levels); deeper is refused before
#: it can exhaust the stack of anything that walks the document.
MAX_DEPTH = 64


def registry_text(registry: Registry) -> str:
    """The file's exact text (2-space indented JSON, one trailing newline)."""
    return json.dumps(registry.to_json(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def json_depth(document: object) -> int:
    """How deeply lists and objects nest in ``document`` (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(document, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Sequence[object] = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def loads_json(text: str, finite: bool = True) -> Any:
    """JSON nested at most :data:`MAX_DEPTH` levels; with ``finite``, finite numbers only.

    Python's decoder recurses once per level, so a file of 100,000 ``[`` would otherwise end
    in a RecursionError (a traceback) instead of a message.

    Raises:
        ValueError: not valid JSON, a number out of range or NaN (with ``finite``), or nested
            too deeply (the message says which; ``json.JSONDecodeError`` for a syntax error).
    """
    try:
        if finite:
            document = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
        else:
            document = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    if json_depth(document) > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    return document


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:30]} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


class _Object:
    """A JSON object being validated: every complaint names the file and the place."""

    def __init__(self, value: object, where: str, path: Path) -> None:
        self.path, self.where = path, where
        if not isinstance(value, dict):
            raise self._error(where, "must be a JSON object", value)
        self.data: dict[str, Any] = value

    def _error(self, where: str, rule: str, got: object) -> RegistryError:
        return RegistryError(
            f"{self.path}: {where} {rule}, got {show_value(got)}; "
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

    def optional_positive(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and math.isfinite(value) and value > 0:
            return float(value)
        raise self.fail(key, "must be a positive number or null")

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
    "featureSpecHash",
    "featureSpecChange",
}


def _redacted_source(source: dict[str, Any]) -> dict[str, Any]:
    """A version's ``source`` with any password in its storage URL masked.

    cso never records a password; this also scrubs one that an older cso (or a hand edit) put
    there, so it is not printed by ``show`` nor written back by the next change.
    """
    storage = source.get("storage")
    if not isinstance(storage, str):
        return source
    from calling_score_opt.study import redact_url

    return {**source, "storage": redact_url(storage)}


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
        source=_redacted_source(obj.mapping("source")),
        parity=obj.mapping("parity"),
        feature_spec_hash=obj.optional_text("featureSpecHash"),
        feature_spec_change=obj.mapping("featureSpecChange") or None,
        extra={k: v for k, v in obj.data.items() if k not in _VERSION_KEYS},
    )


def _parse_model_type(obj: _Object) -> ModelTypeRegistry:
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
            min_effect=test_obj.optional_positive("min_effect"),
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
                salt=event.optional_text("salt"),
                min_effect=event.optional_positive("min_effect"),
            )
        )
    return state


def parse_registry(document: object, path: Path) -> Registry:
    """Validate a decoded registry document; RegistryError (naming the place) when it is not."""
    if not isinstance(document, dict):
        raise RegistryError(
            f"{path}: must hold a JSON object, got {show_value(document)}; "
            "fix the file or restore a good copy (it is not a registry cso can use)"
        )
    top = _Object(document, "", path)
    schema = top.data.get("schema_version")
    if schema != SCHEMA_VERSION:
        newer = isinstance(schema, int) and not isinstance(schema, bool) and schema > 1
        hint = "; it was written by a newer cso: upgrade cso" if newer else ""
        raise RegistryError(
            f"{path}: schema_version must be {SCHEMA_VERSION}, got {show_value(schema)}{hint}"
        )
    types_obj = top.child("model_types")
    registry = Registry(path=path, updated=top.optional_text("updated"))
    for name in types_obj.data:
        if name not in MODEL_TYPES:
            raise types_obj.fail(name, f"is not a model type ({', '.join(MODEL_TYPES)})")
        registry.model_types[name] = _parse_model_type(types_obj.child(name))
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
        document = loads_json(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix the file or restore a good copy"
        ) from None
    except ValueError as exc:
        raise RegistryError(
            f"{path}: not valid JSON ({exc}); fix the file or restore a good copy"
        ) from None
    return parse_registry(document, path)
