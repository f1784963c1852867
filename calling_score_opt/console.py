"""The terminal side of the CLI: consoles, and failures as one clear line."""

from __future__ import annotations

import errno
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from calling_score_opt.errors import CsoError

console = Console()
err_console = Console(stderr=True)


def print_table(table: Table) -> None:
    """A table in full: piped or logged output gets 120 columns, not rich's default 80."""
    if console.is_terminal:
        console.print(table)
    else:  # rich caps a print at the console's width: a wider console for this one table
        Console(width=max(console.width, 120)).print(table)


F = TypeVar("F", bound=Callable[..., Any])

#: What to do about a failed file operation, by errno; anything else: fix it and run again.
_OS_ADVICE = {
    errno.ENOSPC: "free some space on that disk (or choose another place), then run the "
    "command again",
    errno.EDQUOT: "free some space within your disk quota (or choose another place), then run "
    "the command again",
    errno.EACCES: "check its permissions, or choose another place",
    errno.EPERM: "check its permissions, or choose another place",
    errno.EROFS: "choose a place on a writable disk",
}
#: The name of an atomic write's temporary file (see atomic.py): the user knows its target.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9-]+\.\d+\.[a-z0-9_]+\.tmp$")
#: The modules whose errors mean "the study's database failed" (Optuna wraps SQLAlchemy's,
#: which wrap the driver's): shown as one line, the driver's own words.
_DATABASE_MODULES = ("sqlite3", "psycopg", "psycopg2", "sqlalchemy")
_DISK_FULL = ("disk is full", "no space left", "could not extend file", "diskfull")


def os_error_reason(exc: OSError) -> str:
    """Why a file operation failed, in the system's words ("No space left on device")."""
    return exc.strerror or str(exc) or type(exc).__name__


def describe_os_error(exc: OSError, what: str | None = None) -> str:
    """``what`` (default: the file the error names): the reason; what to do about it.

    Where the error names two files (a rename), the second is the one being written; a
    temporary file of an atomic write is shown as the file it was to become.
    """
    if what is None:
        name = exc.filename2 if exc.filename2 is not None else exc.filename
        if name is not None:
            path = Path(os.fsdecode(name))
            temporary = _TEMPORARY.match(path.name)
            what = str(path.with_name(temporary["name"]) if temporary else path)
    advice = _OS_ADVICE.get(exc.errno or 0, "fix that, then run the command again")
    head = f"{what}: " if what else ""
    return f"{head}{os_error_reason(exc)}; {advice}"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _is_database_error(exc: BaseException) -> bool:
    module = type(exc).__module__.split(".")[0]
    storage_internal = type(exc).__name__ == "StorageInternalError" and module == "optuna"
    return module in _DATABASE_MODULES or storage_internal


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def describe_database_error(exc: BaseException) -> str | None:
    """One line for a failure of the study's database (a full disk, a lost server), or None
    when ``exc`` is not one. The reason is the driver's (innermost) message."""
    chain = _chain(exc)
    if not _is_database_error(chain[0]):
        return None
    database = [e for e in chain if _is_database_error(e)]
    reason = _first_line(database[-1])
    if any(mark in reason.lower() for mark in _DISK_FULL):
        return (
            f"the study's database is full ({reason}): free some space on its disk, then run "
            "the same command again; finished trials are kept"
        )
    return (
        f"the study's database failed ({reason}); check that it is reachable and writable, "
        "then run the same command again; finished trials are kept"
    )


def describe_failure(exc: BaseException) -> tuple[str, int] | None:
    """The one line (without ``error:``) and exit code for a failure cso expects: its own
    errors, a file operation's and the study database's; None for anything else (a bug)."""
    if isinstance(exc, CsoError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        return describe_os_error(exc), 2
    database = describe_database_error(exc)
    if database is not None:
        return database, 2
    return None


def error_line(message: str) -> str:
    """``message`` as cso prints an error: one line, with any storage password hidden."""
    from calling_score_opt.study import redact_url

    return " ".join(redact_url(message).split("\n"))


def fails_cleanly(command: F) -> F:
    """Turn cso's own errors, and a file system's or database's, into one line on stderr and
    a non-zero exit (Ctrl-C: 130); never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from calling_score_opt.lifeline import interrupts_kept

        try:
            with interrupts_kept():
                return command(*args, **kwargs)
        except KeyboardInterrupt:
            err_console.print("interrupted: finished work is kept; rerun the command to resume")
            raise typer.Exit(130) from None
        except Exception as exc:
            described = describe_failure(exc)
            if described is None:
                raise  # a bug: its traceback is what a report needs
            message, code = described
            err_console.print(
                f"[bold red]error:[/] {escape(error_line(message))}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(code) from None
        finally:
            from calling_score_opt.study import close_storages

            close_storages()

    return wrapper  # type: ignore[return-value]
