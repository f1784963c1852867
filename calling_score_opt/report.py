"""``cso report``: one self-contained HTML page that shows a study, plot by plot.

What Optuna draws (optimization history, importances, parallel coordinates, slices, the Pareto
front) comes from ``optuna.visualization``, so the report and optuna-dashboard show the same
pictures. cso draws only what Optuna cannot: the grid's variants against the baseline with
paired-bootstrap intervals, the train and validation learning curves, and the ensemble built
from the study. Each of those has a pure ``_collect_<plot>_info()`` that returns plain numbers,
so tests check the numbers and a browser checks the drawing. The page embeds plotly.js: it
opens offline, from a file or an attachment.
"""

from __future__ import annotations

import html
import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from calling_score_opt import __version__
from calling_score_opt.atomic import write_text_atomic
from calling_score_opt.errors import ConfigError, CsoError, StudyError
from calling_score_opt.stats import paired_bootstrap_improvement
from calling_score_opt.study import DATA_CACHE_DIR, ENSEMBLE_STEM, redact_url, storage_of
from calling_score_opt.trials import (
    baseline_trial,
    is_baseline,
    learning_curve,
    trial_name,
)

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go  # type: ignore[import-untyped]
    from optuna.artifacts import FileSystemArtifactStore
    from optuna.trial import FrozenTrial

F64 = npt.NDArray[np.float64]

TOP_TRIALS = 5  # trial rows of the summary table for a single-objective study
BOOTSTRAP_RESAMPLES = 2000  # as the grid's own summary
IMPORTANCE_METHOD = "PED-ANOVA, as optuna-dashboard"
ENSEMBLE_SCHEMA = "cso-ensemble/1"


# --- the numbers behind cso's own plots and the summary ----------------------------------------


@dataclass(frozen=True)
class SummaryRow:
    """One line of the summary table: a trial (ranked), the baseline, or the ensemble."""

    rank: int | None  # by validation loss among the complete trials; None: the ensemble
    role: str  # "best", "baseline", "best, baseline", "Pareto front", "ensemble" or ""
    number: int | None
    name: str
    values: tuple[float, ...]  # the objectives beyond the first are columns of their own
    val_loss: float | None
    test_loss: float | None
    test_vs_baseline_pct: float | None  # (baseline test - test) / baseline test * 100
    epochs: int | None
    params: str  # "name=value, ..." (the ensemble: its members and weights)


@dataclass(frozen=True)
class SummaryInfo:
    study_name: str
    kind: str
    objectives: tuple[str, ...]
    counts: dict[str, int]  # trials per state, e.g. {"COMPLETE": 7, "PRUNED": 1}
    data_path: str | None
    rows: tuple[SummaryRow, ...]  # ranked trials, then the baseline, then the ensemble


@dataclass(frozen=True)
class Curve:
    """Losses per epoch of one trial (train empty where the trial kept none)."""

    number: int
    name: str
    state: str  # COMPLETE or PRUNED
    epochs: tuple[int, ...]
    val_losses: tuple[float, ...]
    train_epochs: tuple[int, ...]
    train_losses: tuple[float, ...]
    baseline: bool
    pruned_at_epoch: int | None


@dataclass(frozen=True)
class LearningCurvesInfo:
    curves: tuple[Curve, ...]
    max_epochs: int | None  # the study's epoch budget, so a cut-short curve looks short


@dataclass(frozen=True)
class VariantBar:
    """One grid variant: its losses (means over repeats) and its improvement on the baseline."""

    name: str
    baseline: bool
    repeats: int
    val_loss: float
    test_loss: float
    val_loss_std: float | None  # None with one repeat
    test_loss_std: float | None
    improvement_pct: float | None  # of the mean test loss, as optimization_results.json
    bootstrap_pct: float | None  # of the exported run (lowest val loss), paired over test records
    ci95_pct: tuple[float, float] | None


@dataclass(frozen=True)
class GridInfo:
    variants: tuple[VariantBar, ...]  # in the documented order
    baseline: str | None
    interval_note: str  # where the intervals come from, or why some are missing


@dataclass(frozen=True)
class VariantErrors:
    """Squared error per test record of each grid variant's exported run (or why none)."""

    errors: dict[str, F64] = field(default_factory=dict)
    seed: int = 0  # the bootstrap's seed: the grid's own (its split seed)
    note: str | None = None


@dataclass(frozen=True)
class EnsembleMember:
    trial: int
    name: str
    weight: float
    picks: int
    val_loss: float | None
    test_loss: float | None


@dataclass(frozen=True)
class Gain:
    """The ensemble's test-MSE improvement on a reference trial, with its 95% interval."""

    against: str  # "best single trial (trial_12)", "baseline (trial_0)"
    percent: float
    ci95_pct: tuple[float, float]
    resamples: int

    @property
    def verdict(self) -> str:
        if self.ci95_pct[0] > 0:
            return "better (the 95% interval excludes zero)"
        if self.ci95_pct[1] < 0:
            return "worse (the 95% interval excludes zero)"
        return "within noise (the 95% interval includes zero)"


@dataclass(frozen=True)
class EnsembleInfo:
    members: tuple[EnsembleMember, ...]  # heaviest first
    selection: tuple[tuple[int, int, float], ...]  # (pick, trial picked, ensemble val loss)
    val_loss: float
    test_loss: float
    best_single: tuple[str, float]  # name, val loss: the selection curve's reference line
    gains: tuple[Gain, ...]  # over the best single trial, then over the baseline (if known)
    about: str  # how it was built and where it was exported: a line under the plot


# --- collecting ---------------------------------------------------------------------------


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(trials, key=lambda t: t.number)


def objective_names(study: optuna.Study) -> tuple[str, ...]:
    """Optuna's metric names when set, else cso's ``objectives`` study attribute."""
    n = len(study.directions)
    if study.metric_names is not None and len(study.metric_names) == n:
        return tuple(study.metric_names)
    names = tuple(str(study.user_attrs.get("objectives", "val_loss")).split(","))
    return names if len(names) == n else tuple(f"objective {i}" for i in range(n))


def _is_grid(study: optuna.Study) -> bool:
    return study.user_attrs.get("kind") == "grid"


def _require_complete(study: optuna.Study) -> list[FrozenTrial]:
    from optuna.study import StudyDirection

    if any(d != StudyDirection.MINIMIZE for d in study.directions):
        raise StudyError(
            f"study '{study.study_name}' maximises an objective; cso report shows cso's own "
            "studies, which minimise validation loss (and parameters or latency)"
        )
    complete = _complete(study)
    if not complete:
        raise StudyError(
            f"study '{study.study_name}' has no complete trial yet, so there is nothing to plot; "
            "run cso grid or cso search first"
        )
    return complete


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _collect_summary_info(study: optuna.Study, ensemble: EnsembleInfo | None = None) -> SummaryInfo:
    """The top trials (or the Pareto front), each with its rank; the baseline; the ensemble.

    Only the trial with the lowest validation loss is called best: the others are ranked.
    """
    from calling_score_opt.trials import best_trials, trial_row

    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    complete = _require_complete(study)
    ranked = sorted(complete, key=lambda t: (t.values[0], t.number))
    rank = {t.number: i for i, t in enumerate(ranked, start=1)}
    multi = len(study.directions) > 1
    shown = best_trials(study) if multi else ranked[:TOP_TRIALS]
    baseline = baseline_trial(study)
    base_test = baseline.user_attrs.get("test_loss") if baseline is not None else None

    def vs_baseline(test: float | None, own: bool) -> float | None:
        if not base_test or test is None or own:
            return None
        return float((base_test - test) / base_test * 100)

    front = {t.number for t in shown} if multi else set()

    def row(trial: FrozenTrial) -> SummaryRow:
        line = trial_row(trial)
        own = baseline is not None and trial.number == baseline.number
        roles = [
            "Pareto front" if trial.number in front else "",
            "best" if not multi and rank[trial.number] == 1 else "",
            "baseline" if own else "",
        ]
        return SummaryRow(
            rank=rank[trial.number],
            role=", ".join(r for r in roles if r),
            number=trial.number,
            name=line["name"],
            values=tuple(trial.values),
            val_loss=line["val_loss"],
            test_loss=line["test_loss"],
            test_vs_baseline_pct=vs_baseline(line["test_loss"], own),
            epochs=line["epochs"],
            params=_params_text(line["params"]),
        )

    rows = [row(t) for t in shown]
    if baseline is not None and all(t.number != baseline.number for t in shown):
        rows.append(row(baseline))
    if ensemble is not None:
        members = ", ".join(f"{m.name} {m.weight:.2f}" for m in ensemble.members)
        rows.append(
            SummaryRow(
                rank=None,
                role="ensemble",
                number=None,
                name=f"ensemble of {len(ensemble.members)} trials",
                values=(),
                val_loss=ensemble.val_loss,
                test_loss=ensemble.test_loss,
                test_vs_baseline_pct=vs_baseline(ensemble.test_loss, False),
                epochs=None,
                params=f"weights: {members}",
            )
        )
    return SummaryInfo(
        study_name=study.study_name,
        kind=str(study.user_attrs.get("kind", "unknown")),
        objectives=objective_names(study),
        counts=counts,
        data_path=study.user_attrs.get("data_path"),
        rows=tuple(rows),
    )


def _collect_learning_curves_info(
    study: optuna.Study, store: FileSystemArtifactStore | None = None
) -> LearningCurvesInfo:
    """Every complete and pruned trial's train and validation loss per epoch.

    Read with :func:`calling_score_opt.trials.learning_curve`: the learning_curve.json artifact
    (needs ``store``), else what older studies kept.
    """
    from optuna.trial import TrialState

    baseline = baseline_trial(study)
    storage = storage_of(study)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    curves = []
    for trial in sorted(trials, key=lambda t: t.number):
        curve = learning_curve(trial, storage, store)
        if curve is None:
            continue
        val = [
            (e, v) for e, v in zip(curve.epoch, curve.val_loss, strict=False) if math.isfinite(v)
        ]
        train = [
            (e, v) for e, v in zip(curve.epoch, curve.train_loss, strict=False) if math.isfinite(v)
        ]
        if not val:
            continue
        pruned = trial.state == TrialState.PRUNED
        curves.append(
            Curve(
                number=trial.number,
                name=trial_name(trial),
                state=trial.state.name,
                epochs=tuple(e for e, _ in val),
                val_losses=tuple(v for _, v in val),
                train_epochs=tuple(e for e, _ in train),
                train_losses=tuple(v for _, v in train),
                baseline=is_baseline(trial)
                or (baseline is not None and trial.number == baseline.number),
                pruned_at_epoch=(
                    int(trial.user_attrs.get("pruned_at_epoch", val[-1][0])) if pruned else None
                ),
            )
        )
    epochs = study.user_attrs.get("epochs")
    return LearningCurvesInfo(tuple(curves), int(epochs) if isinstance(epochs, int) else None)


def _variant_order(name: str) -> tuple[int, str]:
    from calling_score_opt.space import VARIANTS

    names = [v.name for v in VARIANTS]
    return (names.index(name) if name in names else len(names), name)


def _grid_runs(study: optuna.Study) -> dict[str, list[FrozenTrial]]:
    runs: dict[str, list[FrozenTrial]] = {}
    for trial in _complete(study):
        variant = trial.user_attrs.get("variant")
        if isinstance(variant, str) and "test_loss" in trial.user_attrs:
            runs.setdefault(variant, []).append(trial)
    return {name: runs[name] for name in sorted(runs, key=_variant_order)}


def _baseline_variant(runs: Mapping[str, Sequence[FrozenTrial]]) -> str | None:
    return next((name for name, trials in runs.items() if any(map(is_baseline, trials))), None)


def _exported_run(runs: Sequence[FrozenTrial]) -> FrozenTrial:
    # cso grid exports the repeat with the lowest validation loss
    return min(runs, key=lambda t: t.user_attrs["val_loss"])


def _collect_grid_info(
    study: optuna.Study,
    variant_errors: VariantErrors | None = None,
    grid_results: Mapping[str, Any] | None = None,
) -> GridInfo | None:
    """The variants' losses and, where the test errors are known, paired bootstrap intervals.

    ``variant_errors`` (see :func:`load_variant_errors`) gives every variant an interval.
    Without it, ``grid_results`` (the grid's optimization_results.json for this study) gives
    the best variant's, from its summary. None: not a grid study.
    """
    if not _is_grid(study):
        return None
    runs = _grid_runs(study)
    if not runs:
        _require_complete(study)
        raise StudyError(f"grid study '{study.study_name}' has no complete run with its losses")
    base_name = _baseline_variant(runs)
    base_mean_test = (
        statistics.fmean(t.user_attrs["test_loss"] for t in runs[base_name]) if base_name else None
    )
    errors = variant_errors.errors if variant_errors is not None else {}
    seed = variant_errors.seed if variant_errors is not None else 0
    base_errors = errors.get(base_name) if base_name else None
    summary_bootstrap = _results_bootstrap(study, grid_results)
    bars = []
    for name, trials in runs.items():
        val = [float(t.user_attrs["val_loss"]) for t in trials]
        test = [float(t.user_attrs["test_loss"]) for t in trials]
        mean_test = statistics.fmean(test)
        bootstrap_pct: float | None = None
        ci: tuple[float, float] | None = None
        if name != base_name and base_errors is not None and name in errors:
            improvement = paired_bootstrap_improvement(
                base_errors, errors[name], resamples=BOOTSTRAP_RESAMPLES, seed=seed
            )
            bootstrap_pct, ci = improvement.percent, (improvement.ci_low, improvement.ci_high)
        elif summary_bootstrap is not None and summary_bootstrap[0] == name:
            bootstrap_pct, ci = summary_bootstrap[1], summary_bootstrap[2]
        bars.append(
            VariantBar(
                name=name,
                baseline=name == base_name,
                repeats=len(trials),
                val_loss=statistics.fmean(val),
                test_loss=mean_test,
                val_loss_std=statistics.stdev(val) if len(val) > 1 else None,
                test_loss_std=statistics.stdev(test) if len(test) > 1 else None,
                improvement_pct=(
                    (base_mean_test - mean_test) / base_mean_test * 100
                    if base_mean_test and name != base_name
                    else None
                ),
                bootstrap_pct=bootstrap_pct,
                ci95_pct=ci,
            )
        )
    return GridInfo(
        variants=tuple(bars),
        baseline=base_name,
        interval_note=_interval_note(
            bars, variant_errors, summary_bootstrap, base_name is not None
        ),
    )


def _results_bootstrap(
    study: optuna.Study, grid_results: Mapping[str, Any] | None
) -> tuple[str, float, tuple[float, float]] | None:
    """(best variant, improvement %, 95% interval) from a results file made from this study."""
    if not grid_results or not results_match(study, grid_results):
        return None
    summary = grid_results.get("summary") or {}
    bootstrap, best = summary.get("bootstrap"), summary.get("best_variant")
    if not isinstance(bootstrap, Mapping) or not isinstance(best, str):
        return None
    low, high = bootstrap["ci95_pct"]
    return best, float(bootstrap["test_mse_improvement_pct"]), (float(low), float(high))


def results_match(study: optuna.Study, grid_results: Mapping[str, Any]) -> bool:
    """Whether an optimization_results.json was written from this study and its data."""
    named = (grid_results.get("study") or {}).get("name") == study.study_name
    data = (grid_results.get("data") or {}).get("fingerprint")
    return named and data == study.user_attrs.get("data_fingerprint")


def _interval_note(
    bars: Sequence[VariantBar],
    variant_errors: VariantErrors | None,
    summary_bootstrap: tuple[str, float, tuple[float, float]] | None,
    has_baseline: bool,
) -> str:
    if not has_baseline:
        return "none, the study has no complete baseline run"
    missing = [b.name for b in bars if not b.baseline and b.ci95_pct is None]
    reason = variant_errors.note if variant_errors is not None else None
    if variant_errors is not None and variant_errors.errors:
        text = (
            f"95% paired bootstrap ({BOOTSTRAP_RESAMPLES:,} resamples of the test records, each "
            "variant's exported run against the baseline's, from the stored weights)"
        )
        if missing:
            text += f"; none for {', '.join(missing)}"
    elif summary_bootstrap is not None and any(b.ci95_pct is not None for b in bars):
        text = f"only the best variant's ({summary_bootstrap[0]}), from the grid's results file"
    else:
        text = "none"
    return f"{text} ({reason})" if reason else text


def open_store(directory: Path | None) -> FileSystemArtifactStore | None:
    """The study's artifact store, or None when its folder is missing (never creates it)."""
    if directory is None or not directory.is_dir():
        return None
    from calling_score_opt.study import artifact_store

    return artifact_store(directory)


def load_variant_errors(
    study: optuna.Study,
    artifact_dir: Path | None,
    data_path: Path | None = None,
    target: str | None = None,
) -> VariantErrors:
    """Rebuild each grid variant's exported run from its stored weights and score the test split.

    Never raises for missing pieces: a missing data file, other data, or missing weights give
    a ``note`` (and no errors for the variants concerned), so the report is still written.
    """
    from calling_score_opt.data import load_dataset, split_dataset
    from calling_score_opt.study import read_checkpoint
    from calling_score_opt.weights import read_checkpoint_bytes

    attrs = study.user_attrs
    seed = int(attrs.get("split_seed", 0))
    path = data_path or (Path(attrs["data_path"]) if "data_path" in attrs else None)
    if path is None:
        return VariantErrors(seed=seed, note="the study does not record its data file")
    if not path.exists():
        return VariantErrors(seed=seed, note=f"the study's data file {path} is missing")
    try:
        cache = None if artifact_dir is None or not artifact_dir.is_dir() else artifact_dir
        dataset = load_dataset(
            path, target, cache_dir=None if cache is None else cache / DATA_CACHE_DIR
        )
    except CsoError as exc:
        return VariantErrors(seed=seed, note=str(exc))
    if dataset.fingerprint != attrs.get("data_fingerprint"):
        return VariantErrors(seed=seed, note=f"{path} is not the data this study was trained on")
    split = split_dataset(dataset, seed)
    store = open_store(artifact_dir)
    if store is None:
        return VariantErrors(
            seed=seed, note=f"the stored weights' folder {artifact_dir} is missing"
        )
    y = split.y_test.astype(np.float64).reshape(-1)
    errors: dict[str, F64] = {}
    missing: list[str] = []
    for name, runs in _grid_runs(study).items():
        try:
            weights = read_checkpoint_bytes(
                read_checkpoint(store, storage_of(study), _exported_run(runs))
            ).weights
        except CsoError:
            missing.append(name)
            continue
        predicted = weights.predict(split.x_test).astype(np.float64)
        errors[name] = (predicted - y) ** 2
    note = f"no stored weights for {', '.join(missing)}" if missing else None
    return VariantErrors(errors=errors, seed=seed, note=note)


def _collect_ensemble_info(document: Mapping[str, Any]) -> EnsembleInfo:
    """The ensemble ``cso export --ensemble`` stored with the study, as plain numbers.

    Raises:
        ValueError: not a ``cso-ensemble/1`` document, or a field is missing or malformed.
    """
    if document.get("schema") != ENSEMBLE_SCHEMA:
        raise ValueError(f"schema {document.get('schema')!r}, this cso reads {ENSEMBLE_SCHEMA}")

    def loss(value: Any) -> float | None:
        return None if value is None else float(value)

    try:
        members = tuple(
            EnsembleMember(
                int(m["trial"]),
                str(m["name"]),
                float(m["weight"]),
                int(m["picks"]),
                loss(m.get("val_loss")),
                loss(m.get("test_loss")),
            )
            for m in document["members"]
        )
        gains = tuple(
            Gain(
                f"{against} ({reference['name']})",
                float(gain["test_mse_improvement_pct"]),
                (float(gain["ci95_pct"][0]), float(gain["ci95_pct"][1])),
                int(gain["resamples"]),
            )
            for key, against, reference in (
                ("vs_best_single", "best single trial", document["best_single"]),
                ("vs_baseline", "baseline", document.get("baseline")),
            )
            if (gain := document.get(key)) is not None and reference is not None
        )
        exported = document.get("onnx_path")
        size = document.get("size_bytes")
        about = f"{document.get('method', 'greedy selection')}; {document.get('rounds')} picks"
        about += f", built {document.get('created', '')}" if document.get("created") else ""
        about += f"; exported to {exported}" if exported else ""
        about += f" ({int(size) / 1024:.1f} KB)" if exported and size is not None else ""
        return EnsembleInfo(
            members=members,
            selection=tuple(
                (int(s["pick"]), int(s["trial"]), float(s["val_loss"]))
                for s in document["selection"]
            ),
            val_loss=float(document["val_loss"]),
            test_loss=float(document["test_loss"]),
            best_single=(
                str(document["best_single"]["name"]),
                float(document["best_single"]["val_loss"]),
            ),
            gains=gains,
            about=about,
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"malformed ({type(exc).__name__}: {exc})") from exc


def _load_ensemble(
    study: optuna.Study, store: FileSystemArtifactStore | None, artifact_dir: Path | None
) -> tuple[EnsembleInfo | None, str | None]:
    """The newest ensemble built from the study, or why it cannot be shown (None, None: none)."""
    from optuna.artifacts import get_all_artifact_meta

    from calling_score_opt.study import read_study_json

    if store is None:
        metas = get_all_artifact_meta(study, storage=storage_of(study))
        if any(m.filename.startswith(f"{ENSEMBLE_STEM}-") for m in metas):
            return (
                None,
                f"the study has an ensemble, but its artifact folder {artifact_dir} is missing",
            )
        return None, None
    try:
        document = read_study_json(store, study, ENSEMBLE_STEM)
    except StudyError as exc:
        return None, str(exc)
    if document is None:
        return None, None
    try:
        return _collect_ensemble_info(document), None
    except ValueError as exc:
        return None, f"the study's ensemble file cannot be read: {exc}"


# --- Optuna's figures ---------------------------------------------------------------------


def _varying_params(complete: Sequence[FrozenTrial]) -> tuple[list[str], list[str]]:
    """(parameters that differ between trials, parameters the same in all): constant ones
    explain nothing, and would only crowd the importances, parallel coordinates and slices."""
    order: list[str] = []
    for trial in complete:
        order.extend(name for name in trial.params if name not in order)
    varying = [n for n in order if len({repr(t.params.get(n)) for t in complete}) > 1]
    return varying, [n for n in order if n not in varying]


def _value_of(index: int) -> Callable[[FrozenTrial], float]:
    return lambda trial: float(trial.values[index])


def _target(study: optuna.Study) -> Callable[[FrozenTrial], float] | None:
    """Optuna's plots need a target with several objectives: the first, validation loss."""
    return _value_of(0) if len(study.directions) > 1 else None


def _quietly(draw: Callable[[], go.Figure]) -> tuple[go.Figure, tuple[str, ...]]:
    """Draw with Optuna, keeping its warnings (caveats for the page) off the terminal."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = draw()
    caveats = tuple(
        dict.fromkeys(
            str(w.message)
            for w in caught
            # PED-ANOVA's reminder that it ranks for low values: every cso objective is minimised
            if not issubclass(w.category, ExperimentalWarning)
            and "PedAnovaImportanceEvaluator computes" not in str(w.message)
        )
    )
    return fig, caveats


def _optuna_figure(
    kind: str, study: optuna.Study, names: Sequence[str], varying: list[str]
) -> go.Figure:
    """Optuna's history, parallel coordinates, slices or Pareto front, on the first objective
    where the plot takes one, with the baseline as a star where a trial is one point."""
    import plotly.graph_objects as go
    from optuna import visualization as vis

    first: dict[str, Any] = {"target": _target(study), "target_name": names[0]}
    draw: Callable[[], go.Figure] = {
        "history": lambda: vis.plot_optimization_history(study, **first),
        "parallel": lambda: vis.plot_parallel_coordinate(study, params=varying, **first),
        "slices": lambda: vis.plot_slice(study, params=varying, **first),
        "pareto": lambda: vis.plot_pareto_front(study, target_names=list(names)),
    }[kind]
    fig, _ = _quietly(draw)
    baseline = baseline_trial(study)
    star = None
    if baseline is not None and kind == "history":
        star = (baseline.number, baseline.values[0])
        values = [t.values[0] for t in _complete(study)]
        fig.update_layout(yaxis_type="log" if _wide(values) else "linear", xaxis_title="trial")
    elif baseline is not None and kind == "pareto" and len(names) == 2:
        star = (baseline.values[0], baseline.values[1])
    if baseline is not None and star is not None:
        fig.add_trace(
            go.Scatter(
                x=[star[0]],
                y=[star[1]],
                mode="markers+text",
                name="baseline",
                text=["baseline"],
                textposition="top right",
                showlegend=False,  # labelled in place: Optuna's colour bars hold the corner
                marker={"color": _BASELINE_COLOR, "symbol": "star", "size": 15},
                hovertemplate=f"baseline (trial {baseline.number})<br>%{{x}}, %{{y:.5g}}"
                "<extra></extra>",
            )
        )
    if kind == "slices":
        fig.update_layout(height=420)
    return fig


def _importance_figure(
    study: optuna.Study, names: Sequence[str], varying: list[str]
) -> tuple[go.Figure | str, tuple[str, ...]]:
    """One bar per parameter and objective (Optuna's), labelled with the objectives' names."""
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import plot_param_importances

    complete = _complete(study)
    if len(complete) < 2 or not varying:
        return (
            f"needs at least 2 complete trials whose parameters differ; the study has "
            f"{len(complete)} complete trial(s)",
            (),
        )

    def draw() -> go.Figure:
        fig: go.Figure | None = None
        for index, name in enumerate(names):
            part = plot_param_importances(
                study,
                evaluator=PedAnovaImportanceEvaluator(),
                params=varying,
                target=_value_of(index) if len(names) > 1 else None,
                target_name=name,
            )
            for trace in part.data:
                trace.name = name
            if fig is None:
                fig = part
            else:
                fig.add_traces(part.data)
        assert fig is not None
        return fig

    try:
        fig, caveats = _quietly(draw)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return f"cannot be computed for this study ({exc})", ()
    shares = [float(x) for trace in fig.data for x in trace.x]
    if not shares or not all(math.isfinite(x) for x in shares) or sum(shares) <= 0:
        return "every parameter scored zero: the trials differ too little", caveats
    fig.update_layout(
        showlegend=len(names) > 1,
        xaxis_title=f"importance ({IMPORTANCE_METHOD})",
        height=max(300, 80 + 28 * len(varying) * len(names)),
    )
    return fig, caveats


# --- cso's own drawings -------------------------------------------------------------------

_TEMPLATE = "plotly_white"
_BASELINE_COLOR = "#222222"
_COLORS = {"val": "#4c78a8", "test": "#f58518", "pruned": "#e45756", "complete": "#72b7b2"}


def _wide(values: Sequence[float]) -> bool:
    """A log axis pays off when positive values span more than a decade."""
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 1 and max(positive) / min(positive) > 10


def _draw_learning_curves(info: LearningCurvesInfo) -> go.Figure:
    import plotly.graph_objects as go

    fig = go.Figure()
    shown: set[str] = set()
    for curve in info.curves:
        if curve.baseline:
            group, color, width = "baseline", _BASELINE_COLOR, 3.0
        elif curve.state == "PRUNED":
            group, color, width = "pruned", _COLORS["pruned"], 1.5
        else:
            group, color, width = "complete", _COLORS["complete"], 1.5
        label = f"{html.escape(curve.name)} ({curve.state.lower()})"
        if curve.train_losses:  # behind its validation curve: dashed and lighter
            fig.add_trace(
                go.Scatter(
                    x=list(curve.train_epochs),
                    y=list(curve.train_losses),
                    mode="lines",
                    name=f"{group} (train)",
                    legendgroup=f"{group} (train)",
                    showlegend=f"{group} (train)" not in shown,
                    opacity=0.45,
                    line={"color": color, "width": 1.0, "dash": "dash"},
                    hovertemplate=label + "<br>epoch %{x}<br>train loss %{y:.5g}<extra></extra>",
                )
            )
            shown.add(f"{group} (train)")
        end = "x" if curve.state == "PRUNED" else "circle"
        fig.add_trace(
            go.Scatter(
                x=list(curve.epochs),
                y=list(curve.val_losses),
                mode="lines+markers",
                name=group,
                legendgroup=group,
                showlegend=group not in shown,
                line={"color": color, "width": width},
                marker={
                    "size": [0] * (len(curve.epochs) - 1) + [10 if end == "x" else 6],
                    "symbol": end,
                    "color": color,
                },
                hovertemplate=label + "<br>epoch %{x}<br>validation loss %{y:.5g}<extra></extra>",
            )
        )
        shown.add(group)
    losses = [v for c in info.curves for v in (*c.val_losses, *c.train_losses)]
    last = info.max_epochs or max(e for c in info.curves for e in c.epochs)
    fig.update_layout(
        xaxis_title="epoch",
        yaxis_title="loss (MSE)",
        yaxis_type="log" if _wide(losses) else "linear",
        height=520,
    )
    fig.update_xaxes(range=[0.5, last + 0.5], dtick=max(1, math.ceil(last / 12)))
    return fig


def _draw_grid(info: GridInfo) -> go.Figure:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots  # type: ignore[import-untyped]

    names = [b.name for b in info.variants]
    labels = [f"{b.name} (baseline)" if b.baseline else b.name for b in info.variants]
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        row_heights=[0.6, 0.4],
        subplot_titles=[
            "validation and test loss (mean over repeats, +/- 1 standard deviation)",
            "test MSE improvement on the baseline, % (95% paired bootstrap interval)",
        ],
    )
    outline = [3 if b.baseline else 0 for b in info.variants]
    for key, title in (("val", "validation loss"), ("test", "test loss")):
        stds = [getattr(b, f"{key}_loss_std") for b in info.variants]
        fig.add_trace(
            go.Bar(
                x=labels,
                y=[getattr(b, f"{key}_loss") for b in info.variants],
                name=title,
                marker={
                    "color": _COLORS[key],
                    "line": {"width": outline, "color": _BASELINE_COLOR},
                },
                error_y={
                    "type": "data",
                    "array": [s or 0.0 for s in stds],
                    "visible": any(s is not None for s in stds),
                },
                hovertemplate="%{x}<br>" + title + " %{y:.5g}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    baseline = next((b for b in info.variants if b.baseline), None)
    if baseline is not None:
        for key in ("val", "test"):
            fig.add_hline(
                y=getattr(baseline, f"{key}_loss"),
                line={"dash": "dash", "color": _COLORS[key], "width": 1},
                row=1,
                col=1,
            )
    shown = [b for b in info.variants if not b.baseline]
    points = [b.bootstrap_pct if b.bootstrap_pct is not None else b.improvement_pct for b in shown]
    pairs = list(zip(shown, points, strict=True))
    fig.add_trace(
        go.Scatter(
            x=[labels[names.index(b.name)] for b in shown],
            y=points,
            mode="markers",
            name="improvement (95% interval)",
            marker={"color": _COLORS["val"], "size": 10},
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [
                    (b.ci95_pct[1] - p) if b.ci95_pct and p is not None else 0.0 for b, p in pairs
                ],
                "arrayminus": [
                    (p - b.ci95_pct[0]) if b.ci95_pct and p is not None else 0.0 for b, p in pairs
                ],
            },
            hovertemplate="%{x}<br>%{y:+.2f}%<extra></extra>",
        ),
        row=2,
        col=1,
    )
    fig.add_hline(y=0, line={"color": _BASELINE_COLOR, "width": 1}, row=2, col=1)
    fig.update_yaxes(title_text="MSE", row=1, col=1)
    fig.update_yaxes(title_text="% better", row=2, col=1)
    fig.update_layout(barmode="group", height=720, xaxis2_tickangle=-35)
    return fig


def _draw_ensemble(info: EnsembleInfo) -> go.Figure:
    """Members' weights, and the ensemble's validation loss pick by pick against the best
    single trial's: what the greedy selection gained on the data it chose on."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.4, 0.6],
        subplot_titles=["members' weights", "validation loss after each pick"],
    )
    fig.add_trace(
        go.Bar(
            x=[m.name for m in info.members],
            y=[m.weight for m in info.members],
            name="weight",
            marker_color=_COLORS["val"],
            customdata=[[m.picks, _fmt(m.val_loss), _fmt(m.test_loss)] for m in info.members],
            hovertemplate="%{x}: weight %{y:.3f} (%{customdata[0]} picks)<br>val loss "
            "%{customdata[1]}, test loss %{customdata[2]}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    picks = [p for p, _, _ in info.selection]
    fig.add_trace(
        go.Scatter(
            x=picks,
            y=[v for _, _, v in info.selection],
            mode="lines+markers",
            name="ensemble",
            customdata=[t for _, t, _ in info.selection],
            line={"color": _COLORS["val"]},
            hovertemplate="pick %{x}: trial %{customdata}<br>val loss %{y:.5g}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    name, val = info.best_single
    fig.add_trace(
        go.Scatter(
            x=[min(picks, default=1), max(picks, default=1)],
            y=[val, val],
            mode="lines",
            name=f"best single trial ({name})",
            line={"color": _COLORS["test"], "dash": "dash"},
            hovertemplate="best single trial<br>val loss %{y:.5g}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(title_text="weight", row=1, col=1)
    fig.update_yaxes(title_text="validation loss (MSE)", row=1, col=2)
    fig.update_xaxes(title_text="pick", dtick=max(1, math.ceil(len(picks) / 12)), row=1, col=2)
    fig.update_layout(height=440, legend={"orientation": "h", "y": -0.2})
    return fig


# --- the page -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportOutcome:
    """The written report: where it is, the plots it holds and why any section has none."""

    path: Path
    plots: tuple[str, ...]  # element ids of the drawn plots, in page order
    notes: dict[str, str]  # section id -> why it has no plot


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1280px; padding: 16px 24px 48px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; }
p.meta, p.how { color: #555; margin: 4px 0 8px; } p.note { background: #fff6e0;
       border-left: 4px solid #f5b700; padding: 8px 12px; }
table { border-collapse: collapse; font-size: 14px; margin: 8px 0; } th, td { padding: 4px 10px;
       border-bottom: 1px solid #eee; text-align: right; } th { background: #f4f4f4; }
td.text, th.text { text-align: left; } tr.baseline td, tr.best td { font-weight: 600; }
tr.ensemble td { background: #eef4fb; }
div.plot { min-height: 300px; overflow-x: auto; }
"""


def _fmt(value: float | None, digits: str = ".5f") -> str:
    return "" if value is None else format(value, digits)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f}%"


def _table(head: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], text: set[str]) -> str:
    """An HTML table; each row is (its CSS class, its cells), every cell escaped."""

    def cls(h: str) -> str:
        return "text" if h in text else "num"

    cells = "".join(f'<th class="{cls(h)}">{html.escape(h)}</th>' for h in head)
    lines = [f"<table><thead><tr>{cells}</tr></thead><tbody>"]
    for css, values in rows:
        tds = "".join(
            f'<td class="{cls(h)}">{html.escape(v)}</td>' for h, v in zip(head, values, strict=True)
        )
        lines.append(f'<tr class="{css}">{tds}</tr>' if css else f"<tr>{tds}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _summary_html(info: SummaryInfo) -> str:
    extra = list(info.objectives[1:])
    head = ["rank", "role", "trial", "name", "val loss", "test loss", "test vs baseline", *extra]
    head += ["epochs", "parameters"]
    rows = []
    for row in info.rows:
        values = [
            "" if row.rank is None else str(row.rank),
            row.role,
            "" if row.number is None else str(row.number),
            row.name,
            _fmt(row.val_loss),
            _fmt(row.test_loss),
            _pct(row.test_vs_baseline_pct),
            *[f"{v:.6g}" for v in row.values[1:]],
            *[""] * (len(extra) - len(row.values[1:])),
            "" if row.epochs is None else str(row.epochs),
            row.params,
        ]
        css = " ".join(r for r in ("best", "baseline", "ensemble") if r in row.role.split(", "))
        rows.append((css, values))
    return _table(head, rows, {"role", "name", "parameters"})


def _ensemble_html(info: EnsembleInfo) -> str:
    """The members with their losses, and the gains with their intervals, as tables."""
    members = [
        (
            "",
            [
                str(m.trial),
                m.name,
                f"{m.weight:.3f}",
                str(m.picks),
                _fmt(m.val_loss),
                _fmt(m.test_loss),
            ],
        )
        for m in info.members
    ]
    gains = [
        (
            "",
            [
                g.against,
                _pct(g.percent),
                f"{_pct(g.ci95_pct[0])} to {_pct(g.ci95_pct[1])}",
                f"{g.resamples:,}",
                g.verdict,
            ],
        )
        for g in info.gains
    ]
    gain_head = ["test MSE gain over", "gain", "95% interval", "resamples", "verdict"]
    return "\n".join(
        [
            _table(
                ["trial", "name", "weight", "picks", "val loss", "test loss"], members, {"name"}
            ),
            _table(gain_head, gains, {"test MSE gain over", "verdict"}) if gains else "",
            f'<p class="how">{html.escape(info.about)}.</p>',
        ]
    )


_SECTIONS: dict[str, tuple[str, str]] = {
    "grid": (
        "Variants against the baseline",
        "Each documented variant's validation and test loss; the baseline has a dark outline and "
        "dashed lines. Below: how much lower each variant's test MSE is, with its interval; an "
        "interval that crosses zero means the difference is within noise.",
    ),
    "ensemble": (
        "Ensemble",
        "The weighted average of trials that cso export --ensemble built by greedy selection on "
        "the validation predictions: each member's weight, the ensemble's validation loss after "
        "each pick against the best single trial's (dashed), and its test-MSE gain over the best "
        "single trial and over the baseline with paired-bootstrap 95% intervals.",
    ),
    "history": (
        "Optimization history (Optuna)",
        "The validation loss of every complete trial, in the order they were started, and the "
        "best so far; the baseline is a star.",
    ),
    "learning-curves": (
        "Learning curves",
        "Validation loss (solid) and training loss (dashed, lighter) per epoch of every trial. "
        "Pruned trials are red and end in a cross where the pruner stopped them.",
    ),
    "importances": (
        "Hyperparameter importances (Optuna)",
        "How much each parameter decides whether a trial reaches a low value of each objective.",
    ),
    "parallel": (
        "Parallel coordinates (Optuna)",
        "One line per complete trial through the validation loss and its parameters, coloured "
        "by validation loss.",
    ),
    "slices": (
        "Slice plots (Optuna)",
        "The validation loss against each parameter on its own; darker points are later trials.",
    ),
    "pareto": (
        "Pareto front (Optuna)",
        "Every complete trial by its objectives; the front holds the trials no other trial beats "
        "on all of them. The baseline is a star.",
    ),
}


def _figure_html(fig: go.Figure, div_id: str) -> str:
    import plotly.io as pio  # type: ignore[import-untyped]

    if fig.layout.height is None:
        fig.update_layout(height=450)
    fig.update_layout(template=_TEMPLATE, title_text="", margin_t=50)
    page: str = pio.to_html(
        fig,
        full_html=False,
        include_plotlyjs=False,  # embedded once, in the page's head
        div_id=div_id,  # fixed ids: the same study gives the same file
        config={"displaylogo": False, "responsive": True},
    )
    return page


def render_report(
    study: optuna.Study,
    *,
    storage_url: str | None = None,
    artifact_dir: Path | None = None,
    grid_results: Mapping[str, Any] | None = None,
    variant_errors: VariantErrors | None = None,
) -> tuple[str, tuple[str, ...], dict[str, str]]:
    """The report's HTML, the ids of its plots and the notes of sections without one.

    ``artifact_dir``: the study's artifact folder (learning curves, the ensemble); a missing
    one only leaves out what needs it.
    """
    import plotly.offline  # type: ignore[import-untyped]

    complete = _require_complete(study)
    names = objective_names(study)
    store = open_store(artifact_dir)
    ensemble, ensemble_note = _load_ensemble(study, store, artifact_dir)
    summary = _collect_summary_info(study, ensemble)
    varying, constant = _varying_params(complete)
    same = f"the trials' parameters do not differ ({len(complete)} complete trial(s))"

    sections: list[tuple[str, go.Figure | str]] = []  # a figure, or why there is none
    grid = _collect_grid_info(study, variant_errors, grid_results)
    if grid is not None:
        sections.append(("grid", _draw_grid(grid)))
    if ensemble is not None or ensemble_note is not None:
        sections.append(("ensemble", _draw_ensemble(ensemble) if ensemble else str(ensemble_note)))
    sections.append(("history", _optuna_figure("history", study, names, varying)))
    curves = _collect_learning_curves_info(study, store)
    no_curves = "no trial kept a learning curve"
    if store is None and artifact_dir is not None:
        no_curves += f" that can be read without its artifact folder ({artifact_dir} is missing)"
    sections.append(
        ("learning-curves", _draw_learning_curves(curves) if curves.curves else no_curves)
    )
    importances, caveats = _importance_figure(study, names, varying)
    sections.append(("importances", importances))
    sections.append(
        ("parallel", _optuna_figure("parallel", study, names, varying) if varying else same)
    )
    sections.append(
        ("slices", _optuna_figure("slices", study, names, varying) if varying else same)
    )
    if len(names) > 1:
        sections.append(("pareto", _optuna_figure("pareto", study, names, varying)))

    left_out = [f"Left out (the same in every trial): {', '.join(constant)}."] if constant else []
    remarks = {  # below a section's plot
        "importances": [f"Caveat: {c}" for c in caveats] + left_out,
        "parallel": left_out,
        "slices": left_out,
    }
    plots: list[str] = []
    notes: dict[str, str] = {}
    body = [_header_html(summary, storage_url), "<h2>Summary</h2>", _summary_html(summary)]
    if grid is not None:
        body.append(f'<p class="how">Bootstrap intervals: {html.escape(grid.interval_note)}.</p>')
    for key, drawn in sections:
        title, how = _SECTIONS[key]
        body.append(f'<section id="section-{key}"><h2>{html.escape(title)}</h2>')
        body.append(f'<p class="how">{html.escape(how)}</p>')
        if isinstance(drawn, str):
            notes[key] = drawn
            body.append(f'<p class="note">No plot: {html.escape(drawn)}.</p>')
        else:
            div_id = f"plot-{key}"
            plots.append(div_id)
            body.append(f'<div class="plot">{_figure_html(drawn, div_id)}</div>')
        if key == "ensemble" and ensemble is not None:
            body.append(_ensemble_html(ensemble))
        body.extend(f'<p class="how">{html.escape(r)}</p>' for r in remarks.get(key, []))
        body.append("</section>")
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="generator" content="cso {html.escape(__version__)}">',
            f"<title>cso report: {html.escape(study.study_name)}</title>",
            f"<style>{_CSS}</style>",
            f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>',
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )
    return page, tuple(plots), notes


def _header_html(info: SummaryInfo, storage_url: str | None = None) -> str:
    """Title and one line of facts; a storage URL only ever appears with its password hidden."""
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(info.counts.items()))
    meta = [
        f"{info.kind} study",
        f"minimising {' and '.join(info.objectives)}",
        f"trials: {counts}",
    ]
    if info.data_path:
        meta.append(f"data: {info.data_path}")
    if storage_url:
        meta.append(f"storage: {redact_url(storage_url)}")
    meta.append(f"made by cso {__version__}")
    return (
        f"<h1>Study '{html.escape(info.study_name)}'</h1>"
        f'<p class="meta">{html.escape(" | ".join(meta))}</p>'
    )


def write_report(
    study: optuna.Study,
    output_path: Path,
    *,
    storage_url: str | None = None,
    artifact_dir: Path | None = None,
    grid_results: Mapping[str, Any] | None = None,
    variant_errors: VariantErrors | None = None,
) -> ReportOutcome:
    """Write the study's report to ``output_path`` (atomically) as one self-contained HTML file.

    ``grid_results`` (a grid's optimization_results.json) and ``variant_errors``
    (:func:`load_variant_errors`) only matter for grid studies: they give the bootstrap
    intervals of the variants' bar chart.

    Raises:
        StudyError: the study has no complete trial.
        ConfigError: the file cannot be written (one line, with the system's reason).
    """
    page, plots, notes = render_report(
        study,
        storage_url=storage_url,
        artifact_dir=artifact_dir,
        grid_results=grid_results,
        variant_errors=variant_errors,
    )
    try:
        write_text_atomic(output_path, page)
    except OSError as exc:
        where = exc.filename or output_path
        raise ConfigError(
            f"--output {output_path}: cannot write the report ({exc.strerror or exc}: {where}); "
            "pass another --output"
        ) from exc
    return ReportOutcome(path=output_path, plots=plots, notes=notes)
