"""What ``cso grid`` and ``cso search`` say while they run and at the end: true in every case.

A run that has nothing to do says so (not "running until 15"), a resumed grid does not claim
its baseline was trained in this run, a variant's time says what it is (its share of the
stack it trained in), and a variant that learned nothing is pointed out.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import make_variant_learn_nothing
from rich.console import Console
from typer.testing import Result

from calling_score_opt.grid import RunOutcome
from calling_score_opt.progress import GridProgress, SearchProgress

RunCli = Callable[..., Result]


def _plain() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_a_search_with_nothing_left_to_run_says_so() -> None:
    console, out = _plain()
    SearchProgress(console).started(target=15, finished=15, jobs=2)
    assert out.getvalue() == (
        "The study already holds 15 finished trials (--trials 15): nothing to run; raise "
        "--trials to search further.\n"
    )


def test_a_resumed_search_says_how_far_it_will_go() -> None:
    console, out = _plain()
    SearchProgress(console).started(target=15, finished=4, jobs=2)
    assert out.getvalue() == (
        "Resuming: the study holds 4 finished trials; running until 15 with 2 worker(s).\n"
    )


def test_a_grid_with_nothing_left_to_train_says_so() -> None:
    console, out = _plain()
    GridProgress(console, repeats=1).started(runs_total=15, runs_done=15, jobs=2)
    assert out.getvalue() == (
        "Resuming: 15 of 15 runs are already in the study; nothing left to train (their ONNX "
        "files are exported again).\n"
    )


def test_a_resumed_grid_says_what_it_trains() -> None:
    console, out = _plain()
    GridProgress(console, repeats=1).started(runs_total=15, runs_done=6, jobs=2)
    assert out.getvalue() == (
        "Resuming: 6 of 15 runs are already in the study; training the other 9 with 2 worker(s).\n"
    )


def test_a_stacked_run_s_line_says_its_time_is_a_share() -> None:
    console, out = _plain()
    progress = GridProgress(console, repeats=1)
    progress.started(runs_total=2, runs_done=0, jobs=1)
    metrics = {"val_loss": 0.01, "test_loss": 0.02, "epochs_run": 9, "best_epoch": 7}
    stacked = {**metrics, "training_time_s": 1.25, "stack_size": 8}
    alone = {**metrics, "training_time_s": 2.5, "stack_size": 1}
    progress.run_finished(RunOutcome("v1_0_baseline", 0, 0, metrics=stacked))
    progress.run_finished(RunOutcome("v1_1_batch_16", 0, 0, metrics=alone))
    assert out.getvalue().splitlines() == [
        "[1/2] v1_0_baseline: val 0.01000 test 0.02000, 9 epochs (best 7), 1.2s (its share of "
        "8 trained together)",
        "[2/2] v1_1_batch_16: val 0.01000 test 0.02000, 9 epochs (best 7), 2.5s",
    ]


# --- the grid's summary --------------------------------------------------------------------


def _grid(run_cli: RunCli, data: Path, *extra: str) -> Result:
    return run_cli(
        "grid", "--data-path", data, "--output-dir", "out", "--epochs", "8",
        "--max-variants", "3", "--jobs", "1", *extra,
    )  # fmt: skip


def test_the_grid_summary_says_what_its_times_and_its_baseline_are(
    run_cli: RunCli, data_copy: Path, tmp_path: Path
) -> None:
    first = _grid(run_cli, data_copy)
    assert first.exit_code == 0, first.output
    results = json.loads((tmp_path / "out" / "optimization_results.json").read_text())
    best = next(v for v in results["variants"] if v.get("rank") == 1)
    # the first three variants share batch size and layers: one stack of three
    assert best["stack_size"] == 3
    assert (
        f"Training Time: {best['training_time_s']:.1f}s (its share of 3 variants trained "
        f"together, {best['stack_wall_time_s']:.1f}s wall), best epoch {best['best_epoch']} of "
        f"{best['epochs_run']}"
    ) in first.stdout
    assert "time: each variant's share of the stack it trained in" in first.stdout
    assert "vs the baseline trained in this run)" in first.stdout

    again = _grid(run_cli, data_copy)
    assert again.exit_code == 0, again.output
    assert "Resuming: 3 of 3 runs are already in the study; nothing left to train" in again.stdout
    assert "training 0" not in again.stdout
    assert "vs the baseline trained in this run" not in again.stdout
    assert "vs the baseline of this study (not trained by this run; same data and split))" in (
        again.stdout
    )
    assert "(0 runs trained, 3 resumed" in again.stdout


def test_the_grid_summary_flags_a_variant_that_learned_nothing(
    run_cli: RunCli, data_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_variant_learn_nothing(monkeypatch, "v1_1_lr_0.0001")
    result = _grid(run_cli, data_copy, "--max-variants", "2")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stdout
    assert re.fullmatch(
        r"warning: v1_1_lr_0\.0001: no better than predicting the mean \(validation MSE "
        r"0\.\d{5}\): it learned nothing \(a learning rate too high, say\); do not ship it",
        warnings[0],
    )
