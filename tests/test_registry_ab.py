"""``cso registry ab-report``: a decision a team can trust at any look, through any ramp.

The rates are checked by seeded simulations through the library
(:mod:`calling_score_opt.registry.simulation`, the same code bench/bench_ab.py runs with more
replicates); the commands by a registry file written here (no model is trained: ab-report reads
the registry, never the model files).
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_clean_failure
from typer.testing import CliRunner, Result

from calling_score_opt.registry import (
    MIN_USERS_PER_ARM,
    ABPlan,
    Outcome,
    RegistryError,
    SharePeriod,
    ab_plan,
    ab_report,
    always_valid_interval,
    check_assignment,
    cs_multiplier,
    gets_candidate,
    load_registry,
    users_needed,
)
from calling_score_opt.registry.simulation import daily_looks, ramp_test
from calling_score_opt.registry_cli import registry_app

REGISTRY = Path("assets/models/registry.json")
ACTIVE, CANDIDATE = "v1.0-hybrid", "v1.1-hybrid"
SALT = "calling_score:v1.1-hybrid:test"
START = "2026-01-01T00:00:00+00:00"
RAMP = "2026-01-08T00:00:00+00:00"
T_START = 1_767_225_600.0  # START in Unix seconds
WEEK = 7 * 86400.0


def _invoke(*args: object) -> Result:
    return CliRunner().invoke(registry_app, [str(a) for a in args], env={"COLUMNS": "200"})


def _ok(*args: object) -> Result:
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def _version(name: str, status: str, traffic: float | None = None) -> dict[str, Any]:
    return {
        "version": name,
        "modelPath": f"{name}.onnx",
        "defaultWeight": 0.1,
        "dataSource": "synthetic",
        "status": status,
        "sha256": "0" * 64,
        "abTestTrafficPercentage": traffic,
    }


def _write_registry(
    shares: tuple[float, ...] = (0.1,),
    min_effect: float | None = None,
    stopped: bool = False,
) -> bytes:
    """A registry mid-test: ACTIVE active, CANDIDATE at ``shares`` (a week each) with SALT."""
    times = [START, RAMP, "2026-01-15T00:00:00+00:00"]
    history: list[dict[str, Any]] = []
    for index, share in enumerate(shares):
        event = {
            "at": times[index],
            "event": "ab-set" if index else "ab-start",
            "version": CANDIDATE,
            "active": ACTIVE,
            "previous": ACTIVE,
            "traffic": share,
        }
        if not index:
            event["salt"] = SALT
            if min_effect is not None:
                event["min_effect"] = min_effect
        history.append(event)
    test = {
        "candidate": CANDIDATE,
        "traffic": shares[-1],
        "salt": SALT,
        "started": START,
        "min_effect": min_effect,
    }
    if stopped:
        history.append(
            {
                "at": "2026-01-20T00:00:00+00:00",
                "event": "ab-stop",
                "version": CANDIDATE,
                "active": ACTIVE,
                "previous": ACTIVE,
                "traffic": shares[-1],
            }
        )
    document = {
        "schema_version": 1,
        "model_types": {
            "calling_score": {
                "active": ACTIVE,
                "ab_test": None if stopped else test,
                "versions": {
                    ACTIVE: _version(ACTIVE, "active"),
                    CANDIDATE: _version(CANDIDATE, "staging", None if stopped else shares[-1]),
                },
                "history": history,
            }
        },
    }
    REGISTRY.parent.mkdir(parents=True, exist_ok=True)
    REGISTRY.write_text(json.dumps(document, indent=2))
    return REGISTRY.read_bytes()


def _write_csv(path: Path, rows: list[Outcome], timestamps: bool = False) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "version", "outcome", *(["timestamp"] if timestamps else [])])
        for row in rows:
            at = [] if not timestamps else [f"{row.at:.0f}" if row.at is not None else ""]
            writer.writerow([row.user_id, row.version, f"{row.outcome:.6f}", *at])
    return path


def _simulate(
    n_users: int,
    traffic: float,
    effect: float,
    *,
    seed: int = 0,
    drop_candidate: float = 0.0,
    rows_per_user: int = 1,
) -> list[Outcome]:
    """Outcomes of users routed by the real rule with SALT: the candidate adds ``effect``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_users):
        user = f"user_{i}"
        candidate = gets_candidate(SALT, user, traffic)
        if candidate and rng.random() < drop_candidate:
            continue  # the candidate's outcomes are lost on the way: a broken pipeline
        version = CANDIDATE if candidate else ACTIVE
        for _ in range(rows_per_user):
            value = 0.5 + (effect if candidate else 0.0) + rng.gauss(0, 0.2)
            rows.append(Outcome(user, version, value))
    return rows


def _plan(traffic: float, **kwargs: Any) -> ABPlan:
    return ABPlan.fixed(ACTIVE, CANDIDATE, traffic, salt=SALT, **kwargs)


def _ramp_plan() -> ABPlan:
    return ABPlan(
        ACTIVE, CANDIDATE, SALT, (SharePeriod(T_START, 0.1), SharePeriod(T_START + WEEK, 0.5))
    )


def _users(count: int, share: float, inside: bool) -> list[str]:
    """``count`` user ids whose bucket is below ``share`` (``inside``) or not."""
    found = (f"u{i}" for i in range(100_000))
    return [u for u in found if gets_candidate(SALT, u, share) == inside][:count]


# --- the cases ---------------------------------------------------------------------

SMALL_CONTROL = (0.50, 0.60, 0.55)
SMALL_CANDIDATE = (0.70, 0.80, 0.62)


def test_three_users_each_get_welchs_t_interval_and_no_promote(tmp_path: Path) -> None:
    rows = [
        Outcome(u, ACTIVE, v) for u, v in zip(_users(3, 0.5, False), SMALL_CONTROL, strict=True)
    ]
    rows += [
        Outcome(u, CANDIDATE, v) for u, v in zip(_users(3, 0.5, True), SMALL_CANDIDATE, strict=True)
    ]
    report = ab_report(rows, _plan(0.5))
    assert report.welch is not None
    assert (report.welch.low, report.welch.high) == pytest.approx((-0.0286, 0.3420), abs=5e-4)
    assert report.welch.df == pytest.approx(3.12, abs=0.01)
    assert report.welch.p_value == pytest.approx(0.075, abs=5e-4)
    assert report.recommendation == "keep testing"
    assert f"at least {MIN_USERS_PER_ARM} per version before promote or roll back" in report.reason

    _write_registry((0.5,))
    out = _ok("ab-report", "--outcomes", _write_csv(tmp_path / "o.csv", rows)).stdout
    assert "Welch t 95% interval, one look: [-0.02864, +0.34197], df 3.1, p = 0.075" in out
    assert re.search(r"^Recommendation: keep testing: 3 users of v1\.0-hybrid and 3 of", out, re.M)


def test_500_aa_tests_looked_at_daily_decide_wrongly_at_most_5_percent() -> None:
    result = daily_looks(replicates=500, looks=14, users_per_arm=1000, seed=0)
    rate = result.decided_rate
    assert rate <= 0.05, f"A/A wrong decisions {rate:.1%} (promoted {result.promoted})"
    # what ab-report did before: Welch's fixed-sample interval at every look, stop at the first
    assert result.naive_rate > 0.10, f"naive daily Welch {result.naive_rate:.1%}"


def test_a_true_half_sd_effect_at_1000_users_per_arm_is_promoted_and_soon() -> None:
    result = daily_looks(replicates=500, looks=14, users_per_arm=1000, effect_sd=0.5, seed=1)
    assert result.promote_rate >= 0.95, f"promoted {result.promote_rate:.1%}"
    assert result.rolled_back == 0
    assert result.mean_look is not None and result.mean_look <= 4, result.mean_look


def test_200_aa_tests_through_the_ramp_rarely_fire_the_assignment_check() -> None:
    result = ramp_test(replicates=200, users=1000, shares=(0.1, 0.5), seed=2)
    assert result.fire_rate <= 0.01, f"fired in {result.fire_rate:.1%}"


def test_10_percent_of_the_candidates_users_logged_as_active_fire_it_almost_always() -> None:
    result = ramp_test(replicates=200, users=1000, shares=(0.1, 0.5), misrouted=0.1, seed=3)
    assert result.fire_rate >= 0.95, f"fired in {result.fire_rate:.1%}"


def test_with_timestamps_a_correct_ramp_passes_and_a_client_that_missed_it_fires() -> None:
    correct = ramp_test(replicates=50, users=1000, timestamps=True, seed=4)
    assert correct.fire_rate <= 0.02, correct
    stale = (0.1, 0.1)  # the client never picked up the ramp to 0.5
    blind = ramp_test(replicates=20, users=1000, client_shares=stale, seed=5)
    timed = ramp_test(replicates=50, users=1000, client_shares=stale, timestamps=True, seed=5)
    assert blind.fire_rate <= 0.05  # without times, 0.1 is a share the test ran at: allowed
    assert timed.fire_rate >= 0.95, timed


# --- the always-valid interval -----------------------------------------------------------


def test_the_always_valid_interval_is_the_documented_formula() -> None:
    rho2 = (-2 * math.log(0.05) + math.log(1 - 2 * math.log(0.05))) / 5000
    n = 1200
    expected = math.sqrt(2 * (n * rho2 + 1) / (n * rho2) * math.log(math.sqrt(n * rho2 + 1) / 0.05))
    assert cs_multiplier(n) == pytest.approx(expected)
    assert cs_multiplier(5000) == pytest.approx(3.035, abs=1e-3)  # narrowest near N* = 5,000
    assert cs_multiplier(5000) < min(cs_multiplier(1000), cs_multiplier(50_000))
    interval = always_valid_interval(0.1, 0.03, n)
    assert (interval.low, interval.high) == pytest.approx(
        (0.1 - 0.03 * expected, 0.1 + 0.03 * expected)
    )
    # its p-value is below 5% exactly when the interval excludes zero
    for difference in (0.03 * expected * 0.999, 0.03 * expected * 1.001):
        edge = always_valid_interval(difference, 0.03, n)
        assert (edge.p_value < 0.05) == (edge.low > 0)


def test_users_needed_is_the_smallest_n_with_80_percent_power_for_the_interval() -> None:
    needed = users_needed(1.0, 1.0, 0.1, 0.5)
    z = 0.8416212335729143

    def detects(n: int) -> bool:
        return math.sqrt(4 / n) * (cs_multiplier(n) + z) <= 0.1

    assert detects(needed) and not detects(needed - 1)
    assert needed > 3140  # what a single fixed-sample look needs: peeking has a price
    assert users_needed(0.0, 0.0, 0.1, 0.1) == MIN_USERS_PER_ARM * 10  # the minimum per arm


def test_a_clearly_better_candidate_is_promoted_and_a_worse_rolled_back() -> None:
    better = ab_report(_simulate(4000, 0.5, 0.05), _plan(0.5))
    assert better.recommendation == "promote", better.reason
    assert better.sequential is not None and better.sequential.low > 0
    assert better.sequential.low < 0.05 < better.sequential.high
    worse = ab_report(_simulate(4000, 0.5, -0.05, seed=1), _plan(0.5))
    assert worse.recommendation == "roll back", worse.reason
    lower = ab_report(_simulate(4000, 0.5, -0.05, seed=1), _plan(0.5), higher_is_better=False)
    assert lower.recommendation == "promote"


def test_keep_testing_says_how_many_users_the_planned_effect_needs() -> None:
    rows = _simulate(400, 0.1, 0.02, seed=2)
    unplanned = ab_report(rows, _plan(0.1))
    assert unplanned.recommendation == "keep testing"
    assert unplanned.further_users is None
    assert "ab-start V --min-effect E" in unplanned.reason
    planned = ab_report(rows, _plan(0.1, min_effect=0.05))
    assert planned.users_needed == users_needed(
        planned.control.sd or 0, planned.candidate.sd or 0, 0.05, 0.1
    )
    assert planned.users_needed is not None
    total = planned.control.users + planned.candidate.users
    assert planned.further_users == planned.users_needed - total > 0
    assert f"about {planned.further_users:,} more users" in planned.reason
    with pytest.raises(RegistryError, match=r"was planned with --min-effect 0\.05"):
        ab_report(rows, _plan(0.1, min_effect=0.05), min_effect=0.01)
    assert ab_report(rows, _plan(0.1), min_effect=0.05).users_needed == planned.users_needed


# --- the assignment check ------------------------------------------------------------------


def test_a_version_routing_never_gives_a_user_is_a_violation() -> None:
    low, middle, high = _users(1, 0.1, True), _users(500, 0.5, True), _users(1, 0.5, False)
    middle = [u for u in middle if not gets_candidate(SALT, u, 0.1)][:1]
    plan = _ramp_plan()
    fine = [
        Outcome(low[0], CANDIDATE, 1),
        Outcome(middle[0], ACTIVE, 1),  # before the ramp
        Outcome(middle[0], CANDIDATE, 1),  # after it
        Outcome(high[0], ACTIVE, 1),
    ]
    assert check_assignment(fine, plan).violators == ()
    bad = [Outcome(low[0], ACTIVE, 1), Outcome(high[0], CANDIDATE, 1)]
    check = check_assignment(bad, plan)
    assert check.violators == (low[0], high[0])
    assert check.example is not None and "below every share of the test" in check.example


def test_timestamps_use_the_share_in_force_with_an_hours_grace() -> None:
    (user,) = [u for u in _users(500, 0.5, True) if not gets_candidate(SALT, u, 0.1)][:1]
    plan = _ramp_plan()
    ramp = T_START + WEEK

    def violates(version: str, at: float) -> bool:
        return check_assignment([Outcome(user, version, 1, at)], plan).violators != ()

    assert not violates(ACTIVE, ramp - 10)
    assert violates(CANDIDATE, ramp - 2 * 3600)  # at 10% this user had the active version
    assert not violates(CANDIDATE, ramp - 1800)  # within the grace of the ramp: either
    assert not violates(ACTIVE, ramp + 1800)
    assert violates(ACTIVE, ramp + 2 * 3600)  # at 50% the user has the candidate
    assert not violates(ACTIVE, T_START - 1800)  # just before the start: the active version


def test_rows_outside_the_tests_time_are_left_out() -> None:
    rows = _simulate(2000, 0.1, 0.0)
    timed = [Outcome(r.user_id, r.version, r.outcome, T_START + 3600) for r in rows]
    before = [Outcome("early", CANDIDATE, 9.0, T_START - 86400)]
    report = ab_report(
        timed + before, ABPlan(ACTIVE, CANDIDATE, SALT, (SharePeriod(T_START, 0.1),))
    )
    assert report.rows_outside == 1
    assert report.assignment.violators == ()
    assert report.control.users + report.candidate.users == 2000


def test_lost_candidate_outcomes_skew_the_bands_and_block_the_decision() -> None:
    report = ab_report(_simulate(4000, 0.5, 0.05, drop_candidate=0.3), _plan(0.5))
    assert report.assignment.mismatch and report.assignment.p_value < 0.001
    assert report.recommendation == "check the assignment"
    assert "not to be trusted" in report.reason


def test_outcomes_routed_at_12_percent_against_a_registry_at_10_fire_it() -> None:
    assert ab_report(_simulate(10_000, 0.12, 0.0), _plan(0.1)).assignment.misrouted
    assert not ab_report(_simulate(10_000, 0.1, 0.0), _plan(0.1)).assignment.fires


def test_without_the_salt_only_the_split_per_version_is_checked() -> None:
    plan = ABPlan.fixed(ACTIVE, CANDIDATE, 0.1)
    assert not ab_report(_simulate(4000, 0.1, 0.0), plan).assignment.fires
    skewed = ab_report(_simulate(4000, 0.1, 0.0, drop_candidate=0.5), plan)
    assert skewed.assignment.by == "version"
    assert skewed.recommendation == "check the assignment"


def test_users_are_the_unit_and_users_in_both_arms_are_left_out() -> None:
    rows = _simulate(1000, 0.5, 0.05, rows_per_user=3)
    plan = ABPlan.fixed(ACTIVE, CANDIDATE, 0.5)  # no salt: the extra row is no violation
    other = {ACTIVE: CANDIDATE, CANDIDATE: ACTIVE}[rows[0].version]
    rows.append(Outcome(rows[0].user_id, other, 9.0))
    rows.append(Outcome("someone", "v0.9", 1.0))
    report = ab_report(rows, plan)
    assert report.control.users + report.candidate.users == 999
    assert report.control.rows + report.candidate.rows == 999 * 3
    assert report.users_in_both == 1
    assert report.rows_ignored == 1


# --- the registry's history drives the plan ----------------------------------------------


def test_the_plan_comes_from_the_history_ramp_included() -> None:
    _write_registry((0.1, 0.5), min_effect=0.02)
    plan = ab_plan(load_registry(REGISTRY), "calling_score")
    assert (plan.control, plan.candidate, plan.salt) == (ACTIVE, CANDIDATE, SALT)
    assert plan.periods == (SharePeriod(T_START, 0.1), SharePeriod(T_START + WEEK, 0.5))
    assert plan.min_effect == 0.02 and plan.end is None
    _write_registry((0.1, 0.5), stopped=True)
    stopped = ab_plan(load_registry(REGISTRY), "calling_score", CANDIDATE)
    assert stopped.salt == SALT and stopped.shares == (0.1, 0.5)
    assert stopped.end is not None and stopped.end_traffic == 0.0
    fixed = ab_plan(load_registry(REGISTRY), "calling_score", CANDIDATE, traffic=0.2)
    assert fixed.shares == (0.2,) and fixed.salt == SALT


def test_ab_report_through_a_ramp_with_timestamps_prints_and_saves(tmp_path: Path) -> None:
    _write_registry((0.1, 0.5), min_effect=0.05)
    rng = random.Random(0)
    rows = []
    for i in range(3000):
        user = f"user_{i}"
        for start, share in ((T_START, 0.1), (T_START + WEEK, 0.5)):
            inside = gets_candidate(SALT, user, share)
            value = 0.5 + (0.04 if inside else 0.0) + rng.gauss(0, 0.2)
            at = start + rng.random() * WEEK
            rows.append(Outcome(user, CANDIDATE if inside else ACTIVE, value, at))
    path = _write_csv(tmp_path / "outcomes.csv", rows, timestamps=True)
    out = _ok("ab-report", "--outcomes", path, "--save").stdout
    assert "at each row's time; shares 0.1 -> 0.5" in out
    assert re.search(r"Assignment: 0 of 3,000 users .*: ok", out), out
    assert re.search(r"Split: users per routing band \[0, 0\.1\) \d+ \(300 expected\)", out)
    assert re.search(r"Left out: 1,\d{3} users seen under both versions", out)  # the ramp moved
    assert re.search(r"Always-valid 95% interval, any look: \[\+0\.0\d+, \+0\.0\d+\]", out), out
    assert "Recommendation: promote: the candidate is better" in out
    assert "cso registry promote v1.1-hybrid\n" in out
    saved = json.loads(REGISTRY.read_text())["model_types"]["calling_score"]["versions"][CANDIDATE][
        "performanceMetrics"
    ]["ab_report"]
    assert saved["recommendation"] == "promote"
    assert saved["shares"] == [0.1, 0.5]
    assert saved["always_valid_ci95"][0] > 0
    assert saved["min_effect"] == 0.05

    broken = [
        Outcome(r.user_id, ACTIVE, r.outcome, r.at) if i % 10 == 0 else r
        for i, r in enumerate(rows)
    ]
    out = _ok("ab-report", "--outcomes", _write_csv(tmp_path / "b.csv", broken, True)).stdout
    assert "MISROUTED" in out
    assert re.search(r"^Recommendation: check the assignment: \d+ of 3,000 users", out, re.M)


def test_a_stopped_test_is_reported_from_its_history(tmp_path: Path) -> None:
    _write_registry((0.1,), stopped=True)
    path = _write_csv(tmp_path / "o.csv", _simulate(3000, 0.1, 0.0))
    out = _ok("ab-report", "--outcomes", path, "--candidate", CANDIDATE).stdout
    assert "Assignment: 0 of 3,000 users" in out
    assert "Recommendation: keep testing" in out


# --- the CLI: min-effect, refusals ------------------------------------------------------------


def test_ab_report_without_a_planned_effect_says_what_it_needs(tmp_path: Path) -> None:
    _write_registry((0.1,))
    path = _write_csv(tmp_path / "o.csv", _simulate(2000, 0.1, 0.0, seed=3))
    out = _ok("ab-report", "--outcomes", path).stdout
    assert "Recommendation: keep testing: the always-valid 95% interval" in out
    assert "unknown without the smallest difference worth shipping" in out
    sized = _ok("ab-report", "--outcomes", path, "--min-effect", "0.03").stdout
    assert re.search(r"about [\d,]+ more users \([\d,]+ in all at traffic 0\.1\)", sized)


def test_a_planned_effect_cannot_be_changed_by_the_report(tmp_path: Path) -> None:
    before = _write_registry((0.1,), min_effect=0.05)
    path = _write_csv(tmp_path / "o.csv", _simulate(500, 0.1, 0.0))
    assert_clean_failure(
        _invoke("ab-report", "--outcomes", path, "--min-effect", "0.01"),
        "was planned with --min-effect 0.05 at ab-start",
    )
    assert_clean_failure(
        _invoke("ab-report", "--outcomes", path, "--min-effect", "-1"),
        "--min-effect must be a positive number",
    )
    assert REGISTRY.read_bytes() == before


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("1e308", "line 3: outcome '1e308' is out of range (at most 1e+12 in size)"),
        ("inf", "line 3: outcome 'inf' is out of range"),
        ("nan", "line 3: outcome 'nan' is not a number"),
        ("high", "line 3: outcome 'high' is not a number"),
    ],
)
def test_an_absurd_outcome_is_one_line_and_exit_2(
    tmp_path: Path, value: str, fragment: str
) -> None:
    before = _write_registry((0.1,))
    bad = tmp_path / "bad.csv"
    bad.write_text(f"user_id,version,outcome\nu1,{ACTIVE},0.5\nu2,{CANDIDATE},{value}\n")
    assert_clean_failure(_invoke("ab-report", "--outcomes", bad, "--save"), fragment)
    assert REGISTRY.read_bytes() == before


def test_the_outcomes_csv_is_read_strictly(tmp_path: Path) -> None:
    _write_registry((0.1,))
    bad = tmp_path / "bad.csv"
    bad.write_text("user,version,score\n")
    assert_clean_failure(_invoke("ab-report", "--outcomes", bad), "no column user_id, outcome")
    bad.write_text(f"user_id,version,outcome,timestamp\nu1,{ACTIVE},0.5,yesterday\n")
    assert_clean_failure(_invoke("ab-report", "--outcomes", bad), "line 2: timestamp 'yesterday'")
    bad.write_text(f"user_id,version,outcome,timestamp\nu1,{ACTIVE},0.5,1e308\n")
    assert_clean_failure(_invoke("ab-report", "--outcomes", bad), "is not a time")
    extra = _simulate(300, 0.1, 0.0)
    text = "user_id,version,outcome\n" + "".join(
        f"{r.user_id},{r.version},{r.outcome},surplus\n" for r in extra
    )
    bad.write_text(text)  # a field beyond the header is ignored, not a traceback
    assert "Recommendation: keep testing" in _ok("ab-report", "--outcomes", bad).stdout


def test_at_full_traffic_there_is_no_control_group(tmp_path: Path) -> None:
    _write_registry((0.1, 1.0))
    path = _write_csv(tmp_path / "o.csv", _simulate(300, 0.1, 0.0))
    assert_clean_failure(_invoke("ab-report", "--outcomes", path), "there is no control group")
