"""Live progress for long commands: a rich progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from calling_score_opt.grid import ExportOutcome, GridObserver, RunOutcome
from calling_score_opt.search import SearchObserver

if TYPE_CHECKING:
    from types import TracebackType


def _bar(console: Console) -> Progress:
    """Description, bar, done/total, a note (epoch loss or best so far), elapsed time."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,  # the summary replaces the bar
    )


class _Live:
    """A live bar on a terminal (started and stopped as a context manager), else nothing."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self._console = console
        self._quiet = quiet
        self._live = console.is_terminal and not quiet
        self._progress = _bar(console)

    def __enter__(self) -> Self:
        if self._live:
            self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live:  # stopping a bar that never started still prints a blank line
            self._progress.stop()


def _run_label(variant: str, repeat: int, repeats: int) -> str:
    return f"{variant} (seed +{repeat})" if repeats > 1 else variant


class GridProgress(_Live, GridObserver):
    """Variants done, each running variant's epoch and the best validation loss so far.

    On a terminal this is a live bar; otherwise (CI logs, pipes) one line per finished run;
    ``quiet`` prints nothing.
    """

    def __init__(self, console: Console, repeats: int, quiet: bool = False) -> None:
        super().__init__(console, quiet)
        self._repeats = repeats
        self._overall: TaskID | None = None
        self._epoch_tasks: dict[tuple[str, int], TaskID] = {}
        self._best: float | None = None
        self._done = 0
        self._total = 0

    def _note(self) -> str:
        return f"best val {self._best:.5f}" if self._best is not None else ""

    def started(self, runs_total: int, runs_done: int, jobs: int) -> None:
        self._done, self._total = runs_done, runs_total
        if runs_done and not self._quiet:
            left = runs_total - runs_done
            self._console.print(
                f"Resuming: {runs_done} of {runs_total} runs are already in the study; "
                + (
                    f"training the other {left} with {jobs} worker(s)."
                    if left
                    else "nothing left to train (their ONNX files are exported again)."
                )
            )
        if self._live:
            self._overall = self._progress.add_task(
                "variants", total=runs_total, completed=runs_done, note=""
            )

    def epoch(self, variant: str, repeat: int, epoch: int, max_epochs: int, val: float) -> None:
        if not self._live:
            return
        key = (variant, repeat)
        if key not in self._epoch_tasks:
            label = f"  {_run_label(variant, repeat, self._repeats)}"
            self._epoch_tasks[key] = self._progress.add_task(label, total=max_epochs, note="")
        self._progress.update(self._epoch_tasks[key], completed=epoch, note=f"val {val:.5f}")

    def run_finished(self, outcome: RunOutcome) -> None:
        self._done += 1
        task = self._epoch_tasks.pop((outcome.variant, outcome.repeat), None)
        if task is not None:
            self._progress.remove_task(task)
        val = outcome.metrics.get("val_loss")
        if val is not None and (self._best is None or val < self._best):
            self._best = val
        if self._overall is not None:
            self._progress.update(self._overall, completed=self._done, note=self._note())
        if self._live or self._quiet:
            return
        label = _run_label(outcome.variant, outcome.repeat, self._repeats)
        if outcome.error is not None:
            self._console.print(
                f"\\[{self._done}/{self._total}] {label}: FAILED: {escape(outcome.error)}",
                highlight=False,
            )
            return
        m = outcome.metrics
        size = m.get("stack_size", 1)
        shared = f" (its share of {size} trained together)" if size > 1 else ""
        self._console.print(
            f"\\[{self._done}/{self._total}] {label}: val {m['val_loss']:.5f} "
            f"test {m['test_loss']:.5f}, {m['epochs_run']} epochs (best {m['best_epoch']}), "
            f"{m['training_time_s']:.1f}s{shared}",
            highlight=False,
        )

    def exported(self, outcome: ExportOutcome) -> None:
        if outcome.error is not None and not self._quiet:
            self._console.print(
                f"{outcome.variant}: export FAILED: {escape(outcome.error)}", highlight=False
            )


class SearchProgress(_Live, SearchObserver):
    """Finished trials against the target, the best validation loss and the running trial."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        super().__init__(console, quiet)
        self._trials: TaskID | None = None
        self._epochs: TaskID | None = None
        self._finished = 0
        self._target = 0

    def started(self, target: int, finished: int, jobs: int) -> None:
        self._finished, self._target = finished, target
        if finished and not self._quiet:
            if finished >= target:
                self._console.print(
                    f"The study already holds {finished} finished trials (--trials {target}): "
                    "nothing to run; raise --trials to search further."
                )
            else:
                self._console.print(
                    f"Resuming: the study holds {finished} finished trials; running until "
                    f"{target} with {jobs} worker(s)."
                )
        if self._live:
            self._trials = self._progress.add_task(
                "trials", total=target, completed=min(finished, target), note=""
            )
            self._epochs = self._progress.add_task("  epochs", total=1, note="")

    def epoch(self, trial: int, epoch: int, max_epochs: int, val: float) -> None:
        if self._epochs is not None:
            self._progress.update(
                self._epochs,
                description=f"  trial {trial}",
                total=max_epochs,
                completed=epoch,
                note=f"val {val:.5f}",
            )

    def progressed(self, finished: int, best: float | None, last: str) -> None:
        if finished == self._finished:
            return
        self._finished = finished
        note = f"best val {best:.5f}" if best is not None else ""
        if self._trials is not None:
            self._progress.update(self._trials, completed=min(finished, self._target), note=note)
        elif not self._quiet and last:
            self._console.print(
                f"\\[{min(finished, self._target)}/{self._target}] {escape(last)}; {note}",
                highlight=False,
            )
