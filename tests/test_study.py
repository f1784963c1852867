"""Optuna storages and studies: names, locations, identity checks, stored weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from calling_score_opt.errors import StudyError
from calling_score_opt.space import VARIANTS, grid_distributions
from calling_score_opt.study import (
    artifact_store,
    check_study_name,
    default_artifact_dir,
    default_storage_url,
    finish_trial,
    open_storage,
    open_study,
    read_checkpoint,
    read_learning_curve,
    start_trial,
)


@pytest.mark.parametrize("name", ["calling-score-grid", "a", "v1.1_x-y", "A" * 100])
def test_good_study_names(name: str) -> None:
    assert check_study_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", "../escape", "a b", "a/b", "A" * 101, "é"])
def test_bad_study_names(name: str) -> None:
    with pytest.raises(StudyError, match="must be 1-100 letters"):
        check_study_name(name)


def test_default_locations_are_under_studies() -> None:
    url = default_storage_url("grid-1")
    assert url == "sqlite:///studies/grid-1.db"
    assert default_artifact_dir(url, "grid-1") == Path("studies/grid-1.artifacts")
    assert default_artifact_dir("sqlite:////abs/x.db", "s") == Path("/abs/x.artifacts")
    assert default_artifact_dir("postgresql://u@h/db", "s") == Path("studies/s.artifacts")


def test_open_storage_creates_the_sqlite_folder(tmp_path: Path) -> None:
    open_storage(f"sqlite:///{tmp_path}/deep/er/s.db")
    assert (tmp_path / "deep" / "er" / "s.db").exists()


@pytest.mark.parametrize("url", ["not a url", "nosuchdb://x/y"])
def test_open_storage_bad_url_is_a_study_error(url: str) -> None:
    with pytest.raises(StudyError, match="cannot open"):
        open_storage(url)


def test_identity_mismatch_is_refused(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    study = open_study(storage, "s", {"data_fingerprint": "sha256:a", "epochs": 5})
    assert study.user_attrs == {"data_fingerprint": "sha256:a", "epochs": 5}
    again = open_study(storage, "s", {"data_fingerprint": "sha256:a", "epochs": 5})
    assert again.study_name == "s"
    with pytest.raises(StudyError, match=r"data_fingerprint = 'sha256:a', this run has 'sha256:b'"):
        open_study(storage, "s", {"data_fingerprint": "sha256:b", "epochs": 5})
    with pytest.raises(StudyError, match="--study NEW_NAME"):
        open_study(storage, "s", {"data_fingerprint": "sha256:a", "epochs": 6})


def record_trial(study: Any, *, params: Any, distributions: Any, **finish: Any) -> Any:
    """One finished run as a trial: claimed (start_trial), then finished (finish_trial)."""
    trial_id = start_trial(study, params=params, distributions=distributions, user_attrs={})
    return finish_trial(study, trial_id, **finish)


def test_recorded_trial_keeps_values_attrs_and_weights(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    study = open_study(storage, "s", {})
    store = artifact_store(tmp_path / "artifacts")
    trial = record_trial(
        study,
        params=VARIANTS[3].params(),
        distributions=grid_distributions(),
        value=0.0123,
        user_attrs={"variant": VARIANTS[3].name, "val_loss": 0.0123},
        artifact_store=store,
        checkpoint=b"weights",
        history=[(1, 0.06, 0.05), (2, 0.02, 0.0123)],
    )
    assert trial.state.name == "COMPLETE"
    assert trial.value == 0.0123
    assert trial.params == VARIANTS[3].params()
    assert trial.user_attrs["variant"] == "v1_1_lr_0.002"
    assert read_checkpoint(store, storage, trial) == b"weights"
    assert read_learning_curve(store, storage, trial) == {
        "epoch": [1, 2],
        "train_loss": [0.06, 0.02],
        "val_loss": [0.05, 0.0123],
    }

    failed = record_trial(
        study,
        params=VARIANTS[0].params(),
        distributions=grid_distributions(),
        value=None,
        user_attrs={"error": "diverged"},
    )
    assert failed.state.name == "FAIL"
    with pytest.raises(StudyError, match="has no stored weights"):
        read_checkpoint(store, storage, failed)


def test_missing_weights_file_is_a_study_error(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    study = open_study(storage, "s", {})
    store = artifact_store(tmp_path / "artifacts")
    trial = record_trial(
        study,
        params=VARIANTS[0].params(),
        distributions=grid_distributions(),
        value=0.02,
        user_attrs={},
        artifact_store=store,
        checkpoint=b"weights",
    )
    for stored in (tmp_path / "artifacts").rglob("*"):
        if stored.is_file():
            stored.unlink()
    with pytest.raises(StudyError, match="missing from the artifact folder"):
        read_checkpoint(store, storage, trial)
