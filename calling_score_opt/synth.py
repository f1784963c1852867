"""Synthetic training data in the app's JSON format, with a known noise floor.

Two label processes (``cso data synth --kind``), both in the spirit of the app's data:

- ``hybrid`` (the default): a calling formula that scores how well a user's and a spot's vibes
  match (per-dimension differences, some dimensions mattering more than others), the context and
  the timing, turned into an outcome probability with a few interactions the formula does not
  know about; ``outcome_score`` is drawn from a Beta distribution around that probability. Every
  reasonable model captures almost all of what can be learnt from it.
- ``gated``: outcomes that behave like engagement data. Whether the user was called at all is a
  threshold on a hidden score (vibe match, reach, receptivity, timing, plus noise no feature
  shows); an uncalled user barely engages, a called one has a positive, neutral or negative
  experience whose odds come from interactions the features do not show directly; each regime
  and outcome type has its own distribution, clipped to [0, 1]. Models differ on it, so it is
  the data model quality is measured on.

Because the noise model is known, the best test MSE any model could reach (the mean over the
file's records of the label's conditional variance given the features, clipping included) is
known exactly, and is stored in ``metadata["irreducible_mse"]`` so results can say how much of
the learnable signal they captured.
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


def _features(rng: np.random.Generator, n: int) -> tuple[F64, F64, F64, F64]:
    """User and spot vibes, context and timing as the app would send them (4 decimals)."""
    user = np.round(rng.beta(2.0, 2.0, (n, 12)), 4)
    spot = np.round(rng.beta(2.0, 2.0, (n, 12)), 4)
    context = np.round(rng.beta(2.0, 2.0, (n, 10)), 4)
    timing = np.round(rng.beta(2.0, 2.0, (n, 5)), 4)
    # Derived context and timing inputs, as the app computes them from the same record.
    mismatch = np.abs(user - spot)
    context[:, 6] = np.round(1.0 - mismatch.mean(1), 4)
    context[:, 7] = np.round(1.0 - mismatch[:, 8], 4)
    context[:, 8] = np.round(1.0 - mismatch[:, 1], 4)
    context[:, 9] = np.round(1.0 - mismatch[:, 9], 4)
    timing[:, 4] = np.round(timing[:, :4].mean(1), 4)
    return user, spot, context, timing


# --- gated: engagement that depends on whether the user was called at all -------------------

#: The hidden calling score's noise (what no feature shows) and the threshold it must pass.
GATE_NOISE = 0.15
GATE_THRESHOLD = 2.15  # about 45% of users are called
#: Clipped-normal outcome of each regime: (mean function, standard deviation) below.
OUTCOME_SD = {"positive": 0.30, "neutral": 0.25, "negative": 0.25, "not_called": 0.15}
OUTCOME_TYPES = ("positive", "neutral", "negative", "not_called")


def _gated_process(
    user: F64, spot: F64, context: F64, timing: F64
) -> tuple[F64, F64, F64, list[F64]]:
    """P(called), P(type | called) ([n, 3]) and each outcome type's mean, per record.

    Indices follow docs/contract.md: user/spot vibes 0 exploration_eagerness, 1
    community_orientation, 2 authenticity_preference, 4 temporal_flexibility, 5
    location_adventurousness, 7 trust_network_reliance, 8 energy_preference, 9 novelty_seeking,
    11 crowd_tolerance; context 0 location_proximity, 1 journey_alignment, 2 user_receptivity,
    3 opportunity_availability, 4 network_effects, 5 community_patterns; timing 0
    optimal_time_of_day, 2 user_patterns, 4 timing_alignment.
    """
    from scipy.special import ndtr  # the standard normal CDF

    mismatch = np.abs(user - spot)
    compatibility = 1.0 - (mismatch * VIBE_WEIGHTS).sum(1) / VIBE_WEIGHTS.sum()
    reach = np.maximum(context[:, 0], context[:, 1])  # close by, or on the user's way
    explorer = user[:, 0] * user[:, 5]  # explorers go where homebodies would not
    rhythm = np.cos(2 * np.pi * (timing[:, 0] - timing[:, 2]))  # the hour fits the user's habit
    hidden = (
        1.5 * compatibility
        + 0.9 * reach * (1.0 - explorer)
        + 0.8 * explorer
        + 1.4 * context[:, 2] * context[:, 3]  # receptive, and the opportunity is there
        + 0.25 * rhythm
    )
    p_called = ndtr((hidden - GATE_THRESHOLD) / GATE_NOISE)

    # Once called, the experience: interactions no single input shows.
    novelty = 4.0 * (user[:, 9] - 0.5) * (spot[:, 9] - 0.5)  # seekers like new, others not
    trust = 4.0 * (user[:, 7] - 0.5) * (context[:, 4] - 0.5)  # friends' picks, for the trusting
    crowd_clash = np.maximum(spot[:, 11] - user[:, 11], 0.0) * (user[:, 8] < 0.5)
    authentic = np.sin(2 * np.pi * (user[:, 2] - spot[:, 2]))  # taste is sharp and two-sided
    z_positive = (
        -0.3
        + 1.5 * (2.5 * novelty + 2.0 * trust - 3.0 * crowd_clash + 1.0 * authentic)
        + 2.0 * (compatibility - 0.7)
    )
    z_negative = (
        -0.8
        + 1.5 * (-2.0 * novelty + 3.5 * crowd_clash - 1.0 * authentic)
        - 1.0 * (timing[:, 4] - 0.5)
    )
    logits = np.stack([z_positive, np.zeros_like(z_positive), z_negative], axis=1)
    odds = np.exp(logits - logits.max(1, keepdims=True))
    p_type = odds / odds.sum(1, keepdims=True)
    means = [
        0.78 + 0.2 * (context[:, 5] - 0.5),  # positive
        np.full(len(user), 0.45),  # neutral
        0.15 + 0.1 * context[:, 4],  # negative
        0.02 + 0.12 * context[:, 4] * user[:, 1],  # not called: a passing glance at most
    ]
    return p_called, p_type, compatibility, means


def clipped_normal_moments(mean: F64, sd: float) -> tuple[F64, F64]:
    """E[Y] and E[Y^2] of Y = clip(Z, 0, 1), Z ~ N(mean, sd^2): the mass beyond 0 and 1 sits
    on 0 and 1, which is what makes the noise floor depend on the clipping."""
    from scipy.special import ndtr

    a, b = (0.0 - mean) / sd, (1.0 - mean) / sd
    cdf_a, cdf_b = ndtr(a), ndtr(b)
    pdf_a = np.exp(-0.5 * a * a) / np.sqrt(2 * np.pi)
    pdf_b = np.exp(-0.5 * b * b) / np.sqrt(2 * np.pi)
    inside = cdf_b - cdf_a
    above = 1.0 - cdf_b  # Y = 1 there; Y = 0 below 0 adds nothing
    first = mean * inside + sd * (pdf_a - pdf_b) + above
    second = (
        mean * mean * inside
        + 2 * mean * sd * (pdf_a - pdf_b)
        + sd * sd * (inside + a * pdf_a - b * pdf_b)
        + above
    )
    return first, second


def _gated_labels(
    rng: np.random.Generator, user: F64, spot: F64, context: F64, timing: F64
) -> tuple[F64, F64, list[str], F64]:
    """Outcome scores, whether each user was called, the outcome types, and each record's
    conditional label variance (exact: the mixture's second moment minus its squared mean)."""
    n = len(user)
    p_called, p_type, _, means = _gated_process(user, spot, context, timing)
    weights = [p_called * p_type[:, k] for k in range(3)] + [1.0 - p_called]
    first, second = np.zeros(n), np.zeros(n)
    for weight, mean, name in zip(weights, means, OUTCOME_TYPES, strict=True):
        m1, m2 = clipped_normal_moments(mean, OUTCOME_SD[name])
        first += weight * m1
        second += weight * m2
    variance = second - first * first

    called = rng.random(n) < p_called
    kind = (rng.random(n)[:, None] > p_type.cumsum(1)).sum(1).clip(0, 2)
    component = np.where(called, kind, 3)
    mean = np.choose(component, means)
    sd = np.array([OUTCOME_SD[name] for name in OUTCOME_TYPES])[component]
    outcome = np.clip(rng.normal(mean, sd), 0.0, 1.0)
    types = [OUTCOME_TYPES[c] for c in component]
    return outcome, called.astype(np.float64), types, variance


KINDS = ("hybrid", "gated")


def generate_records(n_records: int, seed: int, kind: str = "hybrid") -> dict[str, Any]:
    """The whole JSON document (``metadata`` and ``training_data``), deterministic in ``seed``."""
    if n_records < 1:
        raise ConfigError(f"--records must be at least 1, got {n_records}")
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    rng = np.random.default_rng(seed)
    user, spot, context, timing = _features(rng, n_records)
    formula, probability = _outcome_probability(user, spot, context, timing)
    if kind == "hybrid":
        outcome = rng.beta(probability * CONCENTRATION, (1.0 - probability) * CONCENTRATION)
        irreducible = round(
            float(np.mean(probability * (1.0 - probability) / (CONCENTRATION + 1.0))), 6
        )
        labels = np.round(outcome, 4)
        called = formula >= 0.7
        types = ["positive" if s >= 0.6 else "negative" if s < 0.4 else "neutral" for s in outcome]
        noise_model = f"outcome_score ~ Beta(p*{CONCENTRATION:g}, (1-p)*{CONCENTRATION:g})"
    else:
        labels, called_f, types, variance = _gated_labels(rng, user, spot, context, timing)
        outcome = labels
        called = called_f > 0.5
        irreducible = float(np.mean(variance))  # full precision: it is exact
        noise_model = (
            "called iff hidden score + N(0, {GATE_NOISE:g}^2) > {GATE_THRESHOLD:g}; outcome "
            "~ clip(N(mean(type, x), sd(type)^2), 0, 1) by type: "
            + ", ".join(f"{k} sd {v:g}" for k, v in OUTCOME_SD.items())
        ).format(GATE_NOISE=GATE_NOISE, GATE_THRESHOLD=GATE_THRESHOLD)
    distance_km = np.round(rng.gamma(2.0, 1.5, n_records), 2)
    rating = np.round(rng.uniform(3.0, 5.0, n_records), 1)

    records = []
    for i in range(n_records):
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
                "is_called": bool(called[i]),
                "outcome_type": types[i],
                "outcome_score": float(labels[i]),
                "user_id": f"user_{i % max(1, n_records // 10):05d}",
                "opportunity_id": f"opp_{i:06d}",
                "timestamp": (_EPOCH + timedelta(minutes=17 * i)).isoformat(),
            }
        )
    metadata = {
        "num_samples": n_records,
        "source": f"cso_synthetic_{kind}",
        "generator": f"cso data synth --kind {kind}",
        "kind": kind,
        "seed": seed,
        "noise_model": noise_model,
        "irreducible_mse": irreducible,
        "label_variance": round(float(np.var(outcome)), 6),
    }
    return {"metadata": metadata, "training_data": records}


def write_synthetic(path: Path, n_records: int, seed: int, kind: str = "hybrid") -> dict[str, Any]:
    """Generate ``n_records`` of ``kind`` and write them to ``path`` atomically; returns the
    metadata."""
    document = generate_records(n_records, seed, kind)
    write_text_atomic(path, json.dumps(document, separators=(",", ":")))
    metadata: dict[str, Any] = document["metadata"]
    return metadata
