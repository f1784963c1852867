"""Workers end with their parent: ``kill -9`` of cso leaves no worker and no resource tracker.

Each test starts a real parent process, which starts real workers and prints their pids; the
test then kills the parent with SIGKILL and watches the workers go.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from calling_score_opt import lifeline

LINUX = sys.platform.startswith("linux")

#: The parent: a spawn pool of one worker (idle, as after a grid's last task), a plain
#: multiprocessing.Process and a subprocess told its parent's pid, each following the parent
#: unless FOLLOW is "no"; it prints their pids and the resource tracker's, then waits.
PARENT = textwrap.dedent(
    """
    import json, multiprocessing, os, subprocess, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import resource_tracker

    from calling_score_opt import lifeline

    FOLLOW = sys.argv[1]  # "prctl", "poll" or "no"
    LATE = sys.argv[2] == "late"  # the plain process follows only once a file "go" exists


    def follow():
        if FOLLOW != "no":
            lifeline.exit_with_parent(use_prctl=FOLLOW == "prctl")


    def who():
        return os.getpid(), lifeline.active()


    def plain(queue):
        queue.put(os.getpid())
        while LATE and not os.path.exists("go"):
            time.sleep(0.05)
        follow()
        queue.put(lifeline.active())
        time.sleep(600)


    CHILD = (
        "import sys, time; from calling_score_opt import lifeline; "
        "mode = lifeline.exit_with_parent(int(sys.argv[1]), use_prctl=sys.argv[2] == 'prctl') "
        "if sys.argv[2] != 'no' else None; print(mode, flush=True); time.sleep(600)"
    )

    if __name__ == "__main__":
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=follow)
        pool_pid, pool_mode = pool.submit(who).result(timeout=60)
        queue = context.Queue()
        process = context.Process(target=plain, args=(queue,))
        process.start()
        plain_pid = queue.get(timeout=60)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(os.getpid()), FOLLOW], stdout=subprocess.PIPE
        )
        child_mode = child.stdout.readline().decode().strip()
        plain_mode = "later" if LATE else queue.get(timeout=60)
        print(json.dumps({
            "pool": [pool_pid, pool_mode],
            "plain": [plain_pid, plain_mode],
            "child": [child.pid, child_mode],
            "tracker": resource_tracker._resource_tracker._pid,
        }), flush=True)
        time.sleep(600)
    """
)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids of ``pids`` still running after ``seconds`` (or sooner, once none is)."""
    deadline = time.monotonic() + seconds
    while True:
        left = [pid for pid in pids if _running(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _read_json_line(process: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, Any]:
    """The one line the parent prints (select, so a parent that hangs fails the test)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "the parent printed nothing"
    line = process.stdout.readline()
    assert line, f"the parent exited ({process.wait()})"
    value: dict[str, Any] = json.loads(line)
    return value


@pytest.fixture
def parent(tmp_path: Path) -> Iterator[Any]:
    """Start the parent script with (follow, when); everything it started is killed after."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT, encoding="utf-8")
    started: list[subprocess.Popen[bytes]] = []
    seen: list[int] = []

    def start(follow: str, when: str = "first") -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        process = subprocess.Popen(
            [sys.executable, str(script), follow, when],
            stdout=subprocess.PIPE,
            cwd=tmp_path,
        )
        started.append(process)
        pids = _read_json_line(process)
        seen.extend([pids["pool"][0], pids["plain"][0], pids["child"][0], pids["tracker"]])
        return process, pids

    yield start
    for process in started:
        process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()
    for pid in seen:  # whatever a failed test left behind
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def _kill(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


@pytest.mark.parametrize(
    "follow",
    [
        pytest.param("prctl", marks=pytest.mark.skipif(not LINUX, reason="Linux only")),
        "poll",
    ],
)
def test_workers_and_the_resource_tracker_end_with_a_killed_parent(
    parent: Any, follow: str
) -> None:
    process, pids = parent(follow)
    assert [pids["pool"][1], pids["plain"][1], pids["child"][1]] == [follow] * 3
    workers = [pids["pool"][0], pids["plain"][0], pids["child"][0]]
    tracker = pids["tracker"]
    assert isinstance(tracker, int)
    assert all(_running(pid) for pid in [*workers, tracker])

    _kill(process)
    # prctl: at once; the thread looks every 0.5 s; the tracker exits once its pipe is closed
    assert _gone_within(workers, 3.0) == []
    assert _gone_within([tracker], 3.0) == []


def test_without_a_lifeline_the_workers_outlive_a_killed_parent(parent: Any) -> None:
    # what `kill -9` of cso grid did: this is why every worker follows its parent
    process, pids = parent("no")
    workers = [pids["pool"][0], pids["plain"][0], pids["child"][0]]
    _kill(process)
    assert _gone_within(workers, 2.0) == workers
    assert _running(pids["tracker"])  # kept alive by the workers holding its pipe


@pytest.mark.parametrize(
    "follow",
    [
        pytest.param("prctl", marks=pytest.mark.skipif(not LINUX, reason="Linux only")),
        "poll",
    ],
)
def test_a_worker_whose_parent_died_before_it_followed_exits_at_once(
    parent: Any, follow: str, tmp_path: Path
) -> None:
    # the race prctl alone misses: the parent dies between the worker's start and its prctl
    process, pids = parent(follow, "late")
    _kill(process)
    plain = pids["plain"][0]
    assert _running(plain)  # waiting for "go", about to follow a parent now gone
    (tmp_path / "go").touch()
    assert _gone_within([plain], 3.0) == []


def test_the_main_process_has_no_parent_to_follow() -> None:
    # --jobs 1 runs the worker initializer in-process: that must not tie cso to its shell
    assert lifeline.exit_with_parent() is None
    assert lifeline.active() is None
    if LINUX:
        signal_number = ctypes.c_int(-1)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(2, ctypes.byref(signal_number), 0, 0, 0) == 0  # PR_GET_PDEATHSIG
        assert signal_number.value == 0
