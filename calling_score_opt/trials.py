"""Stored trials, for people: a table, the best ones, and any of them exported to ONNX.

Works on every study cso writes (a grid's or a search's): each complete trial carries its
metrics as user attributes and its weights as an artifact, so export never retrains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calling_score_opt import __version__
from calling_score_opt.atomic import write_text_atomic
from calling_score_opt.data import load_dataset, split_dataset
from calling_score_opt.errors import StudyError
from calling_score_opt.study import (
    BASELINE_ATTR,
    BASELINE_VARIANT,
    artifact_store,
    default_artifact_dir,
    open_storage,
    read_checkpoint,
    read_learning_curve,
    storage_of,
)

if TYPE_CHECKING:
    import optuna
    from optuna.artifacts import FileSystemArtifactStore
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

RESULTS_FILENAME = "optimization_results.json"


def load_study(storage_url: str, study_name: str) -> optuna.Study:
    """The stored study, or a StudyError that lists the studies the storage does hold."""
    import optuna

    if storage_url.startswith("sqlite:///") and not Path(storage_url[len("sqlite:///") :]).exists():
        raise StudyError(
            f"no study '{study_name}': {storage_url} does not exist; pass --study and --storage "
            "of an existing study, or run cso grid / cso search first"
        )
    storage = open_storage(storage_url, heartbeat=False)
    names = [
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    ]
    if study_name not in names:
        held = ", ".join(sorted(names)) or "none"
        raise StudyError(
            f"no study '{study_name}' in {storage_url} (studies there: {held}); "
            "pass --study and --storage of an existing study, or run cso grid / cso search"
        )
    return optuna.load_study(study_name=study_name, storage=storage)


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


@dataclass
class ExportedTrials:
    results: dict[str, Any]
    results_path: Path


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
    from calling_score_opt.train import load_checkpoint

    attrs = study.user_attrs
    path = data_path or (Path(attrs["data_path"]) if "data_path" in attrs else None)
    if path is None:
        raise StudyError("the study does not record its data file; pass --data-path")
    if not path.exists():
        raise StudyError(
            f"{path}: the study's data file is missing; the parity check needs its test split: "
            "pass --data-path to the same data"
        )
    dataset = load_dataset(path, target)
    if dataset.fingerprint != attrs.get("data_fingerprint"):
        raise StudyError(
            f"{path}: is not the data study '{study.study_name}' was trained on "
            "(fingerprints differ); pass --data-path to that file"
        )
    split = split_dataset(dataset, int(attrs.get("split_seed", 0)))
    store_dir = artifact_dir or default_artifact_dir(storage_url, study.study_name)
    store = artifact_store(store_dir)
    storage = storage_of(study)
    entries: list[dict[str, Any]] = []
    names = [trial_name(t) for t in trials]
    for trial in trials:
        checkpoint = read_checkpoint(store, storage, trial)
        model, config, _ = load_checkpoint(checkpoint)
        name = trial_name(trial)
        if names.count(name) > 1:  # several runs (repeats) of one grid variant: keep them apart
            name = f"{name}_trial_{trial.number}"
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
        report = export_onnx(model, onnx_path, split.x_test, metadata)
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
    ranked = sorted(entries, key=lambda e: e["val_loss"])
    for rank, entry in enumerate(ranked, start=1):
        entry["rank"] = rank
    results = {
        "schema_version": 1,
        "producer": f"cso {__version__}",
        "data": {
            "path": str(path),
            "fingerprint": dataset.fingerprint,
            "records": dataset.n_records,
            "features": list(dataset.feature_names),
            "split": split.sizes,
            "split_seed": split.seed,
        },
        "study": {"name": study.study_name, "storage": storage_url, "artifacts": str(store_dir)},
        "variants": entries,
        "summary": {
            "ranked_by": "val_loss",
            "best_variant": ranked[0]["name"],
            "exported": len(entries),
            "irreducible_mse": dataset.irreducible_mse,
        },
    }
    results_path = output_dir / RESULTS_FILENAME
    write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
    return ExportedTrials(results=results, results_path=results_path)
