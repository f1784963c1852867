"""The terminal side of the CLI: consoles, and cso's errors as one clear line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from calling_score_opt.errors import CsoError

# Piped or logged output gets lines wide enough for the summary tables (rich's default is 80).
console = Console() if sys.stdout.isatty() else Console(width=120)
err_console = Console(stderr=True)

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
