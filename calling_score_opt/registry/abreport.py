"""The A/B report: from outcomes to one recommendation a team can act on, at any look.

Order of the verdict: a broken assignment first (``check the assignment``: nothing else can be
trusted), then too few users (``keep testing``), then the always-valid interval of
:mod:`~calling_score_opt.registry.abstats` (``promote`` / ``roll back`` / ``keep testing``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from calling_score_opt.registry.abstats import (
    ALPHA,
    MIN_USERS_PER_ARM,
    POWER,
    TUNING_USERS,
    SequentialInterval,
    WelchInterval,
    always_valid_interval,
    decide,
    users_needed,
    welch_interval,
)
from calling_score_opt.registry.assignment import GRACE_S, ABPlan, AssignmentCheck, check_assignment
from calling_score_opt.registry.outcomes import Outcome
from calling_score_opt.registry.records import RegistryError, check_min_effect, utc_now

METHOD = (
    "asymptotic confidence sequence (Waudby-Smith et al. 2024, arXiv:2103.06476), "
    "as in GrowthBook's sequential testing"
)


@dataclass(frozen=True)
class ArmSummary:
    """One version's side of the test: users (each counted once), rows, mean and sd."""

    version: str
    role: str
    users: int
    rows: int
    mean: float | None
    sd: float | None


@dataclass(frozen=True)
class ABReport:
    """What the outcomes say about a test, and what to do next."""

    plan: ABPlan
    control: ArmSummary
    candidate: ArmSummary
    higher_is_better: bool
    welch: WelchInterval | None  # one look, fixed sample: for reading, not for deciding
    sequential: SequentialInterval | None  # every look: the decision rests on it
    assignment: AssignmentCheck
    users_in_both: int
    rows_ignored: int  # rows of other versions
    rows_outside: int  # rows timed outside the test
    min_effect: float | None
    users_needed: int | None  # in all, to detect min_effect with 80% power
    further_users: int | None
    recommendation: str  # "promote", "keep testing", "roll back" or "check the assignment"
    reason: str

    @property
    def traffic(self) -> float:
        return self.plan.traffic

    @property
    def difference(self) -> float | None:
        return None if self.welch is None else self.welch.difference


def _per_user(rows: Sequence[Outcome], version: str, excluded: set[str]) -> tuple[list[float], int]:
    sums: dict[str, list[float]] = {}
    count = 0
    for row in rows:
        if row.version == version and row.user_id not in excluded:
            entry = sums.setdefault(row.user_id, [0.0, 0.0])
            entry[0] += row.outcome
            entry[1] += 1
            count += 1
    return [total / n for total, n in sums.values()], count


def _arm(version: str, role: str, means: list[float], rows: int) -> ArmSummary:
    if not means:
        return ArmSummary(version, role, 0, rows, None, None)
    mean = math.fsum(means) / len(means)
    sd = (
        math.sqrt(math.fsum((m - mean) ** 2 for m in means) / (len(means) - 1))
        if len(means) > 1
        else None
    )
    return ArmSummary(version, role, len(means), rows, mean, sd)


def _min_effect(plan: ABPlan, given: float | None) -> float | None:
    if given is not None:
        check_min_effect(given)
        if plan.min_effect is not None and given != plan.min_effect:
            raise RegistryError(
                f"the test of '{plan.candidate}' was planned with --min-effect "
                f"{plan.min_effect:g} at ab-start; a report cannot change it (the smallest "
                "difference worth shipping is fixed before the outcomes are seen): drop "
                "--min-effect"
            )
    return plan.min_effect if plan.min_effect is not None else given


def ab_report(
    rows: Sequence[Outcome],
    plan: ABPlan,
    higher_is_better: bool = True,
    min_effect: float | None = None,
    grace_s: float = GRACE_S,
) -> ABReport:
    """Compare the candidate with the control on per-user outcomes and recommend an action.

    Users are the unit: each user's outcomes are averaged first; users seen under both versions
    (a ramp moves some) and users the assignment check found on a forbidden version are left
    out of the comparison. Rows timed outside the test are left out too. ``min_effect`` sizes
    the test only when the plan has none (it is fixed at ``ab-start``).

    Raises:
        RegistryError: the last share is not in (0, 1), no rows are of either version, or
            ``min_effect`` contradicts the plan's.
    """
    if not 0 < plan.traffic < 1:
        raise RegistryError(
            f"the expected candidate share must be in (0, 1) to compare, got {plan.traffic:g}: "
            "at 100% traffic there is no control group; pass --traffic with the share the "
            "outcomes were collected under"
        )
    effect = _min_effect(plan, min_effect)
    arms = (plan.control, plan.candidate)
    relevant = [row for row in rows if row.version in arms]
    ignored = len(rows) - len(relevant)
    inside = [row for row in relevant if plan.covers(row.at, grace_s)]
    outside = len(relevant) - len(inside)
    if not inside:
        raise RegistryError(
            f"no outcomes of '{plan.control}' or '{plan.candidate}' during the test "
            f"({ignored:,} rows of other versions, {outside:,} outside the test's time)"
        )
    check = check_assignment(inside, plan, grace_s)
    seen: dict[str, set[str]] = {}
    for row in inside:
        seen.setdefault(row.user_id, set()).add(row.version)
    both = {user for user, versions in seen.items() if len(versions) > 1}
    excluded = both | set(check.violators)
    control_means, control_rows = _per_user(inside, plan.control, excluded)
    candidate_means, candidate_rows = _per_user(inside, plan.candidate, excluded)
    arm_control = _arm(plan.control, "active", control_means, control_rows)
    arm_candidate = _arm(plan.candidate, "candidate", candidate_means, candidate_rows)
    n_control, n_candidate = arm_control.users, arm_candidate.users

    welch: WelchInterval | None = None
    sequential: SequentialInterval | None = None
    needed: int | None = None
    further: int | None = None
    if n_control >= 2 and n_candidate >= 2:
        welch = welch_interval(control_means, candidate_means)
        sequential = always_valid_interval(welch.difference, welch.se, n_control + n_candidate)
        if effect is not None:
            assert arm_control.sd is not None and arm_candidate.sd is not None
            needed = users_needed(arm_control.sd, arm_candidate.sd, effect, plan.traffic)
            further = max(needed - n_control - n_candidate, 0)

    recommendation, reason = _verdict(
        check,
        arm_control,
        arm_candidate,
        sequential,
        higher_is_better,
        effect,
        needed,
        further,
        plan.traffic,
    )
    return ABReport(
        plan=plan,
        control=arm_control,
        candidate=arm_candidate,
        higher_is_better=higher_is_better,
        welch=welch,
        sequential=sequential,
        assignment=check,
        users_in_both=len(both),
        rows_ignored=ignored,
        rows_outside=outside,
        min_effect=effect,
        users_needed=needed,
        further_users=further,
        recommendation=recommendation,
        reason=reason,
    )


def _verdict(
    check: AssignmentCheck,
    control: ArmSummary,
    candidate: ArmSummary,
    sequential: SequentialInterval | None,
    higher_is_better: bool,
    effect: float | None,
    needed: int | None,
    further: int | None,
    traffic: float,
) -> tuple[str, str]:
    if check.fires:
        return "check the assignment", check.reason
    if sequential is None or min(control.users, candidate.users) < MIN_USERS_PER_ARM:
        return "keep testing", (
            f"{control.users:,} users of {control.version} and {candidate.users:,} of "
            f"{candidate.version}: at least {MIN_USERS_PER_ARM} per version before promote or "
            f"roll back{_sizing(effect, needed, further, traffic)}"
        )
    verdict = decide(sequential, control.users, candidate.users, higher_is_better)
    interval = (
        f"the always-valid {1 - ALPHA:.0%} interval [{sequential.low:+.4g}, {sequential.high:+.4g}]"
    )
    if verdict == "promote":
        return verdict, f"the candidate is better: {interval} excludes zero (valid at any look)"
    if verdict == "roll back":
        return verdict, f"the candidate is worse: {interval} excludes zero (valid at any look)"
    return verdict, f"{interval} includes zero{_sizing(effect, needed, further, traffic)}"


def _sizing(effect: float | None, needed: int | None, further: int | None, traffic: float) -> str:
    if effect is None:
        return (
            "; how many users the test needs is unknown without the smallest difference worth "
            "shipping: set it when the test starts (cso registry ab-start V --min-effect E), or "
            "pass ab-report --min-effect E"
        )
    if needed is None or further is None:
        return ""
    if further == 0:
        return (
            f"; the test already has the {needed:,} users that would detect --min-effect "
            f"{effect:g} with {POWER:.0%} power: a difference that large would most likely show "
            "by now"
        )
    return (
        f"; about {further:,} more users ({needed:,} in all at traffic {traffic:g}) would detect "
        f"--min-effect {effect:g} with {POWER:.0%} power"
    )


def report_metrics(report: ABReport, outcomes: str) -> dict[str, Any]:
    """An A/B report as stored in a version's performanceMetrics (``ab-report --save``)."""
    welch, sequential, check = report.welch, report.sequential, report.assignment
    return {
        "at": utc_now(),
        "outcomes": outcomes,
        "against": report.control.version,
        "traffic": report.traffic,
        "shares": list(report.plan.shares),
        "higher_is_better": report.higher_is_better,
        "users": report.candidate.users,
        "mean_outcome": report.candidate.mean,
        "control_users": report.control.users,
        "control_mean_outcome": report.control.mean,
        "difference": report.difference,
        "welch_ci95": [welch.low, welch.high] if welch else None,
        "welch_df": welch.df if welch and math.isfinite(welch.df) else None,
        "welch_p": welch.p_value if welch else None,
        "always_valid_ci95": [sequential.low, sequential.high] if sequential else None,
        "always_valid_p": sequential.p_value if sequential else None,
        "method": METHOD,
        "tuning_users": TUNING_USERS,
        "min_effect": report.min_effect,
        "users_needed": report.users_needed,
        "misrouted_users": len(check.violators),
        "srm_p": check.p_value,
        "srm_mismatch": check.mismatch,
        "recommendation": report.recommendation,
    }
