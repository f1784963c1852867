"""Stored trials for people: ``cso trials``, ``cso best`` and ``cso export`` (no retraining)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from helpers import assert_clean_failure, fail_training, run_small_grid
from optuna.trial import FrozenTrial, TrialState
from typer.testing import Result

import calling_score_opt.stacked as stacked_module
from calling_score_opt.data import load_dataset, split_dataset
from calling_score_opt.errors import StudyError, TrainingError
from calling_score_opt.export import contract_problems, onnx_predict, read_metadata
from calling_score_opt.results import RESULTS_FILENAME
from calling_score_opt.search import SearchSettings, run_search
from calling_score_opt.space import VARIANTS
from calling_score_opt.study import artifact_store, open_storage, read_checkpoint
from calling_score_opt.train import load_checkpoint
from calling_score_opt.trials import (
    best_trials,
    hidden_sizes,
    load_study,
    select_trials,
    trial_name,
    trial_row,
)

RunCli = Callable[..., Result]

STUDY = "calling-score-search"  # the CLI's default study name
EPOCHS = 8

ENTRY_FIELDS = {
    "name",
    "trial_number",
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
    "values",
    "rank",
}


def _grid(
    lr: float, batch: int, hidden: str, dropout: float, pairs: bool = False
) -> dict[str, Any]:
    return {
        "learning_rate": lr,
        "batch_size": batch,
        "hidden_sizes": hidden,
        "dropout": dropout,
        "pair_features": pairs,
    }


GOOD = [
    _grid(0.005, 16, "128,64", 0.1),
    _grid(0.002, 16, "128,64", 0.2),
    _grid(0.005, 32, "96,48", 0.1),
    _grid(0.002, 32, "256,128", 0.2, pairs=True),
]
BAD = _grid(0.0001, 128, "96,48", 0.4)  # pruned after 5 epochs
FAILING = _grid(0.0005, 64, "128,64,32", 0.3)  # made to fail


def _settings(root: Path, data: Path, trials: int) -> SearchSettings:
    return SearchSettings(
        data_path=data,
        trials=trials,
        space="grid",
        epochs=EPOCHS,
        jobs=1,
        study_name=STUDY,
        storage_url=f"sqlite:///{root}/studies/{STUDY}.db",
    )


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, synth_file: Path) -> Path:
    """A finished search study: 0 baseline, 1-4 good (4 with pair features), 5 pruned,
    6 failed, 7 sampled. Returns the folder that holds its ``studies/``; copy it to change it."""
    root = tmp_path_factory.mktemp("stored")
    run_search(_settings(root, synth_file, 1))
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{root}/studies/{STUDY}.db")
    for params in [*GOOD, BAD, FAILING]:
        study.enqueue_trial(params)
    real = stacked_module.StackedTrainer.add  # where the search hands a trial to training

    def failing(self: Any, key: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
        if config.learning_rate == 0.0005 and config.hidden_sizes == (128, 64, 32):
            raise TrainingError("loss became non-finite at epoch 2")
        return real(self, key, config, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stacked_module.StackedTrainer, "add", failing)
        outcome = run_search(_settings(root, synth_file, 7))
    assert outcome.counts["FAIL"] == 1
    assert outcome.counts.get("PRUNED", 0) >= 1
    return root


@pytest.fixture(scope="module")
def stored_trials(stored: Path) -> list[FrozenTrial]:
    url = f"sqlite:///{stored}/studies/{STUDY}.db"
    return optuna.load_study(study_name=STUDY, storage=url).get_trials()


@pytest.fixture
def study_here(stored: Path, tmp_path: Path) -> Path:
    """A private copy of the stored study at the CLI's default place (studies/ in the cwd)."""
    shutil.copytree(stored / "studies", tmp_path / "studies")
    return tmp_path / "studies"


def _complete(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE]


def test_the_stored_study_is_as_constructed(stored_trials: list[FrozenTrial]) -> None:
    assert [t.state.name for t in stored_trials[:7]] == [
        *["COMPLETE"] * 5,
        "PRUNED",
        "FAIL",
    ]
    assert len(stored_trials) == 8
    assert stored_trials[4].params["pair_features"] is True
    assert stored_trials[6].user_attrs["error"] == "loss became non-finite at epoch 2"


# --- cso trials ----------------------------------------------------------------------------


def _row(out: str, number: int) -> str:
    match = re.search(rf"^\W*{number}\W+(complete|pruned|fail|running|waiting)\b.*$", out, re.M)
    assert match is not None, f"no row for trial {number} in:\n{out}"
    return match.group(0)


def test_trials_lists_every_trial_with_its_state(
    run_cli: RunCli, study_here: Path, stored_trials: list[FrozenTrial]
) -> None:
    result = run_cli("trials")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"Study '{STUDY}': 8 trials" in out
    for trial in stored_trials:
        row = _row(out, trial.number)
        assert trial.state.name.lower() in row
        if trial.state == TrialState.COMPLETE:
            assert f"{trial.user_attrs['val_loss']:.5f}" in row
            assert f"{trial.user_attrs['test_loss']:.5f}" in row
    assert "non-finite at epoch 2" in _row(out, 6)
    pruned = stored_trials[5]
    assert re.search(rf"\b{pruned.user_attrs['pruned_at_epoch']}\b", _row(out, 5))
    assert "learning_rate=0.0001" in _row(out, 5)
    assert result.stderr == ""

    limited = run_cli("trials", "--limit", "2")
    assert limited.exit_code == 0, limited.output
    assert f"Study '{STUDY}': the last 2 of 8 trials" in limited.stdout
    _row(limited.stdout, 7)
    assert not re.search(r"^\W*5\W+pruned", limited.stdout, re.M)


def test_trials_of_a_missing_study_fails_cleanly(run_cli: RunCli, study_here: Path) -> None:
    result = run_cli("trials", "--study", "nope")
    assert_clean_failure(result, "no study 'nope'", "--study")


def test_trial_rows_for_each_state(stored_trials: list[FrozenTrial]) -> None:
    rows = [trial_row(t) for t in stored_trials]
    assert [r["number"] for r in rows] == list(range(8))
    assert rows[0]["name"] == "trial_0"
    assert rows[0]["epochs"] == EPOCHS
    assert rows[0]["values"] == [stored_trials[0].user_attrs["val_loss"]]
    assert rows[5]["state"] == "PRUNED"
    assert rows[5]["epochs"] == stored_trials[5].user_attrs["pruned_at_epoch"]
    assert rows[5]["val_loss"] is None
    assert rows[6]["state"] == "FAIL"
    assert rows[6]["error"] == "loss became non-finite at epoch 2"
    assert hidden_sizes(stored_trials[4]) == [256, 128]
    assert trial_name(stored_trials[4]) == "trial_4"


# --- cso best ------------------------------------------------------------------------------


def test_best_prints_the_trial_with_the_lowest_validation_loss(
    run_cli: RunCli, study_here: Path, stored_trials: list[FrozenTrial]
) -> None:
    best = min(_complete(stored_trials), key=lambda t: t.values[0])
    result = run_cli("best")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Best trial (lowest validation loss)" in out
    row = _row(out, best.number)
    assert f"{best.values[0]:.5f}" in row
    others = [t.number for t in stored_trials if t.number != best.number]
    assert not any(re.search(rf"^\W*{n}\W+complete", out, re.M) for n in others)
    assert best.number != 0  # the data makes a tuned trial beat the baseline
    base = stored_trials[0].user_attrs["test_loss"]
    new = best.user_attrs["test_loss"]
    assert f"Baseline: trial 0, val {stored_trials[0].values[0]:.5f}, test {base:.5f}" in out
    line = next(x for x in out.splitlines() if "against the baseline on the test split" in x)
    assert f"Trial {best.number} against the baseline" in line
    # the gain is computed from the stored models' test predictions: the stored test losses
    assert f"{(base - new) / base * 100:+.2f}% test MSE" in line
    found = re.search(r"interval ([+-][\d.]+)% \.\. ([+-][\d.]+)%", line)
    assert found is not None, line
    low, high = float(found.group(1)), float(found.group(2))
    assert low <= (base - new) / base * 100 <= high
    verdict = "better than" if low > 0 else "worse than" if high < 0 else "within noise"
    assert verdict in line


def test_best_of_a_missing_study_fails_cleanly(run_cli: RunCli) -> None:
    assert_clean_failure(run_cli("best", "--study", "nope"), "no study 'nope'")


# --- cso export ----------------------------------------------------------------------------


def _results(folder: Path) -> dict[str, Any]:
    return json.loads((folder / RESULTS_FILENAME).read_text(encoding="utf-8"))


def test_export_a_trial_matches_the_trained_model(
    run_cli: RunCli,
    study_here: Path,
    tmp_path: Path,
    synth_file: Path,
    stored_trials: list[FrozenTrial],
) -> None:
    trial = stored_trials[2]
    result = run_cli("export", "--trial", "2", "--output-dir", "out")
    assert result.exit_code == 0, result.output
    model_path = tmp_path / "out" / "calling_score_model_trial_2.onnx"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        model_path.name,
        RESULTS_FILENAME,
    ]
    assert f"trial 2: out/{model_path.name}" in result.stdout
    assert "Results: out/optimization_results.json" in result.stdout
    assert contract_problems(model_path, n_features=39) == []

    # the exported graph reproduces the trial's recorded test loss on the study's test split
    split = split_dataset(load_dataset(synth_file), seed=0)
    scores = onnx_predict(model_path, split.x_test)
    assert scores.shape == (len(split.y_test),)
    mse = float(np.mean((scores.astype(np.float64) - split.y_test.astype(np.float64)) ** 2))
    assert mse == pytest.approx(trial.user_attrs["test_loss"], abs=1e-6)

    # ... and the stored weights' predictions
    storage = open_storage(f"sqlite:///{study_here}/{STUDY}.db")
    store = artifact_store(study_here / f"{STUDY}.artifacts")
    model, config, names = load_checkpoint(read_checkpoint(store, storage, trial))
    with torch.no_grad():
        expected = model(torch.from_numpy(split.x_test)).numpy()
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    assert config.learning_rate == trial.params["learning_rate"]
    assert config.hidden_sizes == (128, 64)
    assert len(names) == 39

    # ... which are the weights training this configuration gives (nothing was retrained; the
    # search trained it in a stack beside other trials: the same run up to float rounding)
    retrained = stacked_module.train_one(split, config)
    assert retrained.test_loss == pytest.approx(trial.user_attrs["test_loss"], rel=1e-6)
    np.testing.assert_allclose(retrained.predict(split.x_test), expected, rtol=0, atol=1e-6)

    results = _results(tmp_path / "out")
    (entry,) = results["variants"]
    assert set(entry) >= ENTRY_FIELDS, ENTRY_FIELDS - set(entry)
    assert entry["name"] == "trial_2"
    assert entry["trial_number"] == 2
    assert entry["success"] is True
    assert entry["error"] is None
    assert entry["rank"] == 1
    assert entry["config"] == {
        "learning_rate": 0.002,
        "batch_size": 16,
        "hidden_sizes": [128, 64],
        "dropout": 0.2,
        "epochs": EPOCHS,
        "patience": 10,
    }
    for key in ("val_loss", "test_loss", "train_loss", "best_epoch", "epochs_run", "parameters"):
        assert entry[key] == trial.user_attrs[key], key
    assert entry["values"] == trial.values
    assert entry["onnx_path"] == str(Path("out") / model_path.name)
    assert entry["model_size_bytes"] == model_path.stat().st_size
    assert 0.0 <= entry["parity_max_abs_diff"] <= 1e-5
    assert results["summary"]["best_variant"] == "trial_2"
    assert results["summary"]["ranked_by"] == "val_loss"
    assert results["data"]["split"] == {"train": 140, "val": 30, "test": 30}
    assert results["study"]["name"] == STUDY
    metadata = read_metadata(model_path)
    assert metadata["variant"] == "trial_2"
    assert json.loads(metadata["metrics"])["test_loss"] == trial.user_attrs["test_loss"]


def test_export_a_pair_features_trial(
    run_cli: RunCli,
    study_here: Path,
    tmp_path: Path,
    synth_file: Path,
    stored_trials: list[FrozenTrial],
) -> None:
    result = run_cli("export", "--trial", "4", "--output-dir", "out")
    assert result.exit_code == 0, result.output
    model_path = tmp_path / "out" / "calling_score_model_trial_4.onnx"
    assert contract_problems(model_path, n_features=39) == []  # 39 raw inputs, pairs inside
    split = split_dataset(load_dataset(synth_file), seed=0)
    scores = onnx_predict(model_path, split.x_test)
    mse = float(np.mean((scores.astype(np.float64) - split.y_test.astype(np.float64)) ** 2))
    assert mse == pytest.approx(stored_trials[4].user_attrs["test_loss"], abs=1e-6)
    entry = _results(tmp_path / "out")["variants"][0]
    assert entry["config"]["pair_features"] is True
    assert entry["parameters"] == 51 * 256 + 256 + 256 * 128 + 128 + 128 + 1


def test_export_best_and_top(
    run_cli: RunCli, study_here: Path, tmp_path: Path, stored_trials: list[FrozenTrial]
) -> None:
    ranked = sorted(_complete(stored_trials), key=lambda t: t.values[0])
    best = run_cli("export", "--best", "--output-dir", "best")
    assert best.exit_code == 0, best.output
    names = sorted(p.name for p in (tmp_path / "best").iterdir())
    assert names == [f"calling_score_model_trial_{ranked[0].number}.onnx", RESULTS_FILENAME]

    top = run_cli("export", "--top", "3", "--output-dir", "top")
    assert top.exit_code == 0, top.output
    results = _results(tmp_path / "top")
    entries = sorted(results["variants"], key=lambda e: e["rank"])
    assert [e["trial_number"] for e in entries] == [t.number for t in ranked[:3]]
    assert [e["rank"] for e in entries] == [1, 2, 3]
    assert results["summary"]["exported"] == 3
    assert results["summary"]["best_variant"] == f"trial_{ranked[0].number}"
    for entry in entries:
        path = tmp_path / entry["onnx_path"]
        assert path.name == f"calling_score_model_trial_{entry['trial_number']}.onnx"
        assert contract_problems(path, n_features=39) == []
    assert len(list((tmp_path / "top").glob("*.onnx"))) == 3

    many = run_cli("export", "--top", "50", "--output-dir", "all")
    assert many.exit_code == 0, many.output
    assert len(list((tmp_path / "all").glob("*.onnx"))) == len(ranked)


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (("--trial", "99"), ("has no trial 99", "0-7")),
        (("--trial", "5"), ("trial 5 is pruned, not complete",)),
        (("--trial", "6"), ("trial 6 is fail", "not complete")),
        ((), ("exactly one of --trial N, --best, --top K",)),
        (("--trial", "0", "--best"), ("exactly one of",)),
        (("--best", "--top", "2"), ("exactly one of",)),
        (("--study", "nope", "--best"), ("no study 'nope'", "--study")),
        (("--trial", "0", "--data-path", "missing.json"), ("missing.json", "missing")),
        (("--trial", "0", "--data-path", "OTHER"), ("is not the data", "fingerprints differ")),
    ],
    ids=[
        "no-such-trial",
        "pruned",
        "failed",
        "none-chosen",
        "trial-and-best",
        "best-and-top",
        "missing-study",
        "missing-data",
        "other-data",
    ],
)
def test_export_refusals_fail_cleanly_and_write_no_onnx(
    run_cli: RunCli,
    study_here: Path,
    tmp_path: Path,
    synth_file_other: Path,
    options: tuple[str, ...],
    fragments: tuple[str, ...],
) -> None:
    args = [str(synth_file_other) if a == "OTHER" else a for a in options]
    result = run_cli("export", *args, "--output-dir", "out")
    assert_clean_failure(result, *fragments)
    assert result.stdout == ""
    assert list(tmp_path.rglob("*.onnx")) == []
    assert not (tmp_path / "out").exists()


def test_export_without_stored_weights_fails_cleanly(
    run_cli: RunCli, study_here: Path, tmp_path: Path
) -> None:
    shutil.rmtree(study_here / f"{STUDY}.artifacts")
    result = run_cli("export", "--trial", "0", "--output-dir", "out")
    assert_clean_failure(result, "trial 0", "missing from the artifact folder")
    assert list(tmp_path.rglob("*.onnx")) == []
    assert not (tmp_path / "out" / RESULTS_FILENAME).exists()


def test_export_with_another_artifacts_folder(
    run_cli: RunCli, study_here: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "weights"
    (study_here / f"{STUDY}.artifacts").rename(moved)
    assert run_cli("export", "--trial", "0", "--output-dir", "a").exit_code == 2
    result = run_cli("export", "--trial", "0", "--output-dir", "b", "--artifacts", moved)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "calling_score_model_trial_0.onnx").is_file()


# --- the library behind the commands -------------------------------------------------------


def test_select_trials(stored: Path, stored_trials: list[FrozenTrial]) -> None:
    study = load_study(f"sqlite:///{stored}/studies/{STUDY}.db", STUDY)
    ranked = sorted(_complete(stored_trials), key=lambda t: t.values[0])
    assert [t.number for t in select_trials(study, number=3)] == [3]
    assert [t.number for t in select_trials(study, best=True)] == [ranked[0].number]
    assert [t.number for t in best_trials(study)] == [ranked[0].number]
    assert [t.number for t in select_trials(study, top=2)] == [t.number for t in ranked[:2]]
    with pytest.raises(StudyError, match=r"has no trial 70 \(trials are 0-7\)"):
        select_trials(study, number=70)
    with pytest.raises(StudyError, match="no study 'other'"):
        load_study(f"sqlite:///{stored}/studies/{STUDY}.db", "other")


def test_a_study_without_complete_trials_has_no_best(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(study_name="empty", storage=storage)
    with pytest.raises(StudyError, match="has no complete trial yet"):
        best_trials(study)
    with pytest.raises(StudyError, match="has no complete trial yet"):
        select_trials(study, top=1)
    with pytest.raises(StudyError, match="it has no trials"):
        select_trials(study, number=0)


# --- other studies: several objectives, the grid -------------------------------------------


def test_best_and_export_of_a_two_objective_study(
    run_cli: RunCli, data_copy: Path, tmp_path: Path
) -> None:
    search = run_cli(
        "search",
        "--data-path",
        data_copy,
        "--trials",
        "5",
        "--epochs",
        "2",
        "--objectives",
        "val_loss,params",
        "--study",
        "mo",
        "--quiet",
    )
    assert search.exit_code == 0, search.output
    study = optuna.load_study(study_name="mo", storage="sqlite:///studies/mo.db")
    front = sorted(study.best_trials, key=lambda t: t.values[0])
    assert front

    result = run_cli("best", "--study", "mo")
    assert result.exit_code == 0, result.output
    assert "Pareto front (validation loss vs parameters)" in result.stdout
    assert "model params" in result.stdout  # the size objective has its own column
    for trial in front:
        row = _row(result.stdout, trial.number)
        assert f"{trial.values[0]:.5f}" in row
        assert f"{trial.values[1]:,.0f}" in row  # e.g. 13,441
    dominated = {t.number for t in study.get_trials()} - {t.number for t in front}
    for number in dominated:
        assert not re.search(rf"^\W*{number}\W+complete", result.stdout, re.M)

    export = run_cli("export", "--study", "mo", "--best", "--output-dir", "out")
    assert export.exit_code == 0, export.output
    entries = _results(tmp_path / "out")["variants"]
    assert sorted(e["trial_number"] for e in entries) == sorted(t.number for t in front)
    for entry in entries:
        assert len(entry["values"]) == 2
        assert entry["values"][1] == entry["parameters"]


def test_export_works_on_a_grid_study(run_cli: RunCli, data_copy: Path, tmp_path: Path) -> None:
    grid = run_cli(
        "grid",
        "--data-path",
        data_copy,
        "--output-dir",
        "grid-out",
        "--max-variants",
        "2",
        "--epochs",
        "2",
        "--jobs",
        "1",
        "--quiet",
    )
    assert grid.exit_code == 0, grid.output
    grid_results = _results(tmp_path / "grid-out")
    by_name = {v["name"]: v for v in grid_results["variants"]}

    listed = run_cli("trials", "--study", "calling-score-grid")
    assert listed.exit_code == 0, listed.output
    assert "Study 'calling-score-grid': 2 trials" in listed.stdout

    study = optuna.load_study(
        study_name="calling-score-grid", storage="sqlite:///studies/calling-score-grid.db"
    )
    numbers = {t.user_attrs["variant"]: t.number for t in study.get_trials()}
    assert set(numbers) == {"v1_0_baseline", "v1_1_lr_0.0001"}
    number = str(numbers["v1_1_lr_0.0001"])
    result = run_cli(
        "export", "--study", "calling-score-grid", "--trial", number, "--output-dir", "out"
    )
    assert result.exit_code == 0, result.output
    path = tmp_path / "out" / "calling_score_model_v1_1_lr_0.0001.onnx"
    assert contract_problems(path, n_features=39) == []
    (entry,) = _results(tmp_path / "out")["variants"]
    assert entry["name"] == "v1_1_lr_0.0001"
    assert entry["trial_number"] == numbers["v1_1_lr_0.0001"]
    assert entry["test_loss"] == by_name["v1_1_lr_0.0001"]["test_loss"]
    assert entry["config"]["learning_rate"] == 0.0001
    # the same weights as the grid's own export
    x = split_dataset(load_dataset(data_copy), seed=0).x_test
    grid_model = tmp_path / "grid-out" / "calling_score_model_v1_1_lr_0.0001.onnx"
    np.testing.assert_array_equal(onnx_predict(path, x), onnx_predict(grid_model, x))

    best = run_cli("export", "--study", "calling-score-grid", "--best", "--output-dir", "best")
    assert best.exit_code == 0, best.output
    winner = grid_results["summary"]["best_variant"]
    assert (tmp_path / "best" / f"calling_score_model_{winner}.onnx").is_file()


def test_export_of_two_runs_of_one_grid_variant_keeps_both(
    run_cli: RunCli, data_copy: Path, tmp_path: Path
) -> None:
    """With --repeats two trials share a variant name; each exported trial needs its own file."""
    grid = run_cli(
        "grid",
        "--data-path",
        data_copy,
        "--output-dir",
        "grid-out",
        "--max-variants",
        "1",
        "--repeats",
        "2",
        "--epochs",
        "2",
        "--jobs",
        "1",
        "--quiet",
    )
    assert grid.exit_code == 0, grid.output
    result = run_cli("export", "--study", "calling-score-grid", "--top", "2", "--output-dir", "out")
    assert result.exit_code == 0, result.output
    entries = _results(tmp_path / "out")["variants"]
    assert sorted(e["trial_number"] for e in entries) == [0, 1]
    paths = [e["onnx_path"] for e in entries]
    assert len(set(paths)) == 2, f"both trials were written to {paths[0]}"
    split = split_dataset(load_dataset(data_copy), seed=0)
    for entry in entries:
        scores = onnx_predict(tmp_path / entry["onnx_path"], split.x_test)
        mse = float(np.mean((scores.astype(np.float64) - split.y_test) ** 2))
        assert mse == pytest.approx(entry["test_loss"], abs=1e-6), entry["trial_number"]


def test_best_on_a_grid_compares_with_the_baseline_variant_not_trial_0(
    run_cli: RunCli, data_copy: Path, tmp_path: Path
) -> None:
    """The baseline's first run fails (trial 0) and a rerun trains it as a later trial; every
    command must find the baseline the same way, and report the grid summary's own figures."""
    with pytest.MonkeyPatch.context() as patch:
        baseline_config = VARIANTS[0].train_config(3, 0)
        fail_training(patch, lambda c: c == baseline_config, TrainingError("diverged"))
        run_small_grid(run_cli, data_copy, "--output-dir", "grid-out", max_variants=8, epochs=3)
    run_small_grid(run_cli, data_copy, "--output-dir", "grid-out", max_variants=8, epochs=3)
    study = optuna.load_study(
        study_name="calling-score-grid", storage="sqlite:///studies/calling-score-grid.db"
    )
    first = min(study.get_trials(), key=lambda t: t.number)
    assert (first.user_attrs["variant"], first.state.name) == ("v1_0_baseline", "FAIL")
    summary = _results(tmp_path / "grid-out")["summary"]
    baseline = next(
        t
        for t in study.get_trials()
        if t.user_attrs["variant"] == "v1_0_baseline" and t.state.name == "COMPLETE"
    )
    assert baseline.number > 0

    result = run_cli("best", "--study", "calling-score-grid")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "v1_1_batch_16" not in out.split("Baseline:")[1]
    assert f"Baseline: trial {baseline.number}, val {baseline.values[0]:.5f}" in out
    if summary["best"]["name"] != "v1_0_baseline":
        boot = summary["bootstrap"]
        low, high = boot["ci95_pct"]
        assert f"{boot['test_mse_improvement_pct']:+.2f}% test MSE" in out
        assert f"interval {low:+.2f}% .. {high:+.2f}%" in out
    else:
        assert "the baseline itself is the best trial" in out


def test_export_merges_into_the_results_file_instead_of_replacing_it(
    run_cli: RunCli, study_here: Path, tmp_path: Path, stored_trials: list[FrozenTrial]
) -> None:
    ranked = sorted(_complete(stored_trials), key=lambda t: t.values[0])
    worse, better = ranked[-1], ranked[0]
    for number in (better.number, worse.number):  # the better one first, then a worse one
        result = run_cli("export", "--trial", str(number), "--output-dir", "out")
        assert result.exit_code == 0, result.output
    results = _results(tmp_path / "out")
    by_number = {e["trial_number"]: e for e in results["variants"]}
    assert set(by_number) == {better.number, worse.number}  # nothing dropped
    assert by_number[better.number]["rank"] == 1
    assert by_number[worse.number]["rank"] == 2
    assert results["summary"]["best_variant"] == f"trial_{better.number}"
    assert results["summary"]["exported"] == 2
    # exporting a trial again updates its entry, it does not add a second one
    again = run_cli("export", "--trial", str(worse.number), "--output-dir", "out")
    assert again.exit_code == 0, again.output
    assert len(_results(tmp_path / "out")["variants"]) == 2


def test_export_refuses_a_folder_that_holds_another_studys_results(
    run_cli: RunCli, study_here: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    foreign = {
        "study": {"name": "other"},
        "data": {"fingerprint": "x"},
        "variants": [],
        "summary": {},
    }
    (out / RESULTS_FILENAME).write_text(json.dumps(foreign), encoding="utf-8")
    before = (out / RESULTS_FILENAME).read_bytes()
    result = run_cli("export", "--trial", "0", "--output-dir", out)
    assert_clean_failure(result, "holds the models of study 'other'", "--output-dir")
    assert (out / RESULTS_FILENAME).read_bytes() == before
    assert list(out.glob("*.onnx")) == []


@pytest.mark.parametrize("damage", ["not json {", "[1, 2]"])
def test_export_refuses_to_overwrite_an_unreadable_results_file(
    run_cli: RunCli, study_here: Path, tmp_path: Path, damage: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / RESULTS_FILENAME).write_text(damage, encoding="utf-8")
    result = run_cli("export", "--trial", "0", "--output-dir", out)
    assert_clean_failure(result, RESULTS_FILENAME, "move it away or pass another --output-dir")
    assert (out / RESULTS_FILENAME).read_text(encoding="utf-8") == damage


def test_export_to_an_output_dir_that_is_a_file_fails_cleanly(
    run_cli: RunCli, study_here: Path, tmp_path: Path
) -> None:
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    result = run_cli("export", "--trial", "0", "--output-dir", tmp_path / "afile")
    assert_clean_failure(result, "--output-dir", "is a file, not a folder")
    result = run_cli("export", "--trial", "0", "--output-dir", tmp_path / "afile" / "sub")
    assert_clean_failure(result, "--output-dir", "is a file, not a folder")


# --- cso studies -------------------------------------------------------------------------------


def test_studies_lists_every_study_with_its_kind_trials_and_best(
    run_cli: RunCli, study_here: Path, stored_trials: list[FrozenTrial], data_copy: Path
) -> None:
    run_small_grid(run_cli, data_copy)
    result = run_cli("studies")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "2 studies" in out
    best = min(_complete(stored_trials), key=lambda t: t.values[0])
    search_row = next(line for line in out.splitlines() if STUDY in line)
    assert "search" in search_row and " 8 " in search_row and " 5 " in search_row
    assert f"{best.values[0]:.5f} (#{best.number})" in search_row
    assert f"sqlite:///studies/{STUDY}.db" in search_row
    grid_row = next(line for line in out.splitlines() if "calling-score-grid" in line)
    assert "grid" in grid_row and " 2 " in grid_row


def test_studies_with_nothing_there_says_what_to_do(run_cli: RunCli) -> None:
    result = run_cli("studies")
    assert result.exit_code == 0, result.output
    assert "No studies in studies/ yet: run cso grid or cso search first." in result.stdout


def test_a_missing_study_names_the_studies_there_are(run_cli: RunCli, study_here: Path) -> None:
    """After the README's cso grid, cso trials (default: the search study) must say where the
    grid's study is instead of only that the search study is missing."""
    for command in (("trials",), ("best",), ("export", "--trial", "3")):
        result = run_cli(*command, "--study", "calling-score-grid")
        assert_clean_failure(
            result, "no study 'calling-score-grid'", f"'{STUDY}'", "see cso studies"
        )


def test_trials_shows_each_grid_trials_variant(run_cli: RunCli, data_copy: Path) -> None:
    run_small_grid(run_cli, data_copy)
    result = run_cli("trials", "--study", "calling-score-grid")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "state" in line)
    assert "variant" in header
    assert "v1_0_baseline" in result.stdout and "v1_1_lr_0.0001" in result.stdout
