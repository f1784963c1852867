"""``cso dashboard``: optuna-dashboard on a study, asked over its own HTTP API, stopped by Ctrl-C.

Only loopback addresses are used. The real command runs as a subprocess on a free port (port 0:
it prints the URL of the port it got), so the test sees exactly what a user sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
from helpers import assert_clean_failure, cso_executable
from test_report import Built, built_search, studies_base
from typer.testing import CliRunner, Result

from calling_score_opt.dashboard import is_loopback, open_dashboard
from calling_score_opt.errors import ConfigError
from calling_score_opt.report_cli import dashboard as dashboard_command

START_TIMEOUT_S = 30.0
URL = re.compile(r"(http://127\.0\.0\.1:(\d+)/dashboard)/studies/(\d+)")


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_search(studies_base(tmp_path_factory))


def _mounted() -> bool:
    from calling_score_opt import cli

    return any(c.callback is dashboard_command for c in cli.app.registered_commands)


def command_line(*args: str) -> list[str]:
    """``cso dashboard ARGS`` once cli.py has the command; until then the function on its own."""
    if _mounted():
        return [cso_executable(), "dashboard", *args]
    wrapper = (
        "import typer; from calling_score_opt.report_cli import dashboard; "
        "app = typer.Typer(pretty_exceptions_enable=False); app.command()(dashboard); app()"
    )
    return [sys.executable, "-c", wrapper, *args]


def _default_sigint() -> None:  # in the child: Ctrl-C works even if CI ignores SIGINT here
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Running:
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    base: str = ""  # http://127.0.0.1:PORT
    study_id: int = -1

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            assert response.status == 200
            body = response.read()
        return json.loads(body) if path.startswith("/api/") else body


@contextlib.contextmanager
def dashboard_process(*args: str) -> Iterator[Running]:
    """Start ``cso dashboard`` on a free loopback port; stop it (Ctrl-C) if the test did not."""
    process = subprocess.Popen(
        command_line("--host", "127.0.0.1", "--port", "0", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
        preexec_fn=_default_sigint,
    )
    running = Running(process)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not running.base:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no URL within {START_TIMEOUT_S:.0f}s; output: {running.lines}")
            if line is None:
                stderr = process.stderr.read() if process.stderr else ""
                pytest.fail(f"dashboard exited {process.wait()}: {running.lines} {stderr}")
            running.lines.append(line)
            if match := URL.search(line):
                running.base = match.group(1).removesuffix("/dashboard")
                running.study_id = int(match.group(3))
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(timeout=10)
        while (line := lines.get_nowait() if not lines.empty() else None) is not None:
            running.lines.append(line)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_dashboard_serves_the_study_and_stops_cleanly(search: Built) -> None:
    study = search.load()
    with dashboard_process("--study", "search", "--storage", search.storage) as board:
        listed = board.get("/api/studies")["study_summaries"]
        assert [s["study_name"] for s in listed] == ["search"]
        assert listed[0]["study_id"] == board.study_id

        detail = board.get(f"/api/studies/{board.study_id}")
        assert detail["name"] == "search"
        assert detail["directions"] == ["minimize"]
        assert [t["number"] for t in detail["trials"]] == [t.number for t in study.trials]
        states = [t["state"].upper() for t in detail["trials"]]
        assert states == [t.state.name for t in study.trials]
        assert "PRUNED" in states

        page = board.get(f"/dashboard/studies/{board.study_id}")
        assert b"<html" in page.lower()

        # the stored weights are served from the study's artifact folder
        trial = detail["trials"][0]
        meta = next(a for a in trial["artifacts"] if a["filename"] == "model.pt")
        served = board.get(f"/artifacts/{board.study_id}/{trial['trial_id']}/{meta['artifact_id']}")
        folder = search.root / "studies" / "search.artifacts"
        assert served == (folder / meta["artifact_id"]).read_bytes()

        board.process.send_signal(signal.SIGINT)  # Ctrl-C
        assert board.process.wait(timeout=10) in (0, 130)
        stderr = board.process.stderr.read() if board.process.stderr else ""
    output = "".join(board.lines)
    assert "Traceback" not in stderr + output, stderr
    assert "Press Ctrl-C to stop." in output
    assert "Dashboard stopped." in output
    assert board.process.returncode == 0


def test_sigterm_stops_it_as_cleanly(search: Built) -> None:
    with dashboard_process("--study", "search", "--storage", search.storage) as board:
        assert board.get("/api/studies")["study_summaries"]
        board.process.terminate()
        assert board.process.wait(timeout=10) == 0
        stderr = board.process.stderr.read() if board.process.stderr else ""
    assert "Traceback" not in stderr


# --- in-process: the library and the command's failures ---------------------------------------


@pytest.fixture
def invoke() -> Callable[..., Result]:
    from calling_score_opt import cli

    app = cli.app
    if not _mounted():
        app = typer.Typer(pretty_exceptions_enable=False)
        app.command()(dashboard_command)
        app.command(name="unused")(lambda: None)  # two commands: the name is required
    runner = CliRunner()

    def run(*args: str | Path) -> Result:
        return runner.invoke(app, ["dashboard", *[str(a) for a in args]], env={"COLUMNS": "200"})

    return run


def test_a_port_in_use_is_one_clear_line(search: Built, invoke: Callable[..., Result]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            open_dashboard("search", search.storage, "127.0.0.1", port)
        result = invoke("--study", "search", "--storage", search.storage, "--port", str(port))
    assert_clean_failure(result, f"127.0.0.1:{port}", "--port")


def test_a_missing_study_is_one_clear_line(invoke: Callable[..., Result], tmp_path: Path) -> None:
    result = invoke("--study", "nope", "--port", "0")
    assert_clean_failure(result, "studies/nope.db", "run cso grid")
    assert not (tmp_path / "studies").exists()


def test_the_artifact_folder_is_found_beside_the_database(search: Built, tmp_path: Path) -> None:
    board = open_dashboard("search", search.storage, "127.0.0.1", 0)
    try:
        assert board.artifact_dir == search.root / "studies" / "search.artifacts"
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/dashboard/studies/\d+", board.study_url)
        assert board.server.server_port != 0
    finally:
        board.server.server_close()
    with pytest.raises(ConfigError, match="no such folder"):
        open_dashboard("search", search.storage, "127.0.0.1", 0, tmp_path / "missing")


def test_dashboard_help_has_an_example(invoke: Callable[..., Result]) -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "Example: cso dashboard " in result.stdout
    for option in ("--study", "--storage", "--host", "--port", "--artifacts"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("lan", False)],
)
def test_only_loopback_hosts_count_as_private(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_storage_password_is_never_printed(invoke: Callable[..., Result]) -> None:
    url = "postgresql://board:S3cr3t-pw@127.0.0.1:1/studies"  # nothing listens on port 1
    result = invoke("--study", "s", "--storage", url, "--port", "0")
    message = assert_clean_failure(result, "postgresql://board:***@127.0.0.1:1/studies")
    assert "S3cr3t-pw" not in result.output + message


def test_the_printed_storage_has_its_password_hidden(
    search: Built, invoke: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the command prints once it serves: the URL it was given, password hidden."""
    from calling_score_opt import dashboard as board_module

    secret = "postgresql://board:S3cr3t-pw@db.example/studies"
    opened: list[str] = []

    def open_here(study: str, url: str, *args: Any) -> Any:
        opened.append(url)
        return open_dashboard(study, search.storage, "127.0.0.1", 0)

    monkeypatch.setattr(board_module, "open_dashboard", open_here)
    monkeypatch.setattr(board_module, "serve", lambda board: board.server.server_close())
    result = invoke("--study", "search", "--storage", secret, "--port", "0")
    assert result.exit_code == 0, result.output
    assert opened == [secret]  # the real URL is used, only never shown
    assert "All studies in postgresql://board:***@db.example/studies" in result.stdout
    assert "S3cr3t-pw" not in result.output
