"""``cso report``: one self-contained HTML page that shows a study, plot by plot.

Every plot is computed by a pure ``_collect_<plot>_info()`` that returns plain numbers (a frozen
dataclass) and drawn by ``_draw_<plot>()`` with plotly, so tests check the numbers and a browser
checks the drawing. The page embeds plotly.js: it opens offline, from a file or an attachment.
"""

from __future__ import annotations

import html
import itertools
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
from calling_score_opt.errors import CsoError, StudyError
from calling_score_opt.stats import paired_bootstrap_improvement
from calling_score_opt.trials import trial_name

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go  # type: ignore[import-untyped]
    from optuna.trial import FrozenTrial

F64 = npt.NDArray[np.float64]

BASELINE_VARIANT = "v1_0_baseline"  # space.BASELINE_NAME, without importing torch with it
TOP_TRIALS = 5  # rows of the summary table for a single-objective study
BOOTSTRAP_RESAMPLES = 2000  # as the grid's own summary
OBJECTIVE_LABELS = {
    "val_loss": "validation loss (MSE)",
    "params": "parameters",
    "latency": "latency (ms)",
}


# --- the numbers behind each plot --------------------------------------------------------------


@dataclass(frozen=True)
class SummaryRow:
    """One line of the summary table: a best trial or the baseline."""

    number: int
    name: str
    role: str  # "best", "Pareto front", "baseline" or "best, baseline"
    values: tuple[float, ...]
    val_loss: float | None
    test_loss: float | None
    test_vs_baseline_pct: float | None  # (baseline test - test) / baseline test * 100
    epochs: int | None
    params: dict[str, Any]


@dataclass(frozen=True)
class SummaryInfo:
    study_name: str
    kind: str
    objectives: tuple[str, ...]
    counts: dict[str, int]  # trials per state, e.g. {"COMPLETE": 7, "PRUNED": 1}
    data_path: str | None
    rows: tuple[SummaryRow, ...]  # the best first; the baseline last unless it is among them


@dataclass(frozen=True)
class HistoryInfo:
    objective: str
    numbers: tuple[int, ...]  # complete trials, in order
    values: tuple[float, ...]
    best_so_far: tuple[float, ...]
    baseline_number: int | None


@dataclass(frozen=True)
class ImportanceInfo:
    importances: dict[str, float]  # parameter -> share, largest first; empty with a note
    method: str
    note: str | None = None  # why there are none
    caveats: tuple[str, ...] = ()  # the evaluator's own warnings, e.g. too few trials somewhere
    constant: tuple[str, ...] = ()  # parameters with one value in every trial: left out


@dataclass(frozen=True)
class ParamAxis:
    """One hyperparameter's values over some trials, and how to lay it out on an axis."""

    name: str
    values: tuple[float | str, ...]  # categorical: the choice's label; else the number
    choices: tuple[str, ...] | None  # categorical: every label, in the distribution's order
    log: bool = False


@dataclass(frozen=True)
class ParallelInfo:
    objective: str
    numbers: tuple[int, ...]
    objective_values: tuple[float, ...]
    axes: tuple[ParamAxis, ...]  # parameters every complete trial has
    omitted: tuple[str, ...]  # conditional parameters (not in every trial)


@dataclass(frozen=True)
class SlicePanel:
    axis: ParamAxis
    numbers: tuple[int, ...]  # the complete trials that have this parameter
    objective_values: tuple[float, ...]


@dataclass(frozen=True)
class SliceInfo:
    objective: str
    panels: tuple[SlicePanel, ...]


@dataclass(frozen=True)
class Curve:
    """Validation loss per epoch of one trial."""

    number: int
    name: str
    state: str  # COMPLETE or PRUNED
    epochs: tuple[int, ...]
    val_losses: tuple[float, ...]
    baseline: bool
    pruned_at_epoch: int | None


@dataclass(frozen=True)
class LearningCurvesInfo:
    curves: tuple[Curve, ...]
    max_epochs: int | None  # the study's epoch budget, so a cut-short curve looks short


@dataclass(frozen=True)
class ParetoInfo:
    objectives: tuple[str, str]
    numbers: tuple[int, ...]  # every complete trial
    x: tuple[float, ...]
    y: tuple[float, ...]
    front: tuple[int, ...]  # trial numbers on the front, in order of the first objective
    baseline_number: int | None


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


# --- collecting ---------------------------------------------------------------------------


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(trials, key=lambda t: t.number)


def _objectives(study: optuna.Study) -> tuple[str, ...]:
    names = tuple(str(study.user_attrs.get("objectives", "val_loss")).split(","))
    if len(names) != len(study.directions):
        names = tuple(f"objective {i}" for i in range(len(study.directions)))
    return names


def _label(objective: str) -> str:
    return OBJECTIVE_LABELS.get(objective, objective)


def _is_grid(study: optuna.Study) -> bool:
    return study.user_attrs.get("kind") == "grid"


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    """The grid's baseline run with the lowest validation loss, or a search's trial 0."""
    complete = _complete(study)
    if _is_grid(study):
        runs = [t for t in complete if t.user_attrs.get("variant") == BASELINE_VARIANT]
        return min(runs, key=lambda t: t.values[0]) if runs else None
    if "baseline_trial" not in study.user_attrs:
        return None  # not a study cso made: no trial is known to be a baseline
    number = study.user_attrs["baseline_trial"]
    return next((t for t in complete if t.number == number), None)


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


def _collect_summary_info(study: optuna.Study) -> SummaryInfo:
    from calling_score_opt.trials import best_trials, trial_row

    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    complete = _require_complete(study)
    multi = len(study.directions) > 1
    best = best_trials(study) if multi else sorted(complete, key=lambda t: t.values[0])[:TOP_TRIALS]
    baseline = baseline_trial(study)
    base_test = baseline.user_attrs.get("test_loss") if baseline is not None else None

    def is_base(trial: FrozenTrial) -> bool:
        return baseline is not None and trial.number == baseline.number

    def row(trial: FrozenTrial, role: str) -> SummaryRow:
        line = trial_row(trial)
        test = line["test_loss"]
        vs_baseline = (
            (base_test - test) / base_test * 100
            if base_test and test is not None and not is_base(trial)
            else None
        )
        return SummaryRow(
            number=trial.number,
            name=line["name"],
            role=role,
            values=tuple(trial.values),
            val_loss=line["val_loss"],
            test_loss=test,
            test_vs_baseline_pct=vs_baseline,
            epochs=line["epochs"],
            params=line["params"],
        )

    role = "Pareto front" if multi else "best"
    rows = [row(t, f"{role}, baseline" if is_base(t) else role) for t in best]
    if baseline is not None and not any(is_base(t) for t in best):
        rows.append(row(baseline, "baseline"))
    return SummaryInfo(
        study_name=study.study_name,
        kind=str(study.user_attrs.get("kind", "unknown")),
        objectives=_objectives(study),
        counts=counts,
        data_path=study.user_attrs.get("data_path"),
        rows=tuple(rows),
    )


def _collect_history_info(study: optuna.Study) -> HistoryInfo:
    complete = _require_complete(study)
    values = [t.values[0] for t in complete]
    best_so_far = list(itertools.accumulate(values, min))
    baseline = baseline_trial(study)
    return HistoryInfo(
        objective=_objectives(study)[0],
        numbers=tuple(t.number for t in complete),
        values=tuple(values),
        best_so_far=tuple(best_so_far),
        baseline_number=baseline.number if baseline is not None else None,
    )


IMPORTANCE_METHOD = "PED-ANOVA (as optuna-dashboard)"


def _collect_importance_info(study: optuna.Study) -> ImportanceInfo:
    """Importances of the parameters for the first objective (validation loss).

    PED-ANOVA needs no extra library (fANOVA needs scikit-learn) and has no randomness, and it
    is what ``cso dashboard`` shows, so the two agree.
    """
    from optuna.exceptions import ExperimentalWarning
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    complete = _require_complete(study)
    names = _param_order(complete)
    # A parameter no trial changed explains nothing; PED-ANOVA would still give it a share.
    varying = [n for n in names if len({repr(t.params.get(n)) for t in complete}) > 1]
    constant = tuple(n for n in names if n not in varying)
    if len(complete) < 2 or not varying:
        return ImportanceInfo(
            {},
            IMPORTANCE_METHOD,
            f"needs at least 2 complete trials whose parameters differ; the study has "
            f"{len(complete)} complete trial(s)",
            constant=constant,
        )
    target: Callable[[FrozenTrial], float] | None = None
    if len(study.directions) > 1:
        target = _first_value
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            raw = get_param_importances(
                study,
                evaluator=PedAnovaImportanceEvaluator(),
                params=varying,
                target=target,
                normalize=True,
            )
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return ImportanceInfo({}, IMPORTANCE_METHOD, f"cannot be computed for this study ({exc})")
    caveats = tuple(
        dict.fromkeys(
            str(w.message)
            for w in caught
            # PED-ANOVA's note that it ranks for low target values: validation loss is minimised
            if not issubclass(w.category, ExperimentalWarning)
            and "PedAnovaImportanceEvaluator computes" not in str(w.message)
        )
    )
    importances = {k: float(v) for k, v in raw.items() if math.isfinite(v)}
    if not importances or sum(importances.values()) <= 0:
        return ImportanceInfo(
            {},
            IMPORTANCE_METHOD,
            "every parameter scored zero: the trials differ too little",
            caveats,
            constant,
        )
    ordered = dict(sorted(importances.items(), key=lambda kv: (-kv[1], kv[0])))
    return ImportanceInfo(ordered, IMPORTANCE_METHOD, None, caveats, constant)


def _first_value(trial: FrozenTrial) -> float:
    return float(trial.values[0])


def _param_order(trials: Sequence[FrozenTrial]) -> list[str]:
    order: list[str] = []
    for trial in trials:
        order.extend(name for name in trial.params if name not in order)
    return order


def _param_axis(name: str, trials: Sequence[FrozenTrial]) -> ParamAxis:
    from optuna.distributions import CategoricalDistribution

    distribution = next(t.distributions[name] for t in trials if name in t.distributions)
    if isinstance(distribution, CategoricalDistribution):
        return ParamAxis(
            name=name,
            values=tuple(str(t.params[name]) for t in trials),
            choices=tuple(str(c) for c in distribution.choices),
        )
    return ParamAxis(
        name=name,
        values=tuple(float(t.params[name]) for t in trials),
        choices=None,
        log=bool(getattr(distribution, "log", False)),
    )


def _collect_parallel_info(study: optuna.Study) -> ParallelInfo:
    complete = _require_complete(study)
    names = _param_order(complete)
    shared = [n for n in names if all(n in t.params for t in complete)]
    return ParallelInfo(
        objective=_objectives(study)[0],
        numbers=tuple(t.number for t in complete),
        objective_values=tuple(t.values[0] for t in complete),
        axes=tuple(_param_axis(name, complete) for name in shared),
        omitted=tuple(n for n in names if n not in shared),
    )


def _collect_slice_info(study: optuna.Study) -> SliceInfo:
    complete = _require_complete(study)
    panels = []
    for name in _param_order(complete):
        having = [t for t in complete if name in t.params]
        panels.append(
            SlicePanel(
                axis=_param_axis(name, having),
                numbers=tuple(t.number for t in having),
                objective_values=tuple(t.values[0] for t in having),
            )
        )
    return SliceInfo(objective=_objectives(study)[0], panels=tuple(panels))


def _collect_learning_curves_info(study: optuna.Study) -> LearningCurvesInfo:
    from optuna.trial import TrialState

    baseline = baseline_trial(study)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    curves = []
    for trial in sorted(trials, key=lambda t: t.number):
        points = sorted(
            (step, value) for step, value in _val_losses(trial).items() if math.isfinite(value)
        )
        if not points:
            continue
        is_baseline = baseline is not None and (
            trial.number == baseline.number
            or (_is_grid(study) and trial.user_attrs.get("variant") == BASELINE_VARIANT)
        )
        pruned = trial.state == TrialState.PRUNED
        curves.append(
            Curve(
                number=trial.number,
                name=trial_name(trial),
                state=trial.state.name,
                epochs=tuple(int(s) for s, _ in points),
                val_losses=tuple(float(v) for _, v in points),
                baseline=is_baseline,
                pruned_at_epoch=(
                    int(trial.user_attrs.get("pruned_at_epoch", points[-1][0])) if pruned else None
                ),
            )
        )
    epochs = study.user_attrs.get("epochs")
    return LearningCurvesInfo(tuple(curves), int(epochs) if isinstance(epochs, int) else None)


def _val_losses(trial: FrozenTrial) -> dict[int, float]:
    """Validation loss per epoch: the reported values, else a ``val_losses`` list attribute.

    Optuna accepts no reports from a multi-objective trial, so such a study can only keep
    its curves as an attribute.
    """
    if trial.intermediate_values:
        return dict(trial.intermediate_values)
    listed = trial.user_attrs.get("val_losses")
    if isinstance(listed, list):
        return {epoch: float(v) for epoch, v in enumerate(listed, start=1) if v is not None}
    return {}


def _collect_pareto_info(study: optuna.Study) -> ParetoInfo | None:
    """Every complete trial's first two objectives and the Pareto front; None: one objective."""
    if len(study.directions) < 2:
        return None
    from calling_score_opt.trials import best_trials

    complete = _require_complete(study)
    front = sorted(best_trials(study), key=lambda t: (t.values[0], t.values[1]))
    baseline = baseline_trial(study)
    names = _objectives(study)
    return ParetoInfo(
        objectives=(names[0], names[1]),
        numbers=tuple(t.number for t in complete),
        x=tuple(t.values[0] for t in complete),
        y=tuple(t.values[1] for t in complete),
        front=tuple(t.number for t in front),
        baseline_number=baseline.number if baseline is not None else None,
    )


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
    baseline_runs = runs.get(BASELINE_VARIANT)
    base_mean_test = (
        statistics.fmean(t.user_attrs["test_loss"] for t in baseline_runs)
        if baseline_runs
        else None
    )
    errors = variant_errors.errors if variant_errors is not None else {}
    seed = variant_errors.seed if variant_errors is not None else 0
    base_errors = errors.get(BASELINE_VARIANT)
    summary_bootstrap = _results_bootstrap(study, grid_results)
    bars = []
    for name, trials in runs.items():
        val = [float(t.user_attrs["val_loss"]) for t in trials]
        test = [float(t.user_attrs["test_loss"]) for t in trials]
        mean_test = statistics.fmean(test)
        bootstrap_pct: float | None = None
        ci: tuple[float, float] | None = None
        if name != BASELINE_VARIANT and base_errors is not None and name in errors:
            improvement = paired_bootstrap_improvement(
                base_errors,
                errors[name],
                resamples=BOOTSTRAP_RESAMPLES,
                seed=seed,
            )
            bootstrap_pct, ci = improvement.percent, (improvement.ci_low, improvement.ci_high)
        elif summary_bootstrap is not None and summary_bootstrap[0] == name:
            bootstrap_pct, ci = summary_bootstrap[1], summary_bootstrap[2]
        bars.append(
            VariantBar(
                name=name,
                baseline=name == BASELINE_VARIANT,
                repeats=len(trials),
                val_loss=statistics.fmean(val),
                test_loss=mean_test,
                val_loss_std=statistics.stdev(val) if len(val) > 1 else None,
                test_loss_std=statistics.stdev(test) if len(test) > 1 else None,
                improvement_pct=(
                    (base_mean_test - mean_test) / base_mean_test * 100
                    if base_mean_test and name != BASELINE_VARIANT
                    else None
                ),
                bootstrap_pct=bootstrap_pct,
                ci95_pct=ci,
            )
        )
    return GridInfo(
        variants=tuple(bars),
        baseline=BASELINE_VARIANT if baseline_runs else None,
        interval_note=_interval_note(bars, variant_errors, summary_bootstrap, bool(baseline_runs)),
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


def load_variant_errors(
    study: optuna.Study,
    storage_url: str,
    artifact_dir: Path | None = None,
    data_path: Path | None = None,
    target: str | None = None,
) -> VariantErrors:
    """Rebuild each grid variant's exported run from its stored weights and score the test split.

    Never raises for missing pieces: a missing data file, other data, or missing weights give
    a ``note`` (and no errors for the variants concerned), so the report is still written.
    """
    import torch

    from calling_score_opt.data import load_dataset, split_dataset
    from calling_score_opt.study import default_artifact_dir, read_checkpoint
    from calling_score_opt.train import load_checkpoint

    attrs = study.user_attrs
    seed = int(attrs.get("split_seed", 0))
    path = data_path or (Path(attrs["data_path"]) if "data_path" in attrs else None)
    if path is None:
        return VariantErrors(seed=seed, note="the study does not record its data file")
    if not path.exists():
        return VariantErrors(seed=seed, note=f"the study's data file {path} is missing")
    try:
        dataset = load_dataset(path, target)
    except CsoError as exc:
        return VariantErrors(seed=seed, note=str(exc))
    if dataset.fingerprint != attrs.get("data_fingerprint"):
        return VariantErrors(seed=seed, note=f"{path} is not the data this study was trained on")
    split = split_dataset(dataset, seed)
    directory = artifact_dir or default_artifact_dir(storage_url, study.study_name)
    if not directory.is_dir():
        return VariantErrors(seed=seed, note=f"the stored weights' folder {directory} is missing")
    from optuna.artifacts import FileSystemArtifactStore

    store = FileSystemArtifactStore(str(directory))
    y = split.y_test.astype(np.float64).reshape(-1)
    x = torch.from_numpy(split.x_test)
    errors: dict[str, F64] = {}
    missing: list[str] = []
    for name, runs in _grid_runs(study).items():
        try:
            model, _, _ = load_checkpoint(
                read_checkpoint(store, study._storage, _exported_run(runs))
            )
        except CsoError:
            missing.append(name)
            continue
        with torch.no_grad():
            predicted = model(x).numpy().astype(np.float64).reshape(-1)
        errors[name] = (predicted - y) ** 2
    note = f"no stored weights for {', '.join(missing)}" if missing else None
    return VariantErrors(errors=errors, seed=seed, note=note)


# --- drawing ------------------------------------------------------------------------------

_TEMPLATE = "plotly_white"
_BASELINE_COLOR = "#222222"
_COLORS = {"val": "#4c78a8", "test": "#f58518", "pruned": "#e45756", "complete": "#72b7b2"}


def _wide(values: Sequence[float]) -> bool:
    """A log axis pays off when positive values span more than a decade."""
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 1 and max(positive) / min(positive) > 10


def _integer_step(largest: float) -> int:
    """A tick step for an axis of whole numbers (trials, epochs): no ticks between them."""
    return max(1, math.ceil(largest / 12))


def _draw_history(info: HistoryInfo) -> go.Figure:
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=info.numbers,
            y=info.values,
            mode="markers",
            name="trial",
            marker={"color": _COLORS["val"], "size": 8},
            hovertemplate="trial %{x}<br>%{y:.5g}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=info.numbers,
            y=info.best_so_far,
            mode="lines",
            name="best so far",
            line={"color": _COLORS["test"], "shape": "hv"},
        )
    )
    if info.baseline_number is not None:
        index = info.numbers.index(info.baseline_number)
        fig.add_trace(
            go.Scatter(
                x=[info.baseline_number],
                y=[info.values[index]],
                mode="markers",
                name="baseline",
                marker={"color": _BASELINE_COLOR, "symbol": "star", "size": 14},
            )
        )
    fig.update_xaxes(dtick=_integer_step(max(info.numbers)))
    fig.update_layout(
        xaxis_title="trial",
        yaxis_title=_label(info.objective),
        yaxis_type="log" if _wide(info.values) else "linear",
    )
    return fig


def _draw_importances(info: ImportanceInfo) -> go.Figure:
    import plotly.graph_objects as go

    names = list(info.importances)[::-1]  # largest on top
    fig = go.Figure(
        go.Bar(
            x=[info.importances[n] for n in names],
            y=names,
            orientation="h",
            marker_color=_COLORS["val"],
            text=[f"{info.importances[n]:.2f}" for n in names],
            textposition="outside",
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis_title=f"importance for the validation loss ({info.method})",
        xaxis_range=[0, max(info.importances.values()) * 1.15],
        height=max(260, 60 + 40 * len(names)),
    )
    return fig


def _axis_dimension(axis: ParamAxis) -> dict[str, Any]:
    """A parcoords dimension: categories as positions, log parameters on a log10 scale."""
    if axis.choices is not None:
        positions = [axis.choices.index(str(v)) for v in axis.values]
        return {
            "label": axis.name,
            "values": positions,
            "tickvals": list(range(len(axis.choices))),
            "ticktext": list(axis.choices),
            "range": [0, max(len(axis.choices) - 1, 1)],
        }
    numbers = [float(v) for v in axis.values]
    if axis.log and min(numbers) > 0:
        logs = [math.log10(v) for v in numbers]
        ticks = list(np.linspace(min(logs), max(logs), 5)) if max(logs) > min(logs) else logs[:1]
        return {
            "label": f"{axis.name} (log)",
            "values": logs,
            "tickvals": ticks,
            "ticktext": [f"{10**t:.3g}" for t in ticks],
        }
    return {"label": axis.name, "values": numbers}


def _draw_parallel(info: ParallelInfo) -> go.Figure:
    import plotly.graph_objects as go

    dimensions = [{"label": _label(info.objective), "values": list(info.objective_values)}]
    dimensions += [_axis_dimension(axis) for axis in info.axes]
    fig = go.Figure(
        go.Parcoords(
            dimensions=dimensions,
            line={
                "color": list(info.objective_values),
                "colorscale": "Viridis",
                "reversescale": True,  # the best (lowest) trials in the brightest colour
                "showscale": True,
                "colorbar": {"title": {"text": "val loss"}},
            },
            labelangle=-20,
        )
    )
    fig.update_layout(margin={"l": 80, "r": 80, "t": 90, "b": 40})
    return fig


def _draw_slices(info: SliceInfo) -> go.Figure:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots  # type: ignore[import-untyped]

    per_row = min(4, len(info.panels))
    rows = math.ceil(len(info.panels) / per_row)
    fig = make_subplots(
        rows=rows,
        cols=per_row,
        shared_yaxes=True,
        subplot_titles=[p.axis.name for p in info.panels],
        horizontal_spacing=0.04,
        vertical_spacing=0.18 / rows,
    )
    for index, panel in enumerate(info.panels):
        row, col = divmod(index, per_row)
        fig.add_trace(
            go.Scatter(
                x=list(panel.axis.values),
                y=list(panel.objective_values),
                mode="markers",
                name=panel.axis.name,
                showlegend=False,
                customdata=list(panel.numbers),
                marker={
                    "color": list(panel.numbers),
                    "coloraxis": "coloraxis",
                    "size": 8,
                    "line": {"width": 0.5, "color": "white"},
                },
                hovertemplate="trial %{customdata}<br>%{x}<br>%{y:.5g}<extra></extra>",
            ),
            row=row + 1,
            col=col + 1,
        )
        if panel.axis.choices is not None:
            fig.update_xaxes(
                type="category",
                categoryorder="array",
                categoryarray=list(panel.axis.choices),
                row=row + 1,
                col=col + 1,
            )
        elif panel.axis.log:
            fig.update_xaxes(type="log", row=row + 1, col=col + 1)
    fig.update_yaxes(title_text=_label(info.objective), row=1, col=1)
    fig.update_layout(
        coloraxis={"colorscale": "Blues", "colorbar": {"title": {"text": "trial"}}},
        height=330 * rows,
    )
    return fig


def _draw_learning_curves(info: LearningCurvesInfo) -> go.Figure:
    import plotly.graph_objects as go

    fig = go.Figure()
    shown: set[str] = set()
    for curve in info.curves:
        if curve.baseline:
            group, color, width, dash = "baseline", _BASELINE_COLOR, 3.0, "solid"
        elif curve.state == "PRUNED":
            group, color, width, dash = "pruned", _COLORS["pruned"], 1.5, "dot"
        else:
            group, color, width, dash = "complete", _COLORS["complete"], 1.5, "solid"
        end = "x" if curve.state == "PRUNED" else "circle"
        fig.add_trace(
            go.Scatter(
                x=list(curve.epochs),
                y=list(curve.val_losses),
                mode="lines+markers",
                name=group,
                legendgroup=group,
                showlegend=group not in shown,
                line={"color": color, "width": width, "dash": dash},
                marker={
                    "size": [0] * (len(curve.epochs) - 1) + [10 if end == "x" else 6],
                    "symbol": end,
                    "color": color,
                },
                hovertemplate=(
                    f"{html.escape(curve.name)} ({curve.state.lower()})"
                    "<br>epoch %{x}<br>val loss %{y:.5g}<extra></extra>"
                ),
            )
        )
        shown.add(group)
    all_losses = [v for c in info.curves for v in c.val_losses]
    fig.update_layout(
        xaxis_title="epoch",
        yaxis_title="validation loss (MSE)",
        yaxis_type="log" if _wide(all_losses) else "linear",
        height=520,
    )
    last = info.max_epochs or max(e for c in info.curves for e in c.epochs)
    fig.update_xaxes(range=[0.5, last + 0.5], dtick=_integer_step(last))
    return fig


def _draw_pareto(info: ParetoInfo) -> go.Figure:
    import plotly.graph_objects as go

    front = set(info.front)
    position = {n: i for i, n in enumerate(info.numbers)}
    others = [i for i, n in enumerate(info.numbers) if n not in front]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[info.x[i] for i in others],
            y=[info.y[i] for i in others],
            mode="markers",
            name="trial",
            customdata=[info.numbers[i] for i in others],
            marker={"color": "#bbbbbb", "size": 8},
            hovertemplate="trial %{customdata}<br>%{x:.5g}, %{y:.5g}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[info.x[position[n]] for n in info.front],
            y=[info.y[position[n]] for n in info.front],
            mode="lines+markers",
            name="Pareto front",
            customdata=list(info.front),
            line={"color": _COLORS["pruned"], "shape": "hv"},
            marker={"size": 10},
            hovertemplate="trial %{customdata}<br>%{x:.5g}, %{y:.5g}<extra></extra>",
        )
    )
    if info.baseline_number is not None:
        i = position[info.baseline_number]
        fig.add_trace(
            go.Scatter(
                x=[info.x[i]],
                y=[info.y[i]],
                mode="markers",
                name="baseline",
                marker={"color": _BASELINE_COLOR, "symbol": "star", "size": 14},
            )
        )
    fig.update_layout(
        xaxis_title=_label(info.objectives[0]),
        yaxis_title=_label(info.objectives[1]),
        yaxis_type="log" if _wide(info.y) else "linear",
    )
    return fig


def _draw_grid(info: GridInfo) -> go.Figure:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = [b.name for b in info.variants]
    labels = [
        f"{n} (baseline)" if b.baseline else n for n, b in zip(names, info.variants, strict=True)
    ]
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
                    (b.ci95_pct[1] - p) if b.ci95_pct and p is not None else 0.0
                    for b, p in zip(shown, points, strict=True)
                ],
                "arrayminus": [
                    (p - b.ci95_pct[0]) if b.ci95_pct and p is not None else 0.0
                    for b, p in zip(shown, points, strict=True)
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
table { border-collapse: collapse; font-size: 14px; } th, td { padding: 4px 10px;
       border-bottom: 1px solid #eee; text-align: right; } th { background: #f4f4f4; }
td.text, th.text { text-align: left; } tr.baseline td { font-weight: 600; }
div.plot { min-height: 300px; }
"""


def _fmt(value: float | None, digits: str = ".5f") -> str:
    return "" if value is None else format(value, digits)


def _summary_html(info: SummaryInfo) -> str:
    extra = [_label(o) for o in info.objectives[1:]]
    head = ["role", "trial", "name", "val loss", "test loss", "test vs baseline", *extra]
    head += ["epochs", "parameters"]
    text_columns = {"role", "name", "parameters"}
    cells = "".join(
        f'<th class="{"text" if h in text_columns else "num"}">{html.escape(h)}</th>' for h in head
    )
    lines = [f"<table><thead><tr>{cells}</tr></thead><tbody>"]
    for row in info.rows:
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.params.items()
        )
        values = [
            row.role,
            str(row.number),
            row.name,
            _fmt(row.val_loss),
            _fmt(row.test_loss),
            _fmt(row.test_vs_baseline_pct, "+.2f")
            + ("%" if row.test_vs_baseline_pct is not None else ""),
            *[f"{v:.6g}" for v in row.values[1:]],
            "" if row.epochs is None else str(row.epochs),
            params,
        ]
        tds = "".join(
            f'<td class="{"text" if h in text_columns else "num"}">{html.escape(v)}</td>'
            for h, v in zip(head, values, strict=True)
        )
        css = ' class="baseline"' if "baseline" in row.role else ""
        lines.append(f"<tr{css}>{tds}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


_SECTIONS: dict[str, tuple[str, str]] = {
    "grid": (
        "Variants against the baseline",
        "Each documented variant's validation and test loss; the baseline has a dark outline and "
        "dashed lines. Below: how much lower each variant's test MSE is, with its interval; an "
        "interval that crosses zero means the difference is within noise.",
    ),
    "history": (
        "Optimization history",
        "The validation loss of every complete trial, in the order they were started, and the "
        "best so far.",
    ),
    "learning-curves": (
        "Learning curves",
        "Validation loss per epoch of every trial. Pruned trials are dotted and end in a cross "
        "where the pruner stopped them.",
    ),
    "importances": (
        "Hyperparameter importances",
        "How much each parameter decides whether a trial reaches a low validation loss.",
    ),
    "parallel": (
        "Parallel coordinates",
        "One line per complete trial through its parameters, coloured by validation loss "
        "(brightest is best). Drag along an axis to filter.",
    ),
    "slices": (
        "Slice plots",
        "The validation loss against each parameter on its own; darker points are later trials.",
    ),
    "pareto": (
        "Pareto front",
        "Validation loss against the second objective; the front holds the trials no other "
        "trial beats on both.",
    ),
}


def _figure_html(fig: go.Figure, div_id: str) -> str:
    import plotly.io as pio  # type: ignore[import-untyped]

    if fig.layout.height is None:
        fig.update_layout(height=450)
    fig.update_layout(template=_TEMPLATE, margin_t=fig.layout.margin.t or 50)
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
    grid_results: Mapping[str, Any] | None = None,
    variant_errors: VariantErrors | None = None,
) -> tuple[str, tuple[str, ...], dict[str, str]]:
    """The report's HTML, the ids of its plots and the notes of sections without one."""
    import plotly.offline  # type: ignore[import-untyped]

    summary = _collect_summary_info(study)
    sections: list[tuple[str, go.Figure | str]] = []  # a figure, or why there is none
    grid = _collect_grid_info(study, variant_errors, grid_results)
    if grid is not None:
        sections.append(("grid", _draw_grid(grid)))
    sections.append(("history", _draw_history(_collect_history_info(study))))
    curves = _collect_learning_curves_info(study)
    no_curves = (
        "Optuna takes no per-epoch reports from a study with several objectives, and its "
        "trials keep no val_losses attribute"
        if len(study.directions) > 1
        else "no trial reported a validation loss per epoch"
    )
    sections.append(
        ("learning-curves", _draw_learning_curves(curves) if curves.curves else no_curves)
    )
    importance = _collect_importance_info(study)
    sections.append(
        (
            "importances",
            _draw_importances(importance) if importance.importances else str(importance.note),
        )
    )
    parallel = _collect_parallel_info(study)
    sections.append(
        ("parallel", _draw_parallel(parallel) if parallel.axes else "the trials share no parameter")
    )
    slices = _collect_slice_info(study)
    sections.append(
        ("slices", _draw_slices(slices) if slices.panels else "the trials have no parameter")
    )
    pareto = _collect_pareto_info(study)
    if pareto is not None:
        sections.append(("pareto", _draw_pareto(pareto)))

    plots: list[str] = []
    notes: dict[str, str] = {}
    body = [_header_html(summary), "<h2>Summary</h2>", _summary_html(summary)]
    if grid is not None:
        body.append(f'<p class="how">Bootstrap intervals: {html.escape(grid.interval_note)}.</p>')
    remarks = {  # below a section's plot
        "parallel": [f"Left out (not every trial has them): {', '.join(parallel.omitted)}."]
        if parallel.omitted
        else [],
        "importances": [f"Caveat: {c}" for c in importance.caveats]
        + (
            [f"Left out (the same in every trial): {', '.join(importance.constant)}."]
            if importance.constant
            else []
        ),
    }
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


def _header_html(info: SummaryInfo) -> str:
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(info.counts.items()))
    objectives = " and ".join(_label(o) for o in info.objectives)
    meta = [
        f"{info.kind} study",
        f"minimising {objectives}",
        f"trials: {counts}",
    ]
    if info.data_path:
        meta.append(f"data: {info.data_path}")
    meta.append(f"made by cso {__version__}")
    return (
        f"<h1>Study '{html.escape(info.study_name)}'</h1>"
        f'<p class="meta">{html.escape(" | ".join(meta))}</p>'
    )


def write_report(
    study: optuna.Study,
    output_path: Path,
    grid_results: Mapping[str, Any] | None = None,
    variant_errors: VariantErrors | None = None,
) -> ReportOutcome:
    """Write the study's report to ``output_path`` (atomically) as one self-contained HTML file.

    ``grid_results`` (a grid's optimization_results.json) and ``variant_errors``
    (:func:`load_variant_errors`) only matter for grid studies: they give the bootstrap
    intervals of the variants' bar chart.

    Raises:
        StudyError: the study has no complete trial.
    """
    page, plots, notes = render_report(study, grid_results, variant_errors)
    write_text_atomic(output_path, page)
    return ReportOutcome(path=output_path, plots=plots, notes=notes)
