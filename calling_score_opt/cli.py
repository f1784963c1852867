"""The ``cso`` command line: thin commands over the library, errors as one clear line.

Heavy libraries (torch, onnx, optuna) are imported inside the commands, so ``cso --help`` is fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from calling_score_opt import report_cli
from calling_score_opt.atomic import check_output_dir, check_output_file
from calling_score_opt.console import console, fails_cleanly, print_table
from calling_score_opt.errors import ConfigError, CsoError
from calling_score_opt.options import STORAGE_ENV, Artifacts, Storage, Study
from calling_score_opt.registry_cli import registry_app

DEFAULT_DATA = Path("data/calling_score_training_data_v1_hybrid.json")
DEFAULT_RECORDS = 10_000
DEFAULT_GRID_DIR = Path("assets/models/optimized")
DEFAULT_TRAIN_OUTPUT = Path("assets/models/calling_score_model_custom.onnx")

app = typer.Typer(
    help="cso: train, search, export and ship the app's calling-score model.\n\n"
    "Example: cso grid   (the 15 documented variants on the default data)",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from calling_score_opt import __version__

        console.print(f"cso {__version__}", highlight=False)
        raise typer.Exit


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print cso's version and exit."
        ),
    ] = False,
) -> None:
    """cso: train, search, export and ship the app's calling-score model.

    Example: cso grid   (the 15 documented variants on the default data)
    """


data_app = typer.Typer(
    help="Check or generate training data files.\n\nExample: cso data check data/export.json",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
contract_app = typer.Typer(
    help="The features the app must build: test vectors, and the check of the app's own.\n\n"
    "Example: cso contract check app_vectors.json",
    no_args_is_help=True,
)
app.add_typer(contract_app, name="contract")
app.add_typer(registry_app, name="registry")
app.command()(report_cli.report)
app.command()(report_cli.dashboard)

# Options shared by several commands.
DataPath = Annotated[
    Path | None,
    typer.Option(
        help=f"Training data: the app's JSON export, or a CSV with --target. "
        f"(default: {DEFAULT_DATA}, generated ({DEFAULT_RECORDS:,} records) if missing)",
        show_default=False,
    ),
]
Target = Annotated[
    str | None, typer.Option(help="CSV only: the label column; other numeric columns are features.")
]
Epochs = Annotated[
    int, typer.Option(min=1, help="Most epochs per run (early stopping may end sooner).")
]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto (CUDA when available).")]
Seed = Annotated[int, typer.Option(help="Seed for the split, the weights and the batch order.")]


def _data_path(data_path: Path | None) -> Path:
    """The given file, or the default data, generated (and announced) when it is missing."""
    if data_path is not None:
        return data_path
    if not DEFAULT_DATA.exists():
        from calling_score_opt.synth import write_synthetic

        console.print(
            f"No {DEFAULT_DATA}: generating {DEFAULT_RECORDS:,} synthetic records there "
            "(`cso data synth` makes other sizes)."
        )
        write_synthetic(DEFAULT_DATA, DEFAULT_RECORDS, seed=0)
    return DEFAULT_DATA


def _default_jobs(device: str) -> int:
    if device == "cuda":
        return 1  # one GPU: extra processes would only queue on it
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@app.command()
@fails_cleanly
def grid(
    data_path: DataPath = None,
    target: Target = None,
    output_dir: Annotated[
        Path, typer.Option(help="Where the ONNX files and optimization_results.json go.")
    ] = DEFAULT_GRID_DIR,
    max_variants: Annotated[
        int, typer.Option(min=1, max=15, help="Train only the first N documented variants.")
    ] = 15,
    epochs: Epochs = 100,
    device: Device = "cpu",
    seed: Seed = 0,
    repeats: Annotated[
        int, typer.Option(min=1, help="Train every variant with K seeds and rank by the mean.")
    ] = 1,
    jobs: Annotated[
        int | None,
        typer.Option(min=1, help="Worker processes. (default: the CPU cores available)"),
    ] = None,
    study: Annotated[str, typer.Option(help="Optuna study name (one trial per run).")] = (
        "calling-score-grid"
    ),
    storage: Storage = None,
    artifacts: Artifacts = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Train the 15 documented variants, export each to ONNX and say which is best.

    Every run is a trial in an Optuna study; running the same command again resumes it and
    retrains nothing that finished. Variants are ranked by validation loss.

    Example: cso grid --max-variants 5 --epochs 50
    """
    from calling_score_opt.grid import GridSettings, run_grid
    from calling_score_opt.progress import GridProgress

    settings = GridSettings(  # checks the options and every output path before any work
        data_path=data_path or DEFAULT_DATA,
        output_dir=output_dir,
        target=target,
        max_variants=max_variants,
        epochs=epochs,
        device=device,
        seed=seed,
        repeats=repeats,
        jobs=jobs or _default_jobs(device),
        study_name=study,
        storage_url=storage,
        artifact_dir=artifacts,
    )
    _data_path(data_path)  # the default data, generated if missing, once the options are good
    with GridProgress(console, repeats, quiet) as progress:
        outcome = run_grid(settings, progress)
    _print_grid_summary(outcome.results, outcome.results_path)
    if outcome.results["summary"]["succeeded"] == 0:
        raise CsoError("every variant failed; see the reasons above")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}%"


def _training_time(entry: dict[str, Any], repeats: int) -> str:
    """A variant's training time, saying what it is: its share of the stack it trained in."""
    seconds, size = entry["training_time_s"], entry.get("stack_size")
    wall = entry.get("stack_wall_time_s")
    seeds = f"; summed over {repeats} seeds" if repeats > 1 else ""
    if size is None or wall is None:  # trials stored before cso recorded its stacks
        return (
            f"{seconds:.1f}s (the wall time of the stack it trained in, shared with the "
            f"variants trained alongside it, if any{seeds})"
        )
    if size > 1:
        together = f"its share of {size} variants trained together, {wall:.1f}s wall"
        return f"{seconds:.1f}s ({together}{seeds})"
    return f"{seconds:.1f}s (trained alone{seeds})"


def _print_grid_summary(results: dict[str, Any], results_path: Path) -> None:
    summary = results["summary"]
    ranked = sorted((v for v in results["variants"] if "rank" in v), key=lambda v: v["rank"])
    repeats = results["settings"]["repeats"]
    stacked = any((v.get("stack_size") or 1) > 1 for v in ranked[:5])
    table = Table(
        title=f"Top {min(5, len(ranked))} variants by validation loss",
        title_justify="left",
        caption="time: each variant's share of the stack it trained in (variants with the same "
        "batch size and layers train together)"
        if stacked
        else None,
        caption_justify="left",
    )
    for column in ("rank", "variant", "val loss", "test loss", "vs baseline", "epochs", "time"):
        if column == "variant":
            table.add_column(column, no_wrap=True, min_width=19)
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for v in ranked[:5]:
        val = f"{v['val_loss']:.5f}" + (f" ±{v['val_loss_std']:.5f}" if repeats > 1 else "")
        table.add_row(
            str(v["rank"]),
            v["name"],
            val,
            f"{v['test_loss']:.5f}",
            _pct(v["improvement_vs_baseline_pct"]),
            f"{v['best_epoch']}/{v['epochs_run']}",
            f"{v['training_time_s']:.1f}s",
        )
    print_table(table)
    dead = [v["name"] for v in ranked if v.get("no_better_than_mean")]
    if dead:
        console.print(
            f"[bold yellow]warning:[/] {escape(', '.join(dead))}: no better than predicting the "
            f"mean (validation MSE {summary['mean_predictor_val_loss']:.5f}): "
            + ("it" if len(dead) == 1 else "they")
            + " learned nothing (a learning rate too high, say); do not ship "
            + ("it" if len(dead) == 1 else "them"),
            highlight=False,
            soft_wrap=True,
        )
    if ranked:
        best = ranked[0]
        cfg = best["config"]
        baseline = summary.get("baseline")
        improvement = _pct(best["improvement_vs_baseline_pct"])
        if baseline is None:
            against = "no baseline to compare with: it did not train successfully"
        elif baseline.get("trained_in_this_run", True):
            against = f"improvement: {improvement} vs the baseline trained in this run"
        else:
            against = (
                f"improvement: {improvement} vs the baseline of this study (not trained by this "
                "run; same data and split)"
            )
        lines = [
            f"[bold]🏆 BEST VARIANT: {best['name']}[/] (lowest validation loss"
            + (f", mean of {repeats} seeds)" if repeats > 1 else ")"),
            f"Test Loss: {best['test_loss']:.5f} ({against})",
        ]
        if best.get("no_better_than_mean"):
            lines.append(
                "[bold yellow]warning:[/] even the best variant is no better than predicting "
                "the mean: no variant learned anything; check the data and the settings"
            )
        boot = summary.get("bootstrap")
        if boot is not None:
            low, high = boot["ci95_pct"]
            lines.append(
                f"  95% paired-bootstrap interval: {low:+.2f}% .. {high:+.2f}%: {boot['verdict']}"
            )
        lines += [
            f"Val Loss: {best['val_loss']:.5f}",
            f"Training Time: {_training_time(best, repeats)}, "
            f"best epoch {best['best_epoch']} of {best['epochs_run']}",
            f"Model Size: {best['model_size_kb']} KB",
            f"Parameters: {best['parameters']:,}",
            "Configuration:",
            f"  Learning Rate: {cfg['learning_rate']:g}",
            f"  Batch Size: {cfg['batch_size']}",
            f"  Architecture: {cfg['hidden_sizes']}",
            f"  Dropout: {cfg['dropout']:g}",
        ]
        floor = summary.get("irreducible_mse")
        if floor is not None:
            excess = best["test_loss"] - floor
            lines.append(
                f"Noise floor: the data's irreducible error is {floor:.5f}; the best test MSE is "
                f"{excess:.5f} above it ({excess / floor * 100:.1f}%)"
            )
        console.print("\n".join(lines), highlight=False, soft_wrap=True)
    if summary["failed"]:
        console.print(f"[bold red]Failed variants ({len(summary['failed'])}):[/]")
        for failure in summary["failed"]:
            console.print(
                f"  {failure['name']}: {escape(failure['error'])}", highlight=False, soft_wrap=True
            )
    timing = summary["timing"]
    console.print(
        f"Results: {escape(str(results_path))} ({timing['runs_trained']} runs trained, "
        f"{timing['runs_resumed']} resumed, {timing['wall_s']:.1f}s)",
        highlight=False,
    )


@app.command()
@fails_cleanly
def train(
    data_path: DataPath = None,
    target: Target = None,
    output_path: Annotated[Path, typer.Option(help="Where the ONNX model goes.")] = (
        DEFAULT_TRAIN_OUTPUT
    ),
    learning_rate: Annotated[
        float, typer.Option(help="Adam learning rate, a positive number (e.g. 0.0005).")
    ] = 0.001,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per step.")] = 32,
    epochs: Epochs = 100,
    hidden_sizes: Annotated[
        str, typer.Option(help='Hidden layer widths, comma-separated, e.g. "256,128,64".')
    ] = "128,64",
    dropout: Annotated[float, typer.Option(min=0.0, max=0.99, help="Dropout rate.")] = 0.2,
    seed: Seed = 0,
    device: Device = "cpu",
) -> None:
    """Train one model with the given hyperparameters and write it as a verified ONNX file.

    Example: cso train --learning-rate 0.0005 --batch-size 64 --hidden-sizes "256,128,64"
    """
    from calling_score_opt.console import describe_os_error, err_console
    from calling_score_opt.data import load_dataset, require_trainable, split_dataset
    from calling_score_opt.export import export_onnx, model_metadata
    from calling_score_opt.space import parse_hidden_sizes
    from calling_score_opt.train import TrainConfig, train_model

    check_output_file(
        output_path, "--output-path", example="model.onnx"
    )  # now, not after the whole training
    config = TrainConfig(
        learning_rate=learning_rate,
        batch_size=batch_size,
        hidden_sizes=parse_hidden_sizes(hidden_sizes),
        dropout=dropout,
        epochs=epochs,
        seed=seed,
    )
    dataset = require_trainable(load_dataset(_data_path(data_path), target))
    split = split_dataset(dataset, seed)
    with console.status("training...") as status:
        result = train_model(
            split,
            config,
            device,
            lambda s: status.update(f"training: epoch {s.epoch}/{epochs}, val {s.val_loss:.5f}"),
        )
    metadata = model_metadata(
        "custom", config, dataset.feature_names, result.metrics(), dataset.fingerprint
    )
    try:
        report = export_onnx(
            result.model, output_path, split.x_test, metadata, x_train=split.x_train
        )
    except OSError as exc:
        raise CsoError(
            describe_os_error(exc, f"cannot write {output_path}")
            + " (the model trained, but it must be trained again)"
        ) from exc
    console.print(
        f"Test Loss: {result.test_loss:.5f}\nVal Loss: {result.val_loss:.5f}\n"
        f"Train Loss: {result.train_loss:.5f}\n"
        f"Best epoch: {result.best_epoch} of {result.epochs_run} run\n"
        f"Training Time: {result.training_time_s:.1f}s\n"
        f"Parameters: {result.parameters:,}\n"
        f"Model: {report.path} ({report.size_bytes / 1024:.1f} KB, onnxruntime parity "
        f"{report.parity_max_abs_diff:.1e} on {report.parity_samples} test records)",
        highlight=False,
    )
    if result.no_better_than_mean:  # a dead network: written as asked, but said out loud
        err_console.print(
            f"[bold yellow]warning:[/] this model predicts no better than the training labels' "
            f"mean (validation MSE {result.val_loss:.5f}, the mean's "
            f"{result.mean_predictor_val_loss:.5f}, best epoch {result.best_epoch}): it "
            f"learned nothing; try a lower --learning-rate (this run: {learning_rate:g}), "
            "e.g. 0.001",
            highlight=False,
            soft_wrap=True,
        )


SEARCH_STUDY = "calling-score-search"


@app.command()
@fails_cleanly
def search(
    trials: Annotated[
        int, typer.Option(min=1, help="Run until the study holds N finished trials.")
    ] = 30,
    space: Annotated[
        str, typer.Option(help="continuous (wide ranges) or grid (the documented values).")
    ] = "continuous",
    sampler: Annotated[str, typer.Option(help="tpe, gp, cmaes or random.")] = "tpe",
    pruner: Annotated[str, typer.Option(help="median, hyperband or none.")] = "median",
    objectives: Annotated[
        str, typer.Option(help="val_loss, val_loss,params or val_loss,latency (Pareto front).")
    ] = "val_loss",
    pair_features: Annotated[
        str,
        typer.Option(help="|user - spot| vibe inputs: search (let the sampler decide), on, off."),
    ] = "search",
    timeout: Annotated[
        float | None, typer.Option(help="Stop starting trials after this many seconds.")
    ] = None,
    data_path: DataPath = None,
    target: Target = None,
    epochs: Epochs = 100,
    device: Device = "cpu",
    seed: Seed = 0,
    jobs: Annotated[
        int, typer.Option(min=1, help="Worker processes sharing the study's storage.")
    ] = 1,
    study: Study = SEARCH_STUDY,
    storage: Storage = None,
    artifacts: Artifacts = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Search for a better model with Optuna (TPE by default), pruning on validation loss.

    The baseline is the first trial; every complete trial's weights are stored, so any of them
    can be exported later. Rerunning the same command resumes the study.

    Example: cso search --trials 40 --space continuous --jobs 2
    """
    from calling_score_opt.progress import SearchProgress
    from calling_score_opt.search import SearchSettings, run_search
    from calling_score_opt.study import redact_url
    from calling_score_opt.trials import load_study

    settings = SearchSettings(  # checks the options and every output path before any work
        data_path=data_path or DEFAULT_DATA,
        trials=trials,
        target=target,
        space=space,
        sampler=sampler,
        pruner=pruner,
        objectives=objectives,
        pair_features=pair_features,
        timeout=timeout,
        seed=seed,
        epochs=epochs,
        device=device,
        jobs=jobs,
        study_name=study,
        storage_url=storage,
        artifact_dir=artifacts,
    )
    _data_path(data_path)  # the default data, generated if missing, once the options are good
    with SearchProgress(console, quiet) as progress:
        outcome = run_search(settings, progress)
    counts = ", ".join(f"{n} {state.lower()}" for state, n in outcome.counts.items())
    console.print(
        f"Study '{study}' in {escape(redact_url(outcome.storage))}: {counts}.", highlight=False
    )
    _print_best(load_study(outcome.storage, study), outcome.storage, artifacts, data_path, target)


def _trials_table(
    rows: list[dict[str, Any]], title: str, objectives: tuple[str, ...] = ("val_loss",)
) -> Table:
    """One row per trial; a grid's variant name, and every objective of a Pareto study."""
    named = any(row["name"] != f"trial_{row['number']}" for row in rows)
    table = Table(title=title, title_justify="left")
    columns = ["#", *(["variant"] if named else []), "state", "parameters", "val loss"]
    columns += [OBJECTIVE_COLUMNS.get(o, o) for o in objectives[1:]]  # params, latency
    columns += ["test loss", "epochs", "time"]
    for column in columns:
        left = column in ("variant", "state", "parameters")
        table.add_column(column, justify="left" if left else "right", no_wrap=column == "variant")
    for row in rows:
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items()
        )
        state = row["state"].lower()
        if row["error"]:
            state += f": {row['error'][:60]}"
        values = row["values"] or []
        cells = [str(row["number"]), *([escape(row["name"])] if named else [])]
        cells += [
            escape(state),
            escape(params),
            "" if row["val_loss"] is None else f"{row['val_loss']:.5f}",
        ]
        cells += [
            _objective_value(objectives[i], values[i]) if i < len(values) else ""
            for i in range(1, len(objectives))
        ]
        cells += [
            "" if row["test_loss"] is None else f"{row['test_loss']:.5f}",
            "" if row["epochs"] is None else str(row["epochs"]),
            "" if row["time_s"] is None else f"{row['time_s']:.1f}s",
        ]
        table.add_row(*cells)
    return table


OBJECTIVE_COLUMNS = {"params": "model params", "latency": "latency (ms)"}


def _objective_value(objective: str, value: float) -> str:
    if objective == "params":
        return f"{value:,.0f}"
    return f"{value:.3f}" if objective == "latency" else f"{value:.4g}"


OBJECTIVE_TITLES = {"params": "parameters", "latency": "latency"}


def _objectives(study_obj: Any) -> tuple[str, ...]:
    names = study_obj.metric_names or str(study_obj.user_attrs.get("objectives", "")).split(",")
    if len(names) != len(study_obj.directions):
        return ("val_loss", *(f"objective {i}" for i in range(1, len(study_obj.directions))))
    return tuple(names)


def _print_best(
    study_obj: Any,
    url: str,
    artifacts: Path | None,
    data_path: Path | None = None,
    target: str | None = None,
) -> None:
    """The best trial (or Pareto front), then the best against the baseline on the test split,
    with the same paired-bootstrap interval and verdict as the grid's summary."""
    from calling_score_opt.errors import StudyError
    from calling_score_opt.study import artifact_store, default_artifact_dir
    from calling_score_opt.trials import best_trials, compare_best_with_baseline, trial_row

    try:
        best = best_trials(study_obj)
    except StudyError as exc:
        console.print(escape(str(exc)))
        return
    objectives = _objectives(study_obj)
    title = (
        "Pareto front (validation loss vs "
        + " and ".join(OBJECTIVE_TITLES.get(o, o) for o in objectives[1:])
        + ")"
        if len(objectives) > 1
        else "Best trial (lowest validation loss)"
    )
    print_table(_trials_table([trial_row(t) for t in best], title, objectives))
    store = artifact_store(artifacts or default_artifact_dir(url, study_obj.study_name))
    comparison = compare_best_with_baseline(study_obj, store, data_path, target)
    baseline = comparison.baseline
    top = comparison.best
    lead = f"Trial {top.number}" + (" (lowest validation loss)" if len(best) > 1 else "")
    if baseline is None or comparison.bootstrap is None:
        console.print(f"{lead}: no comparison with the baseline ({comparison.note}).")
        return
    boot = comparison.bootstrap
    low, high = boot["ci95_pct"]
    console.print(
        f"Baseline: trial {baseline.number}, val {baseline.values[0]:.5f}, "
        f"test {baseline.user_attrs.get('test_loss', float('nan')):.5f}\n"
        f"{lead} against the baseline on the test split: "
        f"{boot['test_mse_improvement_pct']:+.2f}% test MSE, 95% paired-bootstrap interval "
        f"{low:+.2f}% .. {high:+.2f}%: {boot['verdict']}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@fails_cleanly
def studies(
    storage: Annotated[
        str | None,
        typer.Option(
            envvar=STORAGE_ENV,
            show_envvar=False,
            help=f"List the studies of this storage URL, else ${STORAGE_ENV}. (default: every "
            "sqlite file under studies/)",
        ),
    ] = None,
) -> None:
    """List the studies there are: name, kind (grid or search), trials, best, storage.

    Example: cso studies   |   cso studies --storage postgresql://cso@db-host/cso
    """
    from calling_score_opt.trials import list_studies

    found = list_studies(storage)
    if not found:
        where = "that storage" if storage else "studies/"
        console.print(f"No studies in {where} yet: run cso grid or cso search first.")
        return
    table = Table(title=f"{len(found)} studies", title_justify="left")
    for column in ("study", "kind", "trials", "complete", "best val loss", "storage"):
        right = column in ("trials", "complete", "best val loss")
        table.add_column(column, justify="right" if right else "left")
    for info in found:
        best = "" if info.best_value is None else f"{info.best_value:.5f} (#{info.best_trial})"
        table.add_row(
            escape(info.name),
            info.kind,
            str(info.trials),
            str(info.complete),
            best,
            escape(info.storage),
        )
    print_table(table)


@app.command()
@fails_cleanly
def trials(
    study: Study = SEARCH_STUDY,
    storage: Storage = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Show only the last N trials.")] = None,
) -> None:
    """List a study's trials: number, variant (grid), state, parameters, losses, epochs, time.

    Example: cso trials --study calling-score-grid
    """
    from calling_score_opt.study import default_storage_url
    from calling_score_opt.trials import load_study, trial_row

    loaded = load_study(storage or default_storage_url(study), study)
    rows = [trial_row(t) for t in loaded.get_trials(deepcopy=False)]
    title = f"Study '{study}': {len(rows)} trials"
    if limit is not None and limit < len(rows):
        title = f"Study '{study}': the last {limit} of {len(rows)} trials"
        rows = rows[-limit:]
    print_table(_trials_table(rows, title, _objectives(loaded)))


@app.command()
@fails_cleanly
def best(
    study: Study = SEARCH_STUDY,
    storage: Storage = None,
    artifacts: Artifacts = None,
    data_path: Annotated[
        Path | None,
        typer.Option(help="The study's data, for the test-split interval. (default: recorded)"),
    ] = None,
    target: Target = None,
) -> None:
    """Show the best trial (or the Pareto front) and how it does against the baseline on the
    test split, with a 95% paired-bootstrap interval.

    Example: cso best --study calling-score-grid
    """
    from calling_score_opt.study import default_storage_url
    from calling_score_opt.trials import load_study

    url = storage or default_storage_url(study)
    _print_best(load_study(url, study), url, artifacts, data_path, target)


@app.command()
@fails_cleanly
def export(
    trial: Annotated[int | None, typer.Option(help="Export trial number N.")] = None,
    best_: Annotated[bool, typer.Option("--best", help="Export the best trial(s).")] = False,
    top: Annotated[
        int | None, typer.Option(min=1, help="Export the K trials with the lowest val loss.")
    ] = None,
    ensemble: Annotated[
        bool,
        typer.Option(
            "--ensemble",
            help="Export the best ensemble of the study's complete trials as one ONNX model "
            "(greedy selection with replacement on validation predictions).",
        ),
    ] = False,
    max_members: Annotated[
        int, typer.Option(min=1, help="--ensemble: at most K distinct trials in it.")
    ] = 8,
    rounds: Annotated[
        int, typer.Option(min=1, help="--ensemble: picks of the greedy selection (best kept).")
    ] = 50,
    output_dir: Annotated[
        Path, typer.Option(help="Where the ONNX files and optimization_results.json go.")
    ] = Path("assets/models/exported"),
    study: Study = SEARCH_STUDY,
    storage: Storage = None,
    artifacts: Artifacts = None,
    data_path: Annotated[
        Path | None,
        typer.Option(help="The study's data, for the parity check. (default: the recorded file)"),
    ] = None,
    target: Target = None,
) -> None:
    """Export stored trials, or their best ensemble, to ONNX (no retraining), verified against
    onnxruntime. optimization_results.json in the output folder gains their entries.

    Example: cso export --best   |   cso export --trial 12   |   cso export --ensemble
    """
    from calling_score_opt.study import default_storage_url
    from calling_score_opt.trials import export_trials, load_study, select_trials

    chosen_modes = (trial is not None, best_, top is not None, ensemble)
    if sum(chosen_modes) != 1:
        raise ConfigError(
            "say what to export: exactly one of --trial N, --best, --top K, --ensemble"
        )
    check_output_dir(output_dir, "--output-dir")
    url = storage or default_storage_url(study)
    loaded = load_study(url, study)
    if ensemble:
        from calling_score_opt.ensemble import build_ensemble

        with console.status("building the ensemble: scoring every complete trial..."):
            outcome = build_ensemble(
                loaded, output_dir, url, artifacts, data_path, target, max_members, rounds
            )
        _print_ensemble(outcome.record, outcome.export.parity_max_abs_diff)
        console.print(f"Results: {escape(str(outcome.results_path))}", highlight=False)
        return
    chosen = select_trials(loaded, number=trial, best=best_, top=top)
    exported = export_trials(loaded, chosen, output_dir, url, artifacts, data_path, target)
    for entry in exported.entries:
        console.print(
            f"trial {entry['trial_number']}: {escape(entry['onnx_path'])} "
            f"(val {entry['val_loss']:.5f}, test {entry['test_loss']:.5f}, "
            f"parity {entry['parity_max_abs_diff']:.1e})",
            highlight=False,
        )
    console.print(f"Results: {escape(str(exported.results_path))}", highlight=False)


def _interval_line(label: str, comparison: dict[str, Any] | None) -> str:
    if comparison is None:
        return f"  vs {label}: n/a"
    low, high = comparison["ci95_pct"]
    return (
        f"  vs {label}: {comparison['test_mse_improvement_pct']:+.2f}% test MSE, 95% "
        f"paired-bootstrap interval {low:+.2f}% .. {high:+.2f}%: {comparison['verdict']}"
    )


def _print_ensemble(record: dict[str, Any], parity: float) -> None:
    console.print(
        f"[bold]Ensemble of {len(record['members'])} trials[/] ({record['rounds']} picks from "
        f"{record['candidates']} complete trials, {record['method']})",
        highlight=False,
        soft_wrap=True,
    )
    table = Table()
    for column in ("model", "weight", "val loss", "test loss"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row("ensemble", "", f"{record['val_loss']:.5f}", f"{record['test_loss']:.5f}")
    for member in record["members"]:
        table.add_row(
            escape(member["name"]),
            f"{member['weight']:.2f}",
            f"{member['val_loss']:.5f}",
            f"{member['test_loss']:.5f}",
        )
    print_table(table)
    best, baseline = record["best_single"], record["baseline"]
    lines = [
        "Selected on the validation split; the test split only reports:",
        _interval_line(f"the best single trial ({best['name']})", record["vs_best_single"]),
        _interval_line(
            f"the baseline ({baseline['name']})" if baseline else "the baseline",
            record["vs_baseline"],
        ),
    ]
    shares = record.get("explained_share")
    if shares:
        lines.append(
            f"Explainable variance captured on the test split: ensemble "
            f"{shares['ensemble']:.1%}, best single trial {shares['best_single']:.1%}"
            + (f", baseline {shares['baseline']:.1%}" if shares["baseline"] is not None else "")
        )
    lines.append(
        f"Model: {record['onnx_path']} ({record['size_bytes'] / 1024:.1f} KB, one file; "
        f"onnxruntime parity {parity:.1e} on the test split)"
    )
    console.print("\n".join(escape(line) for line in lines), highlight=False, soft_wrap=True)


@data_app.command("check")
@fails_cleanly
def data_check(
    path: Annotated[Path, typer.Argument(help="The data file to check.")],
    target: Target = None,
) -> None:
    """Report what a data file holds and whether it can be trained on (exit 2 if not).

    Example: cso data check data/calling_score_training_data_v1_hybrid.json
    """
    from calling_score_opt.data import check_dataset, load_dataset, require_trainable

    dataset = load_dataset(path, target)
    report = check_dataset(dataset)
    q = report.label_quantiles
    sources = ", ".join(f"{n:,} from {k}" for k, n in dataset.label_sources.items() if n)
    console.print(
        f"[bold]{escape(str(path))}[/]: {dataset.n_records:,} records, "
        f"{dataset.n_features} features",
        highlight=False,
    )
    console.print(
        f"Labels ({escape(sources)}): mean {report.label_mean:.4f}, std {report.label_std:.4f}"
    )
    console.print(
        f"  min {q['min']:.4f}  q25 {q['q25']:.4f}  median {q['median']:.4f}  "
        f"q75 {q['q75']:.4f}  max {q['max']:.4f}",
        highlight=False,
    )
    if dataset.irreducible_mse is not None:
        console.print(f"Irreducible error recorded in metadata: MSE {dataset.irreducible_mse:.5f}")
    if dataset.ignored_columns:
        console.print(
            f"Ignored (non-numeric) columns: {escape(', '.join(dataset.ignored_columns))}"
        )
    if report.ignored_keys:
        console.print("Keys cso ignores (not model inputs), by group:")
        for group, keys in report.ignored_keys.items():
            shown = [
                f"{_printable(k)} ({n:,} record{'' if n == 1 else 's'})"
                for k, n in list(keys.items())[:10]
            ]
            more = f", and {len(keys) - 10:,} other keys" if len(keys) > 10 else ""
            console.print(
                f"  {group}: {escape(', '.join(shown))}{more}", highlight=False, soft_wrap=True
            )
    if report.defaulted:
        table = Table(
            title="Inputs cso fills with 0.5 (the record lacks the key)",
            title_justify="left",
        )
        table.add_column("input")
        table.add_column("records filled", justify="right")
        for name, count in report.defaulted.items():
            table.add_row(escape(name), f"{count:,} ({count / dataset.n_records:.0%})")
        print_table(table)
    else:
        console.print("Every input is present in every record (cso fills nothing with 0.5).")
    if report.constant_features:
        constant = report.constant_values
        console.print(
            f"[yellow]Constant inputs ({len(report.constant_features)}):[/] a model never learns "
            "these inputs: its exported ONNX ignores them (first-layer weights zeroed, the input "
            "held at this value), so whatever the app sends there changes no score. (Export "
            "does the same for any input constant in the training split alone.)",
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            "  "
            + escape(", ".join(f"{n} (always {constant[n]:g})" for n in report.constant_features)),
            highlight=False,
            soft_wrap=True,
        )
    if report.out_of_range:
        values = ", ".join(f"{n} ({c})" for n, c in report.out_of_range.items())
        console.print(f"[yellow]Values outside \\[0, 1]:[/] {escape(values)}")
    require_trainable(dataset, report)
    console.print("[green]OK[/]: this file can be trained on.")


@data_app.command("synth")
@fails_cleanly
def data_synth(
    output: Annotated[Path, typer.Option(help="Where to write the JSON file.")] = DEFAULT_DATA,
    records: Annotated[int, typer.Option(min=1, help="How many records.")] = DEFAULT_RECORDS,
    seed: Annotated[int, typer.Option(help="Same seed, same file.")] = 0,
    kind: Annotated[
        str,
        typer.Option(
            help="hybrid (easy: every model captures nearly all the signal) or gated "
            "(engagement gated by a hidden calling decision: models differ, use it to "
            "measure quality)."
        ),
    ] = "hybrid",
    force: Annotated[
        bool, typer.Option("--force", help="Replace OUTPUT if it exists (refused otherwise).")
    ] = False,
) -> None:
    """Write synthetic training data in the app's JSON format, with its noise floor recorded.

    Example: cso data synth --kind gated --records 10000 --output data/gated.json
    """
    from calling_score_opt.synth import KINDS, write_synthetic

    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    check_output_file(output, "--output", example="data.json")
    if output.exists() and not force:
        raise ConfigError(
            f"--output {output}: exists; pass --force to replace it (it may be real data)"
        )
    metadata = write_synthetic(output, records, seed, kind)
    console.print(
        f"Wrote {records:,} {kind} records to {output} "
        f"(irreducible MSE {metadata['irreducible_mse']:.5f}, "
        f"label variance {metadata['label_variance']:.5f})",
        highlight=False,
    )


def _printable(name: str) -> str:
    """A key from a data file as one printable line (control characters escaped)."""
    return name if name.isprintable() else repr(name)[1:-1]


@contract_app.command("check")
@fails_cleanly
def contract_check(
    app_vectors: Annotated[
        Path,
        typer.Argument(
            help='The app\'s vectors: {"cases": [{"id": ..., "features": [39 numbers]}, ...]}.'
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option(
            help="Expect the input order this ONNX model records (its feature_names metadata)."
        ),
    ] = None,
    vectors: Annotated[
        Path | None,
        typer.Option(
            help="The test vectors the app ran on. (default: the built-in ones, the same as "
            "docs/feature_vectors.json)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Compare the app's feature vectors with what the model expects, position by position.

    The app runs its feature builder on the records of docs/feature_vectors.json and writes what
    it would send the model. Exit 0 when every position of every case agrees, 2 when not, with
    each difference named: a position holding another input, a constant, values that differ
    (docs/app-integration.md).

    Example: cso contract check app_vectors.json --model model.onnx
    """
    from calling_score_opt.errors import ContractError
    from calling_score_opt.feature_contract import KIND_TITLES, check_app_vectors

    check = check_app_vectors(app_vectors, vectors, model)
    console.print(
        f"[bold]{escape(str(app_vectors))}[/]: {len(check.compared)} of {check.n_cases} cases "
        f"compared with {escape(check.source)}, {check.n_positions} positions each",
        highlight=False,
        soft_wrap=True,
    )
    if check.problems:
        console.print(f"[yellow]Problems with the app's cases ({len(check.problems)}):[/]")
        for line in check.problems:
            console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
    for kind, title in KIND_TITLES.items():
        found = check.of_kind(kind)
        if found:
            console.print(f"[yellow]{title} ({len(found)}):[/]")
            for finding in found:
                console.print(f"  {escape(finding.message)}", highlight=False, soft_wrap=True)
    if check.hints:
        console.print("To fix the order:")
        for hint in check.hints:
            console.print(f"  {escape(hint)}", highlight=False, soft_wrap=True)
    if not check.agrees:
        raise ContractError(check.summary)
    console.print(f"[green]OK[/]: {escape(check.summary)}", highlight=False, soft_wrap=True)


@contract_app.command("vectors")
@fails_cleanly
def contract_vectors(
    output: Annotated[
        Path | None,
        typer.Option(help="Write them to this file. (default: print them)", show_default=False),
    ] = None,
) -> None:
    """Print the test vectors: records in the app's format, each with the inputs cso trains on.

    docs/feature_vectors.json holds them (a test keeps it equal to this command's output); the
    app runs its feature builder on each record and `cso contract check` compares the result.

    Example: cso contract vectors --output docs/feature_vectors.json
    """
    from calling_score_opt.atomic import write_text_atomic
    from calling_score_opt.feature_contract import feature_vectors_text

    text = feature_vectors_text()
    if output is None:
        typer.echo(text, nl=False)  # plain: rich would colour and wrap the JSON
        return
    check_output_file(output, "--output", example="feature_vectors.json")
    write_text_atomic(output, text)
    console.print(f"Wrote the test vectors to {escape(str(output))}", highlight=False)


def main() -> None:
    """Entry point of the ``cso`` console script."""
    app(prog_name="cso")


if __name__ == "__main__":  # pragma: no cover
    main()
