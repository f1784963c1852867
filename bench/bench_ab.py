"""Benchmark: the error rates of ``cso registry ab-report``, measured by seeded simulation.

The same simulations as tests/test_registry_ab.py (calling_score_opt.registry.simulation), with
more replicates:

- A/A tests reported on every one of 14 days, stopping at the first promote or roll back: how
  often a candidate that is no better is promoted or rolled back (normal and skewed outcomes),
  next to what Welch's fixed-sample interval checked daily does;
- the same with a true effect (0.5, 0.2 and 0.1 standard deviations) at 1,000 users per arm by
  the last day: how often and after how many days it promotes;
- A/A tests through the documented 10% -> 50% ramp, 4,000 users with one outcome per phase:
  how often the assignment check fires with correct routing, with 10% of the candidate's users
  logged under the active version, and with a client that missed the ramp, each with and
  without timestamps.

    python bench/bench_ab.py                 # writes bench/results/ab.json
    python bench/bench_ab.py --quick         # fewer replicates, a smoke run

Each rate comes with its 95% Clopper-Pearson interval.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from calling_score_opt.registry import (  # noqa: E402
    ALPHA,
    GRACE_S,
    METHOD,
    MIN_USERS_PER_ARM,
    TUNING_USERS,
)
from calling_score_opt.registry.assignment import VIOLATION_FLOOR, VIOLATION_SHARE  # noqa: E402
from calling_score_opt.registry.simulation import daily_looks, ramp_test  # noqa: E402


def rate(count: int, total: int) -> dict[str, Any]:
    """``count / total`` with its 95% Clopper-Pearson interval."""
    from scipy import stats

    interval = stats.binomtest(count, total).proportion_ci(0.95, method="exact")
    return {
        "count": count,
        "of": total,
        "rate": round(count / total, 4),
        "ci95": [round(float(interval.low), 4), round(float(interval.high), 4)],
    }


def show(label: str, measured: dict[str, Any], extra: str = "") -> None:
    low, high = measured["ci95"]
    print(
        f"  {label:<72} {measured['rate']:7.2%}  [{low:.2%}, {high:.2%}]  "
        f"({measured['count']}/{measured['of']}){extra}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer replicates (a smoke run)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "ab.json")
    args = parser.parse_args()
    looks_n = 200 if args.quick else 4000
    ramp_n = 40 if args.quick else 500
    started = time.perf_counter()
    results: dict[str, Any] = {
        "method": METHOD,
        "alpha": ALPHA,
        "tuning_users": TUNING_USERS,
        "min_users_per_arm": MIN_USERS_PER_ARM,
        "assignment_tolerance": {"share": VIOLATION_SHARE, "floor": VIOLATION_FLOOR},
        "grace_s": GRACE_S,
    }

    print(f"Daily looks: 14 looks, 1,000 users per arm by the last, {looks_n} tests each")
    aa: dict[str, Any] = {}
    for name, skewed, seed in (("normal", False, 10), ("skewed", True, 11)):
        result = daily_looks(looks_n, 14, 1000, 0.0, seed=seed, skewed=skewed)
        wrong = rate(result.promoted + result.rolled_back, looks_n)
        naive = rate(result.naive_decided, looks_n)
        aa[name] = {
            "wrong_decisions": wrong,
            "promoted": rate(result.promoted, looks_n),
            "naive_daily_welch_wrong_decisions": naive,
        }
        show(f"A/A ({name} outcomes): promote or roll back", wrong)
        show(f"A/A ({name} outcomes): fixed-sample Welch t checked daily", naive)
    results["aa_daily_looks"] = aa

    effects: dict[str, Any] = {}
    for effect, seed in ((0.5, 20), (0.2, 21), (0.1, 22)):
        result = daily_looks(looks_n, 14, 1000, effect, seed=seed)
        promoted = rate(result.promoted, looks_n)
        effects[f"{effect:g}_sd"] = {
            "promoted": promoted,
            "rolled_back": result.rolled_back,
            "mean_day_of_promotion": None
            if result.mean_look is None
            else round(result.mean_look, 2),
            "naive_daily_welch_decided": rate(result.naive_decided, looks_n),
        }
        day = "" if result.mean_look is None else f", on day {result.mean_look:.1f} on average"
        show(f"true effect {effect:g} sd: promoted", promoted, day)
    results["true_effect_daily_looks"] = effects

    print(f"Ramp 10% -> 50% (a week each), 4,000 users, one outcome per phase, {ramp_n} tests each")
    ramp: dict[str, Any] = {}
    scenarios: list[tuple[str, dict[str, Any]]] = [
        ("correct routing", {}),
        ("10% of the candidate's users logged as active", {"misrouted": 0.1}),
        ("a client that missed the ramp (kept 10%)", {"client_shares": (0.1, 0.1)}),
    ]
    for index, (name, options) in enumerate(scenarios):
        for timestamps in (False, True):
            result = ramp_test(
                ramp_n, 4000, (0.1, 0.5), timestamps=timestamps, seed=30 + index, **options
            )
            measured = rate(result.fired, ramp_n)
            key = f"{name} ({'with' if timestamps else 'without'} timestamps)"
            ramp[key] = {"check_the_assignment": measured, "min_split_p": result.min_p_value}
            show(f"{key}: fires", measured)
    results["ramp_assignment_check"] = ramp
    results["seconds"] = round(time.perf_counter() - started, 1)
    if not args.quick:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output} in {results['seconds']} s")


if __name__ == "__main__":
    main()
