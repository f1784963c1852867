"""The terminal side of the CLI: consoles, and cso's errors as one clear line."""

from __future__ import annotations

import functools
from collections.abc import Callable
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


def fails_cleanly(command: F) -> F:
    """Turn cso's own errors into one line on stderr and their exit code; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CsoError as exc:
            err_console.print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: finished work is kept; rerun the command to resume")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
