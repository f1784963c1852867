"""``cso search``: an Optuna study that looks for better models than the grid's 15 points.

The canonical objective shape: suggest (space.py) -> train -> report validation loss every epoch
-> prune -> store the weights as an artifact -> return. The baseline is the first trial a new
study asks for, marked as such (it is never pruned, and a retry after a crash is still the
baseline), the sampler never sees test loss, no two trials share a sampler seed (samplers.py),
and the study runs until it holds N finished (complete or pruned) trials, however often it is
interrupted and by how many worker processes.

Each worker asks the study for several trials before it tells it about any (TPE's
``constant_liar`` is made for that) and trains them together as stacks (stacked.py), each trial
still reporting to Optuna every epoch and leaving its stack when it is pruned or done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calling_score_opt.atomic import check_output_dir
from calling_score_opt.data import (
    Dataset,
    Split,
    load_dataset,
    remember_parse,
    require_trainable,
    split_dataset,
)
from calling_score_opt.errors import ConfigError, CsoError, StudyError, TrainingError
from calling_score_opt.samplers import PRUNERS, SAMPLERS, make_pruner, make_sampler
from calling_score_opt.space import PAIR_FEATURES_MODES, SPACES, baseline_params, suggest_config
from calling_score_opt.study import (
    BASELINE_ATTR,
    DATA_CACHE_DIR,
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
    from optuna.trial import FrozenTrial, TrialState

    from calling_score_opt.stacked import MemberOutcome
    from calling_score_opt.train import EpochStats, TrainResult

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

#: Trials one worker trains at once, as stacks (stacked.py): more share the per-step overhead
#: but learn less from each other (the sampler and the pruner see fewer finished trials).
TRIALS_AT_ONCE = 8


@dataclass
class _Running:
    """A trial this worker claimed: what it trains, and what it has reported so far."""

    trial: optuna.Trial
    trial_id: int
    prunable: bool  # the baseline never is, nor is any trial without a pruner or with 2 objectives
    history: list[tuple[int, float, float]] = field(default_factory=list)
    taken_over: bool = False  # another worker failed it as stale: its retry is the trial now


class _MedianView:
    """What the median pruner reads of a study: its complete trials and its direction.

    ``trial.should_prune()`` reads the trial and every trial of the study from the storage, for
    each trial and epoch: with several trials training at once that was a tenth of a search's
    time. The median pruner (optuna's PercentilePruner) needs only this, so the worker reads it
    once per epoch of its stacks (and after each trial it completes) and asks the pruner itself.
    """

    def __init__(self, study: optuna.Study) -> None:
        from optuna.trial import TrialState

        self.direction = study.direction
        self._complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def get_trials(
        self, deepcopy: bool = False, states: Sequence[TrialState] | None = None
    ) -> list[FrozenTrial]:
        from optuna.trial import TrialState

        if states is None or tuple(states) != (TrialState.COMPLETE,):
            raise NotImplementedError("the median pruner reads only the complete trials")
        return list(self._complete)


class _SearchWorker:
    """One worker's part of a search: it claims trials, trains them stacked, and tells the
    study how each ended, until the study holds enough finished trials (or time runs out).

    Several trials train at once (up to :data:`TRIALS_AT_ONCE`; while the median pruner still
    waits for its first complete trials, only as many as it waits for, so that the trials after
    them are pruned as a one-at-a-time search would prune them). Each reports every epoch to its
    trial and leaves the stack when the pruner says so; a complete one is stored at once. The
    steps: :meth:`claim`, :meth:`start`, :meth:`report` (each epoch), :meth:`finish`.
    """

    def __init__(
        self,
        settings: SearchSettings,
        split: Split,
        dataset: Dataset,
        on_epoch: EpochEvent | None,
        on_trial: Callable[[optuna.Study], None] | None,
        study: optuna.Study | None = None,
    ) -> None:
        from calling_score_opt.samplers import (
            MEDIAN_WARMUP_EPOCHS,
            pruner_startup_trials,
        )
        from calling_score_opt.stacked import StackedTrainer

        self.settings = settings
        self.feature_names = dataset.feature_names
        self.on_epoch = on_epoch
        self.on_trial = on_trial
        if study is None:
            self.study, self.store = _open_search_study(settings, dataset)
        else:  # opened by run_search in this process: not twice
            self.study, self.store = study, artifact_store(settings.artifacts)
        self.storage = storage_of(self.study)
        self.trainer = StackedTrainer(split, settings.device)
        self.running: dict[int, _Running] = {}  # by trial number
        self.beating: set[int] = set()  # the storage ids of the running trials: their heartbeat
        self.pruning = settings.pruner != "none" and not settings.multi_objective
        self.startup = pruner_startup_trials(settings.pruner) if self.pruning else 0
        # The median pruner's view of the study, read once for all the trials that ask it in
        # an epoch (see _MedianView); other pruners are asked through trial.should_prune().
        self.median = self.pruning and settings.pruner == "median"
        self.warmup = MEDIAN_WARMUP_EPOCHS if self.median else 0
        self.view: _MedianView | None = None
        # Claiming takes the lock and reads the study: do it when a trial ended here, else at
        # most once a second (for what other workers finished).
        self.look_again = True
        self.look_at = 0.0
        self.deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
        self.failures = 0

    def run(self) -> None:
        """Claim, train and finish trials until the study holds enough; interrupted (Ctrl-C,
        SIGTERM) or stopped by an error outside the trials, every running trial is failed and
        queued again at once."""
        from calling_score_opt.lifeline import check_interrupted

        with beating(self.storage, self.beating):  # as Optuna's own optimize() does
            try:
                while True:
                    check_interrupted()  # one Python swallowed (see lifeline)
                    done = self.claim()
                    if not self.running:
                        if done:
                            return
                        time.sleep(0.2)  # the last trials run elsewhere; one may still fail
                        continue
                    self.view = None  # the pruner reads the study afresh each epoch
                    for outcome in self.trainer.run_epoch():
                        self.finish(outcome)
            except KeyboardInterrupt:  # failed now and queued again, not left to the heartbeat
                self._release()
                raise
            except Exception as exc:  # the storage or the disk failed under them: the same
                first = str(exc).splitlines()[0] if str(exc) else ""
                self._release(redact_url(f"stopped by {type(exc).__name__}: {first}"))
                raise

    def _release(self, reason: str | None = None) -> None:
        from calling_score_opt.lifeline import interrupts_held

        with interrupts_held(drop=True):  # a second Ctrl-C must not cut this short
            for running in self.running.values():
                if reason is None:
                    fail_interrupted(self.study, running.trial_id, retry=True)
                else:
                    fail_interrupted(self.study, running.trial_id, retry=True, reason=reason)
            self.running.clear()

    def claim(self) -> bool:
        """Claim trials while this worker has room and the study needs them; True when the
        study holds enough finished trials (or time is up) and nothing runs here."""
        from optuna.exceptions import ExperimentalWarning
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        from calling_score_opt.lifeline import interrupts_held

        settings = self.settings
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return not self.running  # start no trial after the timeout
        room = TRIALS_AT_ONCE - len(self.running)
        if room <= 0 or not (self.look_again or time.monotonic() >= self.look_at):
            return False
        # idle, look often: the study may be done (or a trial free) any moment now
        self.look_again = False
        self.look_at = time.monotonic() + (0.2 if not self.running else 1.0)
        with (
            claim_lock(settings.storage, settings.study_name, self.storage),
            warnings.catch_warnings(),
        ):
            # cso records heartbeats itself (study.beating), so Optuna's notes that heartbeats
            # are experimental and meant for optimize() do not apply.
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            fail_stale_trials(self.study)  # a dead worker's trial: failed, and re-queued
            trials = self.study.get_trials(deepcopy=False)
            finished = sum(t.state.name in _FINISHED for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            complete = sum(t.state == TrialState.COMPLETE for t in trials)
            wanted = settings.trials - finished - running
            # each of this machine's workers its part of what is left, so that none waits
            # while another trains more than its share
            share = -(-(settings.trials - finished) // settings.jobs) - len(self.running)
            if complete < self.startup:  # the pruner's first trials: no more than it waits for
                share = -(-self.startup // settings.jobs) - len(self.running)
                wanted = min(wanted, self.startup - complete - running)
            wanted = min(wanted, share)
            for _ in range(min(room, wanted)):
                # Ctrl-C (or a worker's SIGTERM) waits until the new trial is in ``running``,
                # where the handler finds it: never a RUNNING trial nobody fails.
                with interrupts_held():
                    trial = self.study.ask()
                    trial_id = trial_id_of(trial)
                    # a trial with no heartbeat at all is never found stale
                    self.storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
                    prunable = self.pruning and trial.user_attrs.get(BASELINE_ATTR) is not True
                    self.running[trial.number] = _Running(trial, trial_id, prunable)
                    self.beating.add(trial_id)
                self.start(self.running[trial.number])
        return not self.running and finished >= settings.trials

    def start(self, running: _Running) -> None:
        """Suggest the trial's configuration (space.py) and add it to the stacks."""
        settings, trial = self.settings, running.trial
        config = suggest_config(
            trial, settings.space, settings.epochs, settings.seed, settings.pair_features
        )
        trial.set_user_attr("hidden_sizes", list(config.hidden_sizes))
        trial.set_user_attr("seed", config.seed)
        try:
            self.trainer.add(trial.number, config, lambda stats: self.report(running, stats))
        except (TrainingError, RuntimeError, MemoryError) as exc:  # out of memory, say
            self._tell_failed(running, exc)

    def report(self, running: _Running, stats: EpochStats) -> bool:
        """One epoch of a running trial, reported to it (the pruner and optuna-dashboard read
        it); True stops the trial: the pruner says so, or another worker took it over."""
        from optuna.exceptions import UpdateFinishedTrialError

        trial = running.trial
        running.history.append((stats.epoch, stats.train_loss, stats.val_loss))
        if self.on_epoch is not None:
            self.on_epoch(trial.number, stats.epoch, self.settings.epochs, stats.val_loss)
        if self.settings.multi_objective:
            return False  # Optuna cannot prune on one of several objectives
        try:
            trial.report(stats.val_loss, stats.epoch)
            if running.prunable and stats.epoch >= self.warmup and self._should_prune(running):
                trial.set_user_attr("pruned_at_epoch", stats.epoch)
                return True
        except UpdateFinishedTrialError:  # this worker stalled; another failed it as stale
            running.taken_over = True
            return True
        return False

    def _should_prune(self, running: _Running) -> bool:
        """The pruner's verdict on the trial's values so far (all reported to it)."""
        if not self.median:
            return running.trial.should_prune()  # a study read per trial and epoch
        import optuna

        if self.view is None:
            self.view = _MedianView(self.study)
        reported = {epoch: val for epoch, _, val in running.history}
        trial = optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING, intermediate_values=reported
        )
        return self.study.pruner.prune(self.view, trial)  # type: ignore[arg-type]

    def finish(self, outcome: MemberOutcome) -> None:
        """Tell the study how a trial ended (its weights and curve stored first), then count."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        running = self.running.pop(int(outcome.key))  # type: ignore[call-overload]
        self.beating.discard(running.trial_id)
        self.look_again = True  # room for another trial, and maybe the pruner has its first
        try:
            if running.taken_over:
                state = TrialState.FAIL  # its retry is the trial now: nothing to tell
            elif outcome.error is not None:
                state = self._tell_failed(running, outcome.error)
            elif outcome.result is None:  # pruned
                with contextlib.suppress(OSError):  # the curve is for people; the state matters
                    store_learning_curve(self.store, running.trial, running.history)
                self.study.tell(running.trial, state=TrialState.PRUNED)
                state = TrialState.PRUNED
            else:
                state = self._tell_complete(running, outcome.result)
        except UpdateFinishedTrialError:
            state = TrialState.FAIL
        self.failures += state == TrialState.FAIL
        if self.on_trial is not None:
            self.on_trial(self.study)
        if self.failures > max(3, self.settings.trials):
            raise TrainingError(
                f"{self.failures} trials failed in this run (see `cso trials`); stopping the search"
            )

    def _tell_failed(self, running: _Running, exc: BaseException) -> TrialState:
        from optuna.trial import TrialState

        reason = str(exc) if isinstance(exc, CsoError) else f"{type(exc).__name__}: {exc}"
        running.trial.set_user_attr("error", reason)
        self.study.tell(running.trial, state=TrialState.FAIL)
        self.running.pop(running.trial.number, None)
        self.beating.discard(running.trial_id)
        self.look_again = True
        return TrialState.FAIL

    def _tell_complete(self, running: _Running, result: TrainResult) -> TrialState:
        """Store a complete trial's metrics, weights and curve, then its value(s)."""
        from optuna.trial import TrialState

        from calling_score_opt.train import checkpoint_bytes

        trial, settings = running.trial, self.settings
        try:
            # Test loss is recorded for people; the sampler never sees it. Like a grid run, a
            # trial records the most trials it trained beside and those stacks' wall time.
            wall = result.stack_wall_time_s
            metrics = {
                **result.metrics(),
                "stack_size": result.stack_size,
                "stack_wall_time_s": result.training_time_s if wall is None else wall,
            }
            for key, value in metrics.items():
                trial.set_user_attr(key, value)
            store_checkpoint(self.store, trial, checkpoint_bytes(result, self.feature_names))
            store_learning_curve(self.store, trial, running.history)
            values = [result.val_loss]
            if "params" in settings.objective_names:
                values.append(float(result.parameters))
            if "latency" in settings.objective_names:
                latency = _measure_latency_ms(result.model)
                trial.set_user_attr("latency_ms", latency)
                values.append(latency)
            self.study.tell(trial, values)
            self.view = None  # one more complete trial for the pruner
        except (OSError, RuntimeError, ValueError) as exc:  # a full disk, an onnxruntime error
            trial.set_user_attr("error", f"storing the result failed: {type(exc).__name__}: {exc}")
            self.study.tell(trial, state=TrialState.FAIL)
            return TrialState.FAIL
        return TrialState.COMPLETE


def _search_loop(
    settings: SearchSettings,
    split: Split,
    dataset: Dataset,
    worker: int,
    on_epoch: EpochEvent | None = None,
    on_trial: Callable[[optuna.Study], None] | None = None,
    study: optuna.Study | None = None,
) -> None:
    """Run trials until the study holds ``settings.trials`` finished ones (or time runs out)."""
    _SearchWorker(settings, split, dataset, on_epoch, on_trial, study).run()


def _worker_process(worker: int, inbox: Any, errors: Any = None) -> None:
    """One search worker (a process of ``run_search``): trials until the study holds enough.

    It starts before the main process has read the data: it imports PyTorch and Optuna
    meanwhile (seconds, on the other core), then takes the settings, split and dataset from
    ``inbox`` (None: nothing to do). It ends with its parent (``kill -9`` of cso), leaves Ctrl-C
    to the main process, and stops on its SIGTERM: its running trials are failed and queued
    again, and it exits 130 without a word. A failure it expects (cso's own, a file's, the
    database's) goes to ``errors`` (a queue the main process reads) as one line; anything else,
    too, with its type.
    """
    import os
    import sys

    from calling_score_opt.lifeline import exit_with_parent, worker_signals

    exit_with_parent()  # first: a killed cso leaves no worker behind
    worker_signals()  # SIGINT ignored; SIGTERM raises KeyboardInterrupt
    try:
        import torch

        import calling_score_opt.stacked  # noqa: F401  (imported while the data is read)

        torch.set_num_threads(1)
        work = inbox.get()
        if work is None:
            return
        settings, split, dataset = work
        _search_loop(settings, split, dataset, worker)
        # Everything is stored: skip the interpreter's clean-up, half a second with PyTorch
        # loaded, which the main process (and the user) would wait for.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
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


def _prepare(settings: SearchSettings) -> tuple[SearchSettings, Dataset, Split]:
    """The data, checked and split, and the settings it allows (no pair features on data
    without the app's features, unless asked for: then an error). No PyTorch here: with
    several workers, this process only reads the data and watches."""
    from calling_score_opt.data import FEATURE_NAMES

    dataset = require_trainable(load_dataset(settings.data_path, settings.target))
    # pair features need the app's 39 inputs (model.check_pair_features says so when asked)
    if settings.pair_features != "off" and tuple(dataset.feature_names) != FEATURE_NAMES:
        if settings.pair_features == "on":
            from calling_score_opt.model import check_pair_features

            check_pair_features(dataset.feature_names)  # raises, with the model's own words
        settings = dataclasses.replace(settings, pair_features="off")  # nothing to pair
    if settings.device != "cpu":  # cuda or auto: fail now, not in every worker
        from calling_score_opt.train import resolve_device

        resolve_device(settings.device)
    return settings, dataset, split_dataset(dataset, settings.seed)


def _start_study(settings: SearchSettings, dataset: Dataset) -> optuna.Study:
    """The study, opened (or created), with its baseline queued when it is new."""
    study, _ = _open_search_study(settings, dataset)
    with claim_lock(settings.storage, settings.study_name, storage_of(study)):
        if not study.get_trials(deepcopy=False):  # a new study: its first trial is the baseline
            study.enqueue_trial(
                baseline_params(settings.space, settings.pair_features),
                user_attrs={BASELINE_ATTR: True},
            )
    remember_parse(dataset, settings.target, settings.artifacts / DATA_CACHE_DIR)  # for export
    return study


def run_search(settings: SearchSettings, observer: SearchObserver | None = None) -> SearchOutcome:
    """Run (or resume) the search until the study holds ``settings.trials`` finished trials.

    Raises:
        CsoError: bad data, options or storage (before any trial runs).
    """
    from optuna.trial import TrialState

    observer = observer or SearchObserver()

    def progressed(current: optuna.Study) -> None:
        observer.progressed(_finished(current), _best_value(current), _describe_last(current))

    if settings.jobs == 1:
        settings, dataset, split = _prepare(settings)
        study = _start_study(settings, dataset)
        observer.started(settings.trials, _finished(study), settings.jobs)
        _search_loop(settings, split, dataset, 0, observer.epoch, progressed, study)
    else:
        study = _run_workers(settings, observer, progressed)
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


def _run_workers(
    settings: SearchSettings,
    observer: SearchObserver,
    progressed: Callable[[optuna.Study], None],
) -> optuna.Study:
    """``settings.jobs`` worker processes on the study; this process reads the data, opens the
    study, hands both over and watches (it never imports PyTorch).

    The workers start first: importing PyTorch takes each of them seconds, which they spend
    while this process reads the data. A Ctrl-C (or any error here) stops them: each fails and
    requeues its running trials, then exits.
    """
    from calling_score_opt.lifeline import check_interrupted, starting_workers, stop_processes

    context = multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()  # each failed worker's one line, for this process to say
    # Queues whose put returns at once (a thread feeds the pipe): each worker reads its own
    # when its imports are done, none waits for another
    inboxes = [context.Queue() for _ in range(settings.jobs)]
    workers = [
        context.Process(target=_worker_process, args=(k, inboxes[k], errors))
        for k in range(settings.jobs)
    ]
    try:
        # From the main thread, born deaf to Ctrl-C (see lifeline). A Ctrl-C meanwhile is held
        # until every worker is started, then raised.
        with starting_workers():
            for process in workers:
                process.start()
        settings, dataset, split = _prepare(settings)
        study = _start_study(settings, dataset)
        observer.started(settings.trials, _finished(study), settings.jobs)
        for inbox in inboxes:
            inbox.put((settings, split, dataset))
        while any(p.is_alive() for p in workers):
            time.sleep(0.1)
            check_interrupted()
            progressed(study)
    except BaseException:  # Ctrl-C: each worker fails and requeues its trials, then exits
        stop_processes([p for p in workers if p.pid is not None])
        raise
    finally:
        # The workers are gone: data one of them never read (stopped while importing) must
        # not keep this process waiting at exit for a pipe no one will drain.
        for inbox in inboxes:
            inbox.cancel_join_thread()
            inbox.close()
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    errors.close()
    if any(p.exitcode != 0 for p in workers):
        failed = next(p for p in workers if p.exitcode != 0)
        reason = reported[0] if reported else f"a worker stopped (exit status {failed.exitcode})"
        raise CsoError(f"{reason}; finished trials are saved: rerun the same command to resume")
    return study
