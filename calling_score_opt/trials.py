"""Stored trials, for people: a table, the best ones, and any of them exported to ONNX.

Works on every study cso writes (a grid's or a search's): each complete trial carries its
metrics as user attributes and its weights as an artifact, so export never retrains.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calling_score_opt.data import Array, Dataset, Split, load_dataset, split_dataset
from calling_score_opt.errors import CsoError, StudyError
from calling_score_opt.results import (
    RESULTS_FILENAME,
    best_single,
    check_mergeable,
    data_section,
    document,
    entry_name,
    merge_variants,
    read_results,
    study_section,
    write_results,
)
from calling_score_opt.stats import F64, paired_bootstrap_improvement
from calling_score_opt.study import (
    BASELINE_ATTR,
    BASELINE_VARIANT,
    DATA_CACHE_DIR,
    STUDIES_DIR,
    artifact_dir_of,
    artifact_store,
    default_artifact_dir,
    open_storage,
    read_checkpoint,
    read_learning_curve,
    redact_url,
    storage_of,
)

if TYPE_CHECKING:
    import optuna
    from optuna.artifacts import FileSystemArtifactStore
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

    from calling_score_opt.config import TrainConfig
    from calling_score_opt.weights import MlpWeights, Weights


def load_study(storage_url: str, study_name: str) -> optuna.Study:
    """The stored study, or a StudyError that lists the studies there are (and where).

    Raises:
        StudyError: no such study; the message names the studies of ``storage_url``, or for a
            missing default SQLite file those under studies/.
    """
    import optuna

    shown = redact_url(storage_url)
    if storage_url.startswith("sqlite:///") and not Path(storage_url[len("sqlite:///") :]).exists():
        here = ", ".join(f"'{s.name}'" for s in list_studies()) or "none"
        raise StudyError(
            f"no study '{study_name}': {shown} does not exist (studies under {STUDIES_DIR}/: "
            f"{here}); pass --study NAME (and --storage URL), see cso studies, or run cso grid "
            "/ cso search first"
        )
    storage = open_storage(storage_url, heartbeat=False)
    names = [
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    ]
    if study_name not in names:
        held = ", ".join(f"'{n}'" for n in sorted(names)) or "none"
        raise StudyError(
            f"no study '{study_name}' in {shown} (studies there: {held}); pass --study NAME, "
            "see cso studies, or run cso grid / cso search first"
        )
    return optuna.load_study(study_name=study_name, storage=storage)


@dataclass(frozen=True)
class StudyInfo:
    """One line of ``cso studies``."""

    name: str
    kind: str  # grid, search, or "?" for a study cso did not make
    trials: int
    complete: int
    best_value: float | None  # lowest validation loss of a complete trial
    best_trial: int | None
    storage: str  # redacted


def list_studies(storage_url: str | None = None) -> list[StudyInfo]:
    """The studies of ``storage_url``, or of every SQLite file under studies/ (the default
    storages: one file per study)."""
    import optuna
    from optuna.trial import TrialState

    urls = (
        [storage_url]
        if storage_url is not None
        else [f"sqlite:///{p}" for p in sorted(STUDIES_DIR.glob("*.db"))]
    )
    found = []
    for url in urls:
        storage = open_storage(url, heartbeat=False)
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            trials = study.get_trials(deepcopy=False)
            complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
            best = min(complete, key=lambda t: t.values[0]) if complete else None
            found.append(
                StudyInfo(
                    name=summary.study_name,
                    kind=str(summary.user_attrs.get("kind", "?")),
                    trials=len(trials),
                    complete=len(complete),
                    best_value=best.values[0] if best else None,
                    best_trial=best.number if best else None,
                    storage=redact_url(url),
                )
            )
    return found


def is_baseline(trial: FrozenTrial) -> bool:
    """Whether ``trial`` is a run of the documented baseline (marked so, or a grid's v1_0 run)."""
    attrs = trial.user_attrs
    return attrs.get(BASELINE_ATTR) is True or attrs.get("variant") == BASELINE_VARIANT


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    """The baseline every command compares against, found the same way everywhere.

    It is the complete trial marked as the baseline (a user attribute, so a baseline retried
    under a new number after a crash is still found); with several (a grid's ``--repeats``) the
    one with the lowest validation loss, which is the one the grid exports. Studies written
    before the mark existed named their baseline's number in a study attribute.
    """
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    marked = [t for t in complete if is_baseline(t)]
    legacy = study.user_attrs.get("baseline_trial")
    if not marked and isinstance(legacy, int):
        marked = [t for t in complete if t.number == legacy]
    return min(marked, key=lambda t: t.values[0]) if marked else None


@dataclass(frozen=True)
class LearningCurve:
    """Losses per epoch of one run; ``train_loss`` is empty where only validation was kept."""

    epoch: tuple[int, ...]
    val_loss: tuple[float, ...]
    train_loss: tuple[float, ...] = ()


def learning_curve(
    trial: FrozenTrial, storage: BaseStorage, store: FileSystemArtifactStore | None
) -> LearningCurve | None:
    """A run's learning curve: its learning_curve.json artifact, else what older studies kept
    (``val_losses`` / ``train_losses`` list attributes), else its reported intermediate values.
    None when the trial holds no curve at all."""
    document = read_learning_curve(store, storage, trial) if store is not None else None
    if document is not None:
        return LearningCurve(
            epoch=tuple(int(e) for e in document["epoch"]),
            val_loss=tuple(float(v) for v in document["val_loss"]),
            train_loss=tuple(float(v) for v in document["train_loss"]),
        )
    listed = trial.user_attrs.get("val_losses")
    if isinstance(listed, list) and listed:
        train = trial.user_attrs.get("train_losses")
        return LearningCurve(
            epoch=tuple(range(1, len(listed) + 1)),
            val_loss=tuple(float(v) for v in listed),
            train_loss=tuple(float(v) for v in train) if isinstance(train, list) else (),
        )
    if trial.intermediate_values:
        points = sorted(trial.intermediate_values.items())
        train = trial.user_attrs.get("train_losses")
        return LearningCurve(
            epoch=tuple(int(e) for e, _ in points),
            val_loss=tuple(float(v) for _, v in points),
            train_loss=(
                tuple(float(v) for v in train)
                if isinstance(train, list) and len(train) == len(points)
                else ()
            ),
        )
    return None


def trial_name(trial: FrozenTrial) -> str:
    """A grid trial's variant name, else ``trial_<number>``."""
    variant = trial.user_attrs.get("variant")
    return str(variant) if variant else f"trial_{trial.number}"


def hidden_sizes(trial: FrozenTrial) -> list[int]:
    sizes = trial.user_attrs.get("hidden_sizes")
    if isinstance(sizes, list):
        return [int(s) for s in sizes]
    text = trial.params.get("hidden_sizes")
    if isinstance(text, str):
        return [int(s) for s in text.split(",")]
    layers = int(trial.params.get("n_layers", 0))
    return [int(trial.params[f"units_l{i}"]) for i in range(layers)]


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One line of ``cso trials``: number, state, parameters, losses, epochs, time."""
    attrs = trial.user_attrs
    epochs = attrs.get("epochs_run")
    if trial.state.name == "PRUNED":
        epochs = attrs.get("pruned_at_epoch", len(trial.intermediate_values) or None)
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return {
        "number": trial.number,
        "name": trial_name(trial),
        "state": trial.state.name,
        "params": dict(trial.params),
        "val_loss": attrs.get("val_loss"),
        "test_loss": attrs.get("test_loss"),
        "values": list(trial.values) if trial.values else None,
        "epochs": epochs,
        "best_epoch": attrs.get("best_epoch"),
        "time_s": attrs.get("training_time_s", duration),
        "error": attrs.get("error"),
    }


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The complete trial with the lowest val loss, or the Pareto front (several objectives)."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise StudyError(f"study '{study.study_name}' has no complete trial yet")
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.values[0])
    return [min(complete, key=lambda t: t.values[0])]


def select_trials(
    study: optuna.Study, *, number: int | None = None, best: bool = False, top: int | None = None
) -> list[FrozenTrial]:
    """The trials ``cso export`` was asked for (exactly one of number, best, top).

    Raises:
        StudyError: no such trial, or it is not complete.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if number is not None:
        match = [t for t in trials if t.number == number]
        if not match:
            last = trials[-1].number if trials else None
            known = f"trials are 0-{last}" if last is not None else "it has no trials"
            raise StudyError(f"study '{study.study_name}' has no trial {number} ({known})")
        if match[0].state != TrialState.COMPLETE:
            raise StudyError(
                f"trial {number} is {match[0].state.name.lower()}, not complete; "
                "only complete trials have weights to export"
            )
        return match
    if best:
        return best_trials(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise StudyError(f"study '{study.study_name}' has no complete trial yet")
    return sorted(complete, key=lambda t: t.values[0])[: top or 1]


@dataclass(frozen=True)
class StudyData:
    """The data a study was trained on, loaded and split as it was."""

    path: Path
    dataset: Dataset
    split: Split


def study_data(
    study: optuna.Study,
    data_path: Path | None = None,
    target: str | None = None,
    artifact_dir: Path | None = None,
) -> StudyData:
    """The study's data file (``data_path``, else the one it recorded), checked and split.

    With ``artifact_dir`` (the study's), the parsed file is cached there (``load_dataset``).

    Raises:
        StudyError: no data file is known or it is missing, or it is not the study's data.
    """
    attrs = study.user_attrs
    path = data_path or (Path(attrs["data_path"]) if "data_path" in attrs else None)
    if path is None:
        raise StudyError("the study does not record its data file; pass --data-path")
    if not path.exists():
        raise StudyError(
            f"{path}: the study's data file is missing; pass --data-path to the same data"
        )
    recorded_target = attrs.get("target")
    dataset = load_dataset(
        path,
        target or (recorded_target if path.suffix == ".csv" else None),
        cache_dir=None if artifact_dir is None else artifact_dir / DATA_CACHE_DIR,
    )
    if dataset.fingerprint != attrs.get("data_fingerprint"):
        raise StudyError(
            f"{path}: is not the data study '{study.study_name}' was trained on "
            "(fingerprints differ); pass --data-path to that file"
        )
    return StudyData(path, dataset, split_dataset(dataset, int(attrs.get("split_seed", 0))))


def trial_model(
    store: FileSystemArtifactStore, study: optuna.Study, trial: FrozenTrial
) -> tuple[MlpWeights, TrainConfig]:
    """The stored weights of a complete trial and its configuration (no PyTorch needed)."""
    from calling_score_opt.weights import read_checkpoint_bytes

    stored = read_checkpoint_bytes(read_checkpoint(store, storage_of(study), trial))
    return stored.weights, stored.config


def predict(model: Weights, x: Array) -> F64:
    """Scores of raw features ``x`` as float64 (for losses and paired comparisons)."""
    scores: F64 = model.predict(x).astype(np.float64)
    return scores


def compare_on_test(
    reference: F64, candidate: F64, y_test: Array, reference_name: str
) -> dict[str, Any]:
    """The candidate's test-MSE gain over the reference, with its 95% paired-bootstrap interval
    (both judged on the same test records) and a verdict."""
    y = y_test.astype(np.float64)
    improvement = paired_bootstrap_improvement((reference - y) ** 2, (candidate - y) ** 2)
    return improvement.to_dict(improvement.verdict_against(reference_name))


@dataclass(frozen=True)
class BaselineComparison:
    """How the best trial does against the baseline on the test split."""

    best: FrozenTrial
    baseline: FrozenTrial | None
    bootstrap: dict[str, Any] | None  # None: no baseline, the best is the baseline, or no data
    note: str | None = None  # why there is no interval


def compare_best_with_baseline(
    study: optuna.Study,
    store: FileSystemArtifactStore,
    data_path: Path | None = None,
    target: str | None = None,
) -> BaselineComparison:
    """The best trial (lowest validation loss) against the study's baseline on the test split.

    Selection stays on validation; the interval uses only the test split. A missing data file
    or weights give a note instead of an interval (the comparison is advice, not the job).
    """
    best = best_trials(study)[0]
    baseline = baseline_trial(study)
    if baseline is None:
        return BaselineComparison(best, None, None, "the study holds no complete baseline trial")
    if baseline.number == best.number:
        return BaselineComparison(best, baseline, None, "the baseline itself is the best trial")
    try:
        data = study_data(study, data_path, target, artifact_dir_of(store))
        best_model, _ = trial_model(store, study, best)
        base_model, _ = trial_model(store, study, baseline)
    except CsoError as exc:
        return BaselineComparison(best, baseline, None, f"no interval: {exc}")
    x_test = data.split.x_test
    bootstrap = compare_on_test(
        predict(base_model, x_test), predict(best_model, x_test), data.split.y_test, "the baseline"
    )
    return BaselineComparison(best, baseline, bootstrap)


@dataclass
class ExportedTrials:
    """The results document after an export, where it was written, and this export's entries."""

    results: dict[str, Any]
    results_path: Path
    entries: list[dict[str, Any]]


def export_trials(
    study: optuna.Study,
    trials: list[FrozenTrial],
    output_dir: Path,
    storage_url: str,
    artifact_dir: Path | None = None,
    data_path: Path | None = None,
    target: str | None = None,
) -> ExportedTrials:
    """Write each trial's stored weights as a verified ONNX file, plus optimization_results.json.

    The parity check needs the study's test split: the data file is the one the study recorded
    (or ``data_path``), and must have the fingerprint the study was trained on.

    Raises:
        StudyError: weights or data missing, or the data is not the study's.
        ExportError: an export breaks the contract or fails parity.
    """
    from calling_score_opt.export import export_onnx, model_metadata

    store_dir = artifact_dir or default_artifact_dir(storage_url, study.study_name)
    data = study_data(study, data_path, target, store_dir)
    dataset, split = data.dataset, data.split
    results_path = output_dir / RESULTS_FILENAME
    existing = read_results(results_path)
    check_mergeable(existing, results_path, study.study_name, dataset.fingerprint)
    store = artifact_store(store_dir)
    entries: list[dict[str, Any]] = []
    names = [trial_name(t) for t in trials]
    for trial in trials:
        model, config = trial_model(store, study, trial)
        name = trial_name(trial)
        if names.count(name) > 1:  # several runs (repeats) of one grid variant: keep them apart
            name = f"{name}_trial_{trial.number}"
        name = entry_name(existing, name, trial.number)
        onnx_path = output_dir / f"calling_score_model_{name}.onnx"
        metadata = model_metadata(
            name,
            config,
            dataset.feature_names,
            trial.user_attrs,
            dataset.fingerprint,
            study=study.study_name,
            trial_number=trial.number,
        )
        report = export_onnx(model, onnx_path, split.x_test, metadata, x_train=split.x_train)
        a = trial.user_attrs
        entries.append(
            {
                "name": name,
                "trial_number": trial.number,
                "config": {
                    **config.hyperparameters(),
                    "epochs": config.epochs,
                    "patience": config.patience,
                },
                "success": True,
                "error": None,
                "val_loss": a.get("val_loss"),
                "test_loss": a.get("test_loss"),
                "train_loss": a.get("train_loss"),
                "best_epoch": a.get("best_epoch"),
                "epochs_run": a.get("epochs_run"),
                "training_time_s": a.get("training_time_s"),
                "parameters": a.get("parameters"),
                "model_size_bytes": report.size_bytes,
                "model_size_kb": round(report.size_bytes / 1024, 1),
                "onnx_path": str(onnx_path),
                "parity_max_abs_diff": report.parity_max_abs_diff,
                "values": list(trial.values),
            }
        )
    results = merged_results(existing, study, storage_url, store_dir, data, entries)
    write_results(results_path, results)
    return ExportedTrials(results=results, results_path=results_path, entries=entries)


def merged_results(
    existing: dict[str, Any] | None,
    study: optuna.Study,
    storage_url: str,
    store_dir: Path,
    data: StudyData,
    entries: list[dict[str, Any]],
    summary: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The output folder's results document with ``entries`` (and ``summary`` keys) merged in."""
    variants = merge_variants(existing, entries)
    best = best_single(variants)
    merged_summary: dict[str, Any] = dict((existing or {}).get("summary", {}))
    merged_summary.update(
        ranked_by="val_loss",
        best_variant=best["name"] if best else None,
        exported=len(variants),
        irreducible_mse=data.dataset.irreducible_mse,
        **(summary or {}),
    )
    extra = {k: v for k, v in (existing or {}).items() if k == "settings"}
    return document(
        data_section(data.path, data.dataset, data.split),
        study_section(study.study_name, storage_url, store_dir),
        variants,
        merged_summary,
        **extra,
    )
