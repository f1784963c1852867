"""Synthetic data: the app's format, deterministic, with an honest noise floor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calling_score_opt import synth
from calling_score_opt.data import FEATURE_GROUPS, load_dataset
from calling_score_opt.errors import ConfigError


def test_same_seed_gives_byte_identical_file(tmp_path: Path) -> None:
    synth.write_synthetic(tmp_path / "a.json", 200, seed=3)
    synth.write_synthetic(tmp_path / "b.json", 200, seed=3)
    synth.write_synthetic(tmp_path / "c.json", 200, seed=4)
    a, b, c = (tmp_path / n for n in ("a.json", "b.json", "c.json"))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_file_is_the_apps_export_format(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    metadata = synth.write_synthetic(path, 50, seed=1)
    document = json.loads(path.read_text(encoding="utf-8"))
    assert set(document) == {"metadata", "training_data"}
    assert document["metadata"] == metadata
    assert metadata["num_samples"] == 50
    assert metadata["seed"] == 1
    records = document["training_data"]
    assert len(records) == 50
    for record in records:
        for group, names in FEATURE_GROUPS:
            # every documented key is present (extras such as spot_rating may be added)
            assert set(names) <= set(record[group])
            assert all(0.0 <= record[group][n] <= 1.0 for n in names)
        assert 0.0 <= record["outcome_score"] <= 1.0
        assert 0.0 <= record["formula_calling_score"] <= 1.0
        formula = record["formula_calling_score"]
        if abs(formula - 0.7) > 1e-4:  # is_called is decided before rounding to 4 digits
            assert record["is_called"] == (formula >= 0.7)
        assert record["outcome_type"] in {"positive", "negative", "neutral"}


def test_loads_without_defaults(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    synth.write_synthetic(path, 40, seed=2)
    dataset = load_dataset(path)
    assert dataset.n_records == 40
    assert dataset.defaulted is not None and int(dataset.defaulted.sum()) == 0
    assert dataset.label_sources["outcome_score"] == 40


def test_metadata_noise_floor_is_positive_and_below_label_variance(tmp_path: Path) -> None:
    metadata = synth.write_synthetic(tmp_path / "s.json", 2000, seed=0)
    dataset = load_dataset(tmp_path / "s.json")
    assert 0.0 < metadata["irreducible_mse"] < metadata["label_variance"]
    assert metadata["label_variance"] == pytest.approx(float(np.var(dataset.labels)), abs=1e-5)
    # there is learnable signal: the floor is well below predicting the mean
    assert metadata["irreducible_mse"] < 0.6 * metadata["label_variance"]


def test_irreducible_mse_is_what_the_true_probability_scores() -> None:
    """An oracle predicting the true outcome probability reaches the recorded floor."""
    document = synth.generate_records(6000, seed=5)
    records = document["training_data"]

    def block(group: str, names: tuple[str, ...]) -> np.ndarray:
        return np.array([[r[group][n] for n in names] for r in records])

    (user_key, vibe), (spot_key, _), (ctx_key, ctx), (tim_key, tim) = FEATURE_GROUPS
    _, probability = synth._outcome_probability(
        block(user_key, vibe), block(spot_key, vibe), block(ctx_key, ctx), block(tim_key, tim)
    )
    labels = np.array([r["outcome_score"] for r in records])
    oracle_mse = float(np.mean((labels - probability) ** 2))
    floor = document["metadata"]["irreducible_mse"]
    assert oracle_mse == pytest.approx(floor, rel=0.1)
    # and the formula score alone is clearly worse than the oracle (the interactions matter)
    formula = np.array([r["formula_calling_score"] for r in records])
    assert float(np.mean((labels - formula) ** 2)) > 1.5 * oracle_mse


def test_generate_records_is_deterministic() -> None:
    assert synth.generate_records(30, seed=9) == synth.generate_records(30, seed=9)
    assert synth.generate_records(30, seed=9) != synth.generate_records(30, seed=10)


@pytest.mark.parametrize("n", [0, -5])
def test_record_count_must_be_positive(tmp_path: Path, n: int) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        synth.write_synthetic(tmp_path / "s.json", n, seed=0)
    assert not (tmp_path / "s.json").exists()


def test_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    synth.write_synthetic(tmp_path / "out" / "s.json", 10, seed=0)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["s.json"]
