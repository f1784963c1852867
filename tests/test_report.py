"""``cso report``: the numbers behind every plot, the HTML file, and the command.

The studies are tiny and built once per test session (the browser test reuses them): a grid of
4 variants, a grid with 2 repeats, a search with a pruned trial and a two-objective search.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import typer
from helpers import assert_clean_failure
from optuna.trial import TrialState
from typer.testing import CliRunner, Result

from calling_score_opt import report as rpt
from calling_score_opt.errors import StudyError
from calling_score_opt.grid import GridSettings, run_grid
from calling_score_opt.report_cli import report as report_command
from calling_score_opt.search import SearchSettings, run_search
from calling_score_opt.space import VARIANTS
from calling_score_opt.synth import write_synthetic
from calling_score_opt.trials import load_study

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
def repeats(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_repeats(studies_base(tmp_path_factory))


def complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE,))


def results_of(built: Built) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(built.results.read_text(encoding="utf-8"))
    return document


# --- the summary table -----------------------------------------------------------------------


def test_summary_lists_the_five_best_and_the_baseline(search: Built) -> None:
    study = search.load()
    info = rpt._collect_summary_info(study)
    ranked = sorted(complete(study), key=lambda t: t.values[0])
    assert [r.number for r in info.rows[: rpt.TOP_TRIALS]] == [
        t.number for t in ranked[: rpt.TOP_TRIALS]
    ]
    assert info.kind == "search"
    assert sum(info.counts.values()) == 8 and info.counts["PRUNED"] >= 1
    assert info.counts["COMPLETE"] == len(ranked)
    baseline = next(r for r in info.rows if "baseline" in r.role)
    assert baseline.number == 0
    base_test = study.trials[0].user_attrs["test_loss"]
    for row in info.rows:
        trial = study.trials[row.number]
        assert row.val_loss == trial.user_attrs["val_loss"] == trial.values[0]
        assert row.test_loss == trial.user_attrs["test_loss"]
        if row.number == 0:
            assert row.test_vs_baseline_pct is None
        else:
            expected = (base_test - row.test_loss) / base_test * 100
            assert row.test_vs_baseline_pct == pytest.approx(expected)


def test_a_grid_summary_names_variants_and_its_baseline(grid: Built) -> None:
    info = rpt._collect_summary_info(grid.load())
    names = [r.name for r in info.rows]
    assert sorted(names) == sorted(v.name for v in VARIANTS[:GRID_VARIANTS])
    assert [r.name for r in info.rows if "baseline" in r.role] == ["v1_0_baseline"]


def test_a_two_objective_summary_is_the_pareto_front(pareto: Built) -> None:
    study = pareto.load()
    info = rpt._collect_summary_info(study)
    front = {t.number for t in study.best_trials}
    assert {r.number for r in info.rows if r.role.startswith("Pareto front")} == front
    assert info.objectives == ("val_loss", "params")
    for row in info.rows:
        assert row.values[1] == study.trials[row.number].user_attrs["parameters"]


# --- history, learning curves ----------------------------------------------------------------


def test_history_is_every_complete_value_and_the_running_best(search: Built) -> None:
    study = search.load()
    info = rpt._collect_history_info(study)
    done = complete(study)
    assert info.numbers == tuple(t.number for t in done)
    assert info.values == tuple(t.values[0] for t in done)
    assert list(info.best_so_far) == list(np.minimum.accumulate(info.values))
    assert info.baseline_number == 0
    assert 5 not in info.numbers  # the pruned trial has no value


def test_learning_curves_show_the_pruned_trial_cut_short(search: Built) -> None:
    study = search.load()
    info = rpt._collect_learning_curves_info(study)
    assert info.max_epochs == SEARCH_EPOCHS
    by_number = {c.number: c for c in info.curves}
    assert set(by_number) == set(range(8))
    pruned = by_number[5]
    assert pruned.state == "PRUNED"
    assert pruned.pruned_at_epoch == study.trials[5].user_attrs["pruned_at_epoch"]
    assert len(pruned.epochs) == pruned.pruned_at_epoch < SEARCH_EPOCHS
    for curve in info.curves:
        trial = study.trials[curve.number]
        assert dict(zip(curve.epochs, curve.val_losses, strict=True)) == trial.intermediate_values
        assert curve.baseline == (curve.number == 0)
        if curve.state == "COMPLETE":
            assert len(curve.epochs) == trial.user_attrs["epochs_run"]
            assert curve.pruned_at_epoch is None


def test_grid_learning_curves_mark_the_baseline(grid: Built) -> None:
    info = rpt._collect_learning_curves_info(grid.load())
    assert len(info.curves) == GRID_VARIANTS
    assert [c.name for c in info.curves if c.baseline] == ["v1_0_baseline"]
    assert all(len(c.epochs) == GRID_EPOCHS for c in info.curves)


def test_curves_fall_back_to_a_val_losses_attribute() -> None:
    trial = optuna.trial.create_trial(
        value=0.2, user_attrs={"val_losses": [0.5, 0.3, 0.2]}, state=TrialState.COMPLETE
    )
    assert rpt._val_losses(trial) == {1: 0.5, 2: 0.3, 3: 0.2}


# --- importances, parallel coordinates, slices -------------------------------------------------


def test_importances_are_shares_of_the_varying_parameters(search: Built) -> None:
    study = search.load()
    info = rpt._collect_importance_info(study)
    assert info.note is None
    assert sum(info.importances.values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in info.importances.values())
    assert list(info.importances.values()) == sorted(info.importances.values(), reverse=True)
    assert "learning_rate" in info.importances
    done = complete(study)
    same = tuple(n for n in done[0].params if len({repr(t.params[n]) for t in done}) == 1)
    assert info.constant == same  # never changed, so left out
    assert set(info.importances) == set(done[0].params) - set(same)
    assert rpt._collect_importance_info(study) == info  # no randomness


def test_a_one_factor_grid_gives_all_importance_to_the_factor(grid: Built) -> None:
    info = rpt._collect_importance_info(grid.load())
    assert info.importances == {"learning_rate": pytest.approx(1.0)}
    assert set(info.constant) == {"batch_size", "hidden_sizes", "dropout"}


def test_importances_need_two_trials_and_say_so(tmp_path: Path) -> None:
    study = optuna.create_study()
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 1.0},
            distributions={"x": optuna.distributions.FloatDistribution(0, 2)},
            value=0.5,
        )
    )
    info = rpt._collect_importance_info(study)
    assert info.importances == {}
    assert info.note is not None and "at least 2 complete trials" in info.note


def test_parallel_coordinates_carry_every_shared_parameter(search: Built) -> None:
    study = search.load()
    info = rpt._collect_parallel_info(study)
    done = complete(study)
    assert info.numbers == tuple(t.number for t in done)
    assert info.objective_values == tuple(t.values[0] for t in done)
    names = [a.name for a in info.axes]
    assert names[:3] == ["learning_rate", "batch_size", "n_layers"]
    for axis in info.axes:
        if axis.choices is None:
            assert axis.values == tuple(float(t.params[axis.name]) for t in done)
        else:
            assert axis.values == tuple(str(t.params[axis.name]) for t in done)
            assert set(axis.values) <= set(axis.choices)
    by_name = {a.name: a for a in info.axes}
    assert by_name["learning_rate"].log and not by_name["dropout"].log
    assert by_name["batch_size"].choices == ("16", "32", "64", "128")
    for name in info.omitted:  # conditional: some trial lacks it
        assert any(name not in t.params for t in done)


def test_slices_have_one_panel_per_parameter(search: Built) -> None:
    study = search.load()
    info = rpt._collect_slice_info(study)
    done = {t.number: t for t in complete(study)}
    assert {p.axis.name for p in info.panels} == {n for t in done.values() for n in t.params}
    for panel in info.panels:
        assert panel.numbers == tuple(n for n in done if panel.axis.name in done[n].params)
        assert panel.objective_values == tuple(done[n].values[0] for n in panel.numbers)


def test_grid_parallel_axes_are_categorical_choices(grid: Built) -> None:
    info = rpt._collect_parallel_info(grid.load())
    axis = next(a for a in info.axes if a.name == "hidden_sizes")
    assert axis.choices is not None and "128,64" in axis.choices
    assert info.omitted == ()


# --- the Pareto front ------------------------------------------------------------------------


def test_pareto_front_is_the_non_dominated_trials(pareto: Built) -> None:
    study = pareto.load()
    info = rpt._collect_pareto_info(study)
    assert info is not None
    assert info.objectives == ("val_loss", "params")
    assert set(info.front) == {t.number for t in study.best_trials}
    points = dict(zip(info.numbers, zip(info.x, info.y, strict=True), strict=True))

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    for number, point in points.items():
        beaten = any(dominates(other, point) for other in points.values())
        assert beaten == (number not in info.front), number
    assert [points[n][0] for n in info.front] == sorted(points[n][0] for n in info.front)


def test_one_objective_has_no_pareto_front(search: Built) -> None:
    assert rpt._collect_pareto_info(search.load()) is None


# --- the grid's variants and their bootstrap intervals --------------------------------------


def test_grid_bars_match_the_results_file_and_its_bootstrap(grid: Built) -> None:
    study = grid.load()
    results = results_of(grid)
    errors = rpt.load_variant_errors(study, grid.storage)
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
    info = rpt._collect_grid_info(study, rpt.load_variant_errors(study, repeats.storage), results)
    assert info is not None
    for bar, entry in zip(info.variants, results["variants"], strict=True):
        assert bar.name == entry["name"] and bar.repeats == 2
        runs = [r["test_loss"] for r in entry["runs"]]
        assert bar.test_loss == pytest.approx(statistics.fmean(runs))
        assert bar.test_loss_std == pytest.approx(entry["test_loss_std"])
        assert bar.val_loss_std == pytest.approx(entry["val_loss_std"])


def test_variant_errors_explain_missing_data(grid: Built, tmp_path: Path) -> None:
    study = grid.load()
    gone = rpt.load_variant_errors(study, grid.storage, data_path=tmp_path / "nope.json")
    assert gone.errors == {} and gone.note is not None and "is missing" in gone.note
    other = tmp_path / "other.json"
    write_synthetic(other, 200, 8)
    wrong = rpt.load_variant_errors(study, grid.storage, data_path=other)
    assert wrong.errors == {} and wrong.note is not None and "not the data" in wrong.note
    no_weights = rpt.load_variant_errors(study, grid.storage, artifact_dir=tmp_path / "none")
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
    "pareto": (  # multi-objective trials keep their curves as a val_losses attribute
        "plot-history",
        "plot-learning-curves",
        "plot-importances",
        "plot-parallel",
        "plot-slices",
        "plot-pareto",
    ),
}


def write(built: Built, path: Path) -> rpt.ReportOutcome:
    study = built.load()
    errors = rpt.load_variant_errors(study, built.storage) if built.name.endswith("grid") else None
    return rpt.write_report(study, path, None, errors)


@pytest.mark.parametrize("kind", ["grid", "search", "pareto"])
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
    assert_clean_failure(result, "no study 'other'", "studies there: search")


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


def test_the_baseline_name_is_the_grids() -> None:
    from calling_score_opt.space import BASELINE_NAME

    assert rpt.BASELINE_VARIANT == BASELINE_NAME


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
    meta = optuna.artifacts.get_all_artifact_meta(lost, storage=study._storage)
    (folder / meta[0].artifact_id).unlink()
    errors = rpt.load_variant_errors(study, grid.storage, artifact_dir=folder)
    assert errors.note == "no stored weights for v1_1_lr_0.0005"
    info = rpt._collect_grid_info(study, errors)
    assert info is not None
    intervals = {b.name: b.ci95_pct for b in info.variants}
    assert intervals["v1_1_lr_0.0005"] is None
    assert intervals["v1_1_lr_0.002"] is not None
    assert "none for v1_1_lr_0.0005 (no stored weights for v1_1_lr_0.0005)" in info.interval_note


def test_the_grid_drawing_carries_the_intervals(grid: Built) -> None:
    study = grid.load()
    info = rpt._collect_grid_info(study, rpt.load_variant_errors(study, grid.storage))
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
