"""Outputs no write can succeed at are refused at once: one line, before any data or study work.

``--output-dir`` or ``--artifacts`` that is a file, ``--output-path`` that is a folder or lies
under a file, a SQLite ``--storage`` that is a folder or in memory, a timeout that is no number
of seconds: each used to end in a traceback (some after the whole training), an empty study
database or a stray lock file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_clean_failure, files_under
from typer.testing import Result

RunCli = Callable[..., Result]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any training (or data loading) fails the test: the refusal must come first."""
    from calling_score_opt import data, grid, search, stacked, synth, train

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("work started before the outputs were checked")

    for module in (data, grid, search):
        monkeypatch.setattr(module, "load_dataset", forbidden, raising=False)
    monkeypatch.setattr(train, "train_model", forbidden)
    monkeypatch.setattr(stacked, "train_stacked", forbidden)
    monkeypatch.setattr(synth, "write_synthetic", forbidden)  # the default data


def _refused(run_cli: RunCli, root: Path, *args: str | Path, fragments: tuple[str, ...]) -> str:
    before = files_under(root)
    result = run_cli(*args)
    message = assert_clean_failure(result, *fragments)
    assert files_under(root) == before  # no study database, no lock file, no output
    assert not (root / "studies").exists()
    return message


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("command", ["grid", "search"])
def test_artifacts_that_is_a_file_is_refused_before_any_work(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, command: str
) -> None:
    (tmp_path / "weights").write_text("not a folder", encoding="utf-8")
    message = _refused(
        run_cli,
        tmp_path,
        command,
        "--data-path",
        data_copy,
        "--artifacts",
        "weights",
        fragments=("--artifacts weights: is a file, not a folder",),
    )
    assert message == "error: --artifacts weights: is a file, not a folder; pass a folder"


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(
    ("make", "output_dir", "fragment"),
    [
        ("out", "out", "--output-dir out: is a file, not a folder"),
        ("models", "models/optimized", "--output-dir models/optimized: {root}/models is a file"),
    ],
    ids=["a-file", "under-a-file"],
)
def test_grid_output_dir_that_cannot_be_a_folder_is_refused(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, make: str, output_dir: str, fragment: str
) -> None:
    (tmp_path / make).write_text("a file", encoding="utf-8")
    _refused(
        run_cli,
        tmp_path,
        "grid",
        "--data-path",
        data_copy,
        "--output-dir",
        output_dir,
        fragments=(fragment.format(root=tmp_path),),
    )


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(
    ("output_path", "fragment"),
    [
        (
            "models",
            "--output-path models: is a folder; name the file to write, e.g. models/model.onnx",
        ),
        ("notes.txt/m.onnx", "/notes.txt is a file, not a folder"),
    ],
    ids=["a-folder", "under-a-file"],
)
def test_train_output_path_that_cannot_be_written_is_refused_before_training(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, output_path: str, fragment: str
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "notes.txt").write_text("a file", encoding="utf-8")
    before = files_under(tmp_path)
    result = run_cli("train", "--data-path", data_copy, "--output-path", output_path)
    assert_clean_failure(result, fragment)
    assert files_under(tmp_path) == before


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("command", ["grid", "search"])
@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite:///"])
def test_an_in_memory_sqlite_storage_is_refused_without_a_lock_file(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, command: str, url: str
) -> None:
    message = _refused(
        run_cli,
        tmp_path,
        command,
        "--data-path",
        data_copy,
        "--storage",
        url,
        fragments=(f"--storage {url}: an in-memory database is lost when cso exits",),
    )
    assert message.endswith("use a file: sqlite:///path.db")


@pytest.mark.usefixtures("no_training")
def test_a_sqlite_storage_that_is_a_folder_is_refused(
    run_cli: RunCli, data_copy: Path, tmp_path: Path
) -> None:
    (tmp_path / "db").mkdir()
    _refused(
        run_cli,
        tmp_path,
        "grid",
        "--data-path",
        data_copy,
        "--storage",
        "sqlite:///db",
        fragments=("--storage db: is a folder; name the file to write in it",),
    )


def test_open_storage_refuses_an_in_memory_database_itself(tmp_path: Path) -> None:
    from calling_score_opt.errors import StudyError
    from calling_score_opt.study import claim_lock, open_storage

    for url in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(StudyError, match="an in-memory database is lost when cso exits"):
            open_storage(url)
        with pytest.raises(StudyError, match=r"use a file: sqlite:///path\.db"):
            claim_lock(url, "s", None)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # no ":memory:.init.lock"


def test_open_storage_hides_the_password_when_it_cannot_open(tmp_path: Path) -> None:
    from calling_score_opt.errors import StudyError
    from calling_score_opt.study import open_storage

    url = "postgresql://cso:s3cret@127.0.0.1:1/cso"  # nothing listens on port 1
    with pytest.raises(StudyError) as caught:
        open_storage(url)
    assert "s3cret" not in str(caught.value)
    assert str(caught.value).startswith("--storage postgresql://cso:***@127.0.0.1:1/cso: cannot")


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("timeout", ["nan", "inf", "-inf", "0", "-5"])
def test_search_refuses_a_timeout_that_is_no_positive_number_of_seconds(
    run_cli: RunCli, data_copy: Path, tmp_path: Path, timeout: str
) -> None:
    _refused(
        run_cli,
        tmp_path,
        "search",
        "--data-path",
        data_copy,
        "--timeout",
        timeout,
        fragments=("--timeout must be a positive number of seconds", f"got {float(timeout)}"),
    )
