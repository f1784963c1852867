"""Atomic writes: a crash or a power cut leaves the old file or the new one, never half of one,
and a writer killed mid-write leaves nothing the next write does not clear away."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from calling_score_opt import atomic
from calling_score_opt.atomic import atomic_path, write_text_atomic

#: ``.{name}.{writer}.{pid}.{random}.tmp``: the writer is this machine (and its pid namespace).
TEMPORARY = re.compile(r"\.model\.onnx\.(?P<writer>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp")


def _temporary_of(pid: int, writer: str | None = None, random: str = "abcd1234") -> str:
    return f".model.onnx.{writer or atomic.WRITER}.{pid}.{random}.tmp"


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a process that is running for the length of the test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def test_the_temporary_name_says_which_process_writes_it(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        match = TEMPORARY.fullmatch(tmp.name)
        assert match, tmp.name
        assert int(match["pid"]) == os.getpid()
        assert match["writer"] == atomic.WRITER
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(
    tmp_path: Path, dead_pid: int, live_pid: int
) -> None:
    target = tmp_path / "model.onnx"
    stale = tmp_path / _temporary_of(dead_pid)
    live = tmp_path / _temporary_of(live_pid)
    kept = [
        live,  # another process is writing it right now
        tmp_path / _temporary_of(dead_pid, writer="other-machine"),  # its pids are not ours
        tmp_path / f".other.onnx.{atomic.WRITER}.{dead_pid}.abcd1234.tmp",  # another target
        tmp_path / f".model.onnx.5.{atomic.WRITER}.{dead_pid}.abcd1234.tmp",  # of model.onnx.5
        tmp_path / ".model.onnx.k2j4h5g6.tmp",  # the old format: no writer to ask
        tmp_path / "notes.txt",
    ]
    for path in [stale, *kept]:
        path.write_bytes(b"half")
    write_text_atomic(target, "whole")
    assert target.read_text() == "whole"
    assert not stale.exists()
    for path in kept:
        assert path.exists(), path.name


def test_a_writer_killed_mid_write_leaves_a_temporary_the_next_write_removes(
    tmp_path: Path,
) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("old")
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from calling_score_opt.atomic import atomic_path

        with atomic_path(Path({str(target)!r})) as tmp:
            tmp.write_text("half of it")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], check=False)
    assert killed.returncode == -9
    left = [p.name for p in tmp_path.iterdir() if p.name != "model.onnx"]
    assert len(left) == 1 and TEMPORARY.fullmatch(left[0]), left
    assert target.read_text() == "old"

    write_text_atomic(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert target.read_text() == "new"


# --- durability: fsync of the data, then of the folder's entry ----------------------------


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, bool]]:
    """Every fsync (inode, is a folder) and rename, in the order they happen."""
    events: list[tuple[str, int, bool]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino, stat.S_ISDIR(info.st_mode)))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", os.stat(src).st_ino, False))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_the_file_is_synced_before_the_rename_and_the_folder_after(
    tmp_path: Path, synced: list[tuple[str, int, bool]]
) -> None:
    target = tmp_path / "sub" / "results.json"
    write_text_atomic(target, "{}\n")
    file_inode, folder_inode = target.stat().st_ino, target.parent.stat().st_ino
    assert synced == [
        ("fsync", file_inode, False),
        ("replace", file_inode, False),
        ("fsync", folder_inode, True),
    ]


def _failing_fsync(
    monkeypatch: pytest.MonkeyPatch, *, on_folder: bool, code: int
) -> list[tuple[str, int, bool]]:
    calls: list[tuple[str, int, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        is_folder = stat.S_ISDIR(os.fstat(fd).st_mode)
        calls.append(("fsync", fd, is_folder))
        if is_folder == on_folder:
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_a_folder_that_cannot_be_synced_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EINVAL: the file system does not support syncing a folder; nothing else is excused
    calls = _failing_fsync(monkeypatch, on_folder=True, code=errno.EINVAL)
    write_text_atomic(tmp_path / "a.txt", "text")
    assert (tmp_path / "a.txt").read_text() == "text"
    assert [c[2] for c in calls] == [False, True]


def test_a_folder_sync_that_fails_otherwise_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_fsync(monkeypatch, on_folder=True, code=errno.EIO)
    with pytest.raises(OSError) as excinfo:
        write_text_atomic(tmp_path / "a.txt", "text")
    assert excinfo.value.errno == errno.EIO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # renamed, not confirmed


def test_a_failed_file_sync_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    _failing_fsync(monkeypatch, on_folder=False, code=errno.EIO)
    with pytest.raises(OSError) as excinfo:
        write_text_atomic(target, "new")
    assert excinfo.value.errno == errno.EIO
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# --- errors reach the caller as they are ---------------------------------------------------


def test_an_error_while_writing_propagates_as_is(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as excinfo, atomic_path(target) as tmp:
        tmp.write_text("part")
        raise full
    assert excinfo.value is full
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_temporary_that_cannot_be_removed_does_not_hide_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")

    def unlink(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    with pytest.raises(OSError) as excinfo, atomic_path(tmp_path / "a.txt") as tmp:
        monkeypatch.setattr(Path, "unlink", unlink)
        tmp.write_text("part")
        raise full
    assert excinfo.value is full


def test_a_folder_that_cannot_be_created_is_an_os_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "file" / "a.txt", "text")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_an_os_error_and_nothing_is_left(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            write_text_atomic(folder / "a.txt", "text")
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []


def test_the_result_is_an_ordinary_file(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "text")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
