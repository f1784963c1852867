"""The statistics behind an A/B decision: Welch's t interval, and an always-valid interval.

Welch's t interval (scipy.stats) is right for one look at a sample size fixed in advance. People
run ``ab-report`` every day and act on the first "promote", so the decision rests on an
asymptotic confidence sequence instead (Waudby-Smith, Arnold, Wu, McAuliffe, Ramdas, "Time-uniform
central limit theory and asymptotic confidence sequences", Annals of Statistics 2024,
arXiv:2103.06476; the form GrowthBook's sequential testing uses): an interval for the difference
that holds at every look at once, so stopping at the first look that excludes zero keeps the
error rate at ``alpha``. docs/registry.md has the formulas; bench/bench_ab.py measures the rates.

Everything here is plain arithmetic on summaries, so simulations call it directly, thousands of
times, and the report calls the same functions once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ALPHA = 0.05  # two-sided: in an A/A test, a promote or roll back at most 5% of the time
#: N*, the total number of users at which the always-valid interval is narrowest (GrowthBook's
#: default). Smaller makes early looks decisive sooner and late looks a little wider.
TUNING_USERS = 5000
#: Below this many users in either arm the asymptotics are not trusted: keep testing.
MIN_USERS_PER_ARM = 100
POWER = 0.8


def scipy_stats() -> Any:
    """``scipy.stats``, imported only when a statistic is computed: it takes a second or more."""
    from scipy import stats

    return stats


@dataclass(frozen=True)
class WelchInterval:
    """Welch's t interval for candidate - control at one look: the fixed-sample answer."""

    difference: float
    low: float
    high: float
    df: float
    p_value: float
    se: float
    confidence: float = 1 - ALPHA


def welch_interval(
    control: Sequence[float], candidate: Sequence[float], confidence: float = 1 - ALPHA
) -> WelchInterval:
    """``scipy.stats.ttest_ind(candidate, control, equal_var=False)`` and its interval.

    Needs at least 2 values per arm. When both arms have no spread the difference is exact:
    the interval is that point, with p 0 (a difference) or 1 (none).
    """
    import numpy as np

    stats = scipy_stats()

    treated = np.asarray(candidate, dtype=np.float64)
    base = np.asarray(control, dtype=np.float64)
    if len(treated) < 2 or len(base) < 2:
        raise ValueError("Welch's interval needs at least 2 values per arm")
    difference = float(treated.mean() - base.mean())
    se = math.sqrt(float(treated.var(ddof=1)) / len(treated) + float(base.var(ddof=1)) / len(base))
    if se == 0:
        return WelchInterval(
            difference, difference, difference, math.inf, float(difference == 0), 0.0, confidence
        )
    with warnings.catch_warnings():  # near-constant data: scipy warns, and its answer stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(treated, base, equal_var=False)
        interval = result.confidence_interval(confidence)
    return WelchInterval(
        difference,
        float(interval.low),
        float(interval.high),
        float(result.df),
        float(result.pvalue),
        se,
        confidence,
    )


def cs_rho(alpha: float = ALPHA, tuning_users: float = TUNING_USERS) -> float:
    """The mixture's scale rho, chosen so the interval is narrowest at ``tuning_users`` users:
    rho^2 = (-2 ln alpha + ln(1 - 2 ln alpha)) / N*."""
    log_alpha = math.log(alpha)
    return math.sqrt((-2 * log_alpha + math.log(1 - 2 * log_alpha)) / tuning_users)


def cs_multiplier(n: int, alpha: float = ALPHA, tuning_users: float = TUNING_USERS) -> float:
    """Half-width of the always-valid interval in standard errors, at ``n`` users in all:
    sqrt(2 (n rho^2 + 1) / (n rho^2) * ln(sqrt(n rho^2 + 1) / alpha))."""
    if n < 1:
        raise ValueError("the always-valid interval needs at least one user")
    t = n * cs_rho(alpha, tuning_users) ** 2
    return math.sqrt(2 * (t + 1) / t * math.log(math.sqrt(t + 1) / alpha))


@dataclass(frozen=True)
class SequentialInterval:
    """The always-valid interval for candidate - control, and its always-valid p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    users: int
    alpha: float = ALPHA
    tuning_users: float = TUNING_USERS


def always_valid_interval(
    difference: float,
    se: float,
    users: int,
    alpha: float = ALPHA,
    tuning_users: float = TUNING_USERS,
) -> SequentialInterval:
    """``difference +- se * cs_multiplier(users)``: covers the true difference at every look
    with probability 1 - alpha (asymptotically), however often it is looked at.

    ``se`` is the Welch standard error, sqrt(sd_t^2 / n_t + sd_c^2 / n_c); ``users`` is
    n_t + n_c. The p-value is 1 / the mixture martingale, min(1, sqrt(t + 1) *
    exp(-t z^2 / (2 (t + 1)))) with t = users * rho^2 and z = difference / se; it is below
    alpha exactly when the interval excludes zero.
    """
    half = se * cs_multiplier(users, alpha, tuning_users)
    t = users * cs_rho(alpha, tuning_users) ** 2
    if se > 0:
        z2 = (difference / se) ** 2
        p_value = min(1.0, math.sqrt(t + 1) * math.exp(-t * z2 / (2 * (t + 1))))
    else:
        p_value = 1.0 if difference == 0 else 0.0
    return SequentialInterval(
        difference, difference - half, difference + half, p_value, users, alpha, tuning_users
    )


def decide(
    interval: SequentialInterval,
    control_users: int,
    candidate_users: int,
    higher_is_better: bool = True,
    min_users: int = MIN_USERS_PER_ARM,
) -> str:
    """``promote``, ``roll back`` or ``keep testing`` at one look.

    Promote when the always-valid interval lies entirely on the better side of zero, roll back
    when it lies entirely on the worse side, both only with ``min_users`` users in each arm.
    """
    if min(control_users, candidate_users) < min_users:
        return "keep testing"
    better_low = interval.low if higher_is_better else -interval.high
    better_high = interval.high if higher_is_better else -interval.low
    if better_low > 0:
        return "promote"
    if better_high < 0:
        return "roll back"
    return "keep testing"


def users_needed(
    sd_control: float,
    sd_candidate: float,
    effect: float,
    traffic: float,
    alpha: float = ALPHA,
    power: float = POWER,
    tuning_users: float = TUNING_USERS,
    min_users: int = MIN_USERS_PER_ARM,
) -> int:
    """Users in all with which the always-valid interval excludes zero with probability
    ``power`` when the true difference is ``effect`` (a share ``traffic`` in the candidate).

    The smallest N with effect >= SE(N) * (cs_multiplier(N) + z_power), where SE(N) =
    sqrt(sd_candidate^2 / (traffic N) + sd_control^2 / ((1 - traffic) N)), and with at least
    ``min_users`` in each arm. ``effect`` is the smallest difference worth shipping, fixed
    before the test: sizing a test from the difference it happened to observe says little.
    """
    stats = scipy_stats()

    if not (effect > 0 and math.isfinite(effect)):
        raise ValueError("effect must be a positive number")
    if not 0 < traffic < 1:
        raise ValueError("traffic must be in (0, 1)")
    z_power = float(stats.norm.ppf(power))
    unit = math.sqrt(sd_candidate**2 / traffic + sd_control**2 / (1 - traffic))
    floor = math.ceil(min_users / min(traffic, 1 - traffic))

    def enough(n: int) -> bool:
        return effect >= unit / math.sqrt(n) * (cs_multiplier(n, alpha, tuning_users) + z_power)

    if enough(floor):
        return floor
    low, high = floor, floor * 2
    while not enough(high):
        low, high = high, high * 2
    while high - low > 1:  # SE(N) * multiplier(N) falls as N grows: bisect
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high
