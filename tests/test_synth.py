"""Synthetic data: the app's format, deterministic, with an honest noise floor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import assert_clean_failure

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


# --- the gated generator ---------------------------------------------------------------------


def test_gated_file_is_the_apps_format_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    metadata = synth.write_synthetic(path, 300, seed=1, kind="gated")
    assert metadata["kind"] == "gated"
    assert metadata["source"] == "cso_synthetic_gated"
    records = json.loads(path.read_text(encoding="utf-8"))["training_data"]
    types = {r["outcome_type"] for r in records}
    assert types <= {"positive", "neutral", "negative", "not_called"}
    assert {r["is_called"] for r in records} == {True, False}  # both regimes occur
    for record in records:
        assert (record["outcome_type"] == "not_called") == (not record["is_called"])
        assert 0.0 <= record["outcome_score"] <= 1.0
    dataset = load_dataset(path)
    assert dataset.irreducible_mse == metadata["irreducible_mse"]
    # clipping puts real mass on the bounds, as engagement data has
    scores = np.array([r["outcome_score"] for r in records])
    assert (scores == 0.0).mean() > 0.05


def test_gated_same_seed_same_bytes_and_the_default_stays_hybrid(tmp_path: Path) -> None:
    a, b, h = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "h.json"
    synth.write_synthetic(a, 100, seed=2, kind="gated")
    synth.write_synthetic(b, 100, seed=2, kind="gated")
    synth.write_synthetic(h, 100, seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(h.read_text())["metadata"]["kind"] == "hybrid"


def test_clipped_normal_moments_match_sampling() -> None:
    rng = np.random.default_rng(0)
    for mean, sd in ((0.78, 0.3), (0.02, 0.15), (0.5, 0.25), (1.3, 0.4)):
        draws = np.clip(rng.normal(mean, sd, 2_000_000), 0.0, 1.0)
        first, second = synth.clipped_normal_moments(np.array([mean]), sd)
        assert first[0] == pytest.approx(draws.mean(), abs=1e-3)
        assert second[0] == pytest.approx((draws**2).mean(), abs=1e-3)


def test_gated_irreducible_mse_is_the_exact_mean_conditional_variance() -> None:
    """Draw many labels for the same records: their spread around each record's true mean is
    what the recorded noise floor says, clipping included."""
    rng = np.random.default_rng(11)
    user, spot, context, timing = synth._features(rng, 2_000)
    repeats = 400
    draws = np.stack(
        [
            synth._gated_labels(np.random.default_rng(100 + r), user, spot, context, timing)[0]
            for r in range(repeats)
        ]
    )
    variance = synth._gated_labels(rng, user, spot, context, timing)[3]
    sampled = draws.var(axis=0, ddof=1)  # per record, over independent label draws
    assert sampled.mean() == pytest.approx(variance.mean(), rel=0.01)
    assert np.corrcoef(sampled, variance)[0, 1] > 0.95


def test_gated_data_leaves_much_to_learn() -> None:
    """The point of the generator: a large share of the label variance is explainable, and it
    is not a linear function of the inputs (a linear fit captures little of it)."""
    metadata = synth.generate_records(20_000, seed=0, kind="gated")["metadata"]
    explainable = metadata["label_variance"] - metadata["irreducible_mse"]
    assert 0.2 < explainable / metadata["label_variance"] < 0.6
    path_records = synth.generate_records(20_000, seed=0, kind="gated")["training_data"]
    from calling_score_opt.data import FEATURE_GROUPS as groups

    x = np.array([[r[g][n] for g, names in groups for n in names] for r in path_records])
    y = np.array([r["outcome_score"] for r in path_records])
    design = np.column_stack([x, np.ones(len(x))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    linear_mse = float(np.mean((design @ coef - y) ** 2))
    captured = (metadata["label_variance"] - linear_mse) / explainable
    assert captured < 0.6  # a linear model misses much of what a good model can learn


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="--kind must be one of hybrid, gated"):
        synth.generate_records(10, seed=0, kind="real")


# --- the command --------------------------------------------------------------------------------


def test_synth_refuses_to_overwrite_without_force(run_cli: Any, tmp_path: Path) -> None:
    target = tmp_path / "data" / "calling_score_training_data_v1_hybrid.json"
    target.parent.mkdir()
    target.write_text("real data", encoding="utf-8")
    result = run_cli("data", "synth", "--records", "50", "--output", target)
    assert_clean_failure(result, f"--output {target}: exists", "--force")
    assert target.read_text(encoding="utf-8") == "real data"
    result = run_cli("data", "synth", "--records", "50", "--output", target, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(target.read_text())["metadata"]["num_samples"] == 50


def test_synth_gated_from_the_command_line(run_cli: Any, tmp_path: Path) -> None:
    target = tmp_path / "g.json"
    result = run_cli("data", "synth", "--kind", "gated", "--records", "60", "--output", target)
    assert result.exit_code == 0, result.output
    assert "Wrote 60 gated records" in result.output
    assert json.loads(target.read_text())["metadata"]["kind"] == "gated"


def test_synth_unknown_kind_fails_cleanly(run_cli: Any, tmp_path: Path) -> None:
    result = run_cli("data", "synth", "--kind", "real", "--output", tmp_path / "x.json")
    assert_clean_failure(result, "--kind must be one of hybrid, gated")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("where", ["folder", "under_file"])
def test_synth_unusable_output_fails_cleanly_before_work(
    run_cli: Any, tmp_path: Path, where: str
) -> None:
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    output = tmp_path if where == "folder" else tmp_path / "afile" / "data.json"
    result = run_cli("data", "synth", "--records", "20", "--output", output)
    fragment = "is a folder" if where == "folder" else "is a file, not a folder"
    assert_clean_failure(result, fragment)
