"""The one way the registry changes: read, check and modify under a file lock, write atomically.

So concurrent commands never lose an update, a crash never leaves half a file, and a refused
change (any exception in the body) leaves the file byte for byte as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from calling_score_opt.atomic import write_text_atomic
from calling_score_opt.registry.fileformat import load_registry, registry_text
from calling_score_opt.registry.records import Registry, RegistryError, utc_now

LOCK_TIMEOUT_S = 60.0


@contextmanager
def update_registry(path: Path) -> Iterator[Registry]:
    """Load the registry under its lock, let the caller change it, then write it atomically.

    Nothing is written when the body raises, so a refused change leaves the file byte for byte
    as it was. The lock (``<path>.lock``) serialises every writer, across processes.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise RegistryError(
            f"{path}.lock: another cso registry command has held the lock for "
            f"{LOCK_TIMEOUT_S:g} s; wait for it to finish and run the command again"
        ) from None
    except OSError as exc:
        raise RegistryError(f"{path}: cannot create or lock the registry ({exc})") from None
    try:
        registry = load_registry(path)
        yield registry
        registry.updated = utc_now()
        try:
            write_text_atomic(path, registry_text(registry))
        except OSError as exc:
            raise RegistryError(
                f"{path}: cannot write the registry ({exc}); it is unchanged"
            ) from None
    finally:
        lock.release()
