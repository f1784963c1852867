"""``cso export --ensemble``: greedy selection on validation, one ONNX file, honest test figures."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from helpers import assert_clean_failure, run_small_grid
from typer.testing import Result

import calling_score_opt.ensemble as ensemble_module
from calling_score_opt.data import load_dataset, split_dataset
from calling_score_opt.ensemble import ONNX_FILENAME, build_ensemble, greedy_selection
from calling_score_opt.errors import ConfigError
from calling_score_opt.export import contract_problems, onnx_predict, read_metadata
from calling_score_opt.registry import load_registry
from calling_score_opt.results import RESULTS_FILENAME
from calling_score_opt.search import SearchSettings, run_search
from calling_score_opt.study import (
    ENSEMBLE_STEM,
    artifact_store,
    open_storage,
    read_checkpoint,
    read_study_json,
)
from calling_score_opt.train import load_checkpoint
from calling_score_opt.trials import load_study

RunCli = Callable[..., Result]
STUDY = "calling-score-search"


# --- the selection itself ----------------------------------------------------------------------


def test_greedy_selection_combines_models_whose_errors_cancel() -> None:
    y = np.zeros(4)
    val = np.array(
        [
            [0.1, -0.1, 0.1, -0.1],  # the best single model (MSE 0.01) ...
            [-0.1, 0.1, -0.1, 0.1],  # ... and its mirror: together they are exact
            [0.5, 0.5, 0.5, 0.5],  # a bad one, never worth a pick
        ]
    )
    selection = greedy_selection(val, y, rounds=10, max_members=3)
    assert selection.picks[0] == 0  # the first pick is the best single model
    assert selection.picks == (0, 1)  # then its mirror; the best prefix stops there
    assert selection.val_losses == pytest.approx((0.01, 0.0))
    np.testing.assert_allclose(selection.weights(3), [0.5, 0.5, 0.0])


def test_greedy_selection_picks_with_replacement_and_keeps_the_best_prefix() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(200)
    val = np.stack([y + rng.normal(0.0, s, 200) for s in (0.05, 0.1, 0.2, 0.4)])
    selection = greedy_selection(val, y, rounds=30, max_members=4)
    weights = selection.weights(4)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[0] == max(weights)  # the most accurate model weighs most
    assert max(selection.picks.count(i) for i in set(selection.picks)) > 1  # a repeat pick
    ensemble_mse = float(np.mean((weights @ val - y) ** 2))
    assert ensemble_mse == pytest.approx(selection.val_losses[-1])
    assert ensemble_mse == min(selection.val_losses)  # the kept prefix is the best one
    assert ensemble_mse < float(np.mean((val[0] - y) ** 2))


def test_greedy_selection_respects_max_members() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(100)
    val = np.stack([y + rng.normal(0.0, 0.1, 100) for _ in range(6)])  # all worth combining
    assert len(set(greedy_selection(val, y, rounds=40, max_members=6).picks)) > 2
    assert len(set(greedy_selection(val, y, rounds=40, max_members=2).picks)) <= 2


def test_greedy_selection_refuses_nonsense() -> None:
    with pytest.raises(ConfigError):
        greedy_selection(np.zeros((2, 3)), np.zeros(3), rounds=0)


# --- an ensemble of a real (tiny) study ------------------------------------------------------


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, synth_file: Path) -> Path:
    """A search study with 6 complete trials (random sampler, no pruning)."""
    root = tmp_path_factory.mktemp("ensemble")
    settings = SearchSettings(
        data_path=synth_file,
        trials=6,
        epochs=4,
        sampler="random",
        pruner="none",
        study_name=STUDY,
        storage_url=f"sqlite:///{root}/studies/{STUDY}.db",
    )
    run_search(settings)
    return root


@pytest.fixture
def study_here(searched: Path, tmp_path: Path) -> Path:
    shutil.copytree(searched / "studies", tmp_path / "studies")
    return tmp_path / "studies"


def _load() -> optuna.Study:
    return load_study(f"sqlite:///studies/{STUDY}.db", STUDY)


def test_the_ensemble_is_one_contract_model_that_scores_the_weighted_mean_of_its_members(
    study_here: Path, tmp_path: Path, synth_file: Path
) -> None:
    study = _load()
    outcome = build_ensemble(study, tmp_path / "out", f"sqlite:///studies/{STUDY}.db")
    path = outcome.onnx_path
    assert path == tmp_path / "out" / ONNX_FILENAME
    assert contract_problems(path, n_features=39) == []
    assert list((tmp_path / "out").glob("*.onnx.data")) == []  # one self-contained file

    # the app's contract: [N] for N records, [1] for one
    split = split_dataset(load_dataset(synth_file), seed=0)
    scores = onnx_predict(path, split.x_test)
    assert scores.shape == (len(split.x_test),)
    assert onnx_predict(path, split.x_test[:1]).shape == (1,)

    # rebuilt independently from the members' stored weights
    store = artifact_store(study_here / f"{STUDY}.artifacts")
    storage = open_storage(f"sqlite:///studies/{STUDY}.db")
    trials = {t.number: t for t in study.get_trials()}
    expected = np.zeros(len(split.x_test))
    for member in outcome.record["members"]:
        model, _, _ = load_checkpoint(read_checkpoint(store, storage, trials[member["trial"]]))
        import torch

        with torch.no_grad():
            expected += member["weight"] * model(torch.from_numpy(split.x_test)).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert sum(m["weight"] for m in outcome.record["members"]) == pytest.approx(1.0)
    test_mse = float(np.mean((scores.astype(np.float64) - split.y_test) ** 2))
    assert test_mse == pytest.approx(outcome.record["test_loss"], abs=1e-6)

    metadata = read_metadata(path)
    assert metadata["variant"] == "ensemble"
    listed = json.loads(metadata["ensemble"])
    assert [m["trial"] for m in listed["members"]] == [
        m["trial"] for m in outcome.record["members"]
    ]
    assert json.loads(metadata["metrics"])["test_loss"] == pytest.approx(test_mse, abs=1e-6)


def test_the_ensemble_is_chosen_on_validation_and_never_worse_there_than_the_best_trial(
    study_here: Path, tmp_path: Path
) -> None:
    record = build_ensemble(_load(), tmp_path / "out", f"sqlite:///studies/{STUDY}.db").record
    best = record["best_single"]
    assert best["trial"] == min(_load().best_trials, key=lambda t: t.values[0]).number
    assert record["val_loss"] <= best["val_loss"] + 1e-12
    assert record["selection"][0]["trial"] == best["trial"]  # the greedy start
    assert record["rounds"] == len(record["selection"])
    assert record["val_loss"] == pytest.approx(min(p["val_loss"] for p in record["selection"]))
    boot = record["vs_best_single"]
    expected = (best["test_loss"] - record["test_loss"]) / best["test_loss"] * 100
    assert boot["test_mse_improvement_pct"] == pytest.approx(expected)
    low, high = boot["ci95_pct"]
    assert low <= boot["test_mse_improvement_pct"] <= high
    assert record["baseline"]["trial"] == 0
    assert record["vs_baseline"] is not None


def test_the_test_split_never_chooses(
    study_here: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scrambling the test labels changes the reported test loss, never the members."""
    url = f"sqlite:///studies/{STUDY}.db"
    honest = build_ensemble(_load(), tmp_path / "a", url).record
    real = ensemble_module.study_data

    def scrambled(*args: Any, **kwargs: Any) -> Any:
        data = real(*args, **kwargs)
        object.__setattr__(data.split, "y_test", data.split.y_test[::-1].copy())
        return data

    monkeypatch.setattr(ensemble_module, "study_data", scrambled)
    other = build_ensemble(_load(), tmp_path / "b", url).record
    assert [(m["trial"], m["weight"]) for m in other["members"]] == [
        (m["trial"], m["weight"]) for m in honest["members"]
    ]
    assert other["test_loss"] != honest["test_loss"]


def test_the_ensemble_is_recorded_in_the_study_and_the_results_file(
    study_here: Path, tmp_path: Path, run_cli: RunCli
) -> None:
    exported = run_cli("export", "--trial", "0", "--output-dir", "out")
    assert exported.exit_code == 0, exported.output
    result = run_cli("export", "--ensemble", "--output-dir", "out")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Ensemble of" in out
    assert "Selected on the validation split; the test split only reports" in out
    assert "vs the best single trial" in out and "95% paired-bootstrap interval" in out
    assert "vs the baseline (trial_0)" in out
    assert "Explainable variance captured on the test split" in out  # synthetic: floor known

    results = json.loads((tmp_path / "out" / RESULTS_FILENAME).read_text())
    names = [v["name"] for v in results["variants"]]
    assert names == ["trial_0", "ensemble"]  # the earlier export is kept
    entry = results["variants"][1]
    assert entry["kind"] == "ensemble" and "rank" not in entry  # not ranked on its own val
    assert results["summary"]["best_variant"] == "trial_0"
    assert results["summary"]["ensemble"]["members"] == len(entry["members"])

    stored = read_study_json(
        artifact_store(study_here / f"{STUDY}.artifacts"), _load(), ENSEMBLE_STEM
    )
    assert stored is not None
    assert stored["test_loss"] == pytest.approx(entry["test_loss"])
    assert stored["onnx_path"] == entry["onnx_path"]


def test_max_members_bounds_the_ensemble(study_here: Path, run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli("export", "--ensemble", "--max-members", "1", "--output-dir", "one")
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "one" / RESULTS_FILENAME).read_text())["variants"][0]
    assert len(entry["members"]) == 1
    assert entry["members"][0]["weight"] == 1.0


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (("--ensemble", "--trial", "1"), "exactly one of --trial N, --best, --top K, --ensemble"),
        (("--ensemble", "--study", "nope"), "no study 'nope'"),
        (("--ensemble", "--max-members", "0"), "--max-members"),
    ],
)
def test_ensemble_refusals_fail_cleanly(
    study_here: Path, run_cli: RunCli, tmp_path: Path, options: tuple[str, ...], fragment: str
) -> None:
    result = run_cli("export", *options, "--output-dir", "out")
    if fragment == "--max-members":  # typer's own range check: usage error, exit 2
        assert result.exit_code == 2 and "Traceback" not in result.output
        return
    assert_clean_failure(result, fragment)
    assert not (tmp_path / "out").exists()


def test_a_study_without_complete_trials_has_no_ensemble(
    tmp_path: Path, synth_file: Path, run_cli: RunCli
) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/studies/empty.db")
    study = optuna.create_study(study_name="empty", storage=storage)
    study.set_user_attr("data_path", str(synth_file))
    study.set_user_attr("data_fingerprint", load_dataset(synth_file).fingerprint)
    result = run_cli("export", "--ensemble", "--study", "empty", "--output-dir", "out")
    assert_clean_failure(result, "no complete trial", "cso search or cso grid")


def test_register_the_ensemble_from_the_study_and_from_its_file(
    study_here: Path, run_cli: RunCli, tmp_path: Path
) -> None:
    result = run_cli(
        "registry", "register", "--version", "v2.0-ens", "--data-source", "synthetic", "--ensemble"
    )
    assert result.exit_code == 0, result.output
    record = load_registry(Path("assets/models/registry.json")).version("calling_score", "v2.0-ens")
    assert Path(record.model_path).name == ONNX_FILENAME
    assert Path(record.model_path).is_file()
    assert record.source["kind"] == "study_ensemble"
    assert record.source["members"]
    # the study's record of this ensemble names the registered file, not the staging folder
    store = artifact_store(study_here / f"{STUDY}.artifacts")
    recorded = read_study_json(store, _load(), ENSEMBLE_STEM)
    assert recorded is not None and Path(recorded["onnx_path"]) == Path(record.model_path)
    assert record.training_metrics["improvement_vs_baseline"] is not None

    exported = run_cli("export", "--ensemble", "--output-dir", "out")
    assert exported.exit_code == 0, exported.output
    from_file = run_cli(
        "registry",
        "register",
        "--version",
        "v2.1-ens",
        "--data-source",
        "synthetic",
        "--model",
        tmp_path / "out" / ONNX_FILENAME,
    )
    assert from_file.exit_code == 0, from_file.output
    assert "ensemble" in from_file.stdout


def test_an_ensemble_of_a_grid_study(run_cli: RunCli, data_copy: Path, tmp_path: Path) -> None:
    run_small_grid(run_cli, data_copy, max_variants=3)
    result = run_cli(
        "export",
        "--ensemble",
        "--study",
        "calling-score-grid",
        "--output-dir",
        "assets/models/optimized",
    )
    assert result.exit_code == 0, result.output
    assert "vs the baseline (v1_0_baseline)" in result.stdout
    results = json.loads(Path("assets/models/optimized", RESULTS_FILENAME).read_text())
    names = {v["name"] for v in results["variants"]}
    assert {"v1_0_baseline", "v1_1_lr_0.0001", "v1_1_lr_0.0005", "ensemble"} <= names
    assert "bootstrap" in results["summary"]  # the grid's own summary is kept
    # a rerun of the grid keeps what export added to its results file
    run_small_grid(run_cli, data_copy, max_variants=3)
    results = json.loads(Path("assets/models/optimized", RESULTS_FILENAME).read_text())
    assert "ensemble" in {v["name"] for v in results["variants"]}
    assert "ensemble" in results["summary"]
