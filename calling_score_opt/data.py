"""Training data: the app's JSON export (docs/contract.md) or any CSV, loaded, checked, split.

Everything a model sees comes through :func:`load_dataset` and :func:`split_dataset`, so the
feature order, the label rule, the 0.5 default and the 70/15/15 split live in one place; one
record's inputs come from :func:`fill_features`, which the app's test vectors use too
(calling_score_opt.feature_contract).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from calling_score_opt.errors import DataError

VIBE_DIMENSIONS = (
    "exploration_eagerness",
    "community_orientation",
    "authenticity_preference",
    "social_discovery_style",
    "temporal_flexibility",
    "location_adventurousness",
    "curation_tendency",
    "trust_network_reliance",
    "energy_preference",
    "novelty_seeking",
    "value_orientation",
    "crowd_tolerance",
)
CONTEXT_FEATURES = (
    "location_proximity",
    "journey_alignment",
    "user_receptivity",
    "opportunity_availability",
    "network_effects",
    "community_patterns",
    "vibe_compatibility",
    "energy_match",
    "community_match",
    "novelty_match",
)
TIMING_FEATURES = (
    "optimal_time_of_day",
    "optimal_day_of_week",
    "user_patterns",
    "opportunity_timing",
    "timing_alignment",
)
#: (record key, names) in the exact order the app feeds them to the model.
FEATURE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("user_vibe_dimensions", VIBE_DIMENSIONS),
    ("spot_vibe_dimensions", VIBE_DIMENSIONS),
    ("context_features", CONTEXT_FEATURES),
    ("timing_features", TIMING_FEATURES),
)
#: The 39 model inputs as ``group.name``, index i is column i of the ONNX input.
FEATURE_NAMES: tuple[str, ...] = tuple(f"{g}.{n}" for g, names in FEATURE_GROUPS for n in names)
#: Each group's names as a set: every other key of a group is ignored (and counted).
_GROUP_NAME_SETS = {group: frozenset(names) for group, names in FEATURE_GROUPS}
N_FEATURES = len(FEATURE_NAMES)
MISSING_FEATURE_VALUE = 0.5
#: A training column whose standard deviation is below this is constant: scaled, it is 0 in
#: every training record, so a model never learns what the input means (see split_dataset).
CONSTANT_FEATURE_STD = 1e-6
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
MIN_RECORDS = 20  # below this a 70/15/15 split leaves fewer than 3 records to validate or test on
#: Labels whose standard deviation is below this are refused: they teach a model nothing. A label
#: spread of 1e-4 is a variance of 1e-8, below every loss cso prints (5 decimals) and below the
#: jitter of Adam steps at the documented learning rates (1e-4 and up); and it is still 1,000 times
#: above float32 rounding (under 6e-8 for a label in [0, 1]), so rounding is never taken for spread.
MIN_LABEL_STD = 1e-4
#: The most a feature value may lie from its column's median. The network scales in float32,
#: ``(x - mean) / std`` with the training split's statistics; within this limit a column spans at
#: most 2e18, so whichever records the split trains on, ``x - mean`` stays within 2e18, the std
#: within 1e18 and even their squares (4e36) below float32's maximum (3.4e38), and the first
#: layer's sums of scaled inputs (at most 2e24 each: the std is never below 1e-6) stay finite.
MAX_FEATURE_SPREAD = 1e18
#: The largest variance a label in [0, 1] can have (half the labels 0, half 1).
MAX_LABEL_VARIANCE = 0.25

Array = npt.NDArray[np.float32]
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Dataset:
    """A loaded data file: features in model order, labels, and what loading had to assume."""

    path: Path
    features: Array  # [n, f] float32, raw (unscaled)
    labels: Array  # [n] float32 in [0, 1]
    feature_names: tuple[str, ...]
    fingerprint: str  # sha256 of the file's bytes
    metadata: Mapping[str, Any] = field(default_factory=dict)
    defaulted: npt.NDArray[np.int64] | None = None  # per feature: records where 0.5 was assumed
    label_sources: Mapping[str, int] = field(default_factory=dict)
    ignored_columns: tuple[str, ...] = ()  # CSV: non-numeric columns left out
    #: JSON: per group, the keys that are not model inputs -> how many records hold them
    ignored_keys: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @property
    def n_records(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def irreducible_mse(self) -> float | None:
        """The noise floor a synthetic file records (best test MSE any model can reach).

        Checked again here, not only at load, so that no caller ever divides by a bad value.

        Raises:
            DataError: the recorded value is not a number in (0, 0.25].
        """
        return _irreducible_mse(self.path, self.metadata)


@dataclass(frozen=True)
class Split:
    """Train / validation / test arrays of one dataset, cut deterministically by ``seed``."""

    x_train: Array
    y_train: Array
    x_val: Array
    y_val: Array
    x_test: Array
    y_test: Array
    seed: int
    #: Inputs constant in the training split, held at their training value in all three.
    pinned: tuple[int, ...] = ()

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


@dataclass(frozen=True)
class Scaling:
    """Per-feature standardisation fitted on the training split only (baked into the ONNX)."""

    mean: Array
    std: Array

    @classmethod
    def fit(cls, x_train: Array) -> Scaling:
        mean = x_train.mean(axis=0, dtype=np.float64)
        std = x_train.std(axis=0, dtype=np.float64)
        std[std < CONSTANT_FEATURE_STD] = 1.0  # a constant feature: centred, not divided by 0
        return cls(mean=mean.astype(np.float32), std=std.astype(np.float32))


def _fingerprint(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path and pass an existing file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file; pass a .json or .csv file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from exc


def _show(value: object) -> str:
    """A JSON value as an error message shows it: short, so one line stays readable."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _oneline(name: str) -> str:
    """A column name or --target as a message shows it: control characters escaped."""
    return name if name.isprintable() else repr(name)[1:-1]


def _as_float(value: object) -> float | None:
    """A JSON number as a float (inf when too large for one); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        return math.inf


def _number(path: Path, index: int, name: str, value: object) -> float:
    """A finite float from a JSON value, or a DataError naming the record and field."""
    return _finite(f"{path}: record {index}, field '{_oneline(name)}'", value)


def _finite(where: str, value: object) -> float:
    """A finite float from a JSON value, or a DataError that starts with ``where``."""
    number = _as_float(value)
    if number is None:
        raise DataError(f"{where}: {_show(value)} is not a number; fix or remove the record")
    if not math.isfinite(number):
        raise DataError(f"{where}: {_show(value)} is not a finite number; fix or remove the record")
    if abs(number) > _FLOAT32_MAX:  # the model computes in float32: this would become inf
        raise DataError(
            f"{where}: {_show(value)} is too large for the model; fix or remove the record"
        )
    return number


def _irreducible_mse(path: Path, metadata: Mapping[str, Any]) -> float | None:
    """``metadata.irreducible_mse`` as a float (None when absent or null), else a DataError.

    It is a variance of labels in [0, 1]: anything not in (0, 0.25] is a mistake, and would
    later divide by zero or print a nonsense improvement after a whole grid has trained.
    """
    value = metadata.get("irreducible_mse")
    if value is None:
        return None
    number = _as_float(value)
    if number is None or not (math.isfinite(number) and 0.0 < number <= MAX_LABEL_VARIANCE):
        raise DataError(
            f"{path}: metadata.irreducible_mse is {_show(value)}, but it must be a positive "
            f"number no larger than {MAX_LABEL_VARIANCE:g} (the largest variance a label in "
            "[0, 1] can have): fix it or remove it"
        )
    return number


def _label(path: Path, index: int, name: str, value: object) -> float:
    number = _number(path, index, name, value)
    if not 0.0 <= number <= 1.0:
        raise DataError(
            f"{path}: record {index}, field '{_oneline(name)}': label {number:g} is outside "
            "[0, 1]; the model predicts a score in [0, 1]"
        )
    return number


def _records_of(path: Path, document: object) -> list[object]:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        records = document.get("training_data")
        if records is None:
            raise DataError(
                f"{path}: top-level object has no 'training_data' list; expected "
                '{"training_data": [...]} or a bare list of records (see docs/contract.md)'
            )
        if not isinstance(records, list):
            raise DataError(f"{path}: 'training_data' is {type(records).__name__}, not a list")
        return records
    raise DataError(
        f"{path}: top level is {type(document).__name__}; expected an object with "
        "'training_data' or a list of records"
    )


def fill_features(
    record: object,
    row: Array,
    where: str,
    defaulted: npt.NDArray[np.int64] | None = None,
    ignored: dict[str, dict[str, int]] | None = None,
) -> None:
    """Write one record's model inputs into ``row`` (float32, one slot per FEATURE_NAMES).

    The one implementation of the record rules of docs/contract.md, shared by loading and by
    the app's test vectors: a missing key, or a missing or null group, counts as 0.5; other keys
    of a group are ignored; values are kept as given, including outside [0, 1] (nothing is
    clamped), as float32. ``defaulted`` (per column) and ``ignored`` (per group, per key) are
    counted when given.

    Raises:
        DataError: ``where`` (e.g. "data.json: record 4"), the field, and what is wrong: the
            record or a group is not an object, or a value is not a finite number float32 holds.
    """
    if not isinstance(record, dict):
        raise DataError(
            f"{where} is {type(record).__name__}, not an object; "
            "each record must be a JSON object (see docs/contract.md)"
        )
    column = 0
    for group, names in FEATURE_GROUPS:
        values = record.get(group)
        if values is None:
            values = {}
        elif not isinstance(values, dict):
            raise DataError(
                f"{where}, field '{group}': is {type(values).__name__}, "
                "not an object of named features"
            )
        present = 0
        for name in names:
            if name in values:
                row[column] = _finite(f"{where}, field '{group}.{name}'", values[name])
                present += 1
            else:
                row[column] = MISSING_FEATURE_VALUE  # the app sends 0.5 for a missing key
                if defaulted is not None:
                    defaulted[column] += 1
            column += 1
        if ignored is not None and len(values) > present:  # only then are there other keys
            known = _GROUP_NAME_SETS[group]
            for key in values:
                if key not in known:
                    counts = ignored.setdefault(group, {})
                    counts[key] = counts.get(key, 0) + 1


class _Absent:
    """The marker of a key a record does not have (JSON null is a value, and is refused)."""


_ABSENT = _Absent()


def _plain_features(
    records: list[object],
) -> tuple[Array, npt.NDArray[np.int64], dict[str, dict[str, int]]] | None:
    """:func:`fill_features` for a whole file at once, when every record is plain.

    Plain: each record and group is an object and every value a finite number float32 holds,
    which is every file the app writes. Then the rules of :func:`fill_features` (0.5 for a
    missing key, other keys ignored, values kept) run as a few array operations instead of
    39 checks per record, several times faster on 10,000 records. None when any record is not
    plain: the per-field path then finds the first problem and names it.
    """
    absent, empty = _ABSENT, cast("dict[str, object]", {})
    flat: list[object] = []
    ignored: dict[str, dict[str, int]] = {}
    for record in records:
        if type(record) is not dict:
            return None
        for group, names in FEATURE_GROUPS:
            values = record.get(group)
            if values is None:
                values = empty
            elif type(values) is not dict:
                return None
            flat.extend([values.get(name, absent) for name in names])
            if len(values) > len(names) or not values.keys() <= _GROUP_NAME_SETS[group]:
                counts = ignored.setdefault(group, {})
                for key in values.keys() - _GROUP_NAME_SETS[group]:
                    counts[key] = counts.get(key, 0) + 1
    if not set(map(type, flat)) <= {float, int, _Absent}:  # bool, str, None, lists: per field
        return None
    cells = np.array(flat, dtype=object).reshape(len(records), N_FEATURES)
    missing = cells == absent  # identity: _Absent has no __eq__ of its own
    cells[missing] = MISSING_FEATURE_VALUE
    try:
        values = cells.astype(np.float64)
    except OverflowError:  # an integer with hundreds of digits
        return None
    if not np.all(np.abs(values) <= _FLOAT32_MAX):  # also false for inf and nan
        return None
    defaulted: npt.NDArray[np.int64] = missing.sum(axis=0).astype(np.int64)
    return values.astype(np.float32), defaulted, ignored


def _load_json(path: Path, raw: bytes) -> Dataset:
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "is this the app's export?"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text, so not JSON; is this the app's export?") from exc
    except ValueError as exc:  # e.g. an integer too long to convert
        raise DataError(f"{path}: cannot be parsed as JSON ({exc}); fix the file") from exc
    except RecursionError as exc:  # the parser recurses once per level of [ or {
        raise DataError(
            f"{path}: JSON nested too deeply to read (the app's export is 4 levels deep); "
            "is this the app's export?"
        ) from exc
    records = _records_of(path, document)
    if not records:
        raise DataError(f"{path}: contains no records; there is nothing to train on")
    metadata = document.get("metadata") if isinstance(document, dict) else None
    metadata = metadata if isinstance(metadata, dict) else {}
    _irreducible_mse(path, metadata)  # refused now, not after a whole grid has trained

    n = len(records)
    plain = _plain_features(records)
    if plain is None:  # some record is not plain: the per-field path names the first problem
        features = np.empty((n, N_FEATURES), dtype=np.float32)
        defaulted = np.zeros(N_FEATURES, dtype=np.int64)
        ignored: dict[str, dict[str, int]] = {}
        for i, record in enumerate(records):
            fill_features(record, features[i], f"{path}: record {i}", defaulted, ignored)
    else:
        features, defaulted, ignored = plain
    labels = np.empty(n, dtype=np.float32)
    label_sources = {"outcome_score": 0, "formula_calling_score": 0}
    for i, record in enumerate(records):
        record = cast("dict[str, Any]", record)  # both paths refused anything but an object
        if record.get("outcome_score") is not None:
            labels[i] = _label(path, i, "outcome_score", record["outcome_score"])
            label_sources["outcome_score"] += 1
        elif record.get("formula_calling_score") is not None:
            labels[i] = _label(path, i, "formula_calling_score", record["formula_calling_score"])
            label_sources["formula_calling_score"] += 1
        else:
            raise DataError(
                f"{path}: record {i}, field 'outcome_score': missing, and so is "
                "'formula_calling_score'; every record needs a label"
            )
    return Dataset(
        path=path,
        features=features,
        labels=labels,
        feature_names=FEATURE_NAMES,
        fingerprint=_fingerprint(raw),
        metadata=metadata,
        defaulted=defaulted,
        label_sources=label_sources,
        ignored_keys={group: ignored[group] for group, _ in FEATURE_GROUPS if group in ignored},
    )


def _csv_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _refuse_duplicate_columns(path: Path, header: list[str]) -> None:
    """A DataError for the first name in ``header`` that names more than one column.

    With two columns of one name, the one read would be a matter of chance, and a second copy
    of the target would be trained on as a feature: the label leaking into the inputs.
    """
    columns: dict[str, list[int]] = {}
    for number, name in enumerate(header, start=1):
        columns.setdefault(name, []).append(number)
    for name, numbers in columns.items():
        if len(numbers) > 1:
            listed = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
            if not name:
                raise DataError(
                    f"{path}: columns {listed} have no name in the header; name them or remove them"
                )
            raise DataError(
                f"{path}: column '{_oneline(name)}' appears more than once in the header (columns "
                f"{listed}); rename or remove the copies so that every column has its own name"
            )


def _load_csv(path: Path, raw: bytes, target: str) -> Dataset:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text; save the CSV as UTF-8") from exc
    reader = csv.reader(text.splitlines())
    try:
        rows = list(reader)
    except csv.Error as exc:  # e.g. a cell over the csv module's 128 KiB limit
        raise DataError(
            f"{path}: line {reader.line_num}: cannot be read as CSV ({exc}); fix the file"
        ) from exc
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise DataError(f"{path}: empty CSV; expected a header row and one row per record")
    header = [cell.strip() for cell in rows[0]]
    _refuse_duplicate_columns(path, header)
    body = [row for row in rows[1:] if any(cell.strip() for cell in row)]
    if not body:
        raise DataError(f"{path}: has a header but no rows; there is nothing to train on")
    if target not in header:
        raise DataError(
            f"{path}: no column '{_oneline(target)}' for --target; columns are: "
            f"{', '.join(map(_oneline, header))}"
        )
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DataError(
                f"{path}: record {i} (line {i + 2}) has {len(row)} cells, the header has "
                f"{len(header)}; fix the row"
            )
    # A column is a feature when every cell parses as a number; text columns (ids, dates) are
    # left out and reported, so a stray word cannot silently turn a feature into an id.
    numeric = [all(_csv_float(row[c]) is not None for row in body) for c in range(len(header))]
    target_col = header.index(target)
    feature_cols = [c for c in range(len(header)) if numeric[c] and c != target_col]
    ignored = tuple(header[c] for c in range(len(header)) if not numeric[c] and c != target_col)
    if not feature_cols:
        raise DataError(
            f"{path}: no numeric column besides '{_oneline(target)}'; nothing to learn from"
        )
    n = len(body)
    features = np.empty((n, len(feature_cols)), dtype=np.float32)
    labels = np.empty(n, dtype=np.float32)
    for i, row in enumerate(body):
        for j, c in enumerate(feature_cols):
            features[i, j] = _number(path, i, header[c], float(row[c]))
        value = _csv_float(row[target_col])
        if value is None:
            raise DataError(
                f"{path}: record {i}, field '{_oneline(target)}': {_show(row[target_col])} is "
                "not a number; fix or remove the record"
            )
        labels[i] = _label(path, i, target, value)
    return Dataset(
        path=path,
        features=features,
        labels=labels,
        feature_names=tuple(header[c] for c in feature_cols),
        fingerprint=_fingerprint(raw),
        defaulted=np.zeros(len(feature_cols), dtype=np.int64),
        label_sources={target: n},
        ignored_columns=ignored,
    )


def _refuse_unscalable(dataset: Dataset) -> None:
    """A DataError naming the first record and field lying over ``MAX_FEATURE_SPREAD`` from its
    column's median (computed in float64), the values that float32 scaling cannot hold.

    The median, not the mean: one wild value would drag the mean away from every ordinary
    record and get them all named instead of itself.
    """
    first: tuple[int, int, float] | None = None  # (record, column, median)
    for column in range(dataset.n_features):
        values = dataset.features[:, column].astype(np.float64)
        median = float(np.median(values))
        far = np.flatnonzero(np.abs(values - median) > MAX_FEATURE_SPREAD)
        if far.size and (first is None or far[0] < first[0]):
            first = (int(far[0]), column, median)
    if first is None:
        return
    record, column, median = first
    value = float(dataset.features[record, column])
    raise DataError(
        f"{dataset.path}: record {record}, field '{dataset.feature_names[column]}': {value:g} "
        f"lies {abs(value - median):.3g} from the median of its column ({median:g}); the model "
        f"scales every feature in float32 and needs each value within {MAX_FEATURE_SPREAD:g} "
        "of its column's median: fix or remove the record"
    )


#: Part of the parsed-data cache's key: bump it whenever the loading rules change, so that no
#: cached parse made under the old rules is read (the cso version is in the key too).
PARSE_RULES_VERSION = 2
#: Cached parses kept per folder (the most recently written); older ones are removed.
CACHED_PARSES_KEPT = 3


def _cache_file(cache_dir: Path, fingerprint: str, target: str | None) -> Path:
    from calling_score_opt import __version__

    key = f"{fingerprint}|{target}|{__version__}|{PARSE_RULES_VERSION}"
    return cache_dir / f"parsed-data-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _read_cache(file: Path, path: Path, fingerprint: str) -> Dataset | None:
    """The dataset cached in ``file`` for the data file with ``fingerprint``; None if there is
    none, or it is unreadable or for other bytes (it is then parsed again)."""
    try:
        with np.load(file, allow_pickle=False) as archive:
            header = json.loads(archive["header"].tobytes().decode())
            if header["fingerprint"] != fingerprint:
                return None
            return Dataset(
                path=path,
                features=archive["features"].astype(np.float32, copy=False),
                labels=archive["labels"].astype(np.float32, copy=False),
                feature_names=tuple(header["feature_names"]),
                fingerprint=fingerprint,
                metadata=header["metadata"],
                defaulted=archive["defaulted"] if header["has_defaulted"] else None,
                label_sources=header["label_sources"],
                ignored_columns=tuple(header["ignored_columns"]),
                ignored_keys=header["ignored_keys"],
            )
    except Exception:  # missing, damaged or foreign: parse the file instead
        return None


def _write_cache(file: Path, dataset: Dataset) -> None:
    """Cache a loaded dataset in ``file`` (atomically; a failure only costs the next load time)."""
    from calling_score_opt.atomic import atomic_path

    header = {
        "fingerprint": dataset.fingerprint,
        "feature_names": list(dataset.feature_names),
        "metadata": dict(dataset.metadata),
        "has_defaulted": dataset.defaulted is not None,
        "label_sources": dict(dataset.label_sources),
        "ignored_columns": list(dataset.ignored_columns),
        "ignored_keys": {g: dict(keys) for g, keys in dataset.ignored_keys.items()},
    }
    defaulted = dataset.defaulted if dataset.defaulted is not None else np.zeros(0, np.int64)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp, tmp.open("wb") as out:
            np.savez(
                out,
                header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                features=dataset.features,
                labels=dataset.labels,
                defaulted=defaulted,
            )
    except (OSError, TypeError, ValueError):  # a full disk or read-only folder: no cache
        return
    with contextlib.suppress(OSError):  # keep the folder small: the newest few parses
        older = sorted(file.parent.glob("parsed-data-*.npz"), key=lambda f: f.stat().st_mtime)
        for stale in older[:-CACHED_PARSES_KEPT]:
            if stale != file:
                stale.unlink(missing_ok=True)


def remember_parse(dataset: Dataset, target: str | None, cache_dir: Path) -> None:
    """Keep ``dataset`` (loaded with ``target``) in ``cache_dir`` for later ``load_dataset``
    calls with that folder, unless it is there already. For commands that must not write
    anything before their options are checked: they load without a cache, then call this."""
    file = _cache_file(cache_dir, dataset.fingerprint, target)
    if not file.exists():
        _write_cache(file, dataset)


def load_dataset(path: Path, target: str | None = None, cache_dir: Path | None = None) -> Dataset:
    """Load the app's JSON export, or a CSV whose ``target`` column is the label.

    With ``cache_dir`` (a study's artifact folder), the parsed arrays are kept there, keyed by
    the file's sha256, the target and the cso version: a later load of the same bytes reads
    them instead of parsing the file again (a fraction of the time on 10,000 records). The
    file itself is still read and hashed every time, so an edited file is never served stale.

    Raises:
        DataError: one line naming the file, the record index and the field at fault.
    """
    raw = _read_bytes(path)
    is_csv = path.suffix.lower() == ".csv"
    if is_csv and target is None:
        raise DataError(f"{path}: a CSV needs --target COLUMN to say which column is the label")
    if not is_csv and target is not None:
        raise DataError(
            f"{path}: --target applies to CSV files only; JSON exports use outcome_score "
            "(else formula_calling_score) as the label"
        )
    cache = None
    if cache_dir is not None:
        fingerprint = _fingerprint(raw)
        cache = _cache_file(cache_dir, fingerprint, target)
        if (cached := _read_cache(cache, path, fingerprint)) is not None:
            return cached
    dataset = _load_csv(path, raw, target) if target is not None else _load_json(path, raw)
    _refuse_unscalable(dataset)
    if dataset.n_records < MIN_RECORDS:
        raise DataError(
            f"{path}: {dataset.n_records} records; a 70/15/15 split needs at least "
            f"{MIN_RECORDS}. Add records or generate some with `cso data synth`"
        )
    if cache is not None:
        _write_cache(cache, dataset)
    return dataset


def constant_columns(x: Array) -> tuple[int, ...]:
    """Columns of ``x`` whose standard deviation is below ``CONSTANT_FEATURE_STD``."""
    std = np.asarray(x, np.float32).std(axis=0, dtype=np.float64)
    return tuple(int(i) for i in np.flatnonzero(std < CONSTANT_FEATURE_STD))


def pinned_values(x_train: Array, columns: tuple[int, ...]) -> Array:
    """The value each pinned column is held at: its training mean, as the scaling computes it
    (so the scaled input is exactly 0 there)."""
    values: Array = x_train[:, list(columns)].mean(axis=0, dtype=np.float64).astype(np.float32)
    return values


def split_dataset(dataset: Dataset, seed: int) -> Split:
    """Shuffle with ``seed`` and cut 70/15/15 (the same seed always gives the same split).

    An input the training split holds constant (older app exports hold several at 0.5) is one
    no model trained on it can learn: the exported model ignores it (export.py pins it to its
    training value), so all three splits hold it at exactly that value (the training mean; a
    column constant to within ``CONSTANT_FEATURE_STD`` becomes exactly constant). Every loss
    and comparison cso reports is then the exported model's on these records.
    """
    n = dataset.n_records
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * SPLIT_FRACTIONS[1])
    n_test = round(n * SPLIT_FRACTIONS[2])
    train, val, test = np.split(order, [n - n_val - n_test, n - n_test])
    x, y = dataset.features, dataset.labels
    x_train, x_val, x_test = x[train], x[val], x[test]
    pinned = constant_columns(x_train)
    if pinned:
        columns = list(pinned)
        values = pinned_values(x_train, pinned)
        for part in (x_train, x_val, x_test):  # copies (fancy indexing): the dataset is kept
            part[:, columns] = values
    return Split(
        x_train=x_train,
        y_train=y[train],
        x_val=x_val,
        y_val=y[val],
        x_test=x_test,
        y_test=y[test],
        seed=seed,
        pinned=pinned,
    )


@dataclass(frozen=True)
class DataReport:
    """What ``cso data check`` prints: enough to tell whether a file is fit to train on."""

    dataset: Dataset
    label_mean: float
    label_std: float
    label_quantiles: dict[str, float]
    constant_features: tuple[str, ...]
    out_of_range: dict[str, int]  # feature -> values outside [0, 1]
    defaulted: dict[str, int]  # feature -> records where 0.5 was assumed
    problems: tuple[str, ...]  # reasons the file cannot be trained on
    constant_values: dict[str, float] = field(default_factory=dict)  # feature -> its one value
    #: JSON: per group, keys that are not model inputs -> records holding them, most first
    ignored_keys: dict[str, dict[str, int]] = field(default_factory=dict)


def check_dataset(dataset: Dataset) -> DataReport:
    """Summarise a loaded dataset and list what would make training on it pointless."""
    x, y = dataset.features, dataset.labels
    names = dataset.feature_names
    constant_values = {
        n: float(lo) for n, lo, hi in zip(names, x.min(0), x.max(0), strict=True) if lo == hi
    }
    constant = tuple(constant_values)
    outside = ((x < 0.0) | (x > 1.0)).sum(axis=0)
    defaulted = dataset.defaulted if dataset.defaulted is not None else np.zeros(len(names))
    # float64: in float32 the mean of 100 labels of 0.42 rounds, and their std is 3e-8, not 0
    label_std = float(y.std(dtype=np.float64))
    problems = []
    if label_std < MIN_LABEL_STD:
        low, high = float(y.min()), float(y.max())
        if low == high:
            problems.append(f"every label is {low:g}: there is nothing to learn")
        else:
            problems.append(
                f"the labels hardly vary (from {low:g} to {high:g}, standard deviation "
                f"{label_std:.2g}; at least {MIN_LABEL_STD:g} is needed): there is nothing to learn"
            )
    if len(constant) == len(names):
        problems.append("every feature is constant: the model cannot tell records apart")
    quantiles = np.quantile(y, [0.0, 0.25, 0.5, 0.75, 1.0])
    ignored = {
        group: dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
        for group, counts in dataset.ignored_keys.items()
    }
    return DataReport(
        dataset=dataset,
        label_mean=float(y.mean(dtype=np.float64)),
        label_std=label_std,
        label_quantiles=dict(
            zip(("min", "q25", "median", "q75", "max"), map(float, quantiles), strict=True)
        ),
        constant_features=constant,
        out_of_range={n: int(c) for n, c in zip(names, outside, strict=True) if c},
        defaulted={n: int(c) for n, c in zip(names, defaulted, strict=True) if c},
        problems=tuple(problems),
        constant_values=constant_values,
        ignored_keys=ignored,
    )


def require_trainable(dataset: Dataset, report: DataReport | None = None) -> Dataset:
    """``dataset`` itself, or a DataError when :func:`check_dataset` found it untrainable."""
    report = report or check_dataset(dataset)
    if report.problems:
        raise DataError(f"{dataset.path}: cannot be trained on: {'; '.join(report.problems)}")
    return dataset
