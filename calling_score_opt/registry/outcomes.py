"""Outcomes of an A/B test: one CSV row per event, read strictly.

A value the statistics cannot use (not a number, infinite, or absurdly large, like ``1e308``,
whose square overflows) is refused with the line it is on, instead of a wrong report or a
traceback.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from calling_score_opt.errors import DataError
from calling_score_opt.registry.records import show_value

#: No real outcome is larger in size; beyond it a value is a logging bug, and squares of values
#: near float's limit overflow.
OUTCOME_LIMIT = 1e12
COLUMNS = ("user_id", "version", "outcome")
TIMESTAMP_COLUMN = "timestamp"
_LAST_SECOND = 253402300799.0  # 9999-12-31T23:59:59Z


@dataclass(frozen=True)
class Outcome:
    """One event: the user, the version that served them, the outcome, and when (Unix seconds,
    UTC; None when the file has no timestamp)."""

    user_id: str
    version: str
    outcome: float
    at: float | None = None


def parse_time(text: str) -> float:
    """ISO 8601 (no zone means UTC) or Unix seconds, as Unix seconds.

    Raises:
        ValueError: neither, or outside years 1970-9999.
    """
    try:
        seconds = float(text)
    except ValueError:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp()
    if not (math.isfinite(seconds) and 0 <= seconds <= _LAST_SECOND):
        raise ValueError("outside 1970-9999")
    return seconds


def _outcome(text: str, path: Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise DataError(f"{path}: line {line}: outcome {show_value(text)} is not a number")
    if not abs(value) <= OUTCOME_LIMIT:
        raise DataError(
            f"{path}: line {line}: outcome {show_value(text)} is out of range (at most "
            f"{OUTCOME_LIMIT:g} in size); fix the logging that wrote it or drop the row"
        )
    return value


def read_outcomes(path: Path) -> list[Outcome]:
    """Rows of a CSV with columns user_id, version, outcome and optionally timestamp.

    Other columns are ignored. A timestamp (ISO 8601, UTC when no zone is given, or Unix
    seconds) lets the assignment check use the share in force at that time; an empty one
    counts as unknown.

    Raises:
        DataError: the file is missing, lacks a column, or a row is not usable (names the line).
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in columns]
            if missing:
                raise DataError(
                    f"{path}: no column {', '.join(missing)} (columns: {', '.join(columns)}); "
                    "the outcomes CSV needs user_id, version, outcome (and may have timestamp)"
                )
            timed = TIMESTAMP_COLUMN in columns
            rows = []
            for line, raw in enumerate(reader, start=2):
                row = {
                    k.strip(): (v or "").strip()
                    for k, v in raw.items()
                    if isinstance(k, str) and not isinstance(v, list)  # extra fields: ignored
                }
                value = _outcome(row["outcome"], path, line)
                if not row["user_id"] or not row["version"]:
                    raise DataError(f"{path}: line {line}: user_id and version must not be empty")
                at = None
                if timed and row[TIMESTAMP_COLUMN]:
                    try:
                        at = parse_time(row[TIMESTAMP_COLUMN])
                    except (ValueError, OverflowError, OSError):
                        raise DataError(
                            f"{path}: line {line}: timestamp {show_value(row[TIMESTAMP_COLUMN])} "
                            "is not a time (ISO 8601 like 2026-01-05T10:00:00Z, or Unix seconds)"
                        ) from None
                rows.append(Outcome(row["user_id"], row["version"], value, at))
    except FileNotFoundError:
        raise DataError(f"{path}: no such outcomes file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the outcomes CSV ({exc})") from None
    return rows
