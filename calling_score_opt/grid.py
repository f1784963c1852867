"""``cso grid``: the 15 documented variants, trained, stored, exported and compared honestly.

Every (variant, repeat) run is one trial of an Optuna study, stored as soon as it finishes, so a
rerun trains only what is missing. Runs and exports go to worker processes (one thread each);
the main process alone writes the study and the output files.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calling_score_opt.atomic import check_output_dir
from calling_score_opt.data import (
    Array,
    Dataset,
    Split,
    load_dataset,
    remember_parse,
    require_trainable,
    split_dataset,
)
from calling_score_opt.errors import ConfigError, CsoError
from calling_score_opt.results import (
    RESULTS_FILENAME,
    ResultsError,
    check_mergeable,
    data_section,
    document,
    read_results,
    study_section,
    write_results,
)
from calling_score_opt.space import BASELINE_NAME, VARIANTS, Variant, grid_distributions
from calling_score_opt.stats import Improvement, paired_bootstrap_improvement
from calling_score_opt.study import (
    BASELINE_ATTR,
    DATA_CACHE_DIR,
    StudyLocation,
    artifact_store,
    beating,
    check_storage,
    claim_lock,
    fail_interrupted,
    finish_trial,
    heartbeat_interval_s,
    open_storage,
    open_study,
    read_checkpoint,
    redact_url,
    start_trial,
    storage_of,
    study_identity,
)

if TYPE_CHECKING:
    from types import FrameType

    import optuna
    from optuna.artifacts import FileSystemArtifactStore
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial


def onnx_filename(variant: str) -> str:
    return f"calling_score_model_{variant}.onnx"


@dataclass(frozen=True)
class GridSettings(StudyLocation):
    """Everything ``cso grid`` was asked to do."""

    data_path: Path
    output_dir: Path
    target: str | None = None
    max_variants: int = len(VARIANTS)
    epochs: int = 100
    device: str = "cpu"
    seed: int = 0
    repeats: int = 1
    jobs: int = 1
    study_name: str = "calling-score-grid"
    storage_url: str | None = None  # None: sqlite:///studies/<study>.db
    artifact_dir: Path | None = None  # None: beside the SQLite file

    def __post_init__(self) -> None:
        if not 1 <= self.max_variants <= len(VARIANTS):
            raise ConfigError(f"--max-variants must be 1-{len(VARIANTS)}, got {self.max_variants}")
        for flag, value in (("--epochs", self.epochs), ("--repeats", self.repeats)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.jobs}")
        # Where the results go, checked before any work: not after the whole grid has trained.
        check_storage(self.storage)
        check_output_dir(self.output_dir, "--output-dir")
        check_output_dir(self.artifacts, "--artifacts")

    @property
    def variants(self) -> tuple[Variant, ...]:
        return VARIANTS[: self.max_variants]


@dataclass(frozen=True)
class RunOutcome:
    """One (variant, repeat) training as a worker returns it; ``error`` set when it failed."""

    variant: str
    repeat: int
    seed: int
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    history: tuple[tuple[int, float, float], ...] = ()  # (epoch, train_loss, val_loss)
    checkpoint: bytes | None = None


@dataclass(frozen=True)
class ExportOutcome:
    variant: str
    path: Path | None
    size_bytes: int = 0
    parity_max_abs_diff: float | None = None
    test_predictions: Array | None = None
    error: str | None = None


class GridObserver:
    """Hooks for progress display; every method is a no-op here (see the CLI for a live one)."""

    def started(self, runs_total: int, runs_done: int, jobs: int) -> None: ...

    def run_started(self, variant: str, repeat: int) -> None: ...

    def epoch(self, variant: str, repeat: int, epoch: int, max_epochs: int, val: float) -> None: ...

    def run_finished(self, outcome: RunOutcome) -> None: ...

    def exported(self, outcome: ExportOutcome) -> None: ...


# --- worker side -------------------------------------------------------------------------

_worker: dict[str, Any] = {}  # the split, device and event queue of this worker process


def _init_worker(device: str, events: Any) -> None:
    import atexit
    import os
    import sys

    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _worker.update(device=device, events=events)
    if multiprocessing.parent_process() is not None:
        # A pool worker's work is in the study by the time the pool lets it go: skip the
        # interpreter's clean-up, half a second with PyTorch loaded, which the grid waits for.
        def leave() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

        atexit.register(leave)


def _outcome(variant: Variant, repeat: int, seed: int, result: Any) -> RunOutcome:
    from calling_score_opt.train import checkpoint_bytes

    if isinstance(result, CsoError):
        return RunOutcome(variant.name, repeat, seed, error=str(result))
    metrics: dict[str, Any] = result.metrics()
    # training_time_s is this run's share of its stack's time; the stack's own figures beside it
    metrics.update(
        stack_wall_time_s=result.stack_wall_time_s
        if result.stack_wall_time_s is not None
        else result.training_time_s,
        stack_size=result.stack_size,
    )
    history = tuple((s.epoch, s.train_loss, s.val_loss) for s in result.history)
    checkpoint = checkpoint_bytes(result, _worker["feature_names"])
    return RunOutcome(
        variant.name, repeat, seed, metrics=metrics, history=history, checkpoint=checkpoint
    )


def _train_group(variants: list[Variant], repeat: int, seed: int, epochs: int) -> list[RunOutcome]:
    """Train variants that share a network shape, batch size and seed as one stacked model."""
    from calling_score_opt.stacked import train_stacked

    split: Split = _worker["split"]
    events = _worker["events"]
    configs = [v.train_config(epochs, seed) for v in variants]

    def on_epoch(index: int, stats: Any) -> None:
        if events is not None:
            events.put((variants[index].name, repeat, stats.epoch, epochs, stats.val_loss))

    results: list[Any]
    try:  # a stack of one is still the cheaper engine (see stacked.py)
        results = list(train_stacked(split, configs, _worker["device"], on_epoch))
    except CsoError as exc:
        results = [exc] * len(configs)
    except Exception as exc:  # out of memory, a CUDA fault, ...: these variants fail, others go on
        results = [CsoError(f"{type(exc).__name__}: {exc}")] * len(configs)
    return [_outcome(v, repeat, seed, r) for v, r in zip(variants, results, strict=True)]


def _export_run(
    variant: str, checkpoint: bytes, path: Path, metadata: dict[str, Any]
) -> ExportOutcome:
    from calling_score_opt.export import export_onnx
    from calling_score_opt.weights import read_checkpoint_bytes

    split: Split = _worker["split"]
    try:
        weights = read_checkpoint_bytes(checkpoint).weights
        report = export_onnx(weights, path, split.x_test, metadata, x_train=split.x_train)
        predictions = weights.predict(split.x_test)
    except CsoError as exc:
        return ExportOutcome(variant, None, error=str(exc))
    except Exception as exc:  # the exporter can fail in ways of its own
        return ExportOutcome(variant, None, error=f"export failed: {type(exc).__name__}: {exc}")
    return ExportOutcome(variant, path, report.size_bytes, report.parity_max_abs_diff, predictions)


class _DirectEvents:
    """The worker's event queue, in-process: each epoch reaches the observer as it happens."""

    def __init__(self, observer: GridObserver) -> None:
        self._observer = observer

    def put(self, event: tuple[str, int, int, int, float]) -> None:
        self._observer.epoch(*event)


class _InlineExecutor:
    """The executor interface, run in this process: for ``--jobs 1`` and for tests."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


#: The exit status of a pool worker stopped by the main process (as after Ctrl-C).
_STOPPED = 130


def _stop_worker(signum: int, frame: FrameType | None) -> None:
    """SIGTERM from the main process, which owns the runs and fails them itself: stop, silently.

    In a task, unwind it first (an export's temporary file is removed on the way out); idle,
    exit at once. Either way without a traceback: the main process tells the user.
    """
    if _worker.get("busy"):
        raise KeyboardInterrupt
    os._exit(_STOPPED)


def _task(fn: Callable[..., Any], /, *args: Any) -> Any:
    """Run one task in a pool worker; stopped by the main process (SIGTERM), exit quietly."""
    _worker["busy"] = True
    try:
        return fn(*args)
    except KeyboardInterrupt:
        os._exit(_STOPPED)  # not back to the pool's loop: it would print the exception
    finally:
        _worker["busy"] = False


class _WorkerPool:
    """A spawn process pool whose workers leave Ctrl-C to this process, and that can be stopped
    at once (Ctrl-C, or an error here: their runs are failed here, no one waits for them)."""

    def __init__(self, jobs: int, initargs: tuple[Any, ...]) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),  # fork + torch threads deadlock
            initializer=_init_worker_with_names,
            initargs=initargs,
        )

    def start(self, jobs: int) -> None:
        """Start every worker now (the pool would start them one per task submitted)."""
        for _ in range(jobs):
            self.submit(_ready)

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        from calling_score_opt.lifeline import starting_workers

        # The pool starts its workers inside submit, from this (the main) thread: born with
        # Ctrl-C blocked, they never see the terminal's SIGINT (see lifeline.worker_signals).
        with starting_workers():
            return self._pool.submit(_task, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        """SIGTERM every worker, wait a little, SIGKILL the rest; then close the pool."""
        from calling_score_opt.lifeline import stop_processes

        # ProcessPoolExecutor has no public way to stop running tasks before Python 3.14
        # (terminate_workers): its processes, by pid, are in _processes.
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        stop_processes(processes)
        self._pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _executor(
    jobs: int, device: str, observer: GridObserver
) -> Iterator[tuple[Any, Callable[[], None], Callable[[Split, tuple[str, ...]], None]]]:
    """An executor, a function that relays worker epoch events to ``observer``, and one that
    hands the workers the split and feature names.

    The workers start at once, before there is any data to give them: importing PyTorch takes
    each of them seconds, which they spend while this process reads the data and opens the
    study. Left by an exception (Ctrl-C included), the workers are stopped at once instead of
    finishing runs that no one would record.
    """
    if jobs == 1:

        def deliver_inline(split: Split, feature_names: tuple[str, ...]) -> None:
            _worker.update(split=split, feature_names=feature_names)

        _init_worker_with_names(None, device, _DirectEvents(observer))
        try:
            yield _InlineExecutor(), lambda: None, deliver_inline
        finally:
            _worker.clear()
        return
    context = multiprocessing.get_context("spawn")
    # a Queue, not a SimpleQueue: its put returns at once (a thread feeds the pipe), where a
    # SimpleQueue's would wait for a worker still importing PyTorch to read
    events, inbox = context.Queue(), context.Queue()
    pool = _WorkerPool(jobs, (inbox, device, events))

    def drain() -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                observer.epoch(*events.get_nowait())

    def deliver(split: Split, feature_names: tuple[str, ...]) -> None:
        for _ in range(jobs):  # each worker's initializer takes one
            inbox.put((split, feature_names))

    try:
        pool.start(jobs)
        yield pool, drain, deliver
    except BaseException:
        pool.stop()
        raise
    else:
        pool.shutdown()
    finally:
        events.close()
        # The workers are gone: data one of them never read (stopped while importing PyTorch)
        # must not keep this process waiting at exit for a pipe no one will drain.
        inbox.cancel_join_thread()
        inbox.close()


def _ready() -> None:
    """A task that does nothing: submitted once per worker, it starts them all."""


def _init_worker_with_names(inbox: Any, device: str, events: Any) -> None:
    from calling_score_opt.lifeline import exit_with_parent, worker_signals

    # First: a worker ends with a killed cso, and leaves Ctrl-C to it. Both do nothing when
    # this runs in the main process (--jobs 1).
    exit_with_parent()
    worker_signals(_stop_worker)
    _init_worker(device, events)
    if inbox is not None:  # a pool worker: the data comes once the main process has read it
        split, feature_names = inbox.get()
        _worker.update(split=split, feature_names=feature_names)


# --- main process --------------------------------------------------------------------------


@dataclass
class GridOutcome:
    """What ``cso grid`` produced: the results document and where it was written."""

    results: dict[str, Any]
    results_path: Path
    dataset: Dataset


def _stack_key(variants: Mapping[str, Variant], run: tuple[str, int]) -> tuple[Any, ...]:
    # Runs that can train as one stacked model: same batch size, shapes and seed (repeat).
    variant = variants[run[0]]
    return (variant.batch_size, variant.hidden_sizes, run[1])


def _run_cost(variant: Variant, n_train: int) -> float:
    # Longest first keeps the workers busy to the end: steps per epoch times layers.
    return (
        n_train
        / variant.batch_size
        * (len(variant.hidden_sizes) + 1)
        * (1.0 + sum(variant.hidden_sizes) / 512)
    )


def _identity(settings: GridSettings, dataset: Dataset) -> dict[str, Any]:
    return study_identity("grid", dataset, settings.seed, settings.epochs)


def _trial_attrs(outcome: RunOutcome) -> dict[str, Any]:
    """What a finished run adds to its trial (variant, repeat and seed were set at the claim).

    The learning curves go to an artifact (see :func:`study.store_learning_curve`), not one
    intermediate value per epoch: Optuna writes each of those separately, and they made storage
    the grid's largest overhead.
    """
    attrs: dict[str, Any] = {"error": outcome.error} if outcome.error is not None else {}
    attrs.update(outcome.metrics)
    return attrs


def _onnx_metadata(
    variant: Variant,
    trials: Sequence[FrozenTrial],
    chosen: FrozenTrial,
    dataset: Dataset,
    settings: GridSettings,
) -> dict[str, Any]:
    from calling_score_opt.export import model_metadata

    return model_metadata(
        variant.name,
        variant.train_config(settings.epochs, chosen.user_attrs["seed"]),
        dataset.feature_names,
        chosen.user_attrs,
        dataset.fingerprint,
        study=settings.study_name,
        trial_number=chosen.number,
        repeats=len(trials),
    )


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _variant_entry(
    variant: Variant,
    trials: Sequence[FrozenTrial],
    failures: Sequence[str],
    export: ExportOutcome | None,
    settings: GridSettings,
) -> dict[str, Any]:
    config = {**variant.train_config(settings.epochs, settings.seed).hyperparameters()}
    config.update(epochs=settings.epochs, patience=variant.train_config(1, 0).patience)
    entry: dict[str, Any] = {"name": variant.name, "config": config}
    if len(trials) < settings.repeats or export is None or export.error is not None:
        error = failures[-1] if failures else "no completed run"
        if export is not None and export.error is not None:
            error = export.error
        elif trials:
            error = f"{len(trials)} of {settings.repeats} repeats completed; last error: {error}"
        return {**entry, "success": False, "error": error}
    chosen = min(trials, key=lambda t: t.user_attrs["val_loss"])
    attrs = chosen.user_attrs
    losses = {k: [t.user_attrs[k] for t in trials] for k in ("val_loss", "test_loss", "train_loss")}
    # Trials stored before cso recorded stacks lack these: then their times are unexplained.
    walls: list[Any] = [t.user_attrs.get("stack_wall_time_s") for t in trials]
    sizes: list[Any] = [t.user_attrs.get("stack_size") for t in trials]
    entry.update(
        success=True,
        error=None,
        val_loss=_mean(losses["val_loss"]),
        test_loss=_mean(losses["test_loss"]),
        train_loss=_mean(losses["train_loss"]),
        val_loss_std=_std(losses["val_loss"]),
        test_loss_std=_std(losses["test_loss"]),
        best_epoch=attrs["best_epoch"],
        epochs_run=attrs["epochs_run"],
        # its share of the stacks it trained in, summed over repeats; the stacks' own figures
        training_time_s=round(sum(t.user_attrs["training_time_s"] for t in trials), 3),
        stack_wall_time_s=round(sum(walls), 3) if all(w is not None for w in walls) else None,
        stack_size=max(sizes) if all(n is not None for n in sizes) else None,
        parameters=attrs["parameters"],
        model_size_bytes=export.size_bytes if export else None,
        model_size_kb=round(export.size_bytes / 1024, 1) if export else None,
        onnx_path=str(export.path) if export and export.path else None,
        parity_max_abs_diff=export.parity_max_abs_diff if export else None,
        exported_seed=attrs["seed"],
        trial_numbers=[t.number for t in trials],
        runs=[
            {
                "repeat": t.user_attrs["repeat"],
                "seed": t.user_attrs["seed"],
                "trial_number": t.number,
                **{
                    k: t.user_attrs[k]
                    for k in (
                        "val_loss",
                        "test_loss",
                        "train_loss",
                        "best_epoch",
                        "epochs_run",
                        "training_time_s",
                    )
                },
                "stack_wall_time_s": t.user_attrs.get("stack_wall_time_s"),
                "stack_size": t.user_attrs.get("stack_size"),
            }
            for t in sorted(trials, key=lambda t: t.user_attrs["repeat"])
        ],
    )
    return entry


def _summary(
    entries: list[dict[str, Any]],
    exports: Mapping[str, ExportOutcome],
    split: Split,
    dataset: Dataset,
    seed: int,
) -> dict[str, Any]:
    from calling_score_opt.stats import mean_predictor_loss, no_better_than_mean

    ok = [e for e in entries if e["success"]]
    ok.sort(key=lambda e: e["val_loss"])
    mean_loss = mean_predictor_loss(split)
    for rank, entry in enumerate(ok, start=1):
        entry["rank"] = rank
        entry["no_better_than_mean"] = no_better_than_mean(entry["val_loss"], mean_loss)
    summary: dict[str, Any] = {
        "ranked_by": "val_loss",
        "variants": len(entries),
        "succeeded": len(ok),
        "failed": [{"name": e["name"], "error": e["error"]} for e in entries if not e["success"]],
        "best_variant": ok[0]["name"] if ok else None,
        "irreducible_mse": dataset.irreducible_mse,
        # The validation MSE of predicting the training labels' mean: a variant no better
        # than that learned nothing (a dead network, say), however it ranks.
        "mean_predictor_val_loss": mean_loss,
        "no_better_than_mean": [e["name"] for e in entries if e.get("no_better_than_mean")],
    }
    baseline = next((e for e in ok if e["name"] == BASELINE_NAME), None)
    for entry in ok:
        entry["improvement_vs_baseline_pct"] = (
            (baseline["test_loss"] - entry["test_loss"]) / baseline["test_loss"] * 100
            if baseline
            else None
        )
    if not ok:
        return summary
    best = ok[0]
    summary["best"] = {
        k: best[k]
        for k in ("name", "val_loss", "test_loss", "improvement_vs_baseline_pct", "config")
    }
    if baseline is not None:
        summary["baseline"] = {k: baseline[k] for k in ("name", "val_loss", "test_loss")}
        base_pred = exports[BASELINE_NAME].test_predictions  # both succeeded: both exported
        best_pred = exports[best["name"]].test_predictions
        if base_pred is not None and best_pred is not None:
            y = split.y_test.astype(np.float64)
            improvement = paired_bootstrap_improvement(
                (base_pred.astype(np.float64) - y) ** 2,
                (best_pred.astype(np.float64) - y) ** 2,
                seed=seed,
            )
            summary["bootstrap"] = _bootstrap_dict(improvement, best["name"] == BASELINE_NAME)
    if dataset.irreducible_mse is not None:
        summary["best_excess_over_irreducible"] = best["test_loss"] - dataset.irreducible_mse
    return summary


def _bootstrap_dict(improvement: Improvement, best_is_baseline: bool) -> dict[str, Any]:
    verdict = "the baseline itself is the best variant" if best_is_baseline else None
    return improvement.to_dict(verdict)


class _StudyView:
    """What the study says about each (variant, repeat) run, shared by all its workers.

    A run is settled when it has a complete trial, or failed with a reason in this round
    (trial number >= ``first_new``: a failure from an earlier round is retried); it is taken
    while a trial of it is RUNNING (a dead worker's trial turns FAIL, without a reason, once its
    heartbeat is stale, so the run is free again).
    """

    def __init__(
        self, study: optuna.Study, variants: Mapping[str, Variant], repeats: int, first_new: int
    ) -> None:
        self._study = study
        self._repeats = repeats
        self._first_new = first_new
        self.completed: dict[str, dict[int, FrozenTrial]] = {name: {} for name in variants}
        self.failures: dict[str, list[str]] = {name: [] for name in variants}
        self._failed_now: set[tuple[str, int]] = set()
        self._running: set[tuple[str, int]] = set()

    def _run_of(self, trial: FrozenTrial) -> tuple[str, int] | None:
        name, repeat = trial.user_attrs.get("variant"), trial.user_attrs.get("repeat")
        if name in self.completed and isinstance(repeat, int) and repeat < self._repeats:
            return name, repeat
        return None

    def record(self, trial: FrozenTrial) -> None:
        run = self._run_of(trial)
        if run is None:
            return
        name, repeat = run
        state = trial.state.name
        if state == "COMPLETE":
            self.completed[name][repeat] = trial
        elif state == "RUNNING":
            self._running.add(run)
        elif state == "FAIL" and trial.number >= self._first_new and "error" in trial.user_attrs:
            self._failed_now.add(run)
            if trial.user_attrs["error"] not in self.failures[name]:
                self.failures[name].append(trial.user_attrs["error"])

    def refresh(self) -> None:
        import warnings

        from optuna.exceptions import ExperimentalWarning
        from optuna.storages import fail_stale_trials

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            fail_stale_trials(self._study)  # a dead worker's runs become free again
        self._running.clear()
        for trial in self._study.get_trials(deepcopy=False):
            self.record(trial)

    def complete_runs(self) -> list[tuple[str, int]]:
        return [(name, r) for name, done in self.completed.items() for r in done]

    def variant_complete(self, name: str) -> bool:
        return len(self.completed[name]) == self._repeats

    def _settled(self, name: str, repeat: int) -> bool:
        return repeat in self.completed[name] or (name, repeat) in self._failed_now

    def is_free(self, name: str, repeat: int) -> bool:
        return not self._settled(name, repeat) and (name, repeat) not in self._running

    def all_settled(self, runs: Sequence[tuple[str, int]]) -> bool:
        return all(self._settled(name, repeat) for name, repeat in runs)


def run_grid(settings: GridSettings, observer: GridObserver | None = None) -> GridOutcome:
    """Train, store, export and compare the grid's variants; write the results JSON.

    With several jobs the worker processes start first and this process never imports
    PyTorch: it reads the data, keeps the study and writes the results.

    Raises:
        CsoError: bad data, options or storage (before anything is written).
    """
    started = time.perf_counter()
    observer = observer or GridObserver()
    with _executor(settings.jobs, settings.device, observer) as (pool, drain, deliver):
        dataset = require_trainable(load_dataset(settings.data_path, settings.target))
        split = split_dataset(dataset, settings.seed)
        if settings.device != "cpu":  # cuda or auto: fail now, not in every worker
            from calling_score_opt.train import resolve_device

            resolve_device(settings.device)
        deliver(split, dataset.feature_names)
        t0 = time.perf_counter()
        storage = open_storage(settings.storage, heartbeat=True, retry_stale=False)
        study = _open_grid_study(storage, settings, dataset)
        store = artifact_store(settings.artifacts)
        remember_parse(dataset, settings.target, settings.artifacts / DATA_CACHE_DIR)  # export
        setup_s = time.perf_counter() - t0  # opening (on a new database: creating) the study
        grid = _GridRun(settings, observer, dataset, split, storage, study, store)
        grid.run(pool, drain)
    return grid.results(started=started, setup_s=setup_s)


def _open_grid_study(storage: RDBStorage, settings: GridSettings, dataset: Dataset) -> optuna.Study:
    """The grid's study (refused when it was made for other data or settings), with what
    ``cso export`` and ``cso best`` read back: the data file and, for a CSV, its label column."""
    study = open_study(storage, settings.study_name, _identity(settings, dataset))
    study.set_user_attr("data_path", str(settings.data_path))  # for cso export's parity check
    if settings.target is not None:  # a CSV's label column: export and best read it back
        study.set_user_attr("target", settings.target)
    return study


#: What ``_GridRun.claim`` returns for each run it claimed: variant, repeat, trial id.
_Claim = tuple[str, int, int]


class _GridRun:
    """The grid's runs in this process: claimed, trained, stored and exported, step by step.

    Other processes may work on the same study at once (``cso grid`` on another machine, say):
    the study says which runs are free, complete or failed (see :class:`_StudyView`), a run is
    claimed by starting a RUNNING trial under the claim lock, and this process keeps the
    heartbeat of the trials it claimed (``mine``) until they are stored.
    """

    def __init__(
        self,
        settings: GridSettings,
        observer: GridObserver,
        dataset: Dataset,
        split: Split,
        storage: RDBStorage,
        study: optuna.Study,
        store: FileSystemArtifactStore,
    ) -> None:
        self.settings = settings
        self.observer = observer
        self.dataset = dataset
        self.split = split
        self.storage = storage
        self.study = study
        self.store = store
        self.by_name = {v.name: v for v in settings.variants}
        self.runs = [(v.name, r) for v in settings.variants for r in range(settings.repeats)]
        n_train = len(split.y_train)
        self.runs.sort(key=lambda run: -_run_cost(self.by_name[run[0]], n_train))  # longest first
        held = study.get_trials(deepcopy=False)  # an earlier round's failed runs are retried
        first_new = max((t.number for t in held), default=-1) + 1
        self.view = _StudyView(study, self.by_name, settings.repeats, first_new)
        self.distributions = grid_distributions()
        # Set by run(): the claim lock, the executor and the relay of its workers' epoch events.
        self.lock: Any = None
        self.pool: Any = None
        self.drain: Callable[[], None] = lambda: None

        self.mine: set[int] = set()  # trial ids this process is training: it keeps their heartbeat
        self.trial_ids: dict[tuple[str, int], int] = {}  # the RUNNING trial of each claimed run
        self.training: set[Future[Any]] = set()  # stacks in the workers, one future each
        self.exporting: dict[Future[Any], str] = {}  # the variant each export is of
        self.exports: dict[str, ExportOutcome] = {}
        self.retry_claim_at = 0.0  # after finding nothing free, look again only when a run ends
        self.storage_s = 0.0  # claiming, finishing and reading back runs
        self.resumed = 0  # runs complete before this process began
        self.trained = 0  # runs this process stored, failed or not
        self.trained_runs: set[tuple[str, int]] = set()  # the runs this process completed

    def run(self, pool: Any, drain: Callable[[], None]) -> None:
        """Train and export until every run is settled, by this process or another, with
        ``pool`` (see :func:`_executor`) and its epoch events' relay ``drain``.

        Left by an exception (Ctrl-C included), the trials this process holds are failed
        (:func:`_claims_released`); the executor then stops its workers.
        """
        self.pool, self.drain = pool, drain
        self.view.refresh()
        self.resumed = len(self.view.complete_runs())
        self.observer.started(len(self.runs), self.resumed, self.settings.jobs)
        self.settings.output_dir.mkdir(parents=True, exist_ok=True)
        self.lock = claim_lock(self.settings.storage, self.settings.study_name, self.storage)
        with beating(self.storage, self.mine), _claims_released(self.study, self.mine):
            self.schedule()

    def schedule(self) -> None:
        """Keep the workers busy: claim and train, export what is complete, store what ends."""
        from calling_score_opt.lifeline import check_interrupted

        while True:
            check_interrupted()  # one Python swallowed (see lifeline)
            self.fill_workers()
            self.export_completed()
            if self.training or self.exporting:
                self.collect(self.wait_for_tasks())
                continue
            self.view.refresh()  # another worker may have completed a variant since
            if self.export_completed():
                continue
            if self.view.all_settled(self.runs):
                return
            # Other workers hold the remaining runs: wait for them (or for their heartbeat
            # to go stale, which frees the run for us).
            time.sleep(1.0)
            self.view.refresh()

    def fill_workers(self) -> None:
        """Claim runs and start training them while a worker is free for them."""
        while len(self.training) < self.settings.jobs and time.monotonic() >= self.retry_claim_at:
            t0 = time.perf_counter()
            claimed = self.claim()
            self.storage_s += time.perf_counter() - t0
            if not claimed:
                # Other workers hold the rest; one of them may die, so look now and then.
                self.retry_claim_at = time.monotonic() + heartbeat_interval_s()
                return
            self.submit_training(claimed)

    def claim(self) -> list[_Claim]:
        """Take the free runs that train as one stack, the stack of most work first: the
        stack of eight (one of them learning slowly for about 90 epochs) is the longest job,
        and a worker that starts it last finishes the grid alone, long after the other."""
        n_train = len(self.split.y_train)
        with self.lock:
            self.view.refresh()
            free = [run for run in self.runs if self.view.is_free(*run)]
            if not free:
                return []
            groups: dict[tuple[Any, ...], list[tuple[str, int]]] = {}
            for run in free:  # in the order of self.runs: the longest run first
                groups.setdefault(_stack_key(self.by_name, run), []).append(run)
            group = max(
                groups.values(),
                key=lambda runs: sum(_run_cost(self.by_name[name], n_train) for name, _ in runs),
            )
            return [(name, repeat, self._start_trial(name, repeat)) for name, repeat in group]

    def _start_trial(self, name: str, repeat: int) -> int:
        """The RUNNING trial that claims the run (name, repeat); returns its storage id."""
        return start_trial(
            self.study,
            params=self.by_name[name].params(),
            distributions=self.distributions,
            user_attrs={
                "variant": name,
                "repeat": repeat,
                "seed": self.settings.seed + repeat,
                **({BASELINE_ATTR: True} if name == BASELINE_NAME else {}),
            },
        )

    def submit_training(self, claimed: list[_Claim]) -> None:
        """Train the claimed runs (one repeat, one stack) in a worker; their trials are ours."""
        repeat = claimed[0][1]
        for name, _, trial_id in claimed:
            self.mine.add(trial_id)
            self.trial_ids[(name, repeat)] = trial_id
            self.observer.run_started(name, repeat)
        future = self.pool.submit(
            _train_group,
            [self.by_name[name] for name, _, _ in claimed],
            repeat,
            self.settings.seed + repeat,
            self.settings.epochs,
        )
        self.training.add(future)

    def export_completed(self) -> list[str]:
        """Export each variant with all its repeats complete, unless exported or exporting.

        Returns those variants (an empty list: nothing to export now).
        """
        exporting = set(self.exporting.values())
        names = [
            name
            for name in self.by_name
            if name not in self.exports
            and name not in exporting
            and self.view.variant_complete(name)
        ]
        for name in names:
            self.submit_export(name)
        return names

    def submit_export(self, name: str) -> None:
        """Export the variant's repeat of lowest validation loss to ONNX, in a worker."""
        trials = list(self.view.completed[name].values())
        chosen = min(trials, key=lambda t: t.user_attrs["val_loss"])
        t0 = time.perf_counter()
        try:
            checkpoint = read_checkpoint(self.store, self.storage, chosen)
        except CsoError as exc:
            self.exports[name] = ExportOutcome(name, None, error=str(exc))
            return
        self.storage_s += time.perf_counter() - t0
        metadata = _onnx_metadata(self.by_name[name], trials, chosen, self.dataset, self.settings)
        path = self.settings.output_dir / onnx_filename(name)
        self.exporting[self.pool.submit(_export_run, name, checkpoint, path, metadata)] = name

    def wait_for_tasks(self) -> set[Future[Any]]:
        """The tasks that ended within 0.2 s, after relaying the workers' epoch events."""
        done, _ = wait([*self.training, *self.exporting], timeout=0.2, return_when=FIRST_COMPLETED)
        self.drain()
        return done

    def collect(self, done: set[Future[Any]]) -> None:
        """Take in ended tasks: an export's outcome as it is, a stack's runs into their trials."""
        for future in done:
            name = self.exporting.pop(future, None)
            self.training.discard(future)
            self.retry_claim_at = 0.0
            try:
                outcome = future.result()
            except BrokenProcessPool as exc:
                raise CsoError(
                    "a worker process died (killed, or out of memory); finished runs "
                    "are saved in the study: rerun the same command to resume, maybe "
                    "with --jobs 1"
                ) from exc
            if name is not None:
                self.exports[name] = outcome
                self.observer.exported(outcome)
            else:
                self.finish(outcome)

    def finish(self, outcomes: Sequence[RunOutcome]) -> None:
        """Store each run, failed or not, in the trial that claimed it."""
        from optuna.exceptions import UpdateFinishedTrialError

        for run in outcomes:
            trial_id = self.trial_ids.pop((run.variant, run.repeat))
            t0 = time.perf_counter()
            try:
                # finish_trial through this module's name: tests replace it
                trial = finish_trial(
                    self.study,
                    trial_id,
                    value=run.metrics.get("val_loss"),
                    user_attrs=_trial_attrs(run),
                    artifact_store=self.store,
                    checkpoint=run.checkpoint,
                    history=run.history,
                )
            except UpdateFinishedTrialError:
                # This process stalled past the grace period and another worker
                # failed the trial and took the run over: its result stands.
                self.storage_s += time.perf_counter() - t0
                self.mine.discard(trial_id)
                continue
            except OSError as exc:  # the weights' folder: a full disk, say
                raise CsoError(
                    _cannot_write(exc, f"the weights of {run.variant} in {self.settings.artifacts}")
                ) from exc
            self.mine.discard(trial_id)  # only now: until it is stored, it is ours
            self.storage_s += time.perf_counter() - t0
            self.trained += 1
            if trial.state.name == "COMPLETE":
                self.trained_runs.add((run.variant, run.repeat))
            self.view.record(trial)
            self.observer.run_finished(run)

    def results(self, *, started: float, setup_s: float) -> GridOutcome:
        """Rank and compare the variants (all of the study's runs, whoever trained them), time
        the storage against the wall time since ``started``, and write the results file."""
        settings, view = self.settings, self.view
        view.refresh()
        entries = [
            _variant_entry(
                v,
                list(view.completed[v.name].values()),
                view.failures[v.name],
                self.exports.get(v.name),
                settings,
            )
            for v in settings.variants
        ]
        summary = _summary(entries, self.exports, self.split, self.dataset, settings.seed)
        if "baseline" in summary:  # trained here, or (all or partly) in an earlier run of the study
            summary["baseline"]["trained_in_this_run"] = all(
                (BASELINE_NAME, repeat) in self.trained_runs
                for repeat in view.completed[BASELINE_NAME]
            )
        wall = time.perf_counter() - started
        storage_s = self.storage_s
        summary["timing"] = {
            "wall_s": round(wall, 3),
            "storage_setup_s": round(setup_s, 3),
            "storage_s": round(setup_s + storage_s, 3),
            "storage_share": round((setup_s + storage_s) / wall, 4),
            "storage_runs_s": round(storage_s, 3),
            "storage_runs_share": round(storage_s / wall, 4),
            "runs_trained": self.trained,
            "runs_resumed": self.resumed,
            "jobs": settings.jobs,
        }
        return self._write(entries, summary)

    def _write(self, entries: list[dict[str, Any]], summary: dict[str, Any]) -> GridOutcome:
        """Write the results file, keeping what ``cso export`` added to this study's one."""
        settings, dataset = self.settings, self.dataset
        results_path = settings.output_dir / RESULTS_FILENAME
        try:
            existing = read_results(results_path)
            check_mergeable(existing, results_path, settings.study_name, dataset.fingerprint)
        except ResultsError:
            existing = None  # another study's, or unreadable: the grid's own output replaces it
        results = document(
            data_section(settings.data_path, dataset, self.split),
            study_section(settings.study_name, settings.storage, settings.artifacts),
            [*entries, *_kept_entries(existing, self.by_name)],
            summary,
            settings={
                "epochs": settings.epochs,
                "repeats": settings.repeats,
                "device": settings.device,
                "seed": settings.seed,
            },
        )
        if existing is not None and "ensemble" in existing["summary"]:
            results["summary"]["ensemble"] = existing["summary"]["ensemble"]
        try:
            write_results(results_path, results)
        except OSError as exc:
            raise CsoError(_cannot_write(exc, str(results_path))) from exc
        return GridOutcome(results=results, results_path=results_path, dataset=dataset)


def _cannot_write(exc: OSError, what: str) -> str:
    """One line for a write that failed after training: what, why, what to do, nothing lost."""
    from calling_score_opt.console import describe_os_error

    return (
        f"{describe_os_error(exc, f'cannot write {what}')}: the trained runs are kept in the "
        "study, and the same command trains none of them again"
    )


@contextlib.contextmanager
def _claims_released(study: optuna.Study, trial_ids: set[int]) -> Iterator[None]:
    """Left by an exception (Ctrl-C included), fail the RUNNING trials of the runs this process
    holds at once, not after their heartbeat's grace period: a rerun takes them up straight
    away (the grid retries failed runs)."""
    try:
        yield
    except BaseException as exc:
        _release_claims(study, trial_ids, exc)
        raise


def _release_claims(study: optuna.Study, trial_ids: set[int], exc: BaseException) -> None:
    """Fail the RUNNING trials ``trial_ids`` as this process stops with ``exc``.

    Ctrl-C (or SIGTERM) fails them as interrupted; any other error with its reason. Best
    effort: with the study's storage itself failing (a full disk), their heartbeat stops and a
    rerun takes the runs up after the grace period.
    """
    from optuna.trial import TrialState

    from calling_score_opt.lifeline import interrupts_held

    with interrupts_held(drop=True):  # a second Ctrl-C must not cut this short
        if isinstance(exc, KeyboardInterrupt):
            for trial_id in list(trial_ids):
                fail_interrupted(study, trial_id, retry=False)  # the grid retries failed runs
            return
        reason = redact_url(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        storage = storage_of(study)
        for trial_id in list(trial_ids):
            with contextlib.suppress(Exception):
                if storage.get_trial(trial_id).state == TrialState.RUNNING:
                    storage.set_trial_user_attr(trial_id, "error", f"the grid stopped: {reason}")
                    storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _kept_entries(
    existing: Mapping[str, Any] | None, variants: Mapping[str, Variant]
) -> list[dict[str, Any]]:
    """What an earlier ``cso export`` added to the grid's results file (an ensemble, say): the
    grid rewrites its own variants' entries and keeps these."""
    return [dict(v) for v in (existing or {}).get("variants", []) if v.get("name") not in variants]
