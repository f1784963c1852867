"""Worker processes that end when the process that started them dies.

``kill -9`` of ``cso grid`` or ``cso search`` gives the parent no chance to stop its workers: an
idle pool worker (about 250 MB with torch loaded) waits for work that never comes, and
multiprocessing's resource tracker, which exits only once every process holding its pipe has
exited, waits with it. A worker that calls :func:`exit_with_parent` first thing (in a
``ProcessPoolExecutor`` initializer, or at the top of a ``multiprocessing.Process`` target) ends
with its parent instead, and the resource tracker follows by itself.

On Linux the kernel does it: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` kills the worker the moment its
parent exits, however busy or stuck the worker is. Linux sends that signal when the *thread* that
started the worker ends, not only the process: start workers from a thread that lives as long as
they do (the main thread, as ``cso grid`` and ``cso search`` do). Elsewhere, or where ``prctl`` is
not available, a daemon thread checks every :data:`POLL_INTERVAL_S` seconds whether the parent is
still there and ends the process when it is not.

Ctrl-C is the other way a run ends early. A terminal sends SIGINT to every process of its
foreground group, workers included, and each would print its own traceback. So only cso's main
process hears it: workers are started inside :func:`starting_workers` (SIGINT blocked, which a
new process inherits) and call :func:`worker_signals` first thing (SIGINT ignored, SIGTERM a
request to stop); the main process, interrupted, stops them with :func:`stop_processes`.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, Literal

Mode = Literal["prctl", "poll"]

#: How often the portable fallback looks for its parent.
POLL_INTERVAL_S = 0.5
#: The exit status of a worker whose parent is gone (nobody is left to read it).
EXIT_STATUS = 1

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_lock = threading.Lock()
_mode: Mode | None = None


def active() -> Mode | None:
    """How this process follows its parent: ``"prctl"``, ``"poll"``, or None (it does not)."""
    return _mode


def exit_with_parent(parent_pid: int | None = None, *, use_prctl: bool = True) -> Mode | None:
    """Make this process end when its parent does; call it first thing in a worker.

    ``parent_pid`` is the process to follow; by default the one that started this process
    through :mod:`multiprocessing`. In a process that has neither (the main process: ``--jobs 1``
    runs the worker initializer in-process) it does nothing and returns None, so the same
    initializer serves both. If the parent has already died, the process exits at once.
    ``use_prctl=False`` forces the portable fallback (for tests). Calling it again is harmless.

    Returns:
        ``"prctl"`` when the kernel will kill this process with its parent, ``"poll"`` when a
        thread watches for the parent, None when there is no parent to follow.
    """
    global _mode
    mp_parent = multiprocessing.parent_process()
    if parent_pid is None:
        if mp_parent is None:
            return None
        parent_pid = mp_parent.pid
    assert parent_pid is not None
    with _lock:
        if _mode is not None:
            return _mode
        ppid_at_start = os.getppid()

        def parent_gone() -> bool:
            if os.getppid() != ppid_at_start:  # reparented: whoever started us has exited
                return True
            if mp_parent is not None and mp_parent.pid == parent_pid:
                # its sentinel (a pipe or a process handle) works on every start method and OS
                return not mp_parent.is_alive()
            return not _alive(parent_pid)

        # The kernel follows the process that forked this one. Set it, then look again: if that
        # is not the parent any more, the parent died before prctl took effect (or an
        # intermediary such as the forkserver started us, which the thread handles).
        if use_prctl and _set_parent_death_signal() and os.getppid() == parent_pid:
            _mode = "prctl"
            return _mode
        if parent_gone():
            os._exit(EXIT_STATUS)
        thread = threading.Thread(
            target=_watch, args=(parent_gone,), name="cso-lifeline", daemon=True
        )
        thread.start()
        _mode = "poll"
        return _mode


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent exits; False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)) == 0
    except (OSError, AttributeError):  # no libc with prctl (an unusual build)
        return False


def _watch(parent_gone: Callable[[], bool]) -> None:
    while True:
        time.sleep(POLL_INTERVAL_S)
        if parent_gone():
            os._exit(EXIT_STATUS)  # from a thread: ends the whole process, no clean-up to wait on


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on Windows, where os.kill would end it: assumed so)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# --- Ctrl-C is for the main process ---------------------------------------------------------

SignalHandler = Callable[[int, FrameType | None], Any]

#: How long :func:`stop_processes` waits for workers to wind down (a search worker fails its
#: trial in the study first) before it kills them.
STOP_TIMEOUT_S = 10.0

_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_held(*, drop: bool = False) -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and stop requests (SIGTERM) until the block ends, then act on them.

    For the few steps an interrupt must not cut in half: a trial claimed but not yet in the
    hands of the code that fails it when interrupted, a worker started but not yet recorded.
    With ``drop`` they are forgotten instead: for the clean-up a first Ctrl-C started, which a
    second one must not cut short. Only signals with a Python handler are held (an ignored one
    stays ignored), and only in the main thread, where Python runs handlers; elsewhere this
    does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    saved: dict[signal.Signals, SignalHandler] = {}

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    for signum in _HELD_SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):
            saved[signum] = handler
            signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    if received and not drop:
        signum = signal.Signals(received[0])
        saved[signum](signum, None)  # as if it came now (Ctrl-C: KeyboardInterrupt)


@contextlib.contextmanager
def starting_workers() -> Iterator[None]:
    """Start worker processes in this block: each is born with SIGINT blocked.

    A signal mask survives fork and exec, so a worker never sees a Ctrl-C that arrives before
    its :func:`worker_signals` ignores SIGINT. Here, a Ctrl-C meanwhile is held until the
    workers are started (and recorded by whoever started them), then raised.
    """
    with interrupts_held():
        if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups to worry about
            yield
            return
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


# Set by :func:`_raise_interrupt` (the handler of Ctrl-C in cso's main process, of SIGTERM in a
# search worker), cleared when the command ends: see :func:`check_interrupted`.
_interrupt_pending = False


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    global _interrupt_pending
    _interrupt_pending = True
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raise KeyboardInterrupt again if an interrupt came and Python swallowed it.

    A signal handler's exception surfaces wherever the main thread happens to be; inside a
    finalizer or a weakref callback (SQLAlchemy and PyTorch run many) Python prints "Exception
    ignored in ..." and carries on, so a Ctrl-C would be lost and the command would run to its
    end. The long loops of cso grid and cso search call this once per turn.
    """
    if _interrupt_pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Run a command with Ctrl-C handled by :func:`_raise_interrupt` (KeyboardInterrupt, as
    Python's own handler, but remembered for :func:`check_interrupted`), and without Python's
    "Exception ignored in ..." traceback for a swallowed one; both restored after.

    Only where Ctrl-C has Python's default handler, in the main thread; elsewhere (an ignored
    Ctrl-C, a test runner's own handler) it changes nothing.
    """
    global _interrupt_pending
    mine = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if not mine:
        yield
        return
    previous_hook = sys.unraisablehook

    def quiet_about_interrupts(unraisable: Any) -> None:
        # the swallowed Ctrl-C is raised again by check_interrupted: no traceback for it
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    signal.signal(signal.SIGINT, _raise_interrupt)
    sys.unraisablehook = quiet_about_interrupts
    try:
        yield
    finally:
        _interrupt_pending = False
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, signal.default_int_handler)


def worker_signals(on_stop: SignalHandler = _raise_interrupt) -> bool:
    """First thing in a worker started inside :func:`starting_workers`: ignore Ctrl-C (it is
    for the main process, which stops its workers itself) and handle SIGTERM with ``on_stop``
    (by default: raise KeyboardInterrupt, so the worker winds down as if interrupted).

    Does nothing in the main process (``--jobs 1`` runs a pool's initializer there) and
    returns False; True in a worker.
    """
    if multiprocessing.parent_process() is None:
        return False
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a pending Ctrl-C is dropped with it
    signal.signal(signal.SIGTERM, on_stop)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    return True


def stop_processes(processes: Sequence[BaseProcess], timeout: float = STOP_TIMEOUT_S) -> None:
    """Ask started worker processes to stop (SIGTERM), wait up to ``timeout`` seconds for them
    all, then kill (SIGKILL) any still running. Another Ctrl-C meanwhile is ignored."""
    with interrupts_held(drop=True):
        for process in processes:
            if process.exitcode is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.exitcode is None:
                process.kill()
                process.join()
