"""Paired bootstrap of a test-MSE improvement over the baseline."""

from __future__ import annotations

import numpy as np
import pytest

from calling_score_opt.stats import Improvement, paired_bootstrap_improvement


def _errors(seed: int, n: int = 300) -> np.ndarray:
    return np.random.default_rng(seed).gamma(1.0, 0.02, n)


def test_identical_errors_mean_zero_improvement_with_zero_interval() -> None:
    errors = _errors(0)
    result = paired_bootstrap_improvement(errors, errors.copy())
    assert result.percent == 0.0
    assert (result.ci_low, result.ci_high) == (0.0, 0.0)
    assert result.verdict.startswith("within noise")


def test_point_estimate_is_the_relative_mse_difference() -> None:
    baseline = np.array([0.04, 0.02, 0.02, 0.02])  # MSE 0.025
    model = np.array([0.01, 0.01, 0.01, 0.01])  # MSE 0.010
    result = paired_bootstrap_improvement(baseline, model, resamples=500)
    assert result.percent == pytest.approx((0.025 - 0.010) / 0.025 * 100)  # 60 %
    assert result.resamples == 500


def test_clearly_better_model_has_an_interval_above_zero() -> None:
    baseline = _errors(1)
    better = baseline * 0.7  # 30 % less error on every record
    result = paired_bootstrap_improvement(baseline, better)
    assert result.percent == pytest.approx(30.0)
    assert 0 < result.ci_low <= result.percent <= result.ci_high
    assert result.verdict == "better than the baseline (the 95% interval excludes zero)"


def test_clearly_worse_model_has_an_interval_below_zero() -> None:
    baseline = _errors(2)
    worse = baseline * 1.5 + 0.01
    result = paired_bootstrap_improvement(baseline, worse)
    assert result.ci_low <= result.percent <= result.ci_high < 0
    assert result.verdict == "worse than the baseline (the 95% interval excludes zero)"


def test_noise_gives_an_interval_around_zero() -> None:
    baseline = _errors(3)
    other = baseline[np.random.default_rng(4).permutation(len(baseline))]  # same errors, shuffled
    result = paired_bootstrap_improvement(baseline, other)
    assert result.ci_low < 0 < result.ci_high
    assert result.verdict == "within noise (the 95% interval includes zero)"


def test_small_consistent_gain_is_detected_by_the_paired_test() -> None:
    baseline = _errors(5)
    paired = baseline * 0.97  # 3 % better on every record: pairing makes that certain
    result = paired_bootstrap_improvement(baseline, paired)
    assert result.ci_low > 0
    assert result.ci_high - result.ci_low < 1e-6  # every resample gives exactly 3 %


def test_deterministic_by_seed() -> None:
    a, b = _errors(6), _errors(7)
    first = paired_bootstrap_improvement(a, b, seed=1)
    assert first == paired_bootstrap_improvement(a, b, seed=1)
    assert first != paired_bootstrap_improvement(a, b, seed=2)


@pytest.mark.parametrize(
    ("baseline", "model"),
    [(np.ones(5), np.ones(4)), (np.ones((2, 3)), np.ones((2, 3)))],
)
def test_mismatched_errors_are_refused(baseline: np.ndarray, model: np.ndarray) -> None:
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_improvement(baseline, model)


def test_verdict_follows_the_interval() -> None:
    assert "better" in Improvement(5.0, 0.1, 9.0, 10).verdict
    assert "worse" in Improvement(-5.0, -9.0, -0.1, 10).verdict
    assert "within noise" in Improvement(1.0, -0.1, 3.0, 10).verdict
    assert "within noise" in Improvement(0.0, 0.0, 0.0, 10).verdict
