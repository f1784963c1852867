"""Hostile input: whatever JSON, CSV or registry file arrives, cso either reads it or says why.

Property-based (hypothesis): each document either loads or raises the tool's own error with a
clear message, never another exception (which would reach the user as a traceback).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calling_score_opt.data import FEATURE_GROUPS, Dataset, load_dataset
from calling_score_opt.errors import DataError
from calling_score_opt.registry import RegistryError, load_registry

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
any_json = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=25,
)
feature_values = scalars | st.floats(min_value=0, max_value=1) | any_json


@st.composite
def records(draw: st.DrawFn) -> Any:
    """Records shaped like the app's export, with anything in the places values go."""
    record: dict[str, Any] = {}
    for group, names in FEATURE_GROUPS:
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(names), max_size=4, unique=True))
            record[group] = {name: draw(feature_values) for name in chosen}
        elif draw(st.integers(0, 5)) == 0:
            record[group] = draw(any_json)
    for key in ("outcome_score", "formula_calling_score"):
        if draw(st.booleans()):
            record[key] = draw(feature_values)
    return record if draw(st.integers(0, 9)) else draw(any_json)


exports = (
    any_json
    | st.lists(records(), max_size=30)
    | st.builds(lambda rs: {"training_data": rs}, st.lists(records(), max_size=30))
    | st.builds(
        lambda rs, meta: {"metadata": meta, "training_data": rs},
        st.lists(records(), min_size=20, max_size=30),
        any_json,
    )
)


def _write(text: str, suffix: str) -> Path:
    with tempfile.NamedTemporaryFile("w", suffix=suffix, delete=False, encoding="utf-8") as handle:
        handle.write(text)
    return Path(handle.name)


def _loads_or_data_error(path: Path, target: str | None = None) -> Dataset | None:
    try:
        dataset = load_dataset(path, target)
    except DataError as exc:
        message = str(exc)
        assert message.startswith(str(path)), message  # says which file
        assert "\n" not in message  # one line
        return None
    finally:
        path.unlink()
    assert dataset.features.dtype.name == "float32"
    assert all(math.isfinite(v) for v in dataset.labels.tolist())
    assert ((dataset.labels >= 0) & (dataset.labels <= 1)).all()
    return dataset


@SETTINGS
@given(exports)
def test_any_json_document_loads_or_is_a_data_error(document: Any) -> None:
    _loads_or_data_error(_write(json.dumps(document), ".json"))


@SETTINGS
@given(st.text(max_size=300))
def test_any_text_as_json_loads_or_is_a_data_error(text: str) -> None:
    _loads_or_data_error(_write(text, ".json"))


csv_cells = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers().map(str),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=6),
    st.just(""),
)


@SETTINGS
@given(
    st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=5),
    st.lists(st.lists(csv_cells, min_size=1, max_size=6), max_size=40),
    st.booleans(),
)
def test_any_csv_loads_or_is_a_data_error(
    header: list[str], rows: list[list[str]], use_first_column: bool
) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    target = header[0] if use_first_column else "label"
    _loads_or_data_error(_write(buffer.getvalue(), ".csv"), target)


registry_like = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "schema_version",
                    "model_types",
                    "calling_score",
                    "outcome",
                    "active",
                    "ab_test",
                    "versions",
                    "history",
                    "v1",
                    "status",
                    "modelPath",
                    "traffic",
                    "candidate",
                    "salt",
                    "defaultWeight",
                    "dataSource",
                    "sha256",
                    "version",
                ]
            )
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@SETTINGS
@given(registry_like)
def test_a_registry_edited_into_nonsense_is_a_registry_error(document: Any) -> None:
    path = _write(json.dumps(document), ".json")
    try:
        load_registry(path)
    except RegistryError as exc:
        assert "\n" not in str(exc)
    finally:
        path.unlink()


@SETTINGS
@given(st.text(max_size=200))
def test_a_registry_of_any_text_is_a_registry_error(text: str) -> None:
    path = _write(text, ".json")
    try:
        load_registry(path)
    except RegistryError as exc:
        assert "\n" not in str(exc)
    finally:
        path.unlink()


def _nest(depth: int, kinds: list[str], leaf: str) -> str:
    """``leaf`` inside ``depth`` levels of lists and objects (``kinds`` cycled), as JSON text."""
    opening = "".join("[" if kinds[i % len(kinds)] == "list" else '{"k": ' for i in range(depth))
    closing = "".join(
        "]" if kinds[i % len(kinds)] == "list" else "}" for i in reversed(range(depth))
    )
    return opening + leaf + closing


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(min_value=1, max_value=150_000),
    st.lists(st.sampled_from(["list", "object"]), min_size=1, max_size=3),
    st.sampled_from(["document", "metadata", "record", "group", "value", "label"]),
)
def test_json_nested_to_any_depth_loads_or_is_a_data_error(
    depth: int, kinds: list[str], where: str
) -> None:
    records = [json.dumps(r) for r in _some_records()]
    nested = _nest(depth, kinds, "0.5")
    if where == "document":
        text = nested
    elif where == "metadata":
        text = f'{{"metadata": {nested}, "training_data": [{", ".join(records)}]}}'
    elif where == "record":
        text = f"[{', '.join(records[:5])}, {nested}, {', '.join(records[5:])}]"
    else:
        field = {
            "group": '"context_features": ',
            "value": '"context_features": {"energy_match": ',
            "label": '"outcome_score": ',
        }[where]
        closing = "}" if where == "value" else ""
        records[5] = "{" + field + nested + closing + "}"
        text = f"[{', '.join(records)}]"
    _loads_or_data_error(_write(text, ".json"))


def _some_records() -> list[dict[str, Any]]:
    return [
        {
            group: {name: (i * 7 + j) % 10 / 10 for j, name in enumerate(names)}
            for group, names in FEATURE_GROUPS
        }
        | {"outcome_score": i % 10 / 10}
        for i in range(25)
    ]
