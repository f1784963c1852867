"""Seeded simulations of A/B tests through this package: the proof that its error rates hold.

A rate is only as good as its check. The tests (tests/test_registry_ab.py) and
bench/bench_ab.py run these: daily looks at A/A tests (how often the always-valid interval
promotes or rolls back a candidate that is no better), the same with a true effect (how often
and how soon it promotes), and tests through a 10% -> 50% ramp (how often the assignment check
fires with correct routing, and with misrouted users). Not imported by the package itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from calling_score_opt.registry.abreport import ab_report
from calling_score_opt.registry.abstats import (
    ALPHA,
    MIN_USERS_PER_ARM,
    always_valid_interval,
    decide,
    scipy_stats,
)
from calling_score_opt.registry.assignment import ABPlan, SharePeriod
from calling_score_opt.registry.outcomes import Outcome
from calling_score_opt.registry.routing import bucket_int

DAY_S = 86400.0
CONTROL, CANDIDATE = "v1.0", "v1.1"


@dataclass(frozen=True)
class LooksResult:
    """Tests stopped at the first promote or roll back over ``looks`` daily looks."""

    replicates: int
    looks: int
    users_per_arm: int
    effect_sd: float
    promoted: int
    rolled_back: int
    mean_look: float | None  # mean look of the decisions taken; None when none was
    naive_decided: int  # the same tests decided by Welch's fixed-sample interval at each look

    @property
    def decided_rate(self) -> float:
        return (self.promoted + self.rolled_back) / self.replicates

    @property
    def promote_rate(self) -> float:
        return self.promoted / self.replicates

    @property
    def naive_rate(self) -> float:
        return self.naive_decided / self.replicates


def daily_looks(
    replicates: int = 500,
    looks: int = 14,
    users_per_arm: int = 1000,
    effect_sd: float = 0.0,
    traffic: float = 0.5,
    seed: int = 0,
    skewed: bool = False,
) -> LooksResult:
    """A/B tests whose users arrive evenly over ``looks`` days, reported on every day.

    Each user has one outcome: normal (sd 1), or exponential (sd 1, heavily skewed) with
    ``skewed``; the candidate adds ``effect_sd`` standard deviations. At each look the arms'
    per-user summaries go through :func:`always_valid_interval` and :func:`decide`, exactly as
    in the report, and a test stops at its first promote or roll back. For comparison the same
    looks are decided by Welch's 95% t interval (what ``ab-report`` did before).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    total = round(users_per_arm / min(traffic, 1 - traffic))  # the smaller arm gets the users
    t_quantile = scipy_stats().t.ppf
    promoted = rolled_back = naive = 0
    decided_looks: list[int] = []
    for _ in range(replicates):
        arm = rng.random(total) < traffic  # routing's buckets are uniform: a fair coin per user
        day = rng.integers(0, looks, total)
        noise = rng.exponential(1.0, total) - 1.0 if skewed else rng.normal(0.0, 1.0, total)
        values = noise + effect_sd * arm
        stats = np.zeros((2, 3, looks))  # arm x (count, sum, sum of squares) x day
        for side in (0, 1):
            chosen = arm == bool(side)
            stats[side, 0] = np.bincount(day[chosen], minlength=looks)
            stats[side, 1] = np.bincount(day[chosen], values[chosen], minlength=looks)
            stats[side, 2] = np.bincount(day[chosen], values[chosen] ** 2, minlength=looks)
        cumulative = stats.cumsum(axis=2)
        stopped = naive_stopped = False
        for look in range(looks):
            n = cumulative[:, 0, look]
            if n.min() < 2:
                continue
            mean = cumulative[:, 1, look] / n
            var = (cumulative[:, 2, look] - n * mean**2) / (n - 1)
            difference = float(mean[1] - mean[0])
            se = math.sqrt(float(var[1] / n[1] + var[0] / n[0]))
            n_control, n_candidate = int(n[0]), int(n[1])
            if not stopped:
                interval = always_valid_interval(difference, se, n_control + n_candidate)
                verdict = decide(interval, n_control, n_candidate)
                if verdict != "keep testing":
                    stopped = True
                    decided_looks.append(look + 1)
                    promoted += verdict == "promote"
                    rolled_back += verdict == "roll back"
            if not naive_stopped and min(n_control, n_candidate) >= MIN_USERS_PER_ARM:
                df = (var[1] / n[1] + var[0] / n[0]) ** 2 / (
                    (var[1] / n[1]) ** 2 / (n[1] - 1) + (var[0] / n[0]) ** 2 / (n[0] - 1)
                )
                if abs(difference) > float(t_quantile(1 - ALPHA / 2, df)) * se:
                    naive_stopped = True
                    naive += 1
    return LooksResult(
        replicates,
        looks,
        users_per_arm,
        effect_sd,
        promoted,
        rolled_back,
        sum(decided_looks) / len(decided_looks) if decided_looks else None,
        naive,
    )


@dataclass(frozen=True)
class RampResult:
    """A/A tests through a ramp: how often the report said ``check the assignment``."""

    replicates: int
    users: int
    shares: tuple[float, ...]
    client_shares: tuple[float, ...]
    misrouted: float
    timestamps: bool
    fired: int
    min_p_value: float  # the smallest p of the split check over the replicates

    @property
    def fire_rate(self) -> float:
        return self.fired / self.replicates


def ramp_test(
    replicates: int = 200,
    users: int = 4000,
    shares: tuple[float, ...] = (0.1, 0.5),
    misrouted: float = 0.0,
    timestamps: bool = False,
    seed: int = 0,
    client_shares: tuple[float, ...] | None = None,
) -> RampResult:
    """A/A tests that ramp through ``shares`` (a week each), reported through :func:`ab_report`.

    Every user has one outcome in each phase, routed by the real rule with a fresh salt per
    test. Broken clients: ``misrouted`` of the users routing gives the candidate are logged
    under the active version instead, in every phase; ``client_shares`` are the shares the
    clients really used (a client that missed the ramp keeps the first share).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    start = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    periods = tuple(SharePeriod(start + i * 7 * DAY_S, s) for i, s in enumerate(shares))
    ids = [f"user_{i}" for i in range(users)]
    nones = [None] * users
    fired = 0
    min_p = 1.0
    for replicate in range(replicates):
        salt = f"calling_score:{CANDIDATE}:sim-{seed}-{replicate}"
        plan = ABPlan(CONTROL, CANDIDATE, salt, periods)
        buckets = np.array([bucket_int(salt, user) for user in ids], dtype=np.float64)
        broken = rng.random(users) < misrouted
        rows: list[Outcome] = []
        for period, used in zip(periods, client_shares or shares, strict=True):
            logged = (buckets < used * 2.0**64) & ~broken
            versions = np.where(logged, CANDIDATE, CONTROL).tolist()
            values = rng.normal(0.5, 0.2, users).tolist()
            times = (period.start + rng.random(users) * 7 * DAY_S).tolist()
            rows.extend(map(Outcome, ids, versions, values, times if timestamps else nones))
        report = ab_report(rows, plan)
        fired += report.recommendation == "check the assignment"
        min_p = min(min_p, report.assignment.p_value)
    return RampResult(
        replicates, users, shares, client_shares or shares, misrouted, timestamps, fired, min_p
    )
