"""Plain helpers for the tests: hand-made records, JSON files and CLI failure checks."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from typer.testing import Result

from calling_score_opt.data import FEATURE_GROUPS

# --- hand-made records ---------------------------------------------------------------------


def make_record(
    index: int = 0,
    *,
    value: Callable[[int, int], float] | None = None,
    label: float | None = 0.5,
    formula: float | None = 0.4,
) -> dict[str, Any]:
    """One complete record; feature ``column`` gets ``value(index, column)`` (default 0.3)."""
    value = value or (lambda i, c: 0.3)
    record: dict[str, Any] = {}
    column = 0
    for group, names in FEATURE_GROUPS:
        record[group] = {}
        for name in names:
            record[group][name] = value(index, column)
            column += 1
    if formula is not None:
        record["formula_calling_score"] = formula
    if label is not None:
        record["outcome_score"] = label
    record["user_id"] = f"user_{index}"
    return record


def make_records(
    n: int = 30, *, value: Callable[[int, int], float] | None = None
) -> list[dict[str, Any]]:
    """``n`` complete records with labels that vary (so the file is trainable)."""
    value = value or (lambda i, c: ((i * 7 + c * 3) % 11) / 10)
    return [make_record(i, value=value, label=(i % 10) / 10) for i in range(n)]


def write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def cso_executable() -> str:
    """The real ``cso`` console script of this environment."""
    candidate = Path(sys.executable).parent / "cso"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("cso")
    assert found, "the cso console script is not installed (pip install -e .)"
    return found


def assert_clean_failure(result: Result, *fragments: str, exit_code: int = 2) -> str:
    """Exit ``exit_code``, one 'error:' line on stderr containing ``fragments``, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("error:"), result.stderr
    assert "\n" not in message, f"expected one line on stderr, got:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def files_under(root: Path, exclude: Sequence[Path] = ()) -> list[Path]:
    """Every file below ``root`` except ``exclude``, sorted (to show nothing new appeared)."""
    skip = {p.resolve() for p in exclude}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.resolve() not in skip)
