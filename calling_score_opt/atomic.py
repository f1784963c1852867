"""Write files so that a reader, a crash or a power cut never sees half of one.

The data goes to a hidden temporary file beside the target, is flushed to the disk, replaces
the target in one rename, and the folder's new entry is flushed too: without the two flushes a
power cut soon after the rename can leave an empty or missing file even though no process died.

The temporary's name says who writes it, ``.{name}.{writer}.{pid}.{random}.tmp`` (``writer``:
this machine and, on Linux, its pid namespace), so that a writer killed before its rename
(``kill -9``, the OOM killer) leaves a file the next write of the same target can recognise and
remove. Only when that pid is no longer alive on this machine: a live one may be writing it
right now, and a pid of another machine (a shared folder) says nothing about this one.

Every ``OSError`` of the write itself reaches the caller as it is (the CLI reports it in one
line); only the removal of someone else's stale temporary is best effort.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _writer() -> str:
    """This machine's name (letters, digits, ``-``) and, where Linux shows it, the pid namespace:
    two containers on one host can share a host name and a folder but never their pids."""
    tag = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
    with contextlib.suppress(OSError):
        tag += f"-{os.stat('/proc/self/ns/pid').st_ino}"
    return tag


#: Who writes this process's temporaries (``[A-Za-z0-9-]``, no dot: names split unambiguously).
WRITER = _writer()


def _temporary_name(name: str) -> re.Pattern[str]:
    """Our temporaries of the target ``name``: the last three dot-separated parts before
    ``.tmp`` contain no dot, so a temporary of ``a.onnx.5`` never matches one of ``a.onnx``."""
    return re.compile(
        re.escape(f".{name}.") + r"(?P<writer>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp"
    )


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists here (a zombie or another user's process counts)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # no process can have that number
        return False
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers of this machine that have died.

    Best effort: a file another process removes first, or that cannot be removed, is left to
    the next write. Returns what was removed.
    """
    pattern = _temporary_name(path.name)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed  # an unreadable folder: the write itself will say what is wrong
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or match["writer"] != WRITER:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _fsync_file(path: Path) -> None:
    """Flush the file's data to the disk (Windows can only flush a file opened for writing)."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Flush the folder's entries (the rename) to the disk, where the system allows it."""
    if os.name == "nt":  # a folder cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: this file system cannot sync a folder
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    The caller writes (and closes) the temporary file; it is then flushed to the disk, renamed
    over ``path``, and the folder is flushed. On any exception the temporary file is removed and
    ``path`` is left as it was. Stale temporaries of ``path`` (see the module) are removed first.

    Raises:
        OSError: the folder cannot be created or written, or the disk fails; as raised.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.{WRITER}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes 0600; the result should be an ordinary file
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as exc:
        if exc.filename is None:  # a full disk's write() or fsync() names no file: name ours
            exc.filename = str(path)
        raise
    finally:
        # Never let a failed clean-up hide the error that brought us here; a temporary left
        # behind is removed by the next write of ``path``.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_output_file(path: Path, flag: str, example: str = "") -> None:
    """Refuse, before any work, a file path no write can succeed at: a folder, a path under a
    file, or a folder this process may not write in. (A full disk still shows at the write.)

    Raises:
        ConfigError: naming ``flag``, the path and what is in the way (for a folder, a file
            name in it to use instead: ``example``).
    """
    from calling_score_opt.errors import ConfigError

    if path.is_dir():
        instead = f", e.g. {path / example}" if example else " in it"
        raise ConfigError(f"{flag} {path}: is a folder; name the file to write{instead}")
    _check_parents(path, flag)


def check_output_dir(path: Path, flag: str) -> None:
    """Refuse, before any work, a folder path that is a file or lies under one.

    Raises:
        ConfigError: naming ``flag``, the path and what is in the way.
    """
    from calling_score_opt.errors import ConfigError

    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file, not a folder; pass a folder")
    _check_parents(path, flag)


def _check_parents(path: Path, flag: str) -> None:
    from calling_score_opt.errors import ConfigError

    for parent in path.absolute().parents:  # the nearest existing one decides
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag} {path}: cannot write in {parent} (permission denied)")
            return
