"""Ctrl-C and ``kill -9`` of a real ``cso grid`` / ``cso search``, with real worker processes.

Each test starts cso in its own session (a process group, as a terminal's foreground job is),
waits until its workers are training, then sends SIGINT to the whole group (what Ctrl-C does)
or SIGKILL to cso alone. Wanted: one line and exit 130, no trial left RUNNING, no worker left
behind, and a rerun that takes the interrupted work up at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from helpers import cso_executable

from calling_score_opt.synth import write_synthetic

LINUX = sys.platform.startswith("linux")
pytestmark = pytest.mark.skipif(not LINUX, reason="process groups and /proc: Linux")

#: Epochs of the interrupted runs: the slow learning-rate variant trains a few seconds.
EPOCHS = "60"

_started: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_stray_processes() -> Iterator[None]:
    yield
    while _started:  # a failed test must not leave cso or its workers running
        process = _started.pop()
        with contextlib.suppress(ProcessLookupError):  # a worker may outlive cso
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4,000 records: a few seconds of the grid's training, a quick rerun."""
    path = tmp_path_factory.mktemp("data") / "data.json"
    write_synthetic(path, 4000, 3)
    return path


@pytest.fixture(scope="module")
def search_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12,000 records: a search trial trains for seconds, while a second worker starts."""
    path = tmp_path_factory.mktemp("data") / "search.json"
    write_synthetic(path, 12_000, 3)
    return path


def _cso(cwd: Path, *args: str | Path, heartbeat: int = 1) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [cso_executable(), *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200", "CSO_HEARTBEAT_INTERVAL": str(heartbeat)},
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    _started.append(process)
    return process


def _finish(process: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    _started.remove(process)
    return process.returncode, out, err


def _states(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
    return {state: count for state, count in rows}


def _running_trials(db: Path, min_epochs: int = 0) -> int:
    """RUNNING trials (with at least ``min_epochs`` reported epochs: a search's training)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return int(
                connection.execute(
                    "SELECT COUNT(*) FROM trials t WHERE t.state = 'RUNNING' AND "
                    "(SELECT COUNT(*) FROM trial_intermediate_values v "
                    "WHERE v.trial_id = t.trial_id) >= ?",
                    (min_epochs,),
                ).fetchone()[0]
            )
    except sqlite3.OperationalError:  # the tables are not there yet
        return 0


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc: no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _training(pid: int) -> bool:
    """Whether a worker has loaded torch (its initializer runs right before its first task)."""
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _workers(process: subprocess.Popen[str], count: int) -> list[int]:
    """Wait for ``count`` training workers of ``process`` (the resource tracker is not one)."""
    workers: list[int] = []

    def ready() -> bool:
        nonlocal workers
        assert process.poll() is None, process.communicate()
        workers = [
            pid
            for pid in _children(process.pid)
            if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()
        ]
        return len(workers) >= count and all(_training(pid) for pid in workers)

    _wait_until(ready, 120, f"{count} training worker(s)")
    return workers


def _assert_one_interrupted_line(code: int, out: str, err: str) -> None:
    assert code == 130, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2, err
    assert lines[-1].startswith("interrupted:"), err


def _interrupt(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
    return _finish(process, timeout=60)


def test_ctrl_c_of_a_grid_with_two_workers_stops_quietly_and_fails_its_runs(
    tmp_path: Path, data: Path
) -> None:
    args = ("grid", "--data-path", data, "--epochs", EPOCHS, "--max-variants", "6", "-q")
    grid = _cso(tmp_path, *args, "--jobs", "2")
    workers = _workers(grid, 2)  # PyTorch loaded: they start before the data is read ...
    db = tmp_path / "studies" / "calling-score-grid.db"
    # ... and train once their runs are claimed: the five-variant stack and v1_1_batch_16
    _wait_until(lambda: _running_trials(db) == 6, 120, "the six runs claimed")
    time.sleep(0.5)

    code, out, err = _interrupt(grid)
    _assert_one_interrupted_line(code, out, err)
    assert [pid for pid in workers if _running(pid)] == []
    assert _children(grid.pid) == []  # nor the resource tracker
    assert _states(db) == {"FAIL": 6}  # failed at once: nothing waits for a heartbeat
    assert not (tmp_path / "assets" / "models" / "optimized" / "optimization_results.json").exists()

    # With a grace period of 120 s, a rerun that found a RUNNING trial would wait it out.
    code, out, err = _finish(_cso(tmp_path, *args, "--jobs", "1", heartbeat=30), timeout=90)
    assert code == 0, err
    assert "(6 runs trained, 0 resumed" in out
    assert _states(db) == {"FAIL": 6, "COMPLETE": 6}


@pytest.mark.parametrize(
    ("jobs", "trials"),
    [(1, 2), (2, 3)],  # two workers: a third trial keeps both busy however late one starts
)
def test_ctrl_c_of_a_search_stops_quietly_and_requeues_its_trials(
    tmp_path: Path, data: Path, search_data: Path, jobs: int, trials: int
) -> None:
    args = (
        "search", "--data-path", data if jobs == 1 else search_data, "--epochs", EPOCHS,
        "--pruner", "none", "-q",
    )  # fmt: skip
    search = _cso(tmp_path, *args, "--trials", str(trials), "--jobs", str(jobs))
    db = tmp_path / "studies" / "calling-score-search.db"
    workers = _workers(search, jobs) if jobs > 1 else []
    _wait_until(lambda: _running_trials(db, min_epochs=1) >= 1, 120, "a training trial")

    code, out, err = _interrupt(search)
    _assert_one_interrupted_line(code, out, err)
    assert [pid for pid in workers if _running(pid)] == []
    assert _children(search.pid) == []
    study = optuna.load_study(study_name="calling-score-search", storage=f"sqlite:///{db}")
    by_state = Counter(t.state.name for t in study.get_trials())
    assert "RUNNING" not in by_state  # failed at once, and queued again
    assert by_state["FAIL"] == by_state["WAITING"] >= 1, by_state
    failed = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert all(t.user_attrs["error"].startswith("interrupted") for t in failed)

    # The rerun runs one more trial: the first interrupted one, taken up at once. (With a grace
    # period of 120 s, a rerun that found a RUNNING trial would wait it out, and time out.)
    more = str(by_state["COMPLETE"] + 1)
    code, out, err = _finish(
        _cso(tmp_path, *args, "--trials", more, "--jobs", "1", heartbeat=30), timeout=90
    )
    assert code == 0, err
    retried = [t for t in study.get_trials() if t.state.name == "COMPLETE"][-1]
    assert retried.system_attrs["failed_trial"] == failed[0].number
    assert retried.params == failed[0].params


def test_kill_9_of_a_grid_leaves_no_worker_behind(tmp_path: Path, data: Path) -> None:
    grid = _cso(
        tmp_path, "grid", "--data-path", data, "--epochs", EPOCHS, "--max-variants", "6",
        "--jobs", "2", "-q",
    )  # fmt: skip
    workers = _workers(grid, 2)
    children = _children(grid.pid)  # the workers and multiprocessing's resource tracker
    assert len(children) == 3

    os.kill(grid.pid, signal.SIGKILL)  # cso alone, not its group: nothing else is told
    _finish(grid, timeout=30)
    _wait_until(lambda: not any(_running(pid) for pid in children), 5, "the workers to end")
    assert [pid for pid in workers if _running(pid)] == []


def test_ctrl_c_just_after_a_trial_is_claimed_fails_and_requeues_it(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real SIGINT in the one window where a trial is RUNNING but no code holds it yet: right
    # after study.ask(). Without care it stays RUNNING, and with no heartbeat recorded yet it
    # is never found stale: the search could never finish.
    from calling_score_opt.search import SearchSettings, run_search

    real_ask = optuna.Study.ask
    asked: list[int] = []

    def ask_then_ctrl_c(study: optuna.Study, *args: Any, **kwargs: Any) -> optuna.Trial:
        trial = real_ask(study, *args, **kwargs)
        asked.append(trial.number)
        if len(asked) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Python raises it at the next instruction
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask_then_ctrl_c)
    settings = SearchSettings(
        data_path=data, trials=1, epochs=2, storage_url=f"sqlite:///{tmp_path}/s.db"
    )
    with pytest.raises(KeyboardInterrupt):
        run_search(settings)
    study = optuna.load_study(study_name=settings.study_name, storage=settings.storage)
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "WAITING"]
    assert study.trials[0].user_attrs["error"].startswith("interrupted")

    run_search(settings)  # at once: nothing waits for a heartbeat
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "COMPLETE"]


class _CtrlCInAFinalizer:
    """An object whose finalizer receives the Ctrl-C: Python runs the handler there, and the
    KeyboardInterrupt it raises is printed as "Exception ignored in ..." and dropped."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("command", ["search", "grid"])
def test_a_ctrl_c_that_python_swallows_still_stops_the_command(
    run_cli: Any, data: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """SQLAlchemy and PyTorch run finalizers and weakref callbacks all the time: a Ctrl-C that
    lands in one must not be lost (the command ran on to its end and exited 0)."""
    from calling_score_opt.stacked import StackedTrainer

    real_run_epoch = StackedTrainer.run_epoch
    epochs: list[int] = []

    def run_epoch_with_a_finalizer(self: StackedTrainer) -> Any:
        epochs.append(1)
        if len(epochs) == 2:
            _CtrlCInAFinalizer()  # collected at once: the Ctrl-C is swallowed
        return real_run_epoch(self)

    monkeypatch.setattr(StackedTrainer, "run_epoch", run_epoch_with_a_finalizer)
    hook = sys.unraisablehook
    args = ["--data-path", data, "--epochs", "5", "--jobs", "1", "-q"]
    if command == "search":
        args += ["--trials", "2", "--pruner", "none"]
    else:
        args += ["--max-variants", "2"]
    result = run_cli(command, *args)
    assert result.exit_code == 130, result.output
    assert "interrupted: finished work is kept" in result.output
    assert "Traceback" not in result.output
    # put back as they were (and Python's "Exception ignored in" was not printed: pytest's own
    # hook would have turned it into a warning, and the suite's warnings are errors)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert sys.unraisablehook is hook
