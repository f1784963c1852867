"""Shared fixtures: tiny synthetic data, hand-made records and a CLI runner.

Every test runs in its own temporary working directory (``studies/``, ``assets/`` and ``data/``
defaults land there, never in the repository). Expensive fixtures are module- or session-scoped
and use absolute paths, because they are built before the per-test directory change.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from calling_score_opt.data import Dataset, Split, load_dataset, split_dataset
from calling_score_opt.synth import write_synthetic
from calling_score_opt.train import TrainConfig, TrainResult, train_model

N_RECORDS = 200
DATA_SEED = 7


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run every test inside its own empty directory."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture(scope="session")
def synth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 synthetic records in the app's JSON format (read-only: copy it before changing it)."""
    path = tmp_path_factory.mktemp("data") / "tiny.json"
    write_synthetic(path, N_RECORDS, DATA_SEED)
    return path


@pytest.fixture(scope="session")
def synth_file_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another 200 synthetic records (other seed, so other bytes and another fingerprint)."""
    path = tmp_path_factory.mktemp("data") / "tiny_other.json"
    write_synthetic(path, N_RECORDS, DATA_SEED + 1)
    return path


@pytest.fixture
def data_copy(synth_file: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny synthetic file inside this test's directory."""
    target = tmp_path / "tiny.json"
    shutil.copyfile(synth_file, target)
    return target


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def run_cli() -> Callable[..., Result]:
    """Invoke ``cso`` in-process: ``run_cli("data", "check", "x.json")``.

    Output is wide (COLUMNS=200) so rich never truncates a table cell or wraps a line.
    """
    from calling_score_opt.cli import app

    runner = CliRunner()

    def invoke(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> Result:
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})

    return invoke


# --- loaded data and one trained model, shared --------------------------------------------


@pytest.fixture(scope="session")
def tiny_dataset(synth_file: Path) -> Dataset:
    return load_dataset(synth_file)


@pytest.fixture(scope="session")
def tiny_split(tiny_dataset: Dataset) -> Split:
    return split_dataset(tiny_dataset, seed=0)


@pytest.fixture(scope="session")
def trained(tiny_split: Split) -> TrainResult:
    """A baseline-shaped model trained for 5 epochs on the tiny split (do not modify it)."""
    return train_model(tiny_split, TrainConfig(epochs=5, seed=0))
