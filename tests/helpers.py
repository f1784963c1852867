"""Plain helpers for the tests: hand-made records, JSON files and CLI failure checks."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from calling_score_opt.data import FEATURE_GROUPS
from calling_score_opt.errors import CsoError
from calling_score_opt.train import TrainConfig

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


def postgres_url_or_skip() -> str:
    """The test PostgreSQL server's URL (``.ci/run`` starts one and sets
    ``CSO_TEST_POSTGRES_URL``); skip without one, but fail under CI, where it must be there."""
    import os

    url = os.environ.get("CSO_TEST_POSTGRES_URL")
    if url:
        return url
    if os.environ.get("CI") == "true":
        pytest.fail("CSO_TEST_POSTGRES_URL is not set in CI: .ci/run must start PostgreSQL")
    pytest.skip("no PostgreSQL: set CSO_TEST_POSTGRES_URL (see .ci/postgres.sh)")


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


def run_small_grid(
    run_cli: Callable[..., Result],
    data: Path,
    *options: str,
    max_variants: int = 2,
    epochs: int = 2,
) -> Result:
    """``cso grid`` on tiny data, in-process, one job, quiet; it must succeed."""
    result = run_cli(
        "grid", "--data-path", data, "--max-variants", str(max_variants), "--epochs", str(epochs),
        "--jobs", "1", "--quiet", *options,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


def make_variant_learn_nothing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Give grid variant ``name`` learning rate 10: it trains a dead, constant model."""
    from dataclasses import replace

    from calling_score_opt.space import Variant

    real = Variant.train_config

    def dead(self: Variant, epochs: int, seed: int) -> TrainConfig:
        config = real(self, epochs, seed)
        return replace(config, learning_rate=10.0) if self.name == name else config

    monkeypatch.setattr(Variant, "train_config", dead)


def files_under(root: Path, exclude: Sequence[Path] = ()) -> list[Path]:
    """Every file below ``root`` except ``exclude``, sorted (to show nothing new appeared)."""
    skip = {p.resolve() for p in exclude}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.resolve() not in skip)


def fail_training(
    monkeypatch: pytest.MonkeyPatch,
    should_fail: Callable[[TrainConfig], bool],
    error: Exception,
) -> None:
    """Make every run whose config matches raise ``error``, whether it trains alone
    (``train_model``) or stacked with others (``train_stacked``, as the grid does).

    Like the real stacked trainer, a training error fails only its member; any other exception
    ends the whole stack.
    """
    from calling_score_opt import stacked as stacked_module
    from calling_score_opt import train as train_module

    real_model, real_stacked = train_module.train_model, stacked_module.train_stacked

    def train_model(split: Any, config: TrainConfig, *args: Any, **kwargs: Any) -> Any:
        if should_fail(config):
            raise error
        return real_model(split, config, *args, **kwargs)

    def train_stacked(
        split: Any, configs: Sequence[TrainConfig], device: str = "cpu", on_epoch: Any = None
    ) -> list[Any]:
        keep = [i for i, config in enumerate(configs) if not should_fail(config)]
        if len(keep) < len(configs) and not isinstance(error, CsoError):
            raise error
        relay = None if on_epoch is None else (lambda j, stats: on_epoch(keep[j], stats))
        kept = real_stacked(split, [configs[i] for i in keep], device, relay) if keep else []
        results: list[Any] = [error] * len(configs)
        for j, i in enumerate(keep):
            results[i] = kept[j]
        return results

    monkeypatch.setattr(train_module, "train_model", train_model)
    monkeypatch.setattr(stacked_module, "train_stacked", train_stacked)
