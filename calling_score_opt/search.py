"""``cso search``: an Optuna study that looks for better models than the grid's 15 points.

The canonical objective shape: suggest (space.py) -> train -> report validation loss every epoch
-> prune -> store the weights as an artifact -> return. The baseline is the first trial a new
study asks for, marked as such (it is never pruned, and a retry after a crash is still the
baseline), the sampler never sees test loss, no two trials share a sampler seed (samplers.py),
and the study runs until it holds N finished (complete or pruned) trials, however often it is
interrupted and by how many worker processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calling_score_opt.atomic import check_output_dir
from calling_score_opt.data import Dataset, Split, load_dataset, require_trainable, split_dataset
from calling_score_opt.errors import ConfigError, CsoError, StudyError, TrainingError
from calling_score_opt.model import check_pair_features
from calling_score_opt.samplers import PRUNERS, SAMPLERS, make_pruner, make_sampler
from calling_score_opt.space import PAIR_FEATURES_MODES, SPACES, baseline_params, suggest_config
from calling_score_opt.study import (
    BASELINE_ATTR,
    StudyLocation,
    artifact_store,
    beating,
    check_storage,
    claim_lock,
    fail_interrupted,
    open_storage,
    open_study,
    redact_url,
    storage_of,
    store_checkpoint,
    store_learning_curve,
    study_identity,
    trial_id_of,
)

if TYPE_CHECKING:
    import optuna
    from optuna.artifacts import FileSystemArtifactStore
    from optuna.trial import TrialState

OBJECTIVES = ("val_loss", "val_loss,params", "val_loss,latency")
_FINISHED = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class SearchSettings(StudyLocation):
    """Everything ``cso search`` was asked to do."""

    data_path: Path
    trials: int = 30
    target: str | None = None
    space: str = "continuous"
    sampler: str = "tpe"
    pruner: str = "median"
    objectives: str = "val_loss"
    pair_features: str = "search"
    timeout: float | None = None
    seed: int = 0
    epochs: int = 100
    device: str = "cpu"
    jobs: int = 1
    study_name: str = "calling-score-search"
    storage_url: str | None = None
    artifact_dir: Path | None = None

    def __post_init__(self) -> None:
        for flag, value, allowed in (
            ("--space", self.space, SPACES),
            ("--sampler", self.sampler, SAMPLERS),
            ("--pruner", self.pruner, PRUNERS),
            ("--objectives", self.objectives, OBJECTIVES),
            ("--pair-features", self.pair_features, PAIR_FEATURES_MODES),
        ):
            if value not in allowed:
                raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        for flag, number in (
            ("--trials", self.trials),
            ("--epochs", self.epochs),
            ("--jobs", self.jobs),
        ):
            if number < 1:
                raise ConfigError(f"{flag} must be at least 1, got {number}")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(
                f"--timeout must be a positive number of seconds (leave it out for no limit), "
                f"got {self.timeout}"
            )
        # The storage and the weights' folder, checked before any work (data, study, trials).
        check_storage(self.storage)
        check_output_dir(self.artifacts, "--artifacts")

    @property
    def objective_names(self) -> tuple[str, ...]:
        return tuple(self.objectives.split(","))

    @property
    def multi_objective(self) -> bool:
        return len(self.objective_names) > 1


def _identity(settings: SearchSettings, dataset: Dataset) -> dict[str, Any]:
    return {
        **study_identity("search", dataset, settings.seed, settings.epochs),
        "space": settings.space,
        "objectives": settings.objectives,
        "pair_features": settings.pair_features,
    }


def _open_search_study(
    settings: SearchSettings, dataset: Dataset
) -> tuple[optuna.Study, FileSystemArtifactStore]:
    import optuna

    storage = open_storage(settings.storage, heartbeat=True)
    directions = [optuna.study.StudyDirection.MINIMIZE] * len(settings.objective_names)
    study = optuna.create_study(
        study_name=settings.study_name,
        storage=storage,
        directions=directions,
        sampler=make_sampler(settings.sampler, settings.seed),
        pruner=make_pruner(settings.pruner, settings.epochs),
        load_if_exists=True,
    )
    if list(study.directions) != directions:
        raise StudyError(
            f"study '{settings.study_name}' has {len(study.directions)} objective(s), this run "
            f"asks for {settings.objectives}; pass --study NEW_NAME"
        )
    open_study(storage, settings.study_name, _identity(settings, dataset), settings.objective_names)
    study.set_user_attr("data_path", str(settings.data_path))
    if settings.target is not None:  # a CSV's label column: export and best read it back
        study.set_user_attr("target", settings.target)
    return study, artifact_store(settings.artifacts)


def _finished(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _measure_latency_ms(model: Any, runs: int = 200) -> float:
    """Median onnxruntime time to score one record with this model's ONNX graph."""
    import numpy as np
    import onnxruntime as ort

    from calling_score_opt.export import INPUT_NAME, OUTPUT_NAME, onnx_bytes

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        onnx_bytes(model, {}), options, providers=["CPUExecutionProvider"]
    )
    x = np.full((1, model.n_inputs), 0.5, dtype=np.float32)
    for _ in range(20):
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


EpochEvent = Callable[[int, int, int, float], None]  # trial, epoch, max_epochs, val_loss


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    settings: SearchSettings,
    split: Split,
    feature_names: tuple[str, ...],
    store: FileSystemArtifactStore,
    on_epoch: EpochEvent | None,
) -> TrialState:
    """Run one trial; if this worker stalled so long that another failed the trial as stale
    (and queued it again), give it up quietly: that retry is the trial now. Interrupted, the
    trial is failed and queued again at once."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        return _train_and_tell(study, trial, settings, split, feature_names, store, on_epoch)
    except UpdateFinishedTrialError:
        return TrialState.FAIL
    except KeyboardInterrupt:  # failed now and queued again, not left to the heartbeat
        fail_interrupted(study, trial_id_of(trial), retry=True)
        raise
    except Exception as exc:  # the storage or the disk failed under it: the same, best effort
        reason = f"stopped by {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        fail_interrupted(study, trial_id_of(trial), retry=True, reason=redact_url(reason))
        raise


def _train_and_tell(
    study: optuna.Study,
    trial: optuna.Trial,
    settings: SearchSettings,
    split: Split,
    feature_names: tuple[str, ...],
    store: FileSystemArtifactStore,
    on_epoch: EpochEvent | None,
) -> TrialState:
    """Train one suggested configuration, tell the study how it ended, and return that."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from calling_score_opt.stacked import train_one
    from calling_score_opt.train import EpochStats, checkpoint_bytes

    config = suggest_config(
        trial, settings.space, settings.epochs, settings.seed, settings.pair_features
    )
    trial.set_user_attr("hidden_sizes", list(config.hidden_sizes))
    trial.set_user_attr("seed", config.seed)
    # The baseline is what every other trial is measured against: it always runs to the end.
    prunable = settings.pruner != "none" and trial.user_attrs.get(BASELINE_ATTR) is not True
    history: list[tuple[int, float, float]] = []

    def report(stats: EpochStats) -> None:
        history.append((stats.epoch, stats.train_loss, stats.val_loss))
        if on_epoch is not None:
            on_epoch(trial.number, stats.epoch, settings.epochs, stats.val_loss)
        if settings.multi_objective:
            return  # Optuna cannot prune on one of several objectives
        trial.report(stats.val_loss, stats.epoch)
        if prunable and trial.should_prune():  # asking costs a study read
            trial.set_user_attr("pruned_at_epoch", stats.epoch)
            raise optuna.TrialPruned(f"pruned at epoch {stats.epoch}")

    with beating(storage_of(study), {trial_id_of(trial)}):  # as Optuna's own optimize() does
        try:
            result = train_one(split, config, settings.device, report)
        except optuna.TrialPruned:
            with contextlib.suppress(OSError):  # the curve is for people; the state matters
                store_learning_curve(store, trial, history)
            study.tell(trial, state=TrialState.PRUNED)
            return TrialState.PRUNED
        except UpdateFinishedTrialError:
            raise
        except (TrainingError, RuntimeError, MemoryError) as exc:  # diverged, out of memory
            reason = str(exc) if isinstance(exc, CsoError) else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", reason)
            study.tell(trial, state=TrialState.FAIL)
            return TrialState.FAIL
        try:
            # Test loss is recorded for people; the sampler never sees it.
            for key, value in result.metrics().items():
                trial.set_user_attr(key, value)
            store_checkpoint(store, trial, checkpoint_bytes(result, feature_names))
            store_learning_curve(store, trial, history)
            values = [result.val_loss]
            if "params" in settings.objective_names:
                values.append(float(result.parameters))
            if "latency" in settings.objective_names:
                latency = _measure_latency_ms(result.model)
                trial.set_user_attr("latency_ms", latency)
                values.append(latency)
            study.tell(trial, values)
        except UpdateFinishedTrialError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:  # a full disk, an onnxruntime error
            trial.set_user_attr("error", f"storing the result failed: {type(exc).__name__}: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            return TrialState.FAIL
    return TrialState.COMPLETE


def _search_loop(
    settings: SearchSettings,
    split: Split,
    dataset: Dataset,
    worker: int,
    on_epoch: EpochEvent | None = None,
    on_trial: Callable[[optuna.Study], None] | None = None,
) -> None:
    """Run trials until the study holds ``settings.trials`` finished ones (or time runs out)."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    from calling_score_opt.lifeline import interrupts_held

    study, store = _open_search_study(settings, dataset)
    storage = storage_of(study)
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
    failures = 0
    while deadline is None or time.monotonic() < deadline:
        trial: optuna.Trial | None = None
        try:
            with (
                claim_lock(settings.storage, settings.study_name, storage),
                warnings.catch_warnings(),
            ):
                # cso records heartbeats itself (study.beating), so Optuna's notes that
                # heartbeats are experimental and meant for optimize() do not apply.
                warnings.simplefilter("ignore", ExperimentalWarning)
                warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                fail_stale_trials(study)  # a dead worker's trial: failed, and re-queued
                trials = study.get_trials(deepcopy=False)
                finished = sum(t.state.name in _FINISHED for t in trials)
                running = sum(t.state == TrialState.RUNNING for t in trials)
                if finished >= settings.trials:
                    return
                if finished + running < settings.trials:
                    # Ctrl-C (or a worker's SIGTERM) waits until the new trial is in ``trial``,
                    # where the handler below finds it: never a RUNNING trial nobody fails.
                    with interrupts_held():
                        claimed = study.ask()
                        # a trial with no heartbeat at all is never found stale
                        storage.record_heartbeat(trial_id_of(claimed))  # type: ignore[attr-defined]
                        trial = claimed
            if trial is None:  # the last trials are running elsewhere; one may still fail
                time.sleep(0.5)
                continue
            state = _run_trial(
                study, trial, settings, split, dataset.feature_names, store, on_epoch
            )
        except KeyboardInterrupt:
            if trial is not None:  # interrupted before _run_trial took it: failed and queued
                fail_interrupted(study, trial_id_of(trial), retry=True)
            raise
        failures += state == TrialState.FAIL
        if on_trial is not None:
            on_trial(study)
        if failures > max(3, settings.trials):
            raise TrainingError(
                f"{failures} trials failed in this run (see `cso trials`); stopping the search"
            )


def _worker_process(
    settings: SearchSettings,
    split: Split,
    dataset: Dataset,
    worker: int,
    errors: Any = None,
) -> None:
    """One search worker (a process of ``run_search``): trials until the study holds enough.

    It ends with its parent (``kill -9`` of cso), leaves Ctrl-C to the main process, and stops
    on its SIGTERM: the running trial is failed and queued again, and it exits 130 without a
    word. A failure it expects (cso's own, a file's, the database's) goes to ``errors`` (a
    queue the main process reads) as one line; anything else, too, with its type.
    """
    import sys

    from calling_score_opt.lifeline import exit_with_parent, worker_signals

    exit_with_parent()  # first: a killed cso leaves no worker behind
    worker_signals()  # SIGINT ignored; SIGTERM raises KeyboardInterrupt
    try:
        import torch

        torch.set_num_threads(1)
        _search_loop(settings, split, dataset, worker)
    except KeyboardInterrupt:  # stopped by the main process, which tells the user
        sys.exit(130)
    except Exception as exc:
        from calling_score_opt.console import describe_failure, error_line

        described = describe_failure(exc)
        if described is None:  # a bug: still one line here, its type says where to look
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            described = f"{type(exc).__name__}: {reason}".rstrip(": "), 1
        line = error_line(f"worker {worker}: {described[0]}")
        if errors is not None:
            errors.put(line)
        else:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(described[1])


class SearchObserver:
    """Progress hooks of a search; no-ops here (the CLI shows a live bar)."""

    def started(self, target: int, finished: int, jobs: int) -> None: ...

    def epoch(self, trial: int, epoch: int, max_epochs: int, val: float) -> None: ...

    def progressed(self, finished: int, best: float | None, last: str) -> None: ...


@dataclass
class SearchOutcome:
    """How a search ended: the study and its counts."""

    study_name: str
    storage: str
    finished: int
    counts: dict[str, int] = field(default_factory=dict)


def _best_value(study: optuna.Study) -> float | None:
    from optuna.trial import TrialState

    values = [t.values[0] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return min(values) if values else None


def _describe_last(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.is_finished()]
    if not done:
        return ""
    last = max(done, key=lambda t: t.number)
    state = last.state.name.lower()
    if last.state.name == "PRUNED":
        state += f" at epoch {last.user_attrs.get('pruned_at_epoch', '?')}"
    elif last.values:
        state += f", val {last.values[0]:.5f}"
    return f"trial {last.number} {state}"


def run_search(settings: SearchSettings, observer: SearchObserver | None = None) -> SearchOutcome:
    """Run (or resume) the search until the study holds ``settings.trials`` finished trials.

    Raises:
        CsoError: bad data, options or storage (before any trial runs).
    """
    from optuna.trial import TrialState

    from calling_score_opt.train import resolve_device

    observer = observer or SearchObserver()
    dataset = require_trainable(load_dataset(settings.data_path, settings.target))
    if settings.pair_features != "off":
        try:
            check_pair_features(dataset.feature_names)
        except ConfigError:
            if settings.pair_features == "on":
                raise
            settings = dataclasses.replace(settings, pair_features="off")  # nothing to pair
    split = split_dataset(dataset, settings.seed)
    resolve_device(settings.device)
    study, _ = _open_search_study(settings, dataset)
    with claim_lock(settings.storage, settings.study_name, storage_of(study)):
        if not study.get_trials(deepcopy=False):  # a new study: its first trial is the baseline
            study.enqueue_trial(
                baseline_params(settings.space, settings.pair_features),
                user_attrs={BASELINE_ATTR: True},
            )
    observer.started(settings.trials, _finished(study), settings.jobs)

    def progressed(current: optuna.Study) -> None:
        observer.progressed(_finished(current), _best_value(current), _describe_last(current))

    if settings.jobs == 1:
        _search_loop(settings, split, dataset, 0, observer.epoch, progressed)
    else:
        from calling_score_opt.lifeline import starting_workers, stop_processes

        context = multiprocessing.get_context("spawn")
        errors = context.SimpleQueue()  # each failed worker's one line, for this process to say
        workers = [
            context.Process(target=_worker_process, args=(settings, split, dataset, k, errors))
            for k in range(settings.jobs)
        ]
        try:
            # From the main thread, born deaf to Ctrl-C (see lifeline). A Ctrl-C meanwhile is
            # held until every worker is started (each reads its data first), then raised.
            with starting_workers():
                for process in workers:
                    process.start()
            while any(p.is_alive() for p in workers):
                time.sleep(0.5)
                progressed(study)
        except BaseException:  # Ctrl-C: each worker fails and requeues its trial, then exits
            stop_processes([p for p in workers if p.pid is not None])
            raise
        reported = []
        while not errors.empty():
            reported.append(errors.get())
        errors.close()
        if any(p.exitcode != 0 for p in workers):
            failed = next(p for p in workers if p.exitcode != 0)
            reason = (
                reported[0] if reported else f"a worker stopped (exit status {failed.exitcode})"
            )
            raise CsoError(
                f"{reason}; finished trials are saved: rerun the same command to resume",
            )
    progressed(study)
    counts = {s.name: 0 for s in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] += 1
    return SearchOutcome(
        study_name=settings.study_name,
        storage=settings.storage,
        finished=_finished(study),
        counts={k: v for k, v in counts.items() if v},
    )
