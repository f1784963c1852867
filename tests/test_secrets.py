"""A password in a storage URL never reaches a file cso writes or a line it prints.

The whole workflow runs against a real PostgreSQL server (``CSO_TEST_POSTGRES_URL``; ``.ci/run``
starts one) through a URL that carries a known password, once on the command line and once in
``CSO_STORAGE``. Then every file below the working folder (studies, artifacts, ONNX files,
results, the registry, the report) and every line printed are searched for the password.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import assert_clean_failure, postgres_url_or_skip
from typer.testing import Result

RunCli = Callable[..., Result]
PASSWORD = "Sup3r-S3cret-pw"  # the test server trusts loopback, so any password connects


@pytest.fixture
def secret_url() -> str:
    url = postgres_url_or_skip()
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:{PASSWORD}@{host}"


@pytest.fixture
def outputs() -> Iterator[list[str]]:
    printed: list[str] = []
    yield printed
    for text in printed:
        assert PASSWORD not in text, f"the password was printed:\n{text}"


def _files_hold_no_password(root: Path) -> None:
    checked = 0
    for path in root.rglob("*"):
        if path.is_file():
            checked += 1
            assert PASSWORD.encode() not in path.read_bytes(), f"{path} holds the password"
    assert checked > 10  # the workflow really wrote its files


def test_no_file_or_line_of_the_workflow_holds_the_password(
    run_cli: RunCli,
    secret_url: str,
    outputs: list[str],
    data_copy: Path,
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:8]
    grid, search = f"grid-{tag}", f"search-{tag}"

    def ok(*args: str | Path, env: dict[str, str] | None = None) -> Result:
        result = run_cli(*args, env=env)
        outputs.append(result.output)
        assert result.exit_code == 0, result.output
        return result

    storage = ("--storage", secret_url)
    ok("grid", "--data-path", data_copy, "--max-variants", "2", "--epochs", "2", "--jobs", "1",
       "--study", grid, *storage, "-q")  # fmt: skip
    env = {"CSO_STORAGE": secret_url}  # the URL kept off the command line
    ok("search", "--data-path", data_copy, "--trials", "3", "--epochs", "2", "--study", search,
       "-q", env=env)  # fmt: skip
    ok("trials", "--study", search, env=env)
    ok("best", "--study", search, env=env)
    ok("studies", *storage)
    ok("export", "--study", search, "--trial", "0", *storage)
    ok("export", "--study", search, "--ensemble", env=env)
    ok("export", "--study", grid, "--best", "--output-dir", "grid-export", *storage)
    ok("report", "--study", search, *storage)
    ok("registry", "register", "--version", "v9", "--data-source", "synthetic", "--trial", "1",
       "--study", search, *storage)  # fmt: skip
    ok("registry", "register", "--version", "v9-ens", "--data-source", "synthetic",
       "--ensemble", "--study", search, *storage)  # fmt: skip
    ok("registry", "show", "v9")
    _files_hold_no_password(tmp_path)


def test_errors_about_the_storage_hold_no_password(
    run_cli: RunCli, secret_url: str, outputs: list[str], data_copy: Path
) -> None:
    unreachable = secret_url.rsplit("@", 1)[0] + "@127.0.0.1:9/nowhere"  # port 9: nothing there
    for args in (
        ("trials", "--study", "nope", "--storage", secret_url),
        ("best", "--study", "nope", "--storage", unreachable),
        ("search", "--data-path", str(data_copy), "--trials", "1", "--storage", unreachable),
    ):
        result = run_cli(*args)
        outputs.append(result.output)
        assert_clean_failure(result)
        assert "***" in result.output  # the URL is still named, its password hidden
