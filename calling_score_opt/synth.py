"""Synthetic training data in the app's JSON format, with a known noise floor.

The label process follows the spirit of the app's hybrid data: a calling formula that scores how
well a user's and a spot's vibes match (per-dimension differences, some dimensions mattering more
than others), the context and the timing, turned into an outcome probability with a few
interactions the formula does not know about; the observed ``outcome_score`` is drawn from a Beta
distribution around that probability. Because the noise model is known, the best test MSE any
model could reach (the mean conditional variance of the label) is known too, and is stored in
``metadata["irreducible_mse"]`` so results can say how much of the learnable signal they captured.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from calling_score_opt.atomic import write_text_atomic
from calling_score_opt.data import CONTEXT_FEATURES, TIMING_FEATURES, VIBE_DIMENSIONS
from calling_score_opt.errors import ConfigError

#: Beta concentration of the outcome around its probability: label variance is p(1-p)/(k+1).
CONCENTRATION = 30.0
#: How much each vibe dimension's mismatch counts (fixed, so every file follows one process).
VIBE_WEIGHTS = np.array([1.6, 1.2, 1.0, 0.9, 0.5, 1.1, 0.6, 0.8, 1.5, 1.3, 0.7, 1.0])
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

F64 = npt.NDArray[np.float64]


def _sigmoid(z: F64) -> F64:
    result: F64 = 1.0 / (1.0 + np.exp(-z))
    return result


def _outcome_probability(user: F64, spot: F64, context: F64, timing: F64) -> tuple[F64, F64]:
    """The app-like formula score and the true outcome probability of each record."""
    mismatch = np.abs(user - spot)  # [n, 12]
    compatibility = 1.0 - (mismatch * VIBE_WEIGHTS).sum(1) / VIBE_WEIGHTS.sum()
    ctx = context[:, :6] @ np.array([0.30, 0.15, 0.25, 0.15, 0.05, 0.10])
    tim = timing[:, :4] @ np.array([0.35, 0.20, 0.25, 0.20])
    formula = 0.7 * compatibility + 0.18 * ctx + 0.12 * tim
    # What the formula misses: receptive users only act on available opportunities, energy
    # mismatch hurts more for crowd-averse users, and novelty seekers like new places.
    interaction = (
        1.2 * (context[:, 2] - 0.5) * (context[:, 3] - 0.5)
        - 0.8 * mismatch[:, 8] * (1.0 - user[:, 11])
        + 0.5 * (user[:, 9] - 0.5) * (spot[:, 9] - 0.5)
    )
    probability = _sigmoid(12.0 * (formula - 0.71) + 4.0 * interaction)
    return formula, 0.02 + 0.96 * probability


def generate_records(n_records: int, seed: int) -> dict[str, Any]:
    """The whole JSON document (``metadata`` and ``training_data``), deterministic in ``seed``."""
    if n_records < 1:
        raise ConfigError(f"--records must be at least 1, got {n_records}")
    rng = np.random.default_rng(seed)
    user = np.round(rng.beta(2.0, 2.0, (n_records, 12)), 4)
    spot = np.round(rng.beta(2.0, 2.0, (n_records, 12)), 4)
    context = np.round(rng.beta(2.0, 2.0, (n_records, 10)), 4)
    timing = np.round(rng.beta(2.0, 2.0, (n_records, 5)), 4)
    # Derived context and timing inputs, as the app computes them from the same record.
    mismatch = np.abs(user - spot)
    context[:, 6] = np.round(1.0 - mismatch.mean(1), 4)
    context[:, 7] = np.round(1.0 - mismatch[:, 8], 4)
    context[:, 8] = np.round(1.0 - mismatch[:, 1], 4)
    context[:, 9] = np.round(1.0 - mismatch[:, 9], 4)
    timing[:, 4] = np.round(timing[:, :4].mean(1), 4)

    formula, probability = _outcome_probability(user, spot, context, timing)
    outcome = rng.beta(probability * CONCENTRATION, (1.0 - probability) * CONCENTRATION)
    irreducible = float(np.mean(probability * (1.0 - probability) / (CONCENTRATION + 1.0)))
    distance_km = np.round(rng.gamma(2.0, 1.5, n_records), 2)
    rating = np.round(rng.uniform(3.0, 5.0, n_records), 1)

    records = []
    for i in range(n_records):
        score = float(outcome[i])
        records.append(
            {
                "user_vibe_dimensions": dict(zip(VIBE_DIMENSIONS, user[i].tolist(), strict=True)),
                "spot_vibe_dimensions": {
                    **dict(zip(VIBE_DIMENSIONS, spot[i].tolist(), strict=True)),
                    "spot_rating": float(rating[i]),  # extra keys: ignored by the model
                },
                "context_features": {
                    **dict(zip(CONTEXT_FEATURES, context[i].tolist(), strict=True)),
                    "distance_km": float(distance_km[i]),
                },
                "timing_features": dict(zip(TIMING_FEATURES, timing[i].tolist(), strict=True)),
                "formula_calling_score": round(float(formula[i]), 4),
                "is_called": bool(formula[i] >= 0.7),
                "outcome_type": "positive"
                if score >= 0.6
                else "negative"
                if score < 0.4
                else "neutral",
                "outcome_score": round(score, 4),
                "user_id": f"user_{i % max(1, n_records // 10):05d}",
                "opportunity_id": f"opp_{i:06d}",
                "timestamp": (_EPOCH + timedelta(minutes=17 * i)).isoformat(),
            }
        )
    metadata = {
        "num_samples": n_records,
        "source": "cso_synthetic_hybrid",
        "generator": "cso data synth",
        "seed": seed,
        "noise_model": f"outcome_score ~ Beta(p*{CONCENTRATION:g}, (1-p)*{CONCENTRATION:g})",
        "irreducible_mse": round(irreducible, 6),
        "label_variance": round(float(np.var(outcome)), 6),
    }
    return {"metadata": metadata, "training_data": records}


def write_synthetic(path: Path, n_records: int, seed: int) -> dict[str, Any]:
    """Generate ``n_records`` and write them to ``path`` atomically; returns the metadata."""
    document = generate_records(n_records, seed)
    write_text_atomic(path, json.dumps(document, separators=(",", ":")))
    metadata: dict[str, Any] = document["metadata"]
    return metadata
