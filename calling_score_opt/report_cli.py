"""``cso report`` and ``cso dashboard``: a study as plots, in one HTML file or live.

Thin commands in cli.py's style (mounted there with ``app.command()``); plotly, optuna and
optuna-dashboard are imported inside them, so ``cso --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from calling_score_opt.atomic import check_output_file
from calling_score_opt.console import console, fails_cleanly
from calling_score_opt.errors import ConfigError, StudyError
from calling_score_opt.options import Artifacts, Storage, Study
from calling_score_opt.study import hide_password, passwords_hidden

GRID_STUDY = "calling-score-grid"  # what a newcomer has after `cso grid`
DEFAULT_RESULTS = Path("assets/models/optimized/optimization_results.json")  # cso grid's
REPORTS_DIR = Path("reports")


def _storage_url(storage: str | None, study: str) -> str:
    """The URL to read; a SQLite file that is not there is named, not silently created."""
    from calling_score_opt.study import default_storage_url

    url = storage or default_storage_url(study)
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if not path.exists():
            raise StudyError(
                f"{path}: no such study database; run cso grid (or cso search) first, or pass "
                "--study and --storage of an existing study"
            )
    return url


def _artifact_dir(artifacts: Path | None, url: str, study: str) -> Path:
    """``--artifacts`` (which must exist), else the study's default folder (which may not)."""
    from calling_score_opt.study import default_artifact_dir

    if artifacts is not None and not artifacts.is_dir():
        raise ConfigError(f"--artifacts {artifacts}: no such folder")
    return artifacts or default_artifact_dir(url, study)


def _grid_results(path: Path | None, study: Any) -> dict[str, Any] | None:
    """``--results``, or cso grid's default file when it was written from this study."""
    from calling_score_opt.report import results_match

    candidate = path or DEFAULT_RESULTS
    if not candidate.is_file():
        if path is not None:
            raise ConfigError(f"--results {path}: no such file")
        return None
    try:
        document = json.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if path is None:
            return None  # someone else's file in the default place: not ours to judge
        raise ConfigError(f"--results {path}: not a readable results file ({exc})") from exc
    if isinstance(document, dict) and results_match(study, document):
        return document
    if path is not None:
        raise ConfigError(
            f"--results {path}: was not written from study '{study.study_name}' and its data"
        )
    return None


@fails_cleanly
def report(
    study: Study = GRID_STUDY,
    storage: Storage = None,
    output: Annotated[
        Path | None, typer.Option(help="The HTML file to write. [default: reports/<study>.html]")
    ] = None,
    artifacts: Artifacts = None,
    data_path: Annotated[
        Path | None,
        typer.Option(
            help="Grid studies: the data, for the bootstrap intervals. [default: the recorded file]"
        ),
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="CSV data only: the label column the study was trained on.")
    ] = None,
    results: Annotated[
        Path | None,
        typer.Option(
            help="Grid studies: optimization_results.json, used when the weights or data are "
            f"gone. [default: {DEFAULT_RESULTS}, if it is this study's]"
        ),
    ] = None,
) -> None:
    """Write one self-contained HTML report of a study: the best trials and every plot.

    Optuna's own plots (optimization history, hyperparameter importances, parallel coordinates,
    slices, the Pareto front of several objectives) and cso's: train and validation learning
    curves, a grid's variants against the baseline with bootstrap intervals, and the ensemble
    cso export --ensemble built from the study. plotly.js is embedded: the file opens offline.

    Example: cso report --study calling-score-search --output reports/search.html
    """
    from calling_score_opt.report import load_variant_errors, write_report
    from calling_score_opt.trials import load_study

    path = output or REPORTS_DIR / f"{study}.html"
    check_output_file(path, "--output", example="report.html")
    with passwords_hidden(storage):
        url = _storage_url(storage, study)
        folder = _artifact_dir(artifacts, url, study)
        loaded = load_study(url, study)
        grid_results = variant_errors = None
        if loaded.user_attrs.get("kind") == "grid":
            with console.status("scoring the variants' stored weights on the test split..."):
                variant_errors = load_variant_errors(loaded, folder, data_path, target)
            grid_results = _grid_results(results, loaded)
        outcome = write_report(
            loaded,
            path,
            storage_url=url,
            artifact_dir=folder,
            grid_results=grid_results,
            variant_errors=variant_errors,
        )
    console.print(
        f"Report: {escape(str(outcome.path))} ({len(outcome.plots)} plots)", highlight=False
    )
    for section, why in outcome.notes.items():
        why = hide_password(why, url)
        console.print(f"  no {section} plot: {escape(why)}", highlight=False, soft_wrap=True)
    if variant_errors is not None and variant_errors.note:
        console.print(
            f"  bootstrap intervals: {escape(variant_errors.note)}", highlight=False, soft_wrap=True
        )
    console.print(f"Open {escape(outcome.path.resolve().as_uri())} in a browser.", highlight=False)


@fails_cleanly
def dashboard(
    study: Study = GRID_STUDY,
    storage: Storage = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 127.0.0.1 keeps it to this machine.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")
    ] = 8080,
    artifacts: Artifacts = None,
) -> None:
    """Serve optuna-dashboard on a study's storage, stored weights included, until Ctrl-C.

    Example: cso dashboard --study calling-score-search --port 8081
    """
    from calling_score_opt.dashboard import is_loopback, open_dashboard, serve
    from calling_score_opt.study import redact_url

    with passwords_hidden(storage):
        url = _storage_url(storage, study)
        board = open_dashboard(study, url, host, port, artifacts)
    if not is_loopback(host):
        console.print(
            f"[yellow]warning:[/] the dashboard has no login; anyone who can reach {escape(host)} "
            "can read the study and edit its notes",
            soft_wrap=True,
        )
    console.print(f"Dashboard of study '{escape(study)}': {board.study_url}", highlight=False)
    console.print(
        f"All studies in {escape(redact_url(url))}: {board.url}", highlight=False, soft_wrap=True
    )
    if board.artifact_dir is None:
        console.print("(no stored weights folder found: trials show no artifacts)")
    console.print("Press Ctrl-C to stop.")
    serve(board)
    console.print("Dashboard stopped.")
