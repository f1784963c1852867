"""The features the app must build: one record's model inputs, the test vectors, and the check.

The app builds the model's input on the phone (Dart); cso builds it from the training records.
Unless both agree position by position, the model scores other inputs than it learned from, and
nothing fails: it just predicts worse. This module holds the three pieces that keep them equal
(docs/app-integration.md):

- :func:`record_features`: one record in the app's format (docs/contract.md) -> the float32
  inputs cso trains on, by the same code that loads data files
  (:func:`calling_score_opt.data.fill_features`);
- :func:`feature_vectors`: the cases of docs/feature_vectors.json, records chosen so that a
  swapped, defaulted, clamped or ignored input always shows;
- :func:`compare_vectors`: the app's own vectors for those cases against the expected ones, each
  difference said in words a Dart developer can act on ("position 2 holds ..., the model expects
  ...").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from calling_score_opt.data import (
    FEATURE_GROUPS,
    FEATURE_NAMES,
    MISSING_FEATURE_VALUE,
    N_FEATURES,
    TIMING_FEATURES,
    VIBE_DIMENSIONS,
    Array,
    fill_features,
)
from calling_score_opt.errors import ContractError, DataError

#: How close the app's value must be to cso's, relative to the value (absolute below 1): float32
#: keeps about 7 significant digits, so two builders computing the same number agree far closer.
TOLERANCE = 1e-6
#: Where the vectors live in this repository, and the command that writes them.
VECTORS_FILE = "docs/feature_vectors.json"
VECTORS_COMMAND = "cso contract vectors --output docs/feature_vectors.json"
#: How many cases a finding names before it says "and N more".
MAX_NAMED_CASES = 5

Bools = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]


def record_features(record: object, where: str = "record") -> Array:
    """The float32 inputs cso trains on for one record in the app's format (docs/contract.md).

    Exactly what loading a data file gives for that record (the same code,
    :func:`calling_score_opt.data.fill_features`): a missing key, or a missing or null group,
    is 0.5; other keys are ignored; values are kept as given, outside [0, 1] too (cso does not
    clamp; ``cso data check`` counts such values), rounded to float32.

    Raises:
        DataError: the record or a group is not an object, or a value is not a finite number
            (the message starts with ``where``).
    """
    row = np.empty(N_FEATURES, dtype=np.float32)
    fill_features(record, row, where)
    return row


# --- the test vectors ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Case:
    """One test case: how its record differs from a complete record of distinct values."""

    id: str
    description: str
    change: Mapping[str, object] = field(default_factory=dict)  # "group.name" -> value
    drop: tuple[str, ...] = ()  # "group.name" keys, or whole groups, left out
    null: tuple[str, ...] = ()  # groups written as null
    rename: Mapping[str, str] = field(default_factory=dict)  # "group.name" -> the key written
    extra: Mapping[str, object] = field(default_factory=dict)  # "group.key" or top-level key
    reverse_keys: bool = False


_GROUPS = tuple(group for group, _ in FEATURE_GROUPS)
_DERIVED = (
    "context_features.vibe_compatibility",
    "context_features.energy_match",
    "context_features.community_match",
    "context_features.novelty_match",
    "timing_features.timing_alignment",
)
_GENERATOR_NAMES = {
    "context_features.vibe_compatibility": "context_feature_7",
    "context_features.energy_match": "context_feature_8",
    "context_features.community_match": "context_feature_9",
    "context_features.novelty_match": "context_feature_10",
    "timing_features.timing_alignment": "timing_feature_5",
}
_EXPORT_FIELDS = {
    "formula_calling_score": 0.7431,
    "is_called": True,
    "outcome_type": "positive",
    "outcome_score": 0.81,
    "user_id": "user_test_vectors",
    "opportunity_id": "spot_test_vectors",
    "timestamp": "2026-01-01T10:00:00+00:00",
}

_CASES: tuple[_Case, ...] = (
    _Case("complete", "Every input present, each with its own value in [0, 1]."),
    _Case(
        "complete-2",
        "Another complete record with other values: any two positions swapped differ here or in "
        "'complete'.",
    ),
    _Case("complete-3", "A third complete record."),
    _Case(
        "keys-in-reverse-order",
        "The keys of every group in reverse order: an input's position comes from its name, never "
        "from where its key stands.",
        reverse_keys=True,
    ),
    _Case(
        "full-export-record",
        "A record as the app exports it, with label, formula score, ids and timestamp beside the "
        "four groups: only the groups hold inputs.",
        extra=_EXPORT_FIELDS,
    ),
    _Case(
        "missing-user-vibe-keys",
        "user_vibe_dimensions lacks authenticity_preference and crowd_tolerance: both are 0.5.",
        drop=(
            "user_vibe_dimensions.authenticity_preference",
            "user_vibe_dimensions.crowd_tolerance",
        ),
    ),
    _Case(
        "missing-spot-vibe-keys",
        "spot_vibe_dimensions lacks social_discovery_style and curation_tendency: both are 0.5.",
        drop=(
            "spot_vibe_dimensions.social_discovery_style",
            "spot_vibe_dimensions.curation_tendency",
        ),
    ),
    _Case(
        "missing-context-keys",
        "context_features lacks location_proximity and network_effects: both are 0.5.",
        drop=("context_features.location_proximity", "context_features.network_effects"),
    ),
    _Case(
        "missing-timing-key",
        "timing_features lacks user_patterns: it is 0.5 (timing_alignment is present and kept as "
        "given).",
        drop=("timing_features.user_patterns",),
    ),
    _Case(
        "no-user-vibe",
        "No user_vibe_dimensions at all: the twelve user vibe inputs are 0.5.",
        drop=("user_vibe_dimensions",),
    ),
    _Case(
        "no-spot-vibe",
        "No spot_vibe_dimensions at all: the twelve spot vibe inputs are 0.5.",
        drop=("spot_vibe_dimensions",),
    ),
    _Case(
        "no-context",
        "No context_features at all: the ten context inputs are 0.5.",
        drop=("context_features",),
    ),
    _Case(
        "no-timing",
        "No timing_features at all: the five timing inputs are 0.5.",
        drop=("timing_features",),
    ),
    _Case(
        "null-groups",
        "context_features and timing_features are null, which counts as missing: all fifteen "
        "inputs are 0.5.",
        null=("context_features", "timing_features"),
    ),
    _Case("empty-record", "An empty object: every input is 0.5.", drop=_GROUPS),
    _Case(
        "user-vibe-extra-keys",
        "user_vibe_dimensions also holds social_preference and overall_energy, which the app "
        "keeps beside the twelve dimensions: they are not model inputs, so they are ignored.",
        extra={
            "user_vibe_dimensions.social_preference": 0.2718,
            "user_vibe_dimensions.overall_energy": 0.8282,
        },
    ),
    _Case(
        "user-vibe-extra-keys-2",
        "The same two keys with other values: still ignored.",
        extra={
            "user_vibe_dimensions.social_preference": 0.6931,
            "user_vibe_dimensions.overall_energy": 0.1414,
        },
    ),
    _Case(
        "other-extra-keys",
        "spot_vibe_dimensions holds spot_rating (4.5) and distance_km (12.5), context_features a "
        "text: not inputs, ignored whatever their value.",
        extra={
            "spot_vibe_dimensions.spot_rating": 4.5,
            "spot_vibe_dimensions.distance_km": 12.5,
            "context_features.weather": "rain",
        },
    ),
    _Case(
        "generator-names",
        "Written by the app's older generators: context_feature_7 to context_feature_10 instead "
        "of vibe_compatibility, energy_match, community_match and novelty_match, and "
        "timing_feature_5 instead of timing_alignment. Those keys are ignored, so the five "
        "inputs are 0.5.",
        rename=_GENERATOR_NAMES,
    ),
    _Case(
        "negative-values",
        "Inputs below 0 (-0.25, -1.5, -0.5, -0.125): kept as given, not clamped.",
        change={
            "user_vibe_dimensions.exploration_eagerness": -0.25,
            "spot_vibe_dimensions.value_orientation": -1.5,
            "context_features.location_proximity": -0.5,
            "timing_features.optimal_time_of_day": -0.125,
        },
    ),
    _Case(
        "values-above-one",
        "Inputs above 1 (1.25, 3, 1.5, 42): kept as given, not clamped.",
        change={
            "user_vibe_dimensions.novelty_seeking": 1.25,
            "spot_vibe_dimensions.crowd_tolerance": 3.0,
            "context_features.user_receptivity": 1.5,
            "timing_features.opportunity_timing": 42.0,
        },
    ),
    _Case(
        "large-values",
        "Inputs far outside [0, 1] (1000000, -25000): kept as given.",
        change={
            "spot_vibe_dimensions.location_adventurousness": 1_000_000.0,
            "context_features.journey_alignment": -25_000.0,
        },
    ),
    _Case(
        "integers-and-bounds",
        "0 and 1 written as JSON integers, 0.0 and 1.0 as decimals: the same numbers.",
        change={
            "user_vibe_dimensions.community_orientation": 0,
            "user_vibe_dimensions.temporal_flexibility": 1,
            "spot_vibe_dimensions.exploration_eagerness": 0.0,
            "spot_vibe_dimensions.trust_network_reliance": 1.0,
            "context_features.opportunity_availability": 1,
            "timing_features.optimal_day_of_week": 0,
        },
    ),
    _Case(
        "many-decimals",
        "More digits than float32 keeps: each value becomes the nearest float32, as the model "
        "computes (0.123456789012 -> 0.12345679).",
        change={
            "user_vibe_dimensions.energy_preference": 0.123456789012,
            "spot_vibe_dimensions.novelty_seeking": 0.987654321098,
            "context_features.community_patterns": 0.333333333333,
            "timing_features.user_patterns": 0.666666666667,
        },
    ),
)


def _distinct(case: int, column: int) -> float:
    """A value in [0.05, 0.95], different for every column of a case and for every case of a
    column, and never 0.5, so a swapped or defaulted input always shows. (Quadratic in the
    column, so that user and spot vibes do not differ by one constant, which would make the
    derived match inputs equal.)"""
    step = (case * 37 + column * 101 + column * column * 29) % 997  # 997 is prime
    return round(0.0512 + 0.9 * step / 997, 4)


def _derived(record: Mapping[str, Any]) -> dict[str, float]:
    """The five inputs the app computes from the others, by the rule of docs/data.md (which
    cso's synthetic data follows): from the record as cso reads it, a missing vibe being 0.5."""

    def vibe(group: str) -> dict[str, float]:
        values = record.get(group) or {}
        return {n: float(values.get(n, MISSING_FEATURE_VALUE)) for n in VIBE_DIMENSIONS}

    user, spot = vibe("user_vibe_dimensions"), vibe("spot_vibe_dimensions")
    timing = record.get("timing_features") or {}
    known = [float(timing[n]) for n in TIMING_FEATURES[:4] if n in timing]
    return {
        "context_features.vibe_compatibility": 1.0
        - sum(abs(user[n] - spot[n]) for n in VIBE_DIMENSIONS) / len(VIBE_DIMENSIONS),
        "context_features.energy_match": 1.0
        - abs(user["energy_preference"] - spot["energy_preference"]),
        "context_features.community_match": 1.0
        - abs(user["community_orientation"] - spot["community_orientation"]),
        "context_features.novelty_match": 1.0
        - abs(user["novelty_seeking"] - spot["novelty_seeking"]),
        "timing_features.timing_alignment": sum(known) / len(known)
        if known
        else MISSING_FEATURE_VALUE,
    }


def _case_record(index: int, case: _Case) -> dict[str, Any]:
    """The record of ``case``: distinct values, then the case's changes, in a fixed order."""
    record: dict[str, Any] = {group: {} for group in _GROUPS}
    for column, name in enumerate(FEATURE_NAMES):
        group, key = name.split(".")
        if name not in _DERIVED:
            record[group][key] = case.change.get(name, _distinct(index, column))
    for name in case.drop:
        group, _, key = name.partition(".")
        if key:
            del record[group][key]
        else:
            del record[group]
    for group in case.null:
        del record[group]
    for name, value in _derived(record).items():  # from what the record holds after the drops
        group, key = name.split(".")
        if group in record and name not in case.drop:
            record[group][key] = value
    for name, written in case.rename.items():
        group, key = name.split(".")
        record[group][written] = record[group].pop(key)
    for group in case.null:
        record[group] = None
    for name, extra in case.extra.items():
        group, _, key = name.partition(".")
        if key:
            record[group][key] = extra
        else:
            record[group] = extra
    if case.reverse_keys:
        record = {
            g: dict(reversed(v.items())) if isinstance(v, dict) else v for g, v in record.items()
        }
    return record


def _shortest(value: np.float32) -> float:
    """A float32 as the shortest decimal that reads back as the same float32 (0.1, not
    0.10000000149011612): exact, and readable in the JSON file."""
    return float(str(value))


def feature_vectors() -> dict[str, Any]:
    """The document docs/feature_vectors.json holds: per case, a record and its 39 inputs."""
    cases = []
    for index, case in enumerate(_CASES):
        record = _case_record(index, case)
        features = record_features(record, f"case '{case.id}'")
        cases.append(
            {
                "id": case.id,
                "description": case.description,
                "record": record,
                "features": [_shortest(v) for v in features],
            }
        )
    return {
        "about": (
            "Test vectors of the model's input: run the app's feature builder on each case's "
            "record and compare its output with 'features', position by position (float32, "
            "within a relative 1e-6), e.g. with `cso contract check`. See "
            "docs/app-integration.md."
        ),
        "rules": (
            "Position i holds feature_names[i] ('group.name'), read from record[group][name]. A "
            "missing key, or a missing or null group, is 0.5; other keys are ignored; values "
            "are used as given, outside [0, 1] too (not clamped), as float32. Where a record "
            "holds the five inputs the app computes (vibe_compatibility, energy_match, "
            "community_match, novelty_match, timing_alignment), they are what the rule of "
            "docs/data.md gives from its other values."
        ),
        "generated_by": f"{VECTORS_COMMAND} (calling_score_opt.feature_contract)",
        "feature_names": list(FEATURE_NAMES),
        "cases": cases,
    }


def feature_vectors_text() -> str:
    """:func:`feature_vectors` as the text of docs/feature_vectors.json."""
    return json.dumps(feature_vectors(), indent=2, ensure_ascii=False) + "\n"


# --- the vectors to compare against ----------------------------------------------------------


@dataclass(frozen=True)
class ExpectedVectors:
    """Per case, the inputs in the order the model expects them, and what the record held."""

    source: str  # what they come from, as the check's output names it
    feature_names: tuple[str, ...]  # position i of the model's input holds feature_names[i]
    ids: tuple[str, ...]
    features: Array  # [cases, positions] float32
    defaulted: Bools  # [cases, positions]: the record lacks the key, so the input is 0.5
    #: keys a record holds that are not inputs ("group.key") -> per case its number (0.5 where
    #: the record lacks it, NaN where it is not a number), to recognise them in the app's output
    ignored: Mapping[str, Floats] = field(default_factory=dict)

    @property
    def n_cases(self) -> int:
        return len(self.ids)


def _ignored_values(records: Sequence[Mapping[str, Any]]) -> dict[str, Floats]:
    names: dict[str, None] = {}  # ordered set
    for record in records:
        for group, inputs in FEATURE_GROUPS:
            values = record.get(group)
            if isinstance(values, dict):
                names.update((f"{group}.{key}", None) for key in values if key not in inputs)
    columns = {}
    for name in names:
        group, key = name.split(".", 1)
        column = np.full(len(records), MISSING_FEATURE_VALUE)
        for case, record in enumerate(records):
            values = record.get(group)
            if isinstance(values, dict) and key in values:
                value = values[key]
                number = isinstance(value, int | float) and not isinstance(value, bool)
                column[case] = float(value) if number else math.nan
        columns[name] = column
    return columns


def _expected(
    source: str, ids: Sequence[str], records: Sequence[Any], where: Sequence[str]
) -> ExpectedVectors:
    features = np.empty((len(records), N_FEATURES), dtype=np.float32)
    defaulted = np.zeros((len(records), N_FEATURES), dtype=bool)
    for case, record in enumerate(records):
        counts = np.zeros(N_FEATURES, dtype=np.int64)
        fill_features(record, features[case], where[case], counts)
        defaulted[case] = counts > 0
    return ExpectedVectors(
        source=source,
        feature_names=FEATURE_NAMES,
        ids=tuple(ids),
        features=features,
        defaulted=defaulted,
        ignored=_ignored_values(records),
    )


def _read_json(path: Path, what: str) -> Any:
    """The JSON document at ``path``, or a ContractError naming the file and ``what`` it is."""
    if not path.exists():
        raise ContractError(f"{path}: file not found; pass {what}")
    if path.is_dir():
        raise ContractError(f"{path}: is a folder; pass {what}")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ContractError(
            f"{path}: cannot be read ({exc.strerror}); check its permissions"
        ) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ContractError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            f"expected {what}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ContractError(f"{path}: not UTF-8 text, so not JSON; expected {what}") from exc
    except (ValueError, RecursionError) as exc:  # an integer too long, nesting too deep
        raise ContractError(f"{path}: cannot be parsed as JSON ({exc}); expected {what}") from exc


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _vectors_file(path: Path) -> ExpectedVectors:
    """The cases of a vectors file (as ``cso contract vectors`` writes), checked against the
    records they hold: a file whose features are not what this cso builds is refused."""
    what = f"a test vectors file like {VECTORS_FILE}"
    document = _read_json(path, what)
    if not isinstance(document, dict) or not isinstance(document.get("cases"), list):
        raise ContractError(f"{path}: has no 'cases' list; expected {what}")
    if document.get("feature_names") != list(FEATURE_NAMES):
        raise ContractError(
            f"{path}: its feature_names are not this cso's {N_FEATURES} inputs in their order; "
            f"regenerate it with `{VECTORS_COMMAND}`"
        )
    ids, records, where = [], [], []
    for index, case in enumerate(document["cases"]):
        if not isinstance(case, dict) or not isinstance(case.get("id"), str):
            raise ContractError(f"{path}: cases[{index}] is not an object with a string 'id'")
        ids.append(case["id"])
        records.append(case.get("record"))
        where.append(f"{path}: case '{case['id']}', record")
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ContractError(f"{path}: case id '{twice[0]}' appears more than once")
    expected = _expected(str(path), ids, records, where)
    for index, case in enumerate(document["cases"]):
        written = case.get("features")
        try:
            stored = np.array(written, dtype=np.float64)
        except (TypeError, ValueError):
            stored = np.zeros(0)
        if stored.shape != (N_FEATURES,):
            raise ContractError(
                f"{path}: case '{case['id']}': 'features' is not a list of {N_FEATURES} numbers"
            )
        far = np.flatnonzero(~_close(stored.astype(np.float32), expected.features[index]))
        if far.size:
            p = int(far[0])
            raise ContractError(
                f"{path}: case '{case['id']}': position {p} ({FEATURE_NAMES[p]}) is "
                f"{stored[p]:.9g} in the file, but cso builds {expected.features[index, p]:.9g} "
                f"from its record: the file is stale or was edited; regenerate it with "
                f"`{VECTORS_COMMAND}`"
            )
    return expected


def _model_feature_names(model: Path) -> tuple[str, ...]:
    """The input order an exported model records in its metadata (``feature_names``)."""
    from calling_score_opt.export import read_metadata

    if not model.is_file():
        raise ContractError(f"--model {model}: no such file; pass an ONNX model cso exported")
    text = read_metadata(model).get("feature_names")
    try:
        names = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ContractError(
            f"--model {model}: its metadata has no feature_names list, so its input order is "
            "unknown; pass a model cso exported"
        )
    if sorted(names) != sorted(FEATURE_NAMES):
        unknown = [n for n in names if n not in FEATURE_NAMES]
        about = f"e.g. '{unknown[0]}'" if unknown else f"{len(names)} of them"
        raise ContractError(
            f"--model {model}: its inputs are not the app's {N_FEATURES} features ({about}): it "
            "was trained on other data (a CSV?), so the app's vectors do not apply to it"
        )
    return tuple(names)


def expected_vectors(vectors: Path | None = None, model: Path | None = None) -> ExpectedVectors:
    """What the app's vectors must equal: the built-in cases (those of docs/feature_vectors.json)
    or those of ``vectors``, in the input order ``model`` records (default: FEATURE_NAMES).

    Raises:
        ContractError: the vectors file or the model cannot be read, or do not fit this cso.
        DataError: a record of the vectors file is not a valid record.
    """
    if vectors is None:
        document = feature_vectors()
        cases = document["cases"]
        expected = _expected(
            f"the built-in vectors ({VECTORS_FILE})",
            [c["id"] for c in cases],
            [c["record"] for c in cases],
            [f"case '{c['id']}'" for c in cases],
        )
    else:
        expected = _vectors_file(vectors)
    if model is None:
        return expected
    names = _model_feature_names(model)
    order = [FEATURE_NAMES.index(n) for n in names]
    return ExpectedVectors(
        source=f"{expected.source}, in the input order of {model}",
        feature_names=names,
        ids=expected.ids,
        features=expected.features[:, order],
        defaulted=expected.defaulted[:, order],
        ignored=expected.ignored,
    )


# --- comparing the app's vectors -------------------------------------------------------------

APP_VECTORS_SHAPE = '{"cases": [{"id": "...", "features": [39 numbers]}, ...]}'

#: The kinds of finding, in the order the check prints them.
HOLDS_OTHER = "holds another input"
HOLDS_IGNORED = "holds a key cso ignores"
CONSTANT = "constant"
VALUES = "differs in value only"
KINDS = (HOLDS_OTHER, HOLDS_IGNORED, CONSTANT, VALUES)
#: How the check's output titles each kind.
KIND_TITLES = {
    HOLDS_OTHER: "Positions holding another input than the model expects",
    HOLDS_IGNORED: "Positions holding a key that is not a model input",
    CONSTANT: "Positions constant where the model expects data",
    VALUES: "Positions that differ in value only",
}


@dataclass(frozen=True)
class Finding:
    """One position where the app's vectors differ from the expected ones, and how."""

    position: int
    expected: str  # the input the model expects at this position
    kind: str  # one of KINDS
    message: str  # the whole finding, in words a Dart developer can act on
    holds: str | None = None  # HOLDS_OTHER / HOLDS_IGNORED: what the position holds instead
    cases: tuple[str, ...] = ()  # VALUES (and partial HOLDS_OTHER): the cases that differ


@dataclass(frozen=True)
class ContractCheck:
    """The outcome of comparing the app's vectors with the expected ones."""

    source: str  # what the expected vectors come from
    n_positions: int
    n_cases: int  # cases expected
    compared: tuple[str, ...]  # ids of the cases compared position by position
    problems: tuple[str, ...]  # cases missing, unknown or unusable, each said once
    findings: tuple[Finding, ...]
    hints: tuple[str, ...]  # the expected order of each group the app has shuffled

    @property
    def agrees(self) -> bool:
        return not self.problems and not self.findings and len(self.compared) == self.n_cases

    def of_kind(self, kind: str) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.kind == kind)

    @property
    def summary(self) -> str:
        """One line: whether the app agrees, and if not, how many positions and cases differ."""
        if self.agrees:
            return (
                f"the app's features match the expected ones at all {self.n_positions} positions "
                f"in all {self.n_cases} cases (within {TOLERANCE:g})"
            )
        if not self.compared:
            return (
                f"no case could be compared ({len(self.problems)} problems above): fix the "
                f"app's file, one case per expected case, each with {self.n_positions} numbers"
            )
        phrases = {  # (one, several)
            HOLDS_OTHER: ("holds another input", "hold another input"),
            HOLDS_IGNORED: ("holds a key cso ignores", "hold a key cso ignores"),
            CONSTANT: ("is constant", "are constant"),
            VALUES: ("differs in value only", "differ in value only"),
        }
        counts = {k: len(self.of_kind(k)) for k in KINDS}
        parts = [f"{n} {phrases[k][n > 1]}" for k, n in counts.items() if n]
        cases = f"{len(self.compared)} of {self.n_cases} cases compared"
        if self.findings:
            line = (
                f"the app's features differ from the expected ones at {len(self.findings)} of "
                f"{self.n_positions} positions ({', '.join(parts)}) in the {cases}"
            )
        else:
            line = f"the {cases} agree at all {self.n_positions} positions"
        if self.problems:
            count = len(self.problems)
            line += f"; {count} {'problem' if count == 1 else 'problems'} with the app's cases"
        return line


def read_app_vectors(path: Path) -> list[Any]:
    """The ``cases`` list of the app's vectors file; each entry is checked by the comparison.

    Raises:
        ContractError: the file is missing, is not JSON, or has no ``cases`` list.
    """
    what = f"the app's vectors, {APP_VECTORS_SHAPE}"
    document = _read_json(path, what)
    if not isinstance(document, dict):
        raise ContractError(f"{path}: top level is {_kind(document)}; expected {what}")
    cases = document.get("cases")
    if not isinstance(cases, list):
        shown = "missing" if cases is None else _kind(cases)
        raise ContractError(f"{path}: 'cases' is {shown}, not a list; expected {what}")
    return cases


def _close(actual: npt.NDArray[Any], expected: npt.NDArray[Any]) -> Bools:
    """Where two float32 values agree within TOLERANCE (relative, absolute below 1)."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    result: Bools = np.abs(a - e) <= TOLERANCE * np.maximum(1.0, np.abs(e))
    return result


def _listed(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:MAX_NAMED_CASES])
    more = len(ids) - MAX_NAMED_CASES
    return shown + (f" and {more} more" if more > 0 else "")


def _float32(value: object) -> float | None:
    """A JSON value as a number float32 holds, or None (text, a boolean, NaN, too large)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    finite = math.isfinite(number) and abs(number) <= float(np.finfo(np.float32).max)
    return number if finite else None


def _number(value: float) -> str:
    return f"{value:.7g}"


def _app_rows(
    expected: ExpectedVectors, entries: Sequence[Any]
) -> tuple[dict[str, Array], list[str]]:
    """The usable vectors of the app's file by case id, and a line for each unusable entry."""
    wanted = set(expected.ids)
    width = len(expected.feature_names)
    rows: dict[str, Array] = {}
    problems: list[str] = []
    first: dict[str, int] = {}
    unknown: list[str] = []
    lengths: dict[int, list[str]] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"cases[{index}] is {_kind(entry)}, not an object with id and features")
            continue
        case_id = entry.get("id")
        if not isinstance(case_id, str):
            shown = "missing" if case_id is None else _kind(case_id)
            problems.append(
                f"cases[{index}]: 'id' is {shown}; it must be the id of an expected case"
            )
            continue
        if case_id in first:
            problems.append(
                f"case '{case_id}' appears twice (cases[{first[case_id]}] and cases[{index}]); "
                "only the first is compared"
            )
            continue
        first[case_id] = index
        if case_id not in wanted:
            unknown.append(case_id)
            continue
        features = entry.get("features")
        if not isinstance(features, list):
            shown = "missing" if features is None else _kind(features)
            problems.append(
                f"case '{case_id}': 'features' is {shown}, not a list of {width} numbers"
            )
            continue
        if len(features) != width:
            lengths.setdefault(len(features), []).append(case_id)
            continue
        bad = next((p for p, v in enumerate(features) if _float32(v) is None), None)
        if bad is not None:
            problems.append(
                f"case '{case_id}': features[{bad}] ({expected.feature_names[bad]}) is "
                f"{_kind(features[bad])}, not a finite float32 number"
            )
            continue
        rows[case_id] = np.array(features, dtype=np.float64).astype(np.float32)
    for length, ids in lengths.items():
        problems.append(
            f"{len(ids)} {'case has' if len(ids) == 1 else 'cases have'} {length} features, the "
            f"model expects {width}: {_listed(ids)}"
        )
    if unknown:
        problems.append(
            f"{len(unknown)} case {'id is' if len(unknown) == 1 else 'ids are'} not in "
            f"{expected.source}: {_listed(unknown)} "
            "(is the app using another version of the vectors?)"
        )
    missing = [i for i in expected.ids if i not in first]
    if missing:
        several = len(missing) > 1
        problems.append(
            f"{len(missing)} expected {'cases are' if several else 'case is'} not in the app's "
            f"file: {_listed(missing)}"
        )
    return rows, problems


def _value_finding(
    position: int,
    name: str,
    ids: Sequence[str],
    app: Array,
    expected: Array,
    defaulted: Bools,
) -> Finding:
    """A position that differs in some cases only: which, grouped by the likely reason."""
    differ = ~_close(app, expected)
    clamped = differ & ((expected < 0) | (expected > 1)) & _close(app, np.clip(expected, 0, 1))
    missing_key = differ & ~clamped & defaulted
    other = differ & ~clamped & ~missing_key
    parts = []
    if clamped.any():
        at = np.flatnonzero(clamped).tolist()
        shown = [f"{ids[i]} ({_number(expected[i])} -> {_number(app[i])})" for i in at]
        parts.append(f"the app clamps to [0, 1], cso trains on values as given: {_listed(shown)}")
    if missing_key.any():
        at = np.flatnonzero(missing_key).tolist()
        shown = [f"{ids[i]} ({_number(app[i])})" for i in at]
        parts.append(
            "the record lacks the key, so the model expects 0.5 there, the app sends a value "
            f"of its own: {_listed(shown)}"
        )
    if other.any():
        at = np.flatnonzero(other).tolist()
        shown = [
            f"{ids[i]} (expected {_number(expected[i])}, the app sends {_number(app[i])})"
            for i in at
        ]
        parts.append(_listed(shown))
    cases = tuple(ids[i] for i in np.flatnonzero(differ).tolist())
    return Finding(
        position,
        name,
        VALUES,
        f"position {position} ({name}) differs in {len(cases)} of {len(ids)} cases: "
        + "; ".join(parts),
        cases=cases,
    )


def _finding(
    position: int,
    expected: ExpectedVectors,
    ids: Sequence[str],
    app: Array,
    table: Array,
    defaulted: Bools,
    ignored: Mapping[str, Floats],
) -> Finding | None:
    """What position ``position`` of the app's vectors holds, when it is not what is expected."""
    names = expected.feature_names
    name = names[position]
    column = app[:, position]
    own = _close(column, table[:, position])
    if own.all():
        return None
    n = len(ids)
    varies = [q for q in range(len(names)) if np.ptp(table[:, q]) > 0]
    matches = {q: int(_close(column, table[:, q]).sum()) for q in varies if q != position}
    exact = [q for q, count in matches.items() if count == n]
    if exact:
        holds = " or ".join(names[q] for q in exact)
        return Finding(
            position,
            name,
            HOLDS_OTHER,
            f"position {position} holds {holds}, the model expects {name}",
            holds=holds,
        )
    for key, values in ignored.items():
        if np.ptp(values) > 0 and _close(column, values.astype(np.float32)).all():
            return Finding(
                position,
                name,
                HOLDS_IGNORED,
                f"position {position} holds {key}, which is not a model input (cso ignores that "
                f"key; 0.5 where a record lacks it), the model expects {name}",
                holds=key,
            )
    if np.ptp(column) == 0:
        low, high = float(table[:, position].min()), float(table[:, position].max())
        spread = (
            f"from {_number(low)} to {_number(high)} across the cases"
            if low != high
            else f"always {_number(low)} in these cases"
        )
        return Finding(
            position,
            name,
            CONSTANT,
            f"position {position} is always {_number(float(column[0]))}, the model expects "
            f"{name} ({spread})",
        )
    best = max(matches, key=lambda q: (matches[q], -q), default=None)
    if (
        best is not None
        and matches[best] >= max(2, math.ceil(0.75 * n))
        and matches[best] > own.sum()
    ):
        differ = tuple(ids[i] for i in np.flatnonzero(~_close(column, table[:, best])).tolist())
        return Finding(
            position,
            name,
            HOLDS_OTHER,
            f"position {position} holds {names[best]} ({n - len(differ)} of {n} cases; not in "
            f"{_listed(differ)}), the model expects {name}",
            holds=names[best],
            cases=differ,
        )
    return _value_finding(position, name, ids, column, table[:, position], defaulted[:, position])


def _hints(expected: ExpectedVectors, findings: Sequence[Finding]) -> tuple[str, ...]:
    """For each group with a position that holds another input: the order the model expects."""
    shuffled = {f.position for f in findings if f.kind in (HOLDS_OTHER, HOLDS_IGNORED)}
    hints = []
    for group, _ in FEATURE_GROUPS:
        positions = [p for p, n in enumerate(expected.feature_names) if n.startswith(group + ".")]
        if not shuffled.intersection(positions):
            continue
        where = (
            f"positions {positions[0]}-{positions[-1]}"
            if positions == list(range(positions[0], positions[-1] + 1))
            else "positions " + ", ".join(map(str, positions))
        )
        order = ", ".join(expected.feature_names[p].split(".", 1)[1] for p in positions)
        hints.append(f"{where} must hold {group}, in this order: {order}")
    return tuple(hints)


def compare_vectors(expected: ExpectedVectors, entries: Sequence[Any]) -> ContractCheck:
    """Compare the app's vectors (the ``cases`` of its file) with the expected ones.

    Every unusable entry (no id, an unknown or repeated id, a wrong length, a non-number) and
    every expected case the app left out is a problem; the rest are compared position by
    position. A position that differs is explained: it holds another expected input (the app
    column equals that input's column in every case, or in at least 3 cases out of 4), or a key
    cso ignores, or a constant; otherwise it differs in value in some cases, named with the
    likely reason (clamping, a key the record lacks).
    """
    rows, problems = _app_rows(expected, entries)
    compared = tuple(i for i in expected.ids if i in rows)
    findings: list[Finding] = []
    if compared:
        index = [expected.ids.index(i) for i in compared]
        app = np.stack([rows[i] for i in compared])
        table = expected.features[index]
        defaulted = expected.defaulted[index]
        ignored = {k: v[index] for k, v in expected.ignored.items()}
        for position in range(len(expected.feature_names)):
            finding = _finding(position, expected, compared, app, table, defaulted, ignored)
            if finding is not None:
                findings.append(finding)
    return ContractCheck(
        source=expected.source,
        n_positions=len(expected.feature_names),
        n_cases=expected.n_cases,
        compared=compared,
        problems=tuple(problems),
        findings=tuple(findings),
        hints=_hints(expected, findings),
    )


def check_app_vectors(
    app_vectors: Path, vectors: Path | None = None, model: Path | None = None
) -> ContractCheck:
    """Read the app's vectors file and compare it with :func:`expected_vectors`.

    Raises:
        ContractError: a file cannot be read or has the wrong shape (not a mismatch: that is
            in the returned check).
    """
    entries = read_app_vectors(app_vectors)
    try:
        expected = expected_vectors(vectors, model)
    except DataError as exc:  # a record of --vectors: it is a contract file, not data
        raise ContractError(str(exc)) from exc
    return compare_vectors(expected, entries)
