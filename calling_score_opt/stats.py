"""Small statistics the summaries need: a paired bootstrap of an MSE improvement, and the loss
of a model that learned nothing (no PyTorch here: the summaries are written without it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from calling_score_opt.data import Split

F64 = npt.NDArray[np.float64]


def mean_predictor_loss(split: Split) -> float:
    """The validation MSE of the constant prediction ``mean(y_train)``, exactly (float64).

    The yardstick of a model that learned nothing: a dead network (say, after too high a
    learning rate) outputs one constant, and training pulls that constant towards this mean.
    """
    mean = float(np.mean(split.y_train, dtype=np.float64))
    return float(np.mean((split.y_val.astype(np.float64) - mean) ** 2))


def no_better_than_mean(val_loss: float, mean_predictor_val_loss: float) -> bool:
    """Whether ``val_loss`` is no better than predicting the training mean (NaN: unknown, no)."""
    return val_loss >= mean_predictor_val_loss


@dataclass(frozen=True)
class Improvement:
    """Test-MSE improvement of a model over a baseline in %, with a 95% bootstrap interval."""

    percent: float
    ci_low: float
    ci_high: float
    resamples: int

    @property
    def verdict(self) -> str:
        return self.verdict_against("the baseline")

    def verdict_against(self, reference: str) -> str:
        """Better, worse, or within noise of ``reference``, from whether the interval holds 0."""
        if self.ci_low > 0:
            return f"better than {reference} (the 95% interval excludes zero)"
        if self.ci_high < 0:
            return f"worse than {reference} (the 95% interval excludes zero)"
        return "within noise (the 95% interval includes zero)"

    def to_dict(self, verdict: str | None = None) -> dict[str, Any]:
        """As stored in results files: percent, interval, resamples, method and verdict."""
        return {
            "test_mse_improvement_pct": self.percent,
            "ci95_pct": [self.ci_low, self.ci_high],
            "resamples": self.resamples,
            "method": "paired bootstrap over test records",
            "verdict": verdict or self.verdict,
        }


def paired_bootstrap_improvement(
    baseline_sq_err: F64, model_sq_err: F64, resamples: int = 2000, seed: int = 0
) -> Improvement:
    """``(baseline MSE - model MSE) / baseline MSE * 100`` and its 95% percentile interval.

    The two error arrays are per test record, in the same order: each resample draws records
    (not errors), so both models are judged on the same records, which is what makes the
    interval narrow enough to mean something.
    """
    if baseline_sq_err.shape != model_sq_err.shape or baseline_sq_err.ndim != 1:
        raise ValueError("paired errors must be 1-D arrays of the same length")
    n = len(baseline_sq_err)
    percent = float((baseline_sq_err.sum() - model_sq_err.sum()) / baseline_sq_err.sum() * 100)
    rng = np.random.default_rng(seed)
    samples = np.empty(resamples)
    for start in range(0, resamples, 250):  # chunks keep memory flat for large test sets
        idx = rng.integers(0, n, size=(min(250, resamples - start), n))
        base = baseline_sq_err[idx].sum(1)
        samples[start : start + len(idx)] = (base - model_sq_err[idx].sum(1)) / base * 100
    low, high = np.percentile(samples, [2.5, 97.5])
    return Improvement(percent=percent, ci_low=float(low), ci_high=float(high), resamples=resamples)
