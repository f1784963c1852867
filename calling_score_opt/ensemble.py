"""The best ensemble of a study's complete trials, as one ONNX model under the app's contract.

A search holds more than its best trial: the trials' mistakes differ, so a weighted mean of
several of them scores better than any one. Which trials, with which weights, is chosen by
greedy forward selection with replacement on the validation predictions (Caruana, Niculescu-
Mizil, Crew and Ksikes, "Ensemble selection from libraries of models", ICML 2004), as
auto-sklearn and AutoGluon do: start from nothing, add whichever trial (again, if it helps most)
lowers the validation MSE of the mean the most, repeat, and keep the number of picks where that
MSE was lowest. A trial's weight is how often it was picked. The test split is only reported,
never used to choose, and the gain on it gets a paired-bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calling_score_opt.errors import ConfigError, StudyError
from calling_score_opt.results import (
    RESULTS_FILENAME,
    check_mergeable,
    read_results,
    write_results,
)
from calling_score_opt.stats import F64
from calling_score_opt.study import (
    ENSEMBLE_STEM,
    artifact_store,
    default_artifact_dir,
    store_study_json,
)
from calling_score_opt.trials import (
    StudyData,
    baseline_trial,
    compare_on_test,
    merged_results,
    predict,
    study_data,
    trial_model,
    trial_name,
)

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from calling_score_opt.config import TrainConfig
    from calling_score_opt.export import ExportReport
    from calling_score_opt.weights import MlpWeights

ENSEMBLE_NAME = "ensemble"
ONNX_FILENAME = f"calling_score_model_{ENSEMBLE_NAME}.onnx"
SCHEMA = "cso-ensemble/1"
METHOD = (
    "greedy forward selection with replacement on validation predictions (Caruana et al., 2004)"
)
#: Picks of the greedy selection (auto-sklearn's default ensemble size); the best prefix is kept.
DEFAULT_ROUNDS = 50
#: Distinct trials at most: each member adds its weights to the file the app ships and its
#: matrix products to every score.
DEFAULT_MAX_MEMBERS = 8


@dataclass(frozen=True)
class Selection:
    """The kept picks of a greedy selection (candidate indices, in pick order) and the
    validation MSE of the ensemble after each of them."""

    picks: tuple[int, ...]
    val_losses: tuple[float, ...]

    def weights(self, n_candidates: int) -> F64:
        """Per candidate: how often it was picked, over the number of picks."""
        counts = np.bincount(np.array(self.picks), minlength=n_candidates).astype(np.float64)
        weights: F64 = counts / len(self.picks)
        return weights


def greedy_selection(
    val_predictions: F64, y_val: F64, rounds: int = DEFAULT_ROUNDS, max_members: int = 8
) -> Selection:
    """Caruana's ensemble selection with replacement over ``val_predictions`` ([M, n]).

    Each round adds the candidate that gives the lowest validation MSE of the running mean
    (ties: the lower index, so list the candidates best first); once ``max_members`` distinct
    candidates are in, only they can be picked again. The prefix of picks with the lowest
    validation MSE is kept (the first of equal ones: fewer picks).
    """
    if rounds < 1 or max_members < 1:
        raise ConfigError(f"rounds and max members must be >= 1, got {rounds}, {max_members}")
    n_candidates = val_predictions.shape[0]
    total = np.zeros(val_predictions.shape[1])
    picks: list[int] = []
    losses: list[float] = []
    for count in range(1, rounds + 1):
        chosen = sorted(set(picks))
        pool = np.arange(n_candidates) if len(chosen) < max_members else np.array(chosen)
        trial_means = (total + val_predictions[pool]) / count  # [len(pool), n]
        mse = ((trial_means - y_val) ** 2).mean(axis=1)
        best = int(np.argmin(mse))
        picks.append(int(pool[best]))
        losses.append(float(mse[best]))
        total += val_predictions[pool[best]]
    keep = int(np.argmin(losses)) + 1
    return Selection(tuple(picks[:keep]), tuple(losses[:keep]))


@dataclass(frozen=True)
class Candidate:
    """A complete trial with its stored model and its scores on the validation and test splits."""

    trial: FrozenTrial
    name: str
    model: MlpWeights
    config: TrainConfig
    val: F64
    test: F64


def _candidates(study: optuna.Study, store: Any, data: StudyData) -> list[Candidate]:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise StudyError(
            f"study '{study.study_name}' has no complete trial yet; an ensemble needs stored "
            "models: run cso search or cso grid first"
        )
    candidates = []
    for trial in sorted(complete, key=lambda t: (t.values[0], t.number)):  # best first
        model, config = trial_model(store, study, trial)
        val, test = predict(model, data.split.x_val), predict(model, data.split.x_test)
        candidates.append(Candidate(trial, trial_name(trial), model, config, val, test))
    return candidates


def _weighted(weights: Sequence[float], scores: Sequence[F64]) -> F64:
    """The weighted sum of per-member scores (the weights sum to 1: a weighted mean)."""
    total: F64 = np.sum([w * s for w, s in zip(weights, scores, strict=True)], axis=0)
    return total


def _mse(predictions: F64, labels: Any) -> float:
    return float(np.mean((predictions - np.asarray(labels, dtype=np.float64)) ** 2))


def _reference(candidate: Candidate, data: StudyData) -> dict[str, Any]:
    return {
        "trial": candidate.trial.number,
        "name": candidate.name,
        "val_loss": _mse(candidate.val, data.split.y_val),
        "test_loss": _mse(candidate.test, data.split.y_test),
    }


@dataclass
class EnsembleOutcome:
    """What ``cso export --ensemble`` built: its record, its ONNX file and the results file."""

    record: dict[str, Any]
    onnx_path: Path
    results: dict[str, Any]
    results_path: Path
    export: ExportReport


def build_ensemble(
    study: optuna.Study,
    output_dir: Path,
    storage_url: str,
    artifact_dir: Path | None = None,
    data_path: Path | None = None,
    target: str | None = None,
    max_members: int = DEFAULT_MAX_MEMBERS,
    rounds: int = DEFAULT_ROUNDS,
    final_dir: Path | None = None,
) -> EnsembleOutcome:
    """Select, export (verified, one file) and record the best ensemble of the study's trials.

    The record goes to the study (an ``ensemble-<time>.json`` artifact, which ``cso report``
    draws) and, as an entry named ``ensemble``, into the output folder's
    optimization_results.json. ``final_dir``: where the files will live once moved (the
    registry exports to a staging folder first); the record names the file there.

    Raises:
        StudyError: no complete trial, weights or data missing, or another study's results file.
        ExportError: the ONNX file breaks the contract or fails the parity check.
    """
    from calling_score_opt import __version__
    from calling_score_opt.export import METRIC_KEYS, export_onnx, feature_spec_hash
    from calling_score_opt.weights import EnsembleWeights

    if max_members < 1 or rounds < 1:
        raise ConfigError(
            f"--max-members and --rounds must be at least 1, got {max_members}, {rounds}"
        )
    store_dir = artifact_dir or default_artifact_dir(storage_url, study.study_name)
    data = study_data(study, data_path, target, store_dir)
    results_path = output_dir / RESULTS_FILENAME
    existing = read_results(results_path)
    check_mergeable(existing, results_path, study.study_name, data.dataset.fingerprint)
    store = artifact_store(store_dir)
    candidates = _candidates(study, store, data)
    y_val = data.split.y_val.astype(np.float64)
    selection = greedy_selection(
        np.stack([c.val for c in candidates]), y_val, rounds=rounds, max_members=max_members
    )
    weights = selection.weights(len(candidates))
    order = sorted(np.flatnonzero(weights), key=lambda i: (-weights[i], i))
    members = [candidates[i] for i in order]
    member_weights = [float(weights[i]) for i in order]
    model = EnsembleWeights(tuple(m.model for m in members), tuple(member_weights))
    val_scores = _weighted(member_weights, [m.val for m in members])
    test_scores = _weighted(member_weights, [m.test for m in members])
    train_scores = _weighted(
        member_weights, [predict(m.model, data.split.x_train) for m in members]
    )
    best = candidates[0]
    baseline_frozen = baseline_trial(study)
    baseline = next(
        (c for c in candidates if baseline_frozen and c.trial.number == baseline_frozen.number),
        None,
    )
    y_test = data.split.y_test
    vs_best = compare_on_test(best.test, test_scores, y_test, "the best single trial")
    vs_baseline = (
        compare_on_test(baseline.test, test_scores, y_test, "the baseline") if baseline else None
    )
    member_rows = [
        {
            **_reference(candidates[i], data),
            "weight": float(weights[i]),
            "picks": selection.picks.count(int(i)),
        }
        for i in order
    ]
    metrics = {
        "val_loss": _mse(val_scores, y_val),
        "test_loss": _mse(test_scores, y_test),
        "train_loss": _mse(train_scores, data.split.y_train),
        "parameters": model.parameters,
    }
    onnx_path = output_dir / ONNX_FILENAME
    metadata = {
        "producer": f"cso {__version__}",
        "model_type": "calling_score",
        "variant": ENSEMBLE_NAME,
        "ensemble": {
            "method": METHOD,
            "members": [
                {"trial": r["trial"], "name": r["name"], "weight": r["weight"]} for r in member_rows
            ],
        },
        "hyperparameters": {f"trial_{m.trial.number}": dict(m.trial.params) for m in members},
        "feature_names": list(data.dataset.feature_names),
        "feature_spec_hash": feature_spec_hash(data.dataset.feature_names),
        "input": "raw features [N, F] float32 in feature_names order; each member's scaling "
        "is in the graph",
        "metrics": {key: metrics.get(key) for key in METRIC_KEYS},
        "data_fingerprint": data.dataset.fingerprint,
        "study": study.study_name,
    }
    report = export_onnx(model, onnx_path, data.split.x_test, metadata, x_train=data.split.x_train)

    record: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": METHOD,
        "rounds": len(selection.picks),
        "max_members": max_members,
        "candidates": len(candidates),
        "members": member_rows,
        "selection": [
            {"pick": k + 1, "trial": candidates[i].trial.number, "val_loss": loss}
            for k, (i, loss) in enumerate(zip(selection.picks, selection.val_losses, strict=True))
        ],
        "val_loss": metrics["val_loss"],
        "test_loss": metrics["test_loss"],
        "best_single": _reference(best, data),
        "baseline": _reference(baseline, data) if baseline else None,
        "vs_best_single": vs_best,
        "vs_baseline": vs_baseline,
        "onnx_path": str((final_dir or output_dir) / ONNX_FILENAME),
        "size_bytes": report.size_bytes,
    }
    floor = data.dataset.irreducible_mse
    if floor is not None:  # synthetic data knows its noise floor: say how much signal is caught
        variance = float(np.var(np.asarray(y_test, dtype=np.float64)))
        record["explained_share"] = {
            "ensemble": explained_share(metrics["test_loss"], variance, floor),
            "best_single": explained_share(record["best_single"]["test_loss"], variance, floor),
            "baseline": (
                explained_share(record["baseline"]["test_loss"], variance, floor)
                if baseline
                else None
            ),
            "method": "(var(y) - MSE) / (var(y) - irreducible MSE) on the test split",
        }
    store_study_json(store, study, ENSEMBLE_STEM, record)
    entry = {
        "name": ENSEMBLE_NAME,
        "kind": ENSEMBLE_NAME,
        "success": True,
        "error": None,
        "members": [
            {"trial_number": r["trial"], "name": r["name"], "weight": r["weight"]}
            for r in member_rows
        ],
        **metrics,
        "improvement_vs_baseline_pct": (
            vs_baseline["test_mse_improvement_pct"] if vs_baseline else None
        ),
        "vs_best_single": vs_best,
        "vs_baseline": vs_baseline,
        "model_size_bytes": report.size_bytes,
        "model_size_kb": round(report.size_bytes / 1024, 1),
        "onnx_path": str(onnx_path),
        "parity_max_abs_diff": report.parity_max_abs_diff,
    }
    summary = {
        "ensemble": {
            "members": len(member_rows),
            "val_loss": metrics["val_loss"],
            "test_loss": metrics["test_loss"],
            "vs_best_single": vs_best,
            "vs_baseline": vs_baseline,
            **({"explained_share": record["explained_share"]} if floor is not None else {}),
        }
    }
    results = merged_results(existing, study, storage_url, store_dir, data, [entry], summary)
    write_results(results_path, results)
    return EnsembleOutcome(record, onnx_path, results, results_path, report)


def explained_share(test_loss: float, label_variance: float, irreducible: float) -> float:
    """Share of the explainable variance a model captures: (var(y) - MSE) / (var(y) - floor)."""
    return (label_variance - test_loss) / (label_variance - irreducible)
