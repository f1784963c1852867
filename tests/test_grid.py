"""``cso grid`` as a library: the 15 variants trained, stored, exported, compared and resumed."""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from helpers import fail_training, make_variant_learn_nothing

from calling_score_opt.data import FEATURE_NAMES, Dataset, load_dataset, split_dataset
from calling_score_opt.errors import ConfigError, DataError, StudyError, TrainingError
from calling_score_opt.export import contract_problems, onnx_predict, read_metadata
from calling_score_opt.grid import (
    RESULTS_FILENAME,
    ExportOutcome,
    GridObserver,
    GridOutcome,
    GridSettings,
    RunOutcome,
    onnx_filename,
    run_grid,
)
from calling_score_opt.space import VARIANTS, grid_distributions
from calling_score_opt.study import BASELINE_ATTR, artifact_store, open_storage
from calling_score_opt.trials import learning_curve, study_data

EPOCHS = 2
ENTRY_FIELDS = {
    "name",
    "config",
    "success",
    "error",
    "val_loss",
    "test_loss",
    "train_loss",
    "best_epoch",
    "epochs_run",
    "training_time_s",
    "model_size_bytes",
    "parameters",
    "onnx_path",
    "parity_max_abs_diff",
    "improvement_vs_baseline_pct",
    "rank",
}


def settings_in(root: Path, data: Path, **changes: Any) -> GridSettings:
    """Grid settings with every file under ``root`` (absolute), tiny and inline by default."""
    values: dict[str, Any] = {
        "data_path": data,
        "output_dir": root / "out",
        "epochs": EPOCHS,
        "jobs": 1,
        "storage_url": f"sqlite:///{root}/studies/grid.db",
    }
    values.update(changes)
    return GridSettings(**values)


def by_name(outcome: GridOutcome) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in outcome.results["variants"]}


def load_trials(settings: GridSettings) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=settings.study_name, storage=settings.storage)
    return study.get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory: pytest.TempPathFactory, synth_file: Path) -> GridOutcome:
    """All 15 variants, 2 epochs each, on the tiny file (shared by this module's tests)."""
    root = tmp_path_factory.mktemp("grid")
    return run_grid(settings_in(root, synth_file))


@pytest.fixture(scope="module")
def full_settings(full_grid: GridOutcome) -> GridSettings:
    study = full_grid.results["study"]
    out = full_grid.results_path.parent
    return GridSettings(
        data_path=Path(full_grid.results["data"]["path"]),
        output_dir=out,
        epochs=EPOCHS,
        jobs=1,
        storage_url=study["storage"],
        study_name=study["name"],
    )


# --- a full grid ---------------------------------------------------------------------------


def test_full_grid_writes_15_onnx_files_and_the_results(full_grid: GridOutcome) -> None:
    out = full_grid.results_path.parent
    expected = {f"calling_score_model_{v.name}.onnx" for v in VARIANTS} | {RESULTS_FILENAME}
    assert {p.name for p in out.iterdir()} == expected
    assert len(expected) == 16
    assert full_grid.results_path.name == "optimization_results.json"
    on_disk = json.loads(full_grid.results_path.read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(full_grid.results))


def test_every_onnx_file_obeys_the_contract(full_grid: GridOutcome) -> None:
    for entry in full_grid.results["variants"]:
        path = Path(entry["onnx_path"])
        assert path.name == onnx_filename(entry["name"])
        assert contract_problems(path, n_features=39) == [], entry["name"]
        assert entry["model_size_bytes"] == path.stat().st_size
        assert 0.0 <= entry["parity_max_abs_diff"] <= 1e-5


def test_variants_are_reported_in_order_with_every_field(full_grid: GridOutcome) -> None:
    entries = full_grid.results["variants"]
    assert [e["name"] for e in entries] == [v.name for v in VARIANTS]
    for entry, variant in zip(entries, VARIANTS, strict=True):
        assert set(entry) >= ENTRY_FIELDS, ENTRY_FIELDS - set(entry)
        assert entry["success"] is True
        assert entry["error"] is None
        assert entry["config"] == {
            "learning_rate": variant.learning_rate,
            "batch_size": variant.batch_size,
            "hidden_sizes": list(variant.hidden_sizes),
            "dropout": variant.dropout,
            "epochs": EPOCHS,
            "patience": 10,
        }
        for key in ("val_loss", "test_loss", "train_loss"):
            assert 0.0 < entry[key] < 0.25
        assert 1 <= entry["best_epoch"] <= entry["epochs_run"] <= EPOCHS
        assert entry["training_time_s"] >= 0
    params = {e["name"]: e["parameters"] for e in entries}
    assert params["v1_0_baseline"] == 13_441
    assert params["v1_1_batch_64"] == 13_441
    assert params["v1_1_arch_smaller"] == 39 * 96 + 96 + 96 * 48 + 48 + 48 + 1


def test_best_variant_has_the_lowest_validation_loss(full_grid: GridOutcome) -> None:
    entries = full_grid.results["variants"]
    summary = full_grid.results["summary"]
    lowest = min(entries, key=lambda e: e["val_loss"])
    assert summary["ranked_by"] == "val_loss"
    assert summary["best_variant"] == lowest["name"]
    assert summary["best"]["name"] == lowest["name"]
    assert summary["best"]["val_loss"] == lowest["val_loss"]
    ranked = sorted(entries, key=lambda e: e["rank"])
    assert [e["rank"] for e in ranked] == list(range(1, 16))
    vals = [e["val_loss"] for e in ranked]
    assert vals == sorted(vals)
    assert summary["variants"] == summary["succeeded"] == 15
    assert summary["failed"] == []


def test_improvement_is_relative_to_the_baseline_test_loss(full_grid: GridOutcome) -> None:
    entries = by_name(full_grid)
    base = entries["v1_0_baseline"]["test_loss"]
    for entry in entries.values():
        expected = (base - entry["test_loss"]) / base * 100
        assert entry["improvement_vs_baseline_pct"] == pytest.approx(expected, rel=1e-12)
    assert entries["v1_0_baseline"]["improvement_vs_baseline_pct"] == 0.0
    summary = full_grid.results["summary"]
    best = entries[summary["best_variant"]]
    assert summary["best"]["improvement_vs_baseline_pct"] == best["improvement_vs_baseline_pct"]
    assert summary["baseline"]["test_loss"] == base


def test_bootstrap_interval_brackets_the_point_estimate(full_grid: GridOutcome) -> None:
    summary = full_grid.results["summary"]
    boot = summary["bootstrap"]
    low, high = boot["ci95_pct"]
    point = boot["test_mse_improvement_pct"]
    assert low <= point <= high
    assert boot["resamples"] == 2000
    # computed from the exported models' test predictions: the same number as the test losses
    assert point == pytest.approx(summary["best"]["improvement_vs_baseline_pct"], abs=1e-3)
    if summary["best_variant"] == "v1_0_baseline":
        assert boot["verdict"] == "the baseline itself is the best variant"
    else:
        assert boot["verdict"].split(" (")[0] in {
            "better than the baseline",
            "worse than the baseline",
            "within noise",
        }


def test_summary_timing_and_noise_floor(full_grid: GridOutcome, tiny_dataset: Dataset) -> None:
    summary = full_grid.results["summary"]
    timing = summary["timing"]
    assert timing["runs_trained"] == 15
    assert timing["runs_resumed"] == 0
    assert timing["jobs"] == 1
    assert 0.0 <= timing["storage_share"] <= 1.0
    assert timing["storage_share"] == pytest.approx(
        timing["storage_s"] / timing["wall_s"], abs=2e-3
    )
    assert timing["wall_s"] > 0
    assert summary["irreducible_mse"] == tiny_dataset.irreducible_mse
    best = by_name(full_grid)[summary["best_variant"]]
    assert summary["best_excess_over_irreducible"] == pytest.approx(
        best["test_loss"] - tiny_dataset.irreducible_mse
    )


def test_results_describe_the_data_and_split(full_grid: GridOutcome, synth_file: Path) -> None:
    data = full_grid.results["data"]
    assert data["fingerprint"] == load_dataset(synth_file).fingerprint
    assert data["records"] == 200
    assert data["features"] == list(FEATURE_NAMES)
    assert data["split"] == {"train": 140, "val": 30, "test": 30}
    assert full_grid.results["settings"]["epochs"] == EPOCHS


def test_each_run_is_a_trial_with_params_attrs_and_per_epoch_values(
    full_grid: GridOutcome, full_settings: GridSettings
) -> None:
    trials = load_trials(full_settings)
    assert len(trials) == 15
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    entries = by_name(full_grid)
    distributions = grid_distributions()
    storage = open_storage(full_settings.storage)
    store = artifact_store(full_settings.artifacts)
    for variant in VARIANTS:
        (trial,) = [t for t in trials if t.user_attrs["variant"] == variant.name]
        entry = entries[variant.name]
        assert trial.params == variant.params()
        assert trial.distributions == distributions
        assert trial.value == entry["val_loss"]
        assert trial.user_attrs["val_loss"] == entry["val_loss"]
        assert trial.user_attrs["test_loss"] == entry["test_loss"]
        assert trial.user_attrs["train_loss"] == entry["train_loss"]
        assert trial.user_attrs["best_epoch"] == entry["best_epoch"]
        assert trial.user_attrs["parameters"] == entry["parameters"]
        assert (trial.user_attrs["repeat"], trial.user_attrs["seed"]) == (0, 0)
        assert trial.user_attrs.get(BASELINE_ATTR) is (True if variant is VARIANTS[0] else None)
        assert entry["trial_numbers"] == [trial.number]
        # the learning curve: one train and validation loss per epoch, as an artifact
        assert "val_losses" not in trial.user_attrs  # not in the attributes `optuna trials` shows
        assert trial.intermediate_values == {}  # one storage write per epoch is too slow
        curve = learning_curve(trial, storage, store)
        assert curve is not None
        assert curve.epoch == tuple(range(1, entry["epochs_run"] + 1))
        assert len(curve.train_loss) == entry["epochs_run"]
        val_losses = curve.val_loss
        assert val_losses[entry["best_epoch"] - 1] == min(val_losses)
        assert entry["val_loss"] == pytest.approx(min(val_losses), abs=1e-6)


def test_study_remembers_data_and_settings(
    full_grid: GridOutcome, full_settings: GridSettings
) -> None:
    study = optuna.load_study(study_name=full_settings.study_name, storage=full_settings.storage)
    attrs = study.user_attrs
    assert attrs["data_fingerprint"] == full_grid.results["data"]["fingerprint"]
    assert attrs["epochs"] == EPOCHS
    assert attrs["split_seed"] == 0
    assert "feature_names" not in attrs  # 39 names would fill `optuna studies`; the fingerprint
    assert study.metric_names == ["val_loss"]  # optuna-dashboard names the objective
    assert "target" not in attrs  # the app's JSON has its label: no column to remember


def test_a_csv_grid_study_remembers_its_label_column(tmp_path: Path, run_cli: Any) -> None:
    """cso export and cso best load the study's data again: a CSV's label column is recorded
    with its path, so neither needs --target."""
    rows = [
        f"u{i},{i % 13 / 13:.4f},{i % 7 / 7:.4f},{(i % 13 / 13 + i % 7 / 7) / 2:.4f}"
        for i in range(60)
    ]
    csv = tmp_path / "t.csv"
    csv.write_text("user,a,b,score\n" + "\n".join(rows) + "\n", encoding="utf-8")
    settings = settings_in(tmp_path, csv, target="score", max_variants=2)
    run_grid(settings)
    study = optuna.load_study(study_name=settings.study_name, storage=settings.storage)
    assert study.user_attrs["target"] == "score"
    data = study_data(study)  # neither a data path nor a target given
    assert data.path == csv
    assert data.dataset.feature_names == ("a", "b")
    result = run_cli("best", "--study", settings.study_name, "--storage", settings.storage)
    assert result.exit_code == 0, result.output
    assert "v1_" in result.stdout


def test_onnx_metadata_describes_the_variant(full_grid: GridOutcome) -> None:
    for name in ("v1_0_baseline", "v1_1_arch_deeper", "v1_1_dropout_0.4"):
        entry = by_name(full_grid)[name]
        metadata = read_metadata(Path(entry["onnx_path"]))
        assert metadata["variant"] == name
        assert metadata["model_type"] == "calling_score"
        hyper = json.loads(metadata["hyperparameters"])
        for key in ("learning_rate", "batch_size", "hidden_sizes", "dropout", "epochs"):
            assert hyper[key] == entry["config"][key]
        assert json.loads(metadata["feature_names"]) == list(FEATURE_NAMES)
        metrics = json.loads(metadata["metrics"])
        assert metrics["val_loss"] == entry["val_loss"]
        assert metrics["test_loss"] == entry["test_loss"]
        assert metrics["parameters"] == entry["parameters"]
        assert metadata["data_fingerprint"] == full_grid.results["data"]["fingerprint"]


def test_exported_model_reproduces_its_test_loss_from_raw_features(
    full_grid: GridOutcome, synth_file: Path
) -> None:
    split = split_dataset(load_dataset(synth_file), seed=0)
    for entry in full_grid.results["variants"][:4]:
        scores = onnx_predict(Path(entry["onnx_path"]), split.x_test).astype(np.float64)
        mse = float(np.mean((scores - split.y_test) ** 2))
        assert mse == pytest.approx(entry["test_loss"], abs=1e-6)


# --- options -------------------------------------------------------------------------------


def test_max_variants_takes_the_first_n(tmp_path: Path, synth_file: Path) -> None:
    outcome = run_grid(settings_in(tmp_path, synth_file, max_variants=4))
    names = [v.name for v in VARIANTS[:4]]
    assert [e["name"] for e in outcome.results["variants"]] == names
    assert sorted(p.name for p in (tmp_path / "out").glob("*.onnx")) == sorted(
        onnx_filename(n) for n in names
    )
    assert outcome.results["summary"]["variants"] == 4


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"max_variants": 0}, "--max-variants must be 1-15"),
        ({"max_variants": 16}, "--max-variants must be 1-15"),
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"repeats": 0}, "--repeats must be at least 1"),
        ({"jobs": 0}, "--jobs must be at least 1"),
    ],
)
def test_bad_settings_raise_config_error(
    tmp_path: Path, synth_file: Path, changes: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        settings_in(tmp_path, synth_file, **changes)


def test_default_storage_is_under_studies_in_the_working_dir(
    tmp_path: Path, synth_file: Path
) -> None:
    settings = GridSettings(
        data_path=synth_file, output_dir=Path("models"), epochs=1, jobs=1, max_variants=1
    )
    outcome = run_grid(settings)
    assert (tmp_path / "studies" / "calling-score-grid.db").is_file()
    assert (tmp_path / "studies" / "calling-score-grid.artifacts").is_dir()
    assert (tmp_path / "models" / onnx_filename("v1_0_baseline")).is_file()
    assert outcome.results["study"]["storage"] == "sqlite:///studies/calling-score-grid.db"


def test_bad_data_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"training_data": [{"outcome_score": 2}]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json"):
        run_grid(settings_in(tmp_path, bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


# --- resuming ------------------------------------------------------------------------------


def test_rerun_trains_nothing_and_reports_the_same_losses(tmp_path: Path, synth_file: Path) -> None:
    settings = settings_in(tmp_path, synth_file, max_variants=3)
    first = run_grid(settings)
    onnx_bytes = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.onnx")}
    second = run_grid(settings)
    assert second.results["summary"]["timing"]["runs_trained"] == 0
    assert second.results["summary"]["timing"]["runs_resumed"] == 3
    for a, b in zip(first.results["variants"], second.results["variants"], strict=True):
        for key in ("val_loss", "test_loss", "train_loss", "best_epoch", "rank"):
            assert a[key] == b[key]
    assert second.results["summary"]["best_variant"] == first.results["summary"]["best_variant"]
    assert len(load_trials(settings)) == 3  # nothing was added to the study
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.onnx")} == onnx_bytes


def test_deleted_onnx_file_is_recreated_without_retraining(
    tmp_path: Path, synth_file: Path
) -> None:
    settings = settings_in(tmp_path, synth_file, max_variants=3)
    run_grid(settings)
    victim = tmp_path / "out" / onnx_filename("v1_1_lr_0.0001")
    original = victim.read_bytes()
    victim.unlink()
    again = run_grid(settings)
    assert again.results["summary"]["timing"]["runs_trained"] == 0
    assert victim.read_bytes() == original


def test_lost_output_folder_is_rebuilt_from_the_study(tmp_path: Path, synth_file: Path) -> None:
    settings = settings_in(tmp_path, synth_file, max_variants=2)
    first = run_grid(settings)
    shutil.rmtree(tmp_path / "out")
    again = run_grid(settings)
    assert again.results["summary"]["timing"]["runs_trained"] == 0
    assert len(list((tmp_path / "out").glob("*.onnx"))) == 2
    assert [e["val_loss"] for e in again.results["variants"]] == [
        e["val_loss"] for e in first.results["variants"]
    ]


def test_more_variants_later_trains_only_the_new_ones(tmp_path: Path, synth_file: Path) -> None:
    run_grid(settings_in(tmp_path, synth_file, max_variants=2))
    more = run_grid(settings_in(tmp_path, synth_file, max_variants=4))
    assert more.results["summary"]["timing"]["runs_trained"] == 2
    assert more.results["summary"]["timing"]["runs_resumed"] == 2


def test_rerun_on_other_data_is_refused(
    tmp_path: Path, synth_file: Path, synth_file_other: Path
) -> None:
    run_grid(settings_in(tmp_path, synth_file, max_variants=2))
    results = (tmp_path / "out" / RESULTS_FILENAME).read_bytes()
    with pytest.raises(StudyError, match="data_fingerprint") as excinfo:
        run_grid(settings_in(tmp_path, synth_file_other, max_variants=2))
    assert "--study NEW_NAME" in str(excinfo.value)
    assert (tmp_path / "out" / RESULTS_FILENAME).read_bytes() == results
    # under another study name the same storage is fine
    other = run_grid(settings_in(tmp_path, synth_file_other, max_variants=1, study_name="other"))
    assert other.results["summary"]["succeeded"] == 1


def test_rerun_with_other_epochs_is_refused(tmp_path: Path, synth_file: Path) -> None:
    run_grid(settings_in(tmp_path, synth_file, max_variants=1))
    with pytest.raises(StudyError, match="epochs = 2, this run has 3"):
        run_grid(settings_in(tmp_path, synth_file, max_variants=1, epochs=3))


# --- worker processes ----------------------------------------------------------------------


def test_two_worker_processes_give_the_same_results_as_inline(
    tmp_path: Path, synth_file: Path
) -> None:
    inline = run_grid(settings_in(tmp_path / "one", synth_file, max_variants=3, jobs=1))
    pooled = run_grid(settings_in(tmp_path / "two", synth_file, max_variants=3, jobs=2))
    assert pooled.results["summary"]["timing"]["jobs"] == 2
    for a, b in zip(inline.results["variants"], pooled.results["variants"], strict=True):
        assert a["name"] == b["name"]
        assert b["success"] is True
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-9, abs=0)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-9, abs=0)
        assert Path(b["onnx_path"]).is_file()
    assert pooled.results["summary"]["best_variant"] == inline.results["summary"]["best_variant"]


# --- failures ------------------------------------------------------------------------------


def _failing_for(monkeypatch: pytest.MonkeyPatch, lr: float, exc: Exception) -> None:
    fail_training(monkeypatch, lambda config: config.learning_rate == lr, exc)


def test_a_failing_variant_is_reported_and_the_others_succeed(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_for(monkeypatch, 0.0005, TrainingError("loss became non-finite at epoch 3"))
    settings = settings_in(tmp_path, synth_file, max_variants=4)
    outcome = run_grid(settings)
    entries = by_name(outcome)
    failed = entries["v1_1_lr_0.0005"]
    assert failed["success"] is False
    assert failed["error"] == "loss became non-finite at epoch 3"
    assert "rank" not in failed
    assert not (tmp_path / "out" / onnx_filename("v1_1_lr_0.0005")).exists()
    for name in ("v1_0_baseline", "v1_1_lr_0.0001", "v1_1_lr_0.002"):
        assert entries[name]["success"] is True
        assert Path(entries[name]["onnx_path"]).is_file()
    summary = outcome.results["summary"]
    assert summary["succeeded"] == 3
    assert summary["failed"] == [
        {"name": "v1_1_lr_0.0005", "error": "loss became non-finite at epoch 3"}
    ]
    assert summary["best_variant"] != "v1_1_lr_0.0005"
    states = {t.user_attrs["variant"]: t.state for t in load_trials(settings)}
    assert states["v1_1_lr_0.0005"] == optuna.trial.TrialState.FAIL

    # the failed run is retried on the next run, and only it
    monkeypatch.undo()
    retried = run_grid(settings)
    assert retried.results["summary"]["timing"]["runs_trained"] == 1
    assert by_name(retried)["v1_1_lr_0.0005"]["success"] is True
    assert retried.results["summary"]["failed"] == []


def test_an_unexpected_exception_fails_only_its_training_run(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batch 16 trains alone; the baseline and the lr variants train as one stack
    fail_training(
        monkeypatch, lambda config: config.batch_size == 16, RuntimeError("CUDA out of memory")
    )
    outcome = run_grid(settings_in(tmp_path, synth_file, max_variants=6))
    entry = by_name(outcome)["v1_1_batch_16"]
    assert entry["success"] is False
    assert entry["error"] == "RuntimeError: CUDA out of memory"
    assert [e["success"] for e in outcome.results["variants"]] == [True] * 5 + [False]


def test_an_unexpected_exception_in_a_stack_fails_that_stack_only(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_training(
        monkeypatch, lambda config: config.learning_rate == 0.0001, RuntimeError("out of memory")
    )
    outcome = run_grid(settings_in(tmp_path, synth_file, max_variants=6))
    failed = {e["name"]: e["error"] for e in outcome.results["variants"] if not e["success"]}
    assert failed == {name: "RuntimeError: out of memory" for name in (
        "v1_0_baseline", "v1_1_lr_0.0001", "v1_1_lr_0.0005", "v1_1_lr_0.002", "v1_1_lr_0.005"
    )}  # fmt: skip
    assert by_name(outcome)["v1_1_batch_16"]["success"] is True


def test_every_variant_failing_gives_no_best(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_training(monkeypatch, lambda config: True, TrainingError("no"))
    outcome = run_grid(settings_in(tmp_path, synth_file, max_variants=2))
    summary = outcome.results["summary"]
    assert summary["succeeded"] == 0
    assert summary["best_variant"] is None
    assert "bootstrap" not in summary
    assert [f["error"] for f in summary["failed"]] == ["no", "no"]
    assert list((tmp_path / "out").glob("*.onnx")) == []
    assert (tmp_path / "out" / RESULTS_FILENAME).is_file()


# --- repeats -------------------------------------------------------------------------------


def test_repeats_train_each_variant_with_k_seeds_and_rank_by_the_mean(
    tmp_path: Path, synth_file: Path
) -> None:
    settings = settings_in(tmp_path, synth_file, max_variants=2, repeats=2)
    outcome = run_grid(settings)
    trials = load_trials(settings)
    assert len(trials) == 4
    assert outcome.results["summary"]["timing"]["runs_trained"] == 4
    for entry in outcome.results["variants"]:
        mine = [t for t in trials if t.user_attrs["variant"] == entry["name"]]
        assert sorted((t.user_attrs["repeat"], t.user_attrs["seed"]) for t in mine) == [
            (0, 0),
            (1, 1),
        ]
        vals = [t.value for t in mine]
        assert vals[0] != vals[1]  # the seeds really differ
        assert entry["val_loss"] == pytest.approx(statistics.fmean(vals), rel=1e-12)
        assert entry["val_loss_std"] == pytest.approx(statistics.stdev(vals), rel=1e-9)
        assert entry["test_loss"] == pytest.approx(
            statistics.fmean(t.user_attrs["test_loss"] for t in mine), rel=1e-12
        )
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        assert sorted(entry["trial_numbers"]) == sorted(t.number for t in mine)
        # the exported model is the better of the two runs
        chosen = min(mine, key=lambda t: t.value or 0.0)
        assert entry["exported_seed"] == chosen.user_attrs["seed"]
        metrics = json.loads(read_metadata(Path(entry["onnx_path"]))["metrics"])
        assert metrics["val_loss"] == chosen.value

    # asking for a third seed later trains only the third runs
    more = run_grid(settings_in(tmp_path, synth_file, max_variants=2, repeats=3))
    assert more.results["summary"]["timing"]["runs_trained"] == 2
    assert more.results["summary"]["timing"]["runs_resumed"] == 4


# --- progress hooks ------------------------------------------------------------------------


@dataclass
class Recorder(GridObserver):
    events: list[tuple[Any, ...]] = field(default_factory=list)

    def started(self, runs_total: int, runs_done: int, jobs: int) -> None:
        self.events.append(("started", runs_total, runs_done, jobs))

    def run_started(self, variant: str, repeat: int) -> None:
        self.events.append(("run_started", variant, repeat))

    def epoch(self, variant: str, repeat: int, epoch: int, max_epochs: int, val: float) -> None:
        self.events.append(("epoch", variant, epoch, max_epochs))

    def run_finished(self, outcome: RunOutcome) -> None:
        self.events.append(("run_finished", outcome.variant, outcome.error))

    def exported(self, outcome: ExportOutcome) -> None:
        self.events.append(("exported", outcome.variant, outcome.error))


def test_observer_hears_every_run_epoch_and_export(tmp_path: Path, synth_file: Path) -> None:
    recorder = Recorder()
    run_grid(settings_in(tmp_path, synth_file, max_variants=3), recorder)
    kinds = [e[0] for e in recorder.events]
    assert recorder.events[0] == ("started", 3, 0, 1)
    assert kinds.count("run_started") == kinds.count("run_finished") == 3
    assert kinds.count("exported") == 3
    epochs = [e for e in recorder.events if e[0] == "epoch"]
    assert len(epochs) == 3 * EPOCHS
    assert {e[3] for e in epochs} == {EPOCHS}
    assert {e[1] for e in recorder.events if e[0] == "exported"} == {v.name for v in VARIANTS[:3]}
    assert all(e[2] is None for e in recorder.events if e[0] in {"run_finished", "exported"})


# --- ranking, on crafted entries -----------------------------------------------------------


def _entry(name: str, val: float, test: float) -> dict[str, Any]:
    return {
        "name": name,
        "success": True,
        "error": None,
        "val_loss": val,
        "test_loss": test,
        "config": {},
    }


def test_ranking_uses_validation_not_test_loss(tiny_dataset: Dataset) -> None:
    """The test split judges the winner; it must not pick it (that would overfit the test set)."""
    from calling_score_opt.grid import _summary

    entries = [
        _entry("v1_0_baseline", val=0.030, test=0.020),
        _entry("v1_1_lr_0.0001", val=0.010, test=0.025),  # best on validation
        _entry("v1_1_lr_0.0005", val=0.020, test=0.010),  # best on test
        {"name": "v1_1_lr_0.002", "success": False, "error": "diverged", "config": {}},
    ]
    exports = {e["name"]: ExportOutcome(e["name"], None) for e in entries}
    split = split_dataset(tiny_dataset, seed=0)
    summary = _summary(entries, exports, split, tiny_dataset, seed=0)
    assert summary["best_variant"] == "v1_1_lr_0.0001"
    assert [e.get("rank") for e in entries] == [3, 1, 2, None]
    assert entries[1]["improvement_vs_baseline_pct"] == pytest.approx(-25.0)
    assert entries[2]["improvement_vs_baseline_pct"] == pytest.approx(50.0)
    assert summary["best"]["improvement_vs_baseline_pct"] == pytest.approx(-25.0)
    assert summary["failed"] == [{"name": "v1_1_lr_0.002", "error": "diverged"}]
    assert summary["succeeded"] == 3


@pytest.mark.parametrize("failing_lr", [0.0001, 0.001], ids=["variant", "baseline"])
def test_a_variant_with_a_failed_repeat_is_failed_not_half_reported(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch, failing_lr: float
) -> None:
    fail_training(
        monkeypatch,
        lambda config: config.seed == 1 and config.learning_rate == failing_lr,
        TrainingError("loss became non-finite at epoch 2"),
    )
    outcome = run_grid(settings_in(tmp_path, synth_file, max_variants=2, repeats=2))
    name = "v1_1_lr_0.0001" if failing_lr == 0.0001 else "v1_0_baseline"
    entry = by_name(outcome)[name]
    assert entry["success"] is False
    assert "1 of 2 repeats completed" in entry["error"]
    assert "non-finite" in entry["error"]
    assert not (tmp_path / "out" / onnx_filename(name)).exists()
    assert [f["name"] for f in outcome.results["summary"]["failed"]] == [name]


def test_a_run_taken_over_by_another_worker_is_not_a_crash(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This process stalls past the grace period; another worker fails its trial as stale.
    # Finishing the trial then fails in Optuna: the grid must go on and train the run again.
    import calling_score_opt.grid as grid_module

    real_finish = grid_module.finish_trial
    stolen: list[int] = []

    def finish_trial(study: optuna.Study, trial_id: int, **kwargs: Any) -> Any:
        if not stolen:
            stolen.append(trial_id)
            study._storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        return real_finish(study, trial_id, **kwargs)

    monkeypatch.setattr(grid_module, "finish_trial", finish_trial)
    settings = settings_in(tmp_path, synth_file, max_variants=8)  # one stack
    outcome = run_grid(settings)
    assert [e["success"] for e in outcome.results["variants"]] == [True] * 8
    trials = load_trials(settings)
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert states.count(optuna.trial.TrialState.COMPLETE) == 8


# --- what the times and losses mean ----------------------------------------------------------

#: The variants that share batch size and layers: trained together as one stack.
STACKED = {"v1_0_baseline", *(f"v1_1_lr_{lr}" for lr in ("0.0001", "0.0005", "0.002", "0.005"))}
STACKED |= {f"v1_1_dropout_{p}" for p in ("0.1", "0.3", "0.4")}


def test_each_variant_s_time_is_its_share_of_the_stack_it_trained_in(
    full_grid: GridOutcome, full_settings: GridSettings
) -> None:
    entries = by_name(full_grid)
    walls = {entries[name]["stack_wall_time_s"] for name in STACKED}
    assert len(walls) == 1  # one stack, one wall time
    (wall,) = walls
    assert sum(entries[name]["training_time_s"] for name in STACKED) == pytest.approx(
        wall, abs=0.01
    )  # the shares add up to it (each rounded to 1 ms)
    for name, entry in entries.items():
        run = entry["runs"][0]
        if name in STACKED:
            assert (entry["stack_size"], run["stack_size"]) == (8, 8)
            assert entry["training_time_s"] < wall
        else:  # trained alone: its own wall time
            assert (entry["stack_size"], run["stack_size"]) == (1, 1)
            assert entry["training_time_s"] == pytest.approx(entry["stack_wall_time_s"], abs=1e-3)
        assert run["stack_wall_time_s"] == pytest.approx(entry["stack_wall_time_s"], abs=1e-3)
    for trial in load_trials(full_settings):
        entry = entries[trial.user_attrs["variant"]]
        assert trial.user_attrs["stack_size"] == entry["stack_size"]
        assert trial.user_attrs["stack_wall_time_s"] == pytest.approx(
            entry["stack_wall_time_s"], abs=1e-3
        )


def test_the_summary_knows_the_mean_predictor_s_loss(
    full_grid: GridOutcome, tiny_split: Any
) -> None:
    from calling_score_opt.train import mean_predictor_loss

    summary = full_grid.results["summary"]
    mean_loss = summary["mean_predictor_val_loss"]
    assert mean_loss == mean_predictor_loss(tiny_split)
    # two epochs on 140 records: the slowest learners have not beaten the mean yet
    flagged = [e["name"] for e in full_grid.results["variants"] if e["val_loss"] >= mean_loss]
    assert summary["no_better_than_mean"] == flagged
    for entry in full_grid.results["variants"]:
        assert entry["no_better_than_mean"] is (entry["name"] in flagged)
    assert summary["best_variant"] not in flagged


def test_a_variant_that_learned_nothing_is_flagged(
    tmp_path: Path, synth_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_variant_learn_nothing(monkeypatch, "v1_1_lr_0.0001")
    outcome = run_grid(settings_in(tmp_path, synth_file, max_variants=2, epochs=8))
    entries = by_name(outcome)
    summary = outcome.results["summary"]
    assert entries["v1_1_lr_0.0001"]["best_epoch"] == 1  # dead after its first steps
    assert entries["v1_1_lr_0.0001"]["val_loss"] >= summary["mean_predictor_val_loss"]
    assert summary["no_better_than_mean"] == ["v1_1_lr_0.0001"]
    assert [e["no_better_than_mean"] for e in outcome.results["variants"]] == [False, True]


def test_the_summary_says_whether_this_run_trained_the_baseline(
    tmp_path: Path, synth_file: Path
) -> None:
    settings = settings_in(tmp_path, synth_file, max_variants=2)
    assert run_grid(settings).results["summary"]["baseline"]["trained_in_this_run"] is True
    assert run_grid(settings).results["summary"]["baseline"]["trained_in_this_run"] is False
