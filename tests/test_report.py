"""``cso report``: the numbers behind cso's plots, Optuna's figures on the right trials, the
HTML file, and the command.

The studies are tiny and built once per test session (the browser test reuses them): a grid of
4 variants, a grid with 2 repeats, a search with a pruned trial, a two-objective search, and a
hand-made study (no training) with stored learning curves and an ensemble.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import typer
from helpers import assert_clean_failure, files_under
from optuna.distributions import CategoricalDistribution
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
from optuna.trial import TrialState
from typer.testing import CliRunner, Result

from calling_score_opt import report as rpt
from calling_score_opt.errors import StudyError
from calling_score_opt.grid import GridSettings, run_grid
from calling_score_opt.report_cli import report as report_command
from calling_score_opt.search import SearchSettings, run_search
from calling_score_opt.space import VARIANTS
from calling_score_opt.study import (
    BASELINE_ATTR,
    ENSEMBLE_STEM,
    artifact_store,
    storage_of,
    store_learning_curve,
    store_study_json,
)
from calling_score_opt.study import hide_password as _hide_password
from calling_score_opt.synth import write_synthetic
from calling_score_opt.trials import learning_curve, load_study

GRID_EPOCHS = 3
SEARCH_EPOCHS = 8  # the median pruner waits 5 epochs (and 5 complete trials) before it prunes
GRID_VARIANTS = 4  # the baseline and three learning rates


# --- tiny studies, built once per session ----------------------------------------------------


@dataclass(frozen=True)
class Built:
    """A study on disk: where it is and what made it."""

    root: Path
    name: str
    storage: str
    data: Path

    @property
    def results(self) -> Path:
        return self.root / "out" / "optimization_results.json"

    @property
    def artifacts(self) -> Path:
        return self.root / "studies" / f"{self.name}.artifacts"

    def load(self) -> optuna.Study:
        return load_study(self.storage, self.name)


def _built(root: Path, name: str, build: Callable[[Path, Path, str], None]) -> Built:
    """Build a study under ``root`` unless an earlier test module already did."""
    storage = f"sqlite:///{root}/studies/{name}.db"
    data = root / "tiny.json"
    if not (root / "done").exists():
        root.mkdir(parents=True, exist_ok=True)
        write_synthetic(data, 200, 7)
        build(root, data, storage)
        (root / "done").touch()
    return Built(root=root, name=name, storage=storage, data=data)


def _grid(root: Path, data: Path, storage: str, repeats: int, variants: int) -> None:
    run_grid(
        GridSettings(
            data_path=data,
            output_dir=root / "out",
            max_variants=variants,
            epochs=GRID_EPOCHS,
            repeats=repeats,
            jobs=1,
            storage_url=storage,
        )
    )


def _continuous(lr: float, batch: int, units: tuple[int, ...], dropout: float) -> dict[str, Any]:
    params: dict[str, Any] = {
        "learning_rate": lr,
        "batch_size": batch,
        "n_layers": len(units),
        "dropout": dropout,
        "pair_features": False,
    }
    params.update({f"units_l{i}": u for i, u in enumerate(units)})
    return params


#: Four configurations that learn fast on the tiny data and one that barely moves: after the
#: baseline and these four, the median pruner must stop the fifth (trial 5).
GOOD = [
    _continuous(0.005, 16, (128, 64), 0.1),
    _continuous(0.002, 16, (128, 64), 0.2),
    _continuous(0.005, 32, (128, 64), 0.1),
    _continuous(0.002, 32, (256, 128), 0.2),
]
BAD = _continuous(0.0001, 128, (96, 48), 0.4)


def _pruned_search(root: Path, data: Path, storage: str) -> None:
    settings = SearchSettings(
        data_path=data, trials=1, epochs=SEARCH_EPOCHS, storage_url=storage, study_name="search"
    )
    run_search(settings)
    study = optuna.load_study(study_name="search", storage=storage)
    for params in [*GOOD, BAD]:
        study.enqueue_trial(params)
    run_search(
        SearchSettings(
            data_path=data, trials=8, epochs=SEARCH_EPOCHS, storage_url=storage, study_name="search"
        )
    )


def _pareto_search(root: Path, data: Path, storage: str) -> None:
    run_search(
        SearchSettings(
            data_path=data,
            trials=6,
            epochs=3,
            objectives="val_loss,params",
            storage_url=storage,
            study_name="pareto",
        )
    )


#: The hand-made study: (learning rate, batch size, final validation loss); None: pruned.
HANDMADE_EPOCHS = 6
HANDMADE_PRUNED_AT = 3
HANDMADE = [
    (0.001, 32, 0.030),  # trial 0, the baseline
    (0.003, 16, 0.020),
    (0.010, 64, 0.025),
    (0.002, 16, 0.018),  # the best
    (0.050, 64, 0.040),
    (0.0002, 32, None),  # pruned after HANDMADE_PRUNED_AT epochs
    (0.004, 32, 0.022),
]
ENSEMBLE: dict[str, Any] = {
    "schema": "cso-ensemble/1",
    "created": "2026-12-02T15:00:00+00:00",
    "method": "greedy forward selection with replacement on validation predictions "
    "(Caruana et al., 2004)",
    "rounds": 10,
    "max_members": 8,
    "members": [
        {
            "trial": 3,
            "name": "trial_3",
            "weight": 0.5,
            "picks": 5,
            "val_loss": 0.018,
            "test_loss": 0.0189,
        },
        {
            "trial": 1,
            "name": "trial_1",
            "weight": 0.3,
            "picks": 3,
            "val_loss": 0.020,
            "test_loss": 0.021,
        },
        {
            "trial": 6,
            "name": "trial_6",
            "weight": 0.2,
            "picks": 2,
            "val_loss": 0.022,
            "test_loss": 0.0231,
        },
    ],
    "selection": [
        {"pick": i + 1, "trial": t, "val_loss": 0.018 - 0.0003 * min(i, 5)}
        for i, t in enumerate([3, 1, 6, 3, 1, 3, 6, 3, 1, 3])
    ],
    "val_loss": 0.0165,
    "test_loss": 0.0172,
    "best_single": {"trial": 3, "name": "trial_3", "val_loss": 0.018, "test_loss": 0.0189},
    "baseline": {"trial": 0, "name": "trial_0", "val_loss": 0.030, "test_loss": 0.0315},
    "vs_best_single": {
        "test_mse_improvement_pct": 9.0,
        "ci95_pct": [4.1, 13.2],
        "resamples": 2000,
        "verdict": "better",
    },
    "vs_baseline": {
        "test_mse_improvement_pct": 45.4,
        "ci95_pct": [-2.0, 60.1],
        "resamples": 2000,
        "verdict": "within noise",
    },
    "onnx_path": "assets/models/exported/calling_score_model_ensemble.onnx",
    "size_bytes": 123456,
}


def handmade_history(number: int) -> list[tuple[int, float, float]]:
    """(epoch, train loss, val loss): falling towards the trial's final validation loss."""
    final = HANDMADE[number][2] or 0.08
    epochs = HANDMADE_PRUNED_AT if HANDMADE[number][2] is None else HANDMADE_EPOCHS
    return [
        (e, final * 0.9 + 0.05 / e**2, final + 0.06 / e**2 - 0.06 / HANDMADE_EPOCHS**2)
        for e in range(1, epochs + 1)
    ]


def _handmade(root: Path, data: Path, storage: str) -> None:
    """Trials as cso search stores them (learning curves as artifacts), and an ensemble."""
    (root / "studies").mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="handmade", storage=storage)
    for key, value in {
        "kind": "search",
        "objectives": "val_loss",
        "epochs": HANDMADE_EPOCHS,
    }.items():
        study.set_user_attr(key, value)
    store = artifact_store(root / "studies" / "handmade.artifacts")
    for number, (lr, batch, final) in enumerate(HANDMADE):
        study.enqueue_trial({"learning_rate": lr, "batch_size": batch, "dropout": 0.1})
        trial = study.ask()
        trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("batch_size", [16, 32, 64])
        trial.suggest_float("dropout", 0.0, 0.5)
        history = handmade_history(number)
        store_learning_curve(store, trial, history)
        if number == 0:
            trial.set_user_attr(BASELINE_ATTR, True)
        if final is None:
            trial.set_user_attr("pruned_at_epoch", HANDMADE_PRUNED_AT)
            study.tell(trial, state=TrialState.PRUNED)
            continue
        for key, value in {
            "val_loss": final,
            "test_loss": final * 1.05,
            "epochs_run": len(history),
        }.items():
            trial.set_user_attr(key, value)
        study.tell(trial, final)
    store_study_json(store, study, ENSEMBLE_STEM, ENSEMBLE)


def built_handmade(base: Path) -> Built:
    return _built(base / "handmade", "handmade", _handmade)


def built_grid(base: Path) -> Built:
    return _built(
        base / "grid",
        "calling-score-grid",
        lambda r, d, s: _grid(r, d, s, repeats=1, variants=GRID_VARIANTS),
    )


def built_repeats(base: Path) -> Built:
    return _built(
        base / "repeats",
        "calling-score-grid",
        lambda r, d, s: _grid(r, d, s, repeats=2, variants=2),
    )


def built_search(base: Path) -> Built:
    return _built(base / "search", "search", _pruned_search)


def built_pareto(base: Path) -> Built:
    return _built(base / "pareto", "pareto", _pareto_search)


def studies_base(factory: pytest.TempPathFactory) -> Path:
    return factory.getbasetemp() / "report-studies"


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_grid(studies_base(tmp_path_factory))


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_search(studies_base(tmp_path_factory))


@pytest.fixture(scope="module")
def pareto(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_pareto(studies_base(tmp_path_factory))


@pytest.fixture(scope="module")
def handmade(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_handmade(studies_base(tmp_path_factory))


@pytest.fixture(scope="module")
def repeats(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_repeats(studies_base(tmp_path_factory))


def complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE,))


def results_of(built: Built) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(built.results.read_text(encoding="utf-8"))
    return document


# --- the summary table -----------------------------------------------------------------------


def test_summary_ranks_the_five_best_and_calls_only_the_first_best(search: Built) -> None:
    study = search.load()
    info = rpt._collect_summary_info(study)
    ranked = sorted(complete(study), key=lambda t: t.values[0])
    top = info.rows[: rpt.TOP_TRIALS]
    assert [r.number for r in top] == [t.number for t in ranked[: rpt.TOP_TRIALS]]
    assert [r.rank for r in top] == list(range(1, rpt.TOP_TRIALS + 1))
    assert [r for r in info.rows if "best" in r.role] == [info.rows[0]]
    assert info.kind == "search"
    assert sum(info.counts.values()) == 8 and info.counts["PRUNED"] >= 1
    assert info.counts["COMPLETE"] == len(ranked)
    baseline = next(r for r in info.rows if "baseline" in r.role)
    assert baseline.number == 0
    assert baseline.rank == 1 + [t.number for t in ranked].index(0)
    base_test = study.trials[0].user_attrs["test_loss"]
    for row in info.rows:
        assert row.number is not None
        trial = study.trials[row.number]
        assert row.val_loss == trial.user_attrs["val_loss"] == trial.values[0]
        assert row.test_loss == trial.user_attrs["test_loss"]
        if row.number == 0:
            assert row.test_vs_baseline_pct is None
        else:
            expected = (base_test - row.test_loss) / base_test * 100
            assert row.test_vs_baseline_pct == pytest.approx(expected)


def test_the_page_labels_rows_by_what_they_are(handmade: Built) -> None:
    rows = rpt._collect_summary_info(handmade.load()).rows
    assert [(r.rank, r.role, r.name) for r in rows[:3]] == [
        (1, "best", "trial_3"),
        (2, "", "trial_1"),
        (3, "", "trial_6"),
    ]
    page = rpt._summary_html(rpt._collect_summary_info(handmade.load()))
    roles = re.findall(
        r'<tr(?: class="[^"]*")?><td class="num">(\d*)</td><td class="text">([^<]*)', page
    )
    assert roles == [
        ("1", "best"),
        ("2", ""),
        ("3", ""),
        ("4", ""),
        ("5", "baseline"),  # trial 0 is fifth of six: among the top five, and named so
    ]


def test_a_grid_summary_names_variants_and_its_baseline(grid: Built) -> None:
    info = rpt._collect_summary_info(grid.load())
    names = [r.name for r in info.rows]
    assert sorted(names) == sorted(v.name for v in VARIANTS[:GRID_VARIANTS])
    assert [r.name for r in info.rows if "baseline" in r.role] == ["v1_0_baseline"]
    assert len([r for r in info.rows if "best" in r.role]) == 1


def test_a_two_objective_summary_is_the_pareto_front(pareto: Built) -> None:
    study = pareto.load()
    info = rpt._collect_summary_info(study)
    front = {t.number for t in study.best_trials}
    assert {r.number for r in info.rows if "Pareto front" in r.role} == front
    assert not any("best" in r.role for r in info.rows)  # no single best among several objectives
    assert info.objectives == ("val_loss", "params")
    for row in info.rows:
        assert row.number is not None
        assert row.values[1] == study.trials[row.number].user_attrs["parameters"]


# --- Optuna's figures: drawn from these trials ------------------------------------------------


def optuna_figure(study: optuna.Study, kind: str) -> Any:
    varying, _ = rpt._varying_params(complete(study))
    return rpt._optuna_figure(kind, study, rpt.objective_names(study), varying)


def test_history_is_optunas_with_the_trials_and_the_baseline(search: Built) -> None:
    study = search.load()
    fig = optuna_figure(study, "history")
    done = sorted(complete(study), key=lambda t: t.number)
    values = next(t for t in fig.data if t.name == "val_loss")
    assert list(values.x) == [t.number for t in done]
    assert list(values.y) == [t.values[0] for t in done]
    line = next(t for t in fig.data if t.name == "Best Value")  # over every trial number
    best = dict(zip(line.x, line.y, strict=True))
    assert [best[n] for n in values.x] == list(np.minimum.accumulate(values.y))
    star = next(t for t in fig.data if t.name == "baseline")
    assert (list(star.x), list(star.y)) == ([0], [study.trials[0].values[0]])
    assert 5 not in values.x  # the pruned trial has no value


def ped_anova(
    study: optuna.Study, params: list[str], target: Callable[[Any], float] | None = None
) -> dict[str, float]:
    """Optuna's own importances, as optuna-dashboard computes them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "computes the importances ... low values"
        return dict(
            get_param_importances(
                study, evaluator=PedAnovaImportanceEvaluator(), params=params, target=target
            )
        )


def importance_bars(fig: Any) -> dict[str, dict[str, float]]:
    return {t.name: dict(zip(t.y, t.x, strict=True)) for t in fig.data}


def test_importances_are_optunas_ped_anova_of_the_varying_parameters(search: Built) -> None:
    study = search.load()
    varying, constant = rpt._varying_params(complete(study))
    fig, _ = rpt._importance_figure(study, ("val_loss",), varying)
    bars = importance_bars(fig)["val_loss"]
    expected = ped_anova(study, varying)
    assert bars == pytest.approx(expected)
    assert sum(bars.values()) == pytest.approx(1.0)
    assert "learning_rate" in bars and not set(bars) & set(constant)
    done = complete(study)
    assert set(constant) == {n for n in done[0].params if len({t.params[n] for t in done}) == 1}
    again, _ = rpt._importance_figure(study, ("val_loss",), varying)
    assert importance_bars(again) == importance_bars(fig)  # no randomness


def test_a_one_factor_grid_gives_all_importance_to_the_factor(grid: Built) -> None:
    study = grid.load()
    varying, constant = rpt._varying_params(complete(study))
    assert varying == ["learning_rate"]
    assert set(constant) == {"batch_size", "hidden_sizes", "dropout"}
    fig, _ = rpt._importance_figure(study, ("val_loss",), varying)
    assert importance_bars(fig) == {"val_loss": {"learning_rate": pytest.approx(1.0)}}


def test_importances_of_two_objectives_are_labelled_with_their_names(pareto: Built) -> None:
    study = pareto.load()
    varying, _ = rpt._varying_params(complete(study))
    fig, _ = rpt._importance_figure(study, rpt.objective_names(study), varying)
    bars = importance_bars(fig)
    assert list(bars) == ["val_loss", "params"]
    for index, name in enumerate(("val_loss", "params")):
        expected = ped_anova(study, varying, lambda t, i=index: t.values[i])  # type: ignore[misc]
        assert bars[name] == pytest.approx(expected)


def test_importances_need_two_trials_and_say_so() -> None:
    study = optuna.create_study()
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 1.0},
            distributions={"x": optuna.distributions.FloatDistribution(0, 2)},
            value=0.5,
        )
    )
    note, _ = rpt._importance_figure(study, ("val_loss",), ["x"])
    assert isinstance(note, str) and "at least 2 complete trials" in note


def test_parallel_coordinates_draw_one_line_per_complete_trial(search: Built) -> None:
    study = search.load()
    varying, _ = rpt._varying_params(complete(study))
    fig = optuna_figure(study, "parallel")
    lines = [t for t in fig.data if t.mode == "lines" and t.customdata is not None]
    assert len(lines) == len(complete(study))
    assert list(fig.layout.xaxis.ticktext) == ["val_loss", *sorted(varying)]
    shown = sorted(float(line.customdata[0][1]) for line in lines)  # the objective's axis
    assert shown == pytest.approx(
        sorted(t.values[0] for t in complete(study)), rel=5e-3
    )  # 3 digits


def slice_points(fig: Any) -> dict[str, set[tuple[Any, float]]]:
    """Each slice panel's (parameter value, objective) points, by the panel's axis title."""
    points: dict[str, set[tuple[Any, float]]] = {}
    for trace in fig.data:
        axis = "xaxis" + (trace.xaxis or "x")[1:]
        param = fig.layout[axis].title.text
        points.setdefault(param, set()).update(zip(trace.x, trace.y, strict=True))
    return points


def test_slices_show_each_varying_parameter_against_the_loss(search: Built) -> None:
    study = search.load()
    varying, _ = rpt._varying_params(complete(study))
    points = slice_points(optuna_figure(study, "slices"))
    assert set(points) == set(varying)
    for name in varying:
        having = [t for t in complete(study) if name in t.params]
        categorical = isinstance(having[0].distributions[name], CategoricalDistribution)
        shown = {(str(t.params[name]) if categorical else t.params[name]) for t in having}
        assert {x for x, _ in points[name]} == shown
        assert points[name] == {
            (str(t.params[name]) if categorical else t.params[name], t.values[0]) for t in having
        }


def test_pareto_front_is_optunas_with_the_objective_names(pareto: Built) -> None:
    study = pareto.load()
    fig = optuna_figure(study, "pareto")
    assert (fig.layout.xaxis.title.text, fig.layout.yaxis.title.text) == ("val_loss", "params")
    best = next(t for t in fig.data if "Best Trial" in (t.hovertemplate or ""))
    assert set(zip(best.x, best.y, strict=True)) == {tuple(t.values) for t in study.best_trials}
    others = next(t for t in fig.data if "<extra>Trial</extra>" in (t.hovertemplate or ""))
    assert len(best.x) + len(others.x) == len(complete(study))
    star = next(t for t in fig.data if t.name == "baseline")
    assert (star.x[0], star.y[0]) == tuple(study.trials[0].values)


def test_optunas_metric_names_win_over_the_objectives_attribute() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.set_user_attr("objectives", "val_loss,params")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_loss", "latency"])
    for x in (0.1, 0.4, 0.9):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": x},
                distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                values=[x, 1 - x],
            )
        )
    assert rpt.objective_names(study) == ("val_loss", "latency")
    fig = optuna_figure(study, "pareto")
    assert fig.layout.yaxis.title.text == "latency"
    page, _, _ = rpt.render_report(study)
    assert "minimising val_loss and latency" in page


def test_one_objective_has_no_pareto_front(search: Built, tmp_path: Path) -> None:
    outcome = write(search, tmp_path / "r.html")
    assert "plot-pareto" not in outcome.plots


# --- learning curves -------------------------------------------------------------------------


def test_learning_curves_show_the_pruned_trial_cut_short(search: Built) -> None:
    study = search.load()
    store = rpt.open_store(search.artifacts)
    info = rpt._collect_learning_curves_info(study, store)
    assert info.max_epochs == SEARCH_EPOCHS
    by_number = {c.number: c for c in info.curves}
    assert set(by_number) == set(range(8))
    pruned = by_number[5]
    assert pruned.state == "PRUNED"
    assert pruned.pruned_at_epoch == study.trials[5].user_attrs["pruned_at_epoch"]
    assert len(pruned.epochs) == pruned.pruned_at_epoch < SEARCH_EPOCHS
    for curve in info.curves:
        trial = study.trials[curve.number]
        stored = learning_curve(trial, storage_of(study), store)
        assert stored is not None and curve.val_losses == stored.val_loss
        assert curve.baseline == (curve.number == 0)
        if curve.state == "COMPLETE":
            assert len(curve.epochs) == trial.user_attrs["epochs_run"]
            assert curve.pruned_at_epoch is None


def test_learning_curves_carry_the_stored_train_losses(handmade: Built) -> None:
    study = handmade.load()
    info = rpt._collect_learning_curves_info(study, rpt.open_store(handmade.artifacts))
    assert [c.number for c in info.curves] == list(range(len(HANDMADE)))
    for curve in info.curves:
        history = handmade_history(curve.number)
        assert curve.epochs == curve.train_epochs == tuple(e for e, _, _ in history)
        assert curve.train_losses == pytest.approx([t for _, t, _ in history])
        assert curve.val_losses == pytest.approx([v for _, _, v in history])
    assert [c.number for c in info.curves if c.baseline] == [0]
    fig = rpt._draw_learning_curves(info)
    train = [t for t in fig.data if t.name.endswith("(train)")]
    assert len(train) == len(HANDMADE) and all(t.line.dash == "dash" for t in train)
    pruned = [t for t in fig.data if t.name == "pruned"]
    assert [len(t.x) for t in pruned] == [HANDMADE_PRUNED_AT]
    assert fig.layout.xaxis.range == (0.5, HANDMADE_EPOCHS + 0.5)  # the budget, not the longest


def test_grid_learning_curves_mark_the_baseline(grid: Built) -> None:
    info = rpt._collect_learning_curves_info(grid.load(), rpt.open_store(grid.artifacts))
    assert len(info.curves) == GRID_VARIANTS
    assert [c.name for c in info.curves if c.baseline] == ["v1_0_baseline"]
    assert all(len(c.epochs) == GRID_EPOCHS for c in info.curves)


def test_curves_fall_back_to_list_attributes() -> None:
    study = optuna.create_study()
    study.add_trial(
        optuna.trial.create_trial(
            value=0.2,
            user_attrs={"val_losses": [0.5, 0.3, 0.2], "train_losses": [0.6, 0.35, 0.25]},
        )
    )
    (curve,) = rpt._collect_learning_curves_info(study).curves
    assert curve.epochs == (1, 2, 3) and curve.val_losses == (0.5, 0.3, 0.2)
    assert curve.train_losses == (0.6, 0.35, 0.25)


# --- the ensemble ------------------------------------------------------------------------------


def test_the_ensemble_section_shows_members_selection_and_gains(handmade: Built) -> None:
    study = handmade.load()
    info, note = rpt._load_ensemble(study, rpt.open_store(handmade.artifacts), handmade.artifacts)
    assert note is None and info is not None
    assert [
        (m.trial, m.name, m.weight, m.picks, m.val_loss, m.test_loss) for m in info.members
    ] == [
        (m["trial"], m["name"], m["weight"], m["picks"], m["val_loss"], m["test_loss"])
        for m in ENSEMBLE["members"]
    ]
    assert info.selection == tuple(
        (s["pick"], s["trial"], s["val_loss"]) for s in ENSEMBLE["selection"]
    )
    assert info.best_single == ("trial_3", 0.018)
    over_best, over_baseline = info.gains
    assert (over_best.against, over_best.percent, over_best.ci95_pct) == (
        "best single trial (trial_3)",
        9.0,
        (4.1, 13.2),
    )
    assert over_best.verdict.startswith("better")
    assert over_baseline.against == "baseline (trial_0)"
    assert over_baseline.verdict.startswith("within noise")  # its interval crosses zero

    fig = rpt._draw_ensemble(info)
    weights = next(t for t in fig.data if t.name == "weight")
    assert list(weights.x) == ["trial_3", "trial_1", "trial_6"]
    assert list(weights.y) == [0.5, 0.3, 0.2]
    curve = next(t for t in fig.data if t.name == "ensemble")
    assert list(curve.y) == [s["val_loss"] for s in ENSEMBLE["selection"]]
    reference = next(t for t in fig.data if t.name.startswith("best single trial"))
    assert set(reference.y) == {0.018}

    page = rpt._ensemble_html(info)
    assert "+9.00%" in page and "+4.10% to +13.20%" in page and "-2.00% to +60.10%" in page
    assert "calling_score_model_ensemble.onnx (120.6 KB)" in page


def test_the_ensemble_has_a_row_in_the_summary(handmade: Built) -> None:
    study = handmade.load()
    info, _ = rpt._load_ensemble(study, rpt.open_store(handmade.artifacts), handmade.artifacts)
    rows = rpt._collect_summary_info(study, info).rows
    row = rows[-1]
    assert (row.role, row.name, row.rank, row.number) == (
        "ensemble",
        "ensemble of 3 trials",
        None,
        None,
    )
    assert (row.val_loss, row.test_loss) == (0.0165, 0.0172)
    base_test = study.trials[0].user_attrs["test_loss"]
    assert row.test_vs_baseline_pct == pytest.approx((base_test - 0.0172) / base_test * 100)
    assert "trial_3 0.50" in row.params


def test_a_report_of_the_handmade_study_has_every_section(handmade: Built, tmp_path: Path) -> None:
    outcome = write(handmade, tmp_path / "r.html")
    assert outcome.plots == EXPECTED_PLOTS["handmade"]
    assert outcome.notes == {}
    page = outcome.path.read_text(encoding="utf-8")
    assert 'id="section-ensemble"' in page and "ensemble of 3 trials" in page
    assert "Left out (the same in every trial): dropout." in page


def test_without_its_artifact_folder_the_report_says_what_is_missing(
    handmade: Built, tmp_path: Path
) -> None:
    study = handmade.load()
    gone = tmp_path / "gone"
    outcome = rpt.write_report(study, tmp_path / "r.html", artifact_dir=gone)
    assert "plot-ensemble" not in outcome.plots and "plot-learning-curves" not in outcome.plots
    assert outcome.notes["ensemble"] == (
        f"the study has an ensemble, but its artifact folder {gone} is missing"
    )
    assert f"({gone} is missing)" in outcome.notes["learning-curves"]
    assert "plot-history" in outcome.plots
    assert not gone.exists()  # looked for, never created


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"schema": "cso-ensemble/9"}, "schema 'cso-ensemble/9'"),
        ({"members": [{"trial": 3}]}, "malformed (KeyError"),
        ({"val_loss": "low"}, "malformed (ValueError"),
    ],
)
def test_an_unreadable_ensemble_is_a_note_not_a_crash(
    change: dict[str, Any], reason: str, tmp_path: Path
) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="s")
    study.add_trial(optuna.trial.create_trial(value=0.1, user_attrs={"val_loss": 0.1}))
    store = artifact_store(tmp_path / "artifacts")
    store_study_json(store, study, ENSEMBLE_STEM, {**ENSEMBLE, **change})
    info, note = rpt._load_ensemble(study, store, tmp_path / "artifacts")
    assert info is None and note is not None and reason in note


# --- the grid's variants and their bootstrap intervals --------------------------------------


def test_grid_bars_match_the_results_file_and_its_bootstrap(grid: Built) -> None:
    study = grid.load()
    results = results_of(grid)
    errors = rpt.load_variant_errors(study, grid.artifacts)
    assert errors.note is None
    assert set(errors.errors) == {v.name for v in VARIANTS[:GRID_VARIANTS]}
    info = rpt._collect_grid_info(study, errors, None)
    assert info is not None
    entries = {e["name"]: e for e in results["variants"]}
    assert [b.name for b in info.variants] == [v.name for v in VARIANTS[:GRID_VARIANTS]]
    assert info.baseline == "v1_0_baseline"
    for bar in info.variants:
        entry = entries[bar.name]
        assert bar.val_loss == pytest.approx(entry["val_loss"])
        assert bar.test_loss == pytest.approx(entry["test_loss"])
        assert bar.repeats == 1 and bar.val_loss_std is None
        if bar.baseline:
            assert bar.improvement_pct is None and bar.ci95_pct is None
            continue
        assert bar.improvement_pct == pytest.approx(entry["improvement_vs_baseline_pct"])
        assert bar.bootstrap_pct == pytest.approx(bar.improvement_pct, abs=1e-4)
        assert bar.ci95_pct is not None
        assert bar.ci95_pct[0] < bar.bootstrap_pct < bar.ci95_pct[1]
    # the best variant's interval is exactly the one cso grid reported
    summary = results["summary"]
    best = next(b for b in info.variants if b.name == summary["best_variant"])
    if not best.baseline:
        assert best.ci95_pct == pytest.approx(tuple(summary["bootstrap"]["ci95_pct"]), abs=1e-6)
    assert info.interval_note.startswith("95% paired bootstrap")


def test_without_weights_the_results_file_gives_the_best_interval(grid: Built) -> None:
    study = grid.load()
    results = results_of(grid)
    info = rpt._collect_grid_info(study, None, results)
    assert info is not None
    summary = results["summary"]
    with_interval = [b for b in info.variants if b.ci95_pct is not None]
    if summary["best_variant"] == "v1_0_baseline":
        pytest.skip("the baseline won on this data: the results file has no interval to show")
    assert [b.name for b in with_interval] == [summary["best_variant"]]
    assert with_interval[0].ci95_pct == tuple(summary["bootstrap"]["ci95_pct"])
    assert "only the best variant's" in info.interval_note
    # a results file from another study is not used
    other = {**results, "study": {**results["study"], "name": "other"}}
    info = rpt._collect_grid_info(study, None, other)
    assert info is not None and all(b.ci95_pct is None for b in info.variants)
    assert info.interval_note == "none"


def test_repeats_give_means_and_standard_deviations(repeats: Built) -> None:
    study = repeats.load()
    results = results_of(repeats)
    info = rpt._collect_grid_info(study, rpt.load_variant_errors(study, repeats.artifacts), results)
    assert info is not None
    for bar, entry in zip(info.variants, results["variants"], strict=True):
        assert bar.name == entry["name"] and bar.repeats == 2
        runs = [r["test_loss"] for r in entry["runs"]]
        assert bar.test_loss == pytest.approx(statistics.fmean(runs))
        assert bar.test_loss_std == pytest.approx(entry["test_loss_std"])
        assert bar.val_loss_std == pytest.approx(entry["val_loss_std"])


def test_variant_errors_explain_missing_data(grid: Built, tmp_path: Path) -> None:
    study = grid.load()
    gone = rpt.load_variant_errors(study, grid.artifacts, data_path=tmp_path / "nope.json")
    assert gone.errors == {} and gone.note is not None and "is missing" in gone.note
    other = tmp_path / "other.json"
    write_synthetic(other, 200, 8)
    wrong = rpt.load_variant_errors(study, grid.artifacts, data_path=other)
    assert wrong.errors == {} and wrong.note is not None and "not the data" in wrong.note
    no_weights = rpt.load_variant_errors(study, tmp_path / "none")
    assert no_weights.note is not None and "folder" in no_weights.note
    info = rpt._collect_grid_info(study, gone, None)
    assert info is not None and info.interval_note == f"none ({gone.note})"


def test_a_search_study_has_no_grid_chart(search: Built) -> None:
    assert rpt._collect_grid_info(search.load()) is None


# --- the HTML file ---------------------------------------------------------------------------

EXPECTED_PLOTS = {
    "grid": (
        "plot-grid",
        "plot-history",
        "plot-learning-curves",
        "plot-importances",
        "plot-parallel",
        "plot-slices",
    ),
    "search": (
        "plot-history",
        "plot-learning-curves",
        "plot-importances",
        "plot-parallel",
        "plot-slices",
    ),
    "pareto": (
        "plot-history",
        "plot-learning-curves",
        "plot-importances",
        "plot-parallel",
        "plot-slices",
        "plot-pareto",
    ),
    "handmade": (
        "plot-ensemble",
        "plot-history",
        "plot-learning-curves",
        "plot-importances",
        "plot-parallel",
        "plot-slices",
    ),
}


def write(built: Built, path: Path) -> rpt.ReportOutcome:
    """The report as `cso report` writes it: storage named, artifacts at the default place."""
    study = built.load()
    grid = study.user_attrs.get("kind") == "grid"
    errors = rpt.load_variant_errors(study, built.artifacts) if grid else None
    return rpt.write_report(
        study, path, storage_url=built.storage, artifact_dir=built.artifacts, variant_errors=errors
    )


@pytest.mark.parametrize("kind", ["grid", "search", "pareto", "handmade"])
def test_report_is_one_offline_html_file_with_every_plot(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    built: Built = request.getfixturevalue(kind)
    outcome = write(built, tmp_path / "out" / "report.html")
    assert outcome.plots == EXPECTED_PLOTS[kind]
    page = outcome.path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert re.search(r"<script[^>]*\bsrc=", page) is None  # nothing loaded from anywhere
    assert re.search(r"<link\b", page) is None
    assert page.count("plotly.js v") >= 1  # the library itself is embedded, once
    assert len(page) > 3_000_000
    for div_id in outcome.plots:
        assert page.count(f'id="{div_id}"') == 1
    assert [p.name for p in outcome.path.parent.iterdir()] == ["report.html"]  # no temp file
    assert outcome.notes == {}


def test_the_same_study_gives_the_same_file(search: Built, tmp_path: Path) -> None:
    first = write(search, tmp_path / "a.html").path.read_bytes()
    second = write(search, tmp_path / "b.html").path.read_bytes()
    assert first == second


def test_names_are_escaped_in_the_page(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="x<script>")
    study.set_user_attr("kind", "search")
    study.set_user_attr("baseline_trial", 0)
    for x in (0.2, 0.5, 1.5):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": x},
                distributions={"x": optuna.distributions.FloatDistribution(0, 2)},
                value=x,
                user_attrs={"val_loss": x, "test_loss": x},
                intermediate_values={1: x * 2, 2: x},
            )
        )
    page = rpt.write_report(study, tmp_path / "r.html").path.read_text(encoding="utf-8")
    assert "x<script>" not in page and "x&lt;script&gt;" in page


def test_a_study_without_complete_trials_is_refused(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="empty")
    with pytest.raises(StudyError, match="no complete trial yet"):
        rpt.write_report(study, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


# --- the command ------------------------------------------------------------------------------


@pytest.fixture
def invoke() -> Callable[..., Result]:
    """``cso report ...``: through cso's own app once it has the command, else on its own."""
    from calling_score_opt import cli

    mounted = any(c.callback is report_command for c in cli.app.registered_commands)
    app = cli.app
    if not mounted:
        app = typer.Typer(pretty_exceptions_enable=False)
        app.command()(report_command)
        app.command(name="unused")(lambda: None)  # two commands: the name is required
    runner = CliRunner()

    def run(*args: str | Path) -> Result:
        return runner.invoke(app, ["report", *[str(a) for a in args]], env={"COLUMNS": "200"})

    return run


def copy_grid_here(grid: Built, here: Path) -> None:
    """The grid study at its default place in ``here``, as `cso grid` leaves it."""
    studies = here / "studies"
    studies.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = grid.root / "studies" / f"{grid.name}.db{suffix}"
        if source.exists():
            shutil.copyfile(source, studies / f"calling-score-grid.db{suffix}")
    shutil.copytree(
        grid.root / "studies" / f"{grid.name}.artifacts",
        studies / "calling-score-grid.artifacts",
    )


def test_report_after_grid_needs_no_options(
    grid: Built, tmp_path: Path, invoke: Callable[..., Result]
) -> None:
    copy_grid_here(grid, tmp_path)
    result = invoke()
    assert result.exit_code == 0, result.output
    path = tmp_path / "reports" / "calling-score-grid.html"
    assert path.is_file()
    assert "reports/calling-score-grid.html (6 plots)" in result.stdout
    assert path.resolve().as_uri() in result.stdout
    assert "bootstrap intervals" not in result.stdout  # every interval could be computed


def test_report_help_has_an_example(invoke: Callable[..., Result]) -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "Example: cso report " in result.stdout
    for option in ("--study", "--storage", "--output", "--artifacts", "--data-path", "--results"):
        assert option in result.stdout


def test_report_without_a_study_fails_cleanly(
    invoke: Callable[..., Result], tmp_path: Path
) -> None:
    result = invoke("--study", "nope")
    assert_clean_failure(result, "studies/nope.db", "run cso grid")
    assert not (tmp_path / "studies").exists()  # nothing created on the way


def test_report_names_the_studies_a_storage_holds(
    search: Built, invoke: Callable[..., Result]
) -> None:
    result = invoke("--study", "other", "--storage", search.storage)
    assert_clean_failure(result, "no study 'other'", "studies there: 'search'")


def test_report_refuses_a_results_file_of_another_study(
    grid: Built, search: Built, invoke: Callable[..., Result], tmp_path: Path
) -> None:
    foreign = tmp_path / "results.json"
    foreign.write_text(json.dumps({"study": {"name": "other"}}), encoding="utf-8")
    args = ("--storage", grid.storage, "--output", tmp_path / "r.html", "--results", foreign)
    result = invoke(*args)
    assert_clean_failure(result, "--results", "was not written from study 'calling-score-grid'")


def test_report_writes_where_it_is_told(
    search: Built, invoke: Callable[..., Result], tmp_path: Path
) -> None:
    out = tmp_path / "deep" / "search.html"
    result = invoke("--study", "search", "--storage", search.storage, "--output", out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and "(5 plots)" in result.stdout


def test_a_maximising_study_is_refused(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="up", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=1.0))
    with pytest.raises(StudyError, match="maximises an objective"):
        rpt.write_report(study, tmp_path / "r.html")


def test_a_variant_without_weights_has_no_interval(grid: Built, tmp_path: Path) -> None:
    study = grid.load()
    folder = tmp_path / "artifacts"
    shutil.copytree(grid.root / "studies" / f"{grid.name}.artifacts", folder)
    lost = next(t for t in complete(study) if t.user_attrs["variant"] == "v1_1_lr_0.0005")
    meta = optuna.artifacts.get_all_artifact_meta(lost, storage=storage_of(study))
    weights = next(m for m in meta if m.filename == "model.pt")
    (folder / weights.artifact_id).unlink()
    errors = rpt.load_variant_errors(study, folder)
    assert errors.note == "no stored weights for v1_1_lr_0.0005"
    info = rpt._collect_grid_info(study, errors)
    assert info is not None
    intervals = {b.name: b.ci95_pct for b in info.variants}
    assert intervals["v1_1_lr_0.0005"] is None
    assert intervals["v1_1_lr_0.002"] is not None
    assert "none for v1_1_lr_0.0005 (no stored weights for v1_1_lr_0.0005)" in info.interval_note


def test_the_grid_drawing_carries_the_intervals(grid: Built) -> None:
    study = grid.load()
    info = rpt._collect_grid_info(study, rpt.load_variant_errors(study, grid.artifacts))
    assert info is not None
    figure = rpt._draw_grid(info)
    improvement = figure.data[-1]
    shown = [b for b in info.variants if not b.baseline]
    assert list(improvement.y) == [b.bootstrap_pct for b in shown]
    for bar, y, up, down in zip(
        shown, improvement.y, improvement.error_y.array, improvement.error_y.arrayminus, strict=True
    ):
        assert bar.ci95_pct == pytest.approx((y - down, y + up))
    assert figure.data[0].x[0] == "v1_0_baseline (baseline)"


# --- where the report goes, and what it never shows ------------------------------------------


def test_an_output_under_a_file_is_refused_before_any_work(
    invoke: Callable[..., Result], tmp_path: Path
) -> None:
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("not a folder", encoding="utf-8")
    result = invoke("--study", "nope", "--output", blocker / "report.html")
    # the output is checked first: the missing study is not even looked for
    assert_clean_failure(result, f"--output {blocker / 'report.html'}", "is a file, not a folder")
    assert files_under(tmp_path) == [blocker]


def test_an_output_that_is_a_folder_is_refused(
    search: Built, invoke: Callable[..., Result], tmp_path: Path
) -> None:
    folder = tmp_path / "reports"
    folder.mkdir()
    result = invoke("--study", "search", "--storage", search.storage, "--output", folder)
    assert_clean_failure(result, f"--output {folder}: is a folder", "report.html")
    assert files_under(tmp_path) == []


def test_a_failed_write_is_one_line(
    search: Built, invoke: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(rpt, "write_text_atomic", full_disk)
    out = tmp_path / "r.html"
    result = invoke("--study", "search", "--storage", search.storage, "--output", out)
    assert_clean_failure(result, f"--output {out}", "No space left on device")
    assert not out.exists()


def test_a_missing_artifacts_folder_given_is_refused(
    search: Built, invoke: Callable[..., Result], tmp_path: Path
) -> None:
    result = invoke(
        "--study",
        "search",
        "--storage",
        search.storage,
        "--artifacts",
        tmp_path / "nope",
        "--output",
        tmp_path / "r.html",
    )
    assert_clean_failure(result, f"--artifacts {tmp_path / 'nope'}: no such folder")


def test_without_the_default_artifacts_folder_the_report_draws_what_it_can(
    handmade: Built, invoke: Callable[..., Result], tmp_path: Path
) -> None:
    (tmp_path / "studies").mkdir()
    shutil.copyfile(handmade.root / "studies" / "handmade.db", tmp_path / "studies" / "x.db")
    result = invoke("--study", "handmade", "--storage", f"sqlite:///{tmp_path}/studies/x.db")
    assert result.exit_code == 0, result.output
    assert "(4 plots)" in result.stdout  # history, importances, parallel coordinates, slices
    assert "no ensemble plot: the study has an ensemble, but its artifact folder" in result.stdout
    assert "no learning-curves plot: no trial kept a learning curve" in result.stdout
    assert not (tmp_path / "studies" / "x.artifacts").exists()


SECRET_URL = "postgresql://reporter:S3cr3t-pw@db.example:5432/studies?sslmode=require"


def test_a_storage_password_never_reaches_the_page(handmade: Built) -> None:
    study = handmade.load()
    header = rpt._header_html(rpt._collect_summary_info(study), SECRET_URL)
    assert "S3cr3t-pw" not in header
    assert "storage: postgresql://reporter:***@db.example:5432/studies" in header
    page, _, _ = rpt.render_report(study, storage_url=SECRET_URL)
    assert "S3cr3t-pw" not in page


def test_messages_hide_the_password_however_it_appears() -> None:
    message = f"--storage {SECRET_URL}: cannot open (password S3cr3t-pw rejected)"
    hidden = _hide_password(message, SECRET_URL)
    assert "S3cr3t-pw" not in hidden and "reporter:***@db.example" in hidden
    query = "postgresql://u@h/db?password=S3cr3t-pw"
    assert "S3cr3t-pw" not in _hide_password(f"cannot open {query}", query)
    assert _hide_password("nothing to hide", "") == "nothing to hide"


def test_the_command_never_prints_the_password(
    invoke: Callable[..., Result], tmp_path: Path
) -> None:
    url = "postgresql://reporter:S3cr3t-pw@127.0.0.1:1/studies"  # nothing listens on port 1
    result = invoke("--study", "s", "--storage", url, "--output", tmp_path / "r.html")
    message = assert_clean_failure(result, "postgresql://reporter:***@127.0.0.1:1/studies")
    assert "S3cr3t-pw" not in result.output + message
