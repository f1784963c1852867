"""A full disk (or any failing write, or a failing study database) is one line, exit 2, and the
study stays resumable: finished runs are kept and a rerun picks up.

A real full disk is simulated where it must be: ``os.replace`` (the rename of an atomic write,
which fails with ENOSPC when the folder cannot grow) or the artifact store raise the error the
kernel would. For SQLite a real "database or disk is full" comes from ``PRAGMA max_page_count``
set on every connection cso opens.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from helpers import assert_clean_failure, files_under
from typer.testing import CliRunner, Result

from calling_score_opt import study as study_module
from calling_score_opt.console import fails_cleanly

RunCli = Callable[..., Result]
ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"
FULL_ADVICE = "free some space on that disk (or choose another place), then run the command again"


def _disk_full_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Renames onto a file called ``name`` fail as on a full disk; everything else works."""
    real = os.replace

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst).name == name:
            raise OSError(errno.ENOSPC, ENOSPC, str(src), None, str(dst))
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _sqlite_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every new connection to a study database may not grow it: SQLite's real "full"."""
    real = study_module._sqlite_pragmas

    def limited(connection: Any, record: Any) -> None:
        real(connection, record)
        cursor = connection.cursor()
        pages = cursor.execute("PRAGMA page_count").fetchone()[0]
        cursor.execute(f"PRAGMA max_page_count = {pages}")
        cursor.close()

    monkeypatch.setattr(study_module, "_sqlite_pragmas", limited)


def _states(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
    return {state: count for state, count in rows}


def _grid(run_cli: RunCli, data: Path, *extra: str) -> Result:
    return run_cli(
        "grid", "--data-path", data, "--output-dir", "out", "--epochs", "2",
        "--max-variants", "2", "--jobs", "1", "-q", *extra,
        env={"CSO_HEARTBEAT_INTERVAL": "1"},
    )  # fmt: skip


# --- files ---------------------------------------------------------------------------------


def test_grid_whose_results_file_cannot_be_written_says_so_and_keeps_the_runs(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        _disk_full_at(patch, "optimization_results.json")
        result = _grid(run_cli, data_copy)
    message = assert_clean_failure(result, f"cannot write out/optimization_results.json: {ENOSPC}")
    assert FULL_ADVICE in message
    assert "the trained runs are kept in the study" in message
    assert not (tmp_path / "out" / "optimization_results.json").exists()
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")] == []
    db = tmp_path / "studies" / "calling-score-grid.db"
    assert _states(db) == {"COMPLETE": 2}

    again = _grid(run_cli, data_copy)  # space freed: it finishes without training again
    assert again.exit_code == 0, again.output
    assert "(0 runs trained, 2 resumed" in again.stdout
    assert (tmp_path / "out" / "optimization_results.json").is_file()


def test_grid_whose_weights_cannot_be_stored_fails_its_run_at_once(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optuna.artifacts import FileSystemArtifactStore

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, ENOSPC)

    with monkeypatch.context() as patch:
        patch.setattr(FileSystemArtifactStore, "write", full)
        result = _grid(run_cli, data_copy)
    assert_clean_failure(result, "cannot write the weights of v1_0_baseline in", ENOSPC)
    db = tmp_path / "studies" / "calling-score-grid.db"
    assert _states(db) == {"FAIL": 2}  # the stack's two runs: failed now, not left RUNNING

    again = _grid(run_cli, data_copy)
    assert again.exit_code == 0, again.output
    assert _states(db) == {"FAIL": 2, "COMPLETE": 2}


def test_train_whose_model_cannot_be_written_says_so_in_one_line(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _disk_full_at(monkeypatch, "m.onnx")
    before = files_under(tmp_path)
    result = run_cli("train", "--data-path", data_copy, "--epochs", "1", "--output-path", "m.onnx")
    message = assert_clean_failure(result, f"cannot write m.onnx: {ENOSPC}", FULL_ADVICE)
    assert message.endswith("(the model trained, but it must be trained again)")
    assert files_under(tmp_path) == before  # no model, no temporary file


def test_data_synth_on_a_full_disk_names_the_file(
    run_cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _disk_full_at(monkeypatch, "d.json")
    result = run_cli("data", "synth", "--output", "d.json", "--records", "50")
    message = assert_clean_failure(result, f"d.json: {ENOSPC}; {FULL_ADVICE}")
    assert message == f"error: d.json: {ENOSPC}; {FULL_ADVICE}"
    assert files_under(tmp_path) == []


# --- the study's database ------------------------------------------------------------------


def test_search_on_a_full_sqlite_database_is_one_line_and_resumable(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("search", "--data-path", data_copy, "--epochs", "8", "-q")
    env = {"CSO_HEARTBEAT_INTERVAL": "1"}
    assert run_cli(*args, "--trials", "1", env=env).exit_code == 0
    db = tmp_path / "studies" / "calling-score-search.db"
    assert _states(db) == {"COMPLETE": 1}

    with monkeypatch.context() as patch:
        _sqlite_full(patch)
        result = run_cli(*args, "--trials", "8", env=env)
    assert_clean_failure(
        result,
        "the study's database is full (database or disk is full): free some space on its disk, "
        "then run the same command again; finished trials are kept",
    )
    held = _states(db)
    assert held["COMPLETE"] >= 1
    assert sum(held.values()) < 8  # it stopped when the database could not grow

    again = run_cli(*args, "--trials", "8", env=env)  # a trial left RUNNING is stale in 4 s
    assert again.exit_code == 0, again.output
    assert _states(db).get("COMPLETE", 0) + _states(db).get("PRUNED", 0) == 8


def test_grid_on_a_full_sqlite_database_is_one_line_and_resumable(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run_cli(
        "grid", "--data-path", data_copy, "--output-dir", "out", "--epochs", "2",
        "--max-variants", "1", "--jobs", "1", "-q",
    )  # fmt: skip
    assert first.exit_code == 0, first.output
    with monkeypatch.context() as patch:
        _sqlite_full(patch)
        result = run_cli(
            "grid", "--data-path", data_copy, "--output-dir", "out", "--epochs", "2",
            "--jobs", "1", "-q", env={"CSO_HEARTBEAT_INTERVAL": "1"},
        )  # fmt: skip
    assert_clean_failure(result, "the study's database is full (database or disk is full)")
    db = tmp_path / "studies" / "calling-score-grid.db"
    assert _states(db)["COMPLETE"] >= 1

    again = run_cli(
        "grid", "--data-path", data_copy, "--output-dir", "out", "--epochs", "2", "--jobs", "1",
        "-q", env={"CSO_HEARTBEAT_INTERVAL": "1"},
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert _states(db)["COMPLETE"] == 15


# --- the one wrapper every command uses ----------------------------------------------------


def _run(command: Callable[[], None]) -> Result:
    app = typer.Typer()
    app.command()(fails_cleanly(command))
    return CliRunner().invoke(app, [])


def _storage_failure(reason: str) -> BaseException:
    """What Optuna raises when SQLite fails: three exceptions chained."""
    import optuna
    import sqlalchemy.exc

    driver = sqlite3.OperationalError(reason)
    try:
        try:
            raise sqlalchemy.exc.OperationalError("INSERT INTO trials ...", {}, driver) from driver
        except sqlalchemy.exc.OperationalError as wrapped:
            raise optuna.exceptions.StorageInternalError("An exception is raised ...") from wrapped
    except optuna.exceptions.StorageInternalError as exc:
        return exc


def test_a_storage_error_chain_is_one_line_with_the_driver_s_reason() -> None:
    def command() -> None:
        raise _storage_failure("disk I/O error")

    result = _run(command)
    assert_clean_failure(
        result, "error: the study's database failed (disk I/O error); check that it is reachable"
    )


def test_an_os_error_names_the_file_an_atomic_write_was_for(tmp_path: Path) -> None:
    temporary = tmp_path / ".model.onnx.host-4026531836.123.abc_1.tmp"

    def command() -> None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(temporary))

    message = assert_clean_failure(_run(command), f"{tmp_path / 'model.onnx'}: Permission denied")
    assert message.endswith("check its permissions, or choose another place")


def test_every_message_hides_storage_passwords() -> None:
    from calling_score_opt.errors import StudyError

    def command() -> None:
        raise StudyError("no study x in postgresql://cso:s3cret@db/cso?password=other")

    message = assert_clean_failure(_run(command))
    assert message == "error: no study x in postgresql://cso:***@db/cso?password=***"


def test_a_bug_is_not_hidden() -> None:
    from calling_score_opt.console import describe_failure

    assert describe_failure(ValueError("a bug")) is None

    def command() -> None:
        raise ValueError("a bug")

    result = _run(command)
    assert result.exit_code == 1
    assert isinstance(result.exception, ValueError)


def test_a_search_worker_reports_a_full_database_as_one_line(
    monkeypatch: pytest.MonkeyPatch, tiny_dataset: Any, tiny_split: Any
) -> None:
    from calling_score_opt import search

    def full(*args: Any, **kwargs: Any) -> None:
        raise _storage_failure("database or disk is full")

    monkeypatch.setattr(search, "_search_loop", full)
    lines: list[str] = []

    class Queue:
        def put(self, line: str) -> None:
            lines.append(line)

    settings = search.SearchSettings(data_path=Path("d.json"), jobs=2)

    class Inbox:
        def get(self) -> tuple[Any, ...]:
            return settings, tiny_split, tiny_dataset

    with pytest.raises(SystemExit) as exited:
        search._worker_process(1, Inbox(), Queue())
    assert exited.value.code == 2
    assert lines == [
        "worker 1: the study's database is full (database or disk is full): free some space "
        "on its disk, then run the same command again; finished trials are kept"
    ]
