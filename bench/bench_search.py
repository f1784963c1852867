"""Benchmark: model quality and time of four ways to get a model, on data where models differ.

In one run, on fresh ``cso data synth --kind gated`` data (10,000 records) and fresh studies:

    python bench/bench_search.py                 # one data seed
    python bench/bench_search.py --seeds 0 1 2   # several, for the spread

(a) the optuna-examples PyTorch pattern (``bench/optuna_example.py``: TPE + median pruner, a
    DataLoader loop), 20 trials; (b) ``cso grid``; (c) ``cso search --trials 20``, its best
    trial; (d) ``cso export --ensemble`` of that search; (e) that ensemble bagged: each member
    retrained on 5 folds of train + validation (as AutoGluon does) and replaced by the mean of
    its fold models, the question being whether cso should offer it. For each: wall time and
    the share of the
    explainable variance captured on the test split, (var(y) - MSE) / (var(y) - irreducible
    error), with the irreducible error the data file records. Selection is on validation
    everywhere; the test split only reports. (d) and (e) against (c) get the paired-bootstrap
    interval of their gain in points, and the time ratio of (c) over (b) is kept.
Results go to bench/results/search.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from calling_score_opt.data import load_dataset, split_dataset  # noqa: E402
from calling_score_opt.stats import paired_bootstrap_improvement  # noqa: E402

sys.path.insert(0, str(HERE))
import optuna_example  # noqa: E402


def cso(args: list[str], cwd: Path) -> float:
    """Run one cso command in ``cwd``; its wall time, start-up and imports included."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "calling_score_opt.cli", *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def one_seed(
    seed: int, records: int, trials: int, jobs: int, search_jobs: int, epochs: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cso-bench-search-") as tmp:
        work = Path(tmp)
        data = work / "gated.json"
        cso(["data", "synth", "--kind", "gated", "--records", str(records), "--seed", str(seed),
             "--output", str(data)], work)  # fmt: skip
        dataset = load_dataset(data)
        split = split_dataset(dataset, 0)
        var_y = float(np.var(split.y_test.astype(np.float64)))
        floor = float(dataset.irreducible_mse or 0.0)

        def share(mse: float) -> float:
            return (var_y - mse) / (var_y - floor)

        common = ["--data-path", str(data), "--epochs", str(epochs)]
        print(f"[seed {seed}] (a) optuna-examples pattern, {trials} trials ...", flush=True)
        example = optuna_example.run(data, trials, seed=seed)
        print(f"[seed {seed}] (b) cso grid ...", flush=True)
        grid_s = cso(
            ["grid", *common, "--jobs", str(jobs), "--output-dir", "grid", "--quiet"], work
        )
        grid = json.loads((work / "grid" / "optimization_results.json").read_text())["summary"]
        print(f"[seed {seed}] (c) cso search --trials {trials} ...", flush=True)
        search_s = cso(
            ["search", "--trials", str(trials), *common, "--jobs", str(search_jobs), "--quiet"],
            work,
        )
        print(f"[seed {seed}] (d) cso export --ensemble ...", flush=True)
        ensemble_s = cso(["export", "--ensemble", "--output-dir", "ens"], work)

        results = json.loads((work / "ens" / "optimization_results.json").read_text())
        ens = results["summary"]["ensemble"]
        (entry,) = [v for v in results["variants"] if v["name"] == "ensemble"]

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(
            study_name="calling-score-search",
            storage=f"sqlite:///{work}/studies/calling-score-search.db",
        )
        states = [t.state.name for t in study.trials]
        best = study.best_trial
        search_best_test = best.user_attrs["test_loss"]
        boot = ens["vs_best_single"]
        row = {
            "seed": seed,
            "var_y_test": var_y,
            "irreducible_mse": floor,
            "a_optuna_example": {
                "wall_s": round(example["wall_s"], 1),
                "test_loss": example["test_loss"],
                "explained_share": share(example["test_loss"]),
                "complete": example["complete"],
                "pruned": example["pruned"],
            },
            "b_cso_grid": {
                "wall_s": round(grid_s, 1),
                "best": grid["best"]["name"],
                "test_loss": grid["best"]["test_loss"],
                "explained_share": share(grid["best"]["test_loss"]),
            },
            "c_cso_search": {
                "wall_s": round(search_s, 1),
                "best_trial": best.number,
                "test_loss": search_best_test,
                "explained_share": share(search_best_test),
                "complete": states.count("COMPLETE"),
                "pruned": states.count("PRUNED"),
            },
            "d_cso_ensemble": {
                "wall_s": round(ensemble_s, 1),
                "members": ens["members"],
                "test_loss": entry["test_loss"],
                "explained_share": share(entry["test_loss"]),
                "vs_c_test_mse_gain_pct": boot["test_mse_improvement_pct"],
                "vs_c_ci95_pct": boot["ci95_pct"],
                "size_kb": entry["model_size_kb"],
            },
            "shares_as_cso_reports_them": ens["explained_share"],
            "time_ratio_search_over_grid": round(search_s / grid_s, 3),
        }
        # the points (d) and (e) add to (c), with bootstrap intervals in points, on the same
        # records, from the ONNX files the app would run
        y = split.y_test.astype(np.float64)
        c_pred = _predictions(work, best.number, split)
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(y), size=(2000, len(y)))
        denom = var_y - floor
        print(f"[seed {seed}] (e) the ensemble, bagged on 5 folds ...", flush=True)
        started = time.perf_counter()
        bagged = _bagged_ensemble(work, folds=5)
        bagged_s = time.perf_counter() - started
        d_pred = _ensemble_predictions(work / "ens", split)

        def gain_in_points(before: Any, after: Any) -> tuple[float, float, float]:
            """Points of explainable variance ``after`` adds to ``before``, with the 95%
            paired-bootstrap interval (both scored on the same resampled test records)."""
            points = ((before[idx] - y[idx]) ** 2).mean(1) - ((after[idx] - y[idx]) ** 2).mean(1)
            low, high = np.percentile(points / denom * 100, [2.5, 97.5])
            mean = (float(np.mean((before - y) ** 2)) - float(np.mean((after - y) ** 2))) / denom
            return mean * 100, float(low), float(high)

        for key, before, after in (("d", c_pred, d_pred), ("e", c_pred, bagged)):
            gap, low, high = gain_in_points(before, after)
            row[f"{key}_minus_c_points"] = gap
            row[f"{key}_minus_c_points_ci95"] = [low, high]
        gap, low, high = gain_in_points(d_pred, bagged)
        row["e_minus_d_points"] = gap
        row["e_minus_d_points_ci95"] = [low, high]
        bagged_mse = float(np.mean((bagged - y) ** 2))
        row["e_ensemble_bagged5"] = {
            "wall_s": round(bagged_s, 1),
            "test_loss": bagged_mse,
            "explained_share": share(bagged_mse),
        }
        a_pred = example["test_predictions"]
        versus = paired_bootstrap_improvement((a_pred - y) ** 2, (c_pred - y) ** 2)
        row["c_vs_a_test_mse_gain_pct"] = [versus.percent, versus.ci_low, versus.ci_high]
        return row


def _bagged_ensemble(work: Path, folds: int) -> Any:
    """The search's ensemble (members and weights as cso export --ensemble selects them), each
    member retrained on ``folds`` folds of train + validation (fold k: trained on the others,
    stopped early on fold k, seed + 1 + k; the same folds for every member) and replaced by the
    mean of its fold models. Returns its test scores."""
    import dataclasses

    import optuna

    from calling_score_opt.data import Split
    from calling_score_opt.ensemble import _candidates, greedy_selection
    from calling_score_opt.stacked import train_one
    from calling_score_opt.study import artifact_store
    from calling_score_opt.trials import predict, study_data

    study = optuna.load_study(
        study_name="calling-score-search",
        storage=f"sqlite:///{work}/studies/calling-score-search.db",
    )
    data = study_data(study)
    candidates = _candidates(
        study, artifact_store(work / "studies" / "calling-score-search.artifacts"), data
    )
    split = data.split
    weights = greedy_selection(
        np.stack([c.val for c in candidates]), split.y_val.astype(np.float64)
    ).weights(len(candidates))
    x_all = np.concatenate([split.x_train, split.x_val])
    y_all = np.concatenate([split.y_train, split.y_val])
    fold = np.random.default_rng(split.seed).permutation(len(y_all)) % folds
    scores = np.zeros(len(split.y_test))
    for i in np.flatnonzero(weights):
        for k in range(folds):
            fit, held = fold != k, fold == k
            part = Split(x_all[fit], y_all[fit], x_all[held], y_all[held], split.x_test,
                         split.y_test, split.seed)  # fmt: skip
            config = dataclasses.replace(
                candidates[i].config, seed=candidates[i].config.seed + 1 + k
            )
            model = train_one(part, config, "cpu", None).model
            scores += weights[i] / folds * predict(model, split.x_test)
    return scores


def _predictions(work: Path, trial: int, split: Any) -> Any:
    """Trial ``trial``'s test scores, through its exported ONNX file (what the app would run)."""
    from calling_score_opt.export import onnx_predict

    cso(["export", "--trial", str(trial), "--output-dir", "single"], work)
    (path,) = (work / "single").glob("*.onnx")
    return onnx_predict(path, split.x_test).astype(np.float64)


def _ensemble_predictions(folder: Path, split: Any) -> Any:
    from calling_score_opt.export import onnx_predict

    return onnx_predict(folder / "calling_score_model_ensemble.onnx", split.x_test).astype(
        np.float64
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    # One search worker: with several, which trial sees which finished ones depends on timing,
    # so the same command can pick another best trial (the grid is reproducible either way).
    parser.add_argument("--search-jobs", type=int, default=1)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "search.json")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])

    rows = [
        one_seed(s, args.records, args.trials, args.jobs, args.search_jobs, args.epochs)
        for s in args.seeds
    ]
    print()
    print("explainable variance captured on the test split, and wall time:")
    for row in rows:
        print(f"data seed {row['seed']} (var(y) {row['var_y_test']:.5f}, "
              f"irreducible {row['irreducible_mse']:.5f}):")  # fmt: skip
        for key, label in (
            ("a_optuna_example", "(a) optuna-examples pattern"),
            ("b_cso_grid", "(b) cso grid"),
            ("c_cso_search", "(c) cso search, best trial"),
            ("d_cso_ensemble", "(d) its ensemble"),
            ("e_ensemble_bagged5", "(e) that ensemble, bagged x5"),
        ):
            print(f"  {label:32s} {row[key]['explained_share']:6.1%}  {row[key]['wall_s']:6.1f} s")
        for key in ("d", "e"):
            low, high = row[f"{key}_minus_c_points_ci95"]
            gap = row[f"{key}_minus_c_points"]
            print(f"  ({key}) - (c): {gap:+.1f} points, 95% paired-bootstrap interval "
                  f"{low:+.1f} .. {high:+.1f} (target: >= +8, above 0)")  # fmt: skip
        low, high = row["e_minus_d_points_ci95"]
        print(f"  (e) - (d): {row['e_minus_d_points']:+.1f} points, 95% paired-bootstrap "
              f"interval {low:+.1f} .. {high:+.1f} (what bagging adds)")  # fmt: skip
    if len(rows) > 1:
        for key in ("d", "e"):
            gaps = [r[f"{key}_minus_c_points"] for r in rows]
            print(f"mean ({key}) - (c) over {len(rows)} seeds: {statistics.mean(gaps):+.1f} points")
    report = {
        "records": args.records,
        "trials": args.trials,
        "epochs": args.epochs,
        "jobs": args.jobs,
        "search_jobs": args.search_jobs,
        "data": "cso data synth --kind gated",
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
