"""Did users get the version routing gave them? The assignment check of the A/B report.

Routing is a pure function of salt, user and share (docs/routing.md), and the registry's history
records every share a test ran at and when. So for each user the versions routing allowed are
known: the check compares them with the versions the outcomes were logged under, and the users
per routing band with the bands' widths. A correct ramp (10% -> 50%) never fires it; a client
that routes on its own, or logging that loses one version's outcomes, does.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from calling_score_opt.registry.abstats import scipy_stats
from calling_score_opt.registry.outcomes import Outcome, parse_time
from calling_score_opt.registry.records import Registry, RegistryError
from calling_score_opt.registry.routing import bucket_int

#: Around each change of share, a row may show either share: app caches and clocks lag a little.
GRACE_S = 3600.0
#: Users seen on a version routing never gave them, tolerated before the check fires: a few
#: stale clients do not invalidate a test; 10% of one arm misrouted does.
VIOLATION_SHARE = 0.002
VIOLATION_FLOOR = 3
SRM_ALPHA = 0.001  # a split of users this unlikely means the assignment or the logging is broken
_SCALE = 2**64


@dataclass(frozen=True)
class SharePeriod:
    """From ``start`` (Unix seconds, UTC) on, ``traffic`` of users got the candidate."""

    start: float
    traffic: float


@dataclass(frozen=True)
class ABPlan:
    """What routing did during one A/B test: the arms, the salt and each share with its start.

    ``end`` is when the test stopped (None while it runs) and ``end_traffic`` the share after it:
    0 after ``ab-stop`` (everyone back on the control), 1 after ``promote``. ``salt`` is None for
    a test whose salt the registry did not record (then only the split is checked).
    """

    control: str
    candidate: str
    salt: str | None
    periods: tuple[SharePeriod, ...]
    end: float | None = None
    end_traffic: float = 0.0
    min_effect: float | None = None

    def __post_init__(self) -> None:
        if not self.periods:
            raise ValueError("a test plan needs at least one share")
        starts = [p.start for p in self.periods]
        if starts != sorted(starts):
            raise ValueError("a test plan's shares must be in time order")

    @classmethod
    def fixed(
        cls,
        control: str,
        candidate: str,
        traffic: float,
        salt: str | None = None,
        min_effect: float | None = None,
    ) -> ABPlan:
        """One share, at any time: outcomes collected while nothing changed."""
        return cls(
            control, candidate, salt, (SharePeriod(-math.inf, traffic),), None, 0.0, min_effect
        )

    @property
    def traffic(self) -> float:
        """The last share (the one the test runs at now, or ended at)."""
        return self.periods[-1].traffic

    @functools.cached_property
    def shares(self) -> tuple[float, ...]:
        """Every share the test ran at, ascending."""
        return tuple(sorted({p.traffic for p in self.periods}))

    @property
    def timed(self) -> bool:
        return math.isfinite(self.periods[0].start)

    def covers(self, at: float | None, grace_s: float = GRACE_S) -> bool:
        """Whether a row at ``at`` belongs to the test (unknown times always do)."""
        if at is None or not self.timed:
            return True
        if at < self.periods[0].start - grace_s:
            return False
        return self.end is None or at <= self.end + grace_s

    def shares_around(self, at: float | None, grace_s: float = GRACE_S) -> tuple[float, float]:
        """The lowest and highest share routing used within ``grace_s`` of ``at``.

        Without a time (or a timed plan), any share of the test's history.
        """
        if at is None or not self.timed:
            return self.shares[0], self.shares[-1]
        low, high = at - grace_s, at + grace_s
        in_force = []
        for index, period in enumerate(self.periods):
            until = (
                self.periods[index + 1].start
                if index + 1 < len(self.periods)
                else (self.end if self.end is not None else math.inf)
            )
            if period.start <= high and until > low:
                in_force.append(period.traffic)
        if low < self.periods[0].start:
            in_force.append(0.0)  # before the test everyone had the control (the active version)
        if self.end is not None and high >= self.end:
            in_force.append(self.end_traffic)
        return min(in_force), max(in_force)


def _time(text: str, where: str, registry: Registry) -> float:
    try:
        return parse_time(text)
    except (ValueError, OverflowError, OSError):
        raise RegistryError(
            f"{registry.path}: {where} {text!r} is not an ISO 8601 time; the A/B report needs the "
            "test's times (fix the file or restore a good copy)"
        ) from None


def ab_plan(
    registry: Registry,
    model_type: str,
    candidate: str | None = None,
    traffic: float | None = None,
) -> ABPlan:
    """The plan of the running test, or of ``candidate``'s last test, from the registry history.

    ``traffic`` replaces the recorded shares with one (outcomes collected at that share); it is
    needed for a version with no ``ab-start`` in the history.

    Raises:
        RegistryError: no test to report on, or a time in the history that is not one.
    """
    state = registry.of(model_type)
    test = state.ab_test
    if candidate is None:
        if test is None:
            raise RegistryError(
                f"no {model_type} A/B test is running; pass --candidate V (and --traffic T when "
                "its test is not in the history) to report on a stopped one"
            )
        candidate = test.candidate
    registry.version(model_type, candidate)
    running = test if test is not None and test.candidate == candidate else None
    history = state.history
    starts = [i for i, e in enumerate(history) if e.event == "ab-start" and e.version == candidate]
    if not starts:
        if running is not None:  # a hand-made file: the test without its start event
            start = _time(running.started, f"model_types.{model_type}.ab_test.started", registry)
            share = traffic if traffic is not None else running.traffic
            assert state.active is not None  # a running test has an active version
            return ABPlan(
                state.active,
                candidate,
                running.salt,
                (SharePeriod(start, share),),
                None,
                0.0,
                running.min_effect,
            )
        if traffic is None:
            raise RegistryError(
                f"'{candidate}' has no A/B test in the {model_type} history: pass --traffic with "
                "the share its outcomes were collected under"
            )
        if state.active is None:
            raise RegistryError(f"no active {model_type} version to compare with")
        return ABPlan.fixed(state.active, candidate, traffic)
    first = starts[-1]
    start_event = history[first]
    periods: list[SharePeriod] = []
    end: float | None = None
    end_traffic = 0.0
    for index in range(first, len(history)):
        event = history[index]
        if event.version != candidate:
            continue
        where = f"model_types.{model_type}.history[{index}].at"
        if index == first or event.event == "ab-set":
            if event.traffic is None:
                raise RegistryError(
                    f"{registry.path}: model_types.{model_type}.history[{index}] has no traffic; "
                    "the A/B report needs every share of the test"
                )
            periods.append(SharePeriod(_time(event.at, where, registry), event.traffic))
        elif event.event in ("ab-stop", "promote"):
            end = _time(event.at, where, registry)
            end_traffic = 1.0 if event.event == "promote" else 0.0
            break
    if traffic is not None:
        periods = [SharePeriod(periods[0].start, traffic)]
    periods.sort(key=lambda p: p.start)  # same-second events keep their order (stable sort)
    control = start_event.active or state.active
    if control is None:
        raise RegistryError(f"no active {model_type} version to compare with")
    salt = running.salt if running is not None else start_event.salt
    min_effect = running.min_effect if running is not None else start_event.min_effect
    return ABPlan(control, candidate, salt, tuple(periods), end, end_traffic, min_effect)


@dataclass(frozen=True)
class Band:
    """Users whose bucket lies in [low, high): ``expected`` of them if nobody is missing."""

    low: float
    high: float
    users: int
    expected: float


@dataclass(frozen=True)
class AssignmentCheck:
    """What the outcomes say about the assignment.

    ``violators`` were seen on a version routing never gave them (``example`` says one such
    case); the split (``chi2``, ``p_value``) compares users per routing band with the bands'
    widths, or, when the salt is unknown, users per version with the last share.
    """

    users: int
    violators: tuple[str, ...]
    example: str | None
    tolerance: int
    by: str  # "routing band" or "version"
    bands: tuple[Band, ...]
    chi2: float
    p_value: float
    timestamps: bool

    @property
    def misrouted(self) -> bool:
        return len(self.violators) > self.tolerance

    @property
    def mismatch(self) -> bool:
        return self.p_value < SRM_ALPHA

    @property
    def fires(self) -> bool:
        return self.misrouted or self.mismatch

    @property
    def reason(self) -> str:
        """Why it fires (or that it does not)."""
        parts = []
        if self.misrouted:
            share = len(self.violators) / self.users
            parts.append(
                f"{len(self.violators):,} of {self.users:,} users ({share:.1%}) were seen on a "
                f"version routing never gave them, more than the {self.tolerance:,} tolerated "
                f"(e.g. {self.example}); a client or the outcome logging does not follow "
                "docs/routing.md"
            )
        if self.mismatch:
            parts.append(
                f"the users per {self.by} are not the expected split (chi-square {self.chi2:.1f},"
                f" p = {self.p_value:.2g} < {SRM_ALPHA:g}): outcomes of some users are missing "
                "or filtered"
            )
        if not parts:
            return "the assignment looks right"
        return "; and ".join(parts) + "; these outcomes are not to be trusted"


def tolerance(users: int) -> int:
    """Users on a forbidden version tolerated among ``users``: max(3, 0.2% of them)."""
    return max(VIOLATION_FLOOR, math.floor(VIOLATION_SHARE * users))


def _chisquare(observed: Sequence[float], expected: Sequence[float]) -> tuple[float, float]:
    if len(observed) < 2 or sum(observed) == 0:
        return 0.0, 1.0
    result = scipy_stats().chisquare(observed, expected)
    return float(result.statistic), float(result.pvalue)


def check_assignment(
    rows: Sequence[Outcome], plan: ABPlan, grace_s: float = GRACE_S
) -> AssignmentCheck:
    """Check rows of the test's two versions (inside its time) against routing.

    With the salt: every row's version must be one routing could give that user, at the share in
    force at the row's time (within ``grace_s`` of a change, either share) or, without a time,
    at any share of the test; and the users per routing band ([0, s1), [s1, s2), ..., [sk, 1) for
    the test's shares) must match the bands' widths (chi-square, flagged at p < SRM_ALPHA).
    Without the salt: only the split of users per version against the last share.
    """
    timestamps = any(row.at is not None for row in rows) and plan.timed
    if plan.salt is None:
        versions: dict[str, set[str]] = {}
        for row in rows:
            versions.setdefault(row.user_id, set()).add(row.version)
        single = [next(iter(v)) for v in versions.values() if len(v) == 1]
        observed = [single.count(plan.control), single.count(plan.candidate)]
        n = sum(observed)
        expected = [n * (1 - plan.traffic), n * plan.traffic]
        chi2, p_value = _chisquare(observed, expected)
        bands: tuple[Band, ...] = (
            Band(plan.traffic, 1.0, observed[0], expected[0]),
            Band(0.0, plan.traffic, observed[1], expected[1]),
        )
        return AssignmentCheck(
            len(versions),
            (),
            None,
            tolerance(len(versions)),
            "version",
            bands,
            chi2,
            p_value,
            timestamps,
        )

    salt = plan.salt
    buckets: dict[str, int] = {}
    violators: dict[str, None] = {}  # ordered set
    example: str | None = None
    any_share = (plan.shares[0], plan.shares[-1])
    for row in rows:
        value = buckets.get(row.user_id)
        if value is None:
            value = buckets[row.user_id] = bucket_int(salt, row.user_id)
        low, high = any_share if row.at is None else plan.shares_around(row.at, grace_s)
        if row.version == plan.candidate:
            allowed = value < high * _SCALE
        else:
            allowed = not value < low * _SCALE
        if not allowed and row.user_id not in violators:
            violators[row.user_id] = None
            if example is None:
                side = "above" if row.version == plan.candidate else "below"
                shares = "every share" if row.at is None or not plan.timed else "the share then"
                example = (
                    f"{row.user_id} on {row.version}, bucket {value / _SCALE:.4f} {side} "
                    f"{shares} of the test"
                )
    edges = sorted({0.0, 1.0, *plan.shares})
    counts = [0] * (len(edges) - 1)
    for value in buckets.values():
        counts[min(bisect.bisect_right(edges, value / _SCALE), len(counts)) - 1] += 1
    users = len(buckets)
    widths = [edges[i + 1] - edges[i] for i in range(len(counts))]
    expected = [users * w for w in widths]
    chi2, p_value = _chisquare(counts, expected)
    bands = tuple(Band(edges[i], edges[i + 1], counts[i], expected[i]) for i in range(len(counts)))
    return AssignmentCheck(
        users,
        tuple(violators),
        example,
        tolerance(users),
        "routing band",
        bands,
        chi2,
        p_value,
        timestamps,
    )
