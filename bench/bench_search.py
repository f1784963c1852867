"""Benchmark: `cso search --trials 15 --space grid` (with pruning) against `cso grid`.

In one run, on the same 10,000-record synthetic file, from fresh studies:

    python bench/bench_search.py

prints the wall time of each and their ratio (target: the search takes less time), the best
validation loss of each against the training-seed noise of that loss (target: the search is no
worse beyond that noise), and model quality as the share of the explainable variance captured
on the test split, (var(y) - MSE) / (var(y) - irreducible error), for the grid's best, the
search's best, and the search's best with pair_features. Results go to bench/results/search.json.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from calling_score_opt.data import load_dataset, split_dataset  # noqa: E402
from calling_score_opt.synth import write_synthetic  # noqa: E402
from calling_score_opt.train import TrainConfig, train_model  # noqa: E402


def run(args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "calling_score_opt.cli", *args, "--quiet"]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def best_of_study(cwd: Path, study: str) -> dict[str, float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{cwd}/studies/{study}.db")
    best = loaded.best_trial
    counts: dict[str, int] = {}
    for trial in loaded.trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return {
        "trial": best.number,
        "val_loss": best.user_attrs["val_loss"],
        "test_loss": best.user_attrs["test_loss"],
        "params": best.params,
        "states": counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output", type=Path, default=HERE / "results" / "search.json")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])

    with tempfile.TemporaryDirectory(prefix="cso-bench-search-") as tmp:
        work = Path(tmp)
        data = work / "data.json"
        write_synthetic(data, args.records, 0)
        common = ["--data-path", str(data), "--epochs", str(args.epochs), "--jobs", str(args.jobs)]
        print("cso grid ...", flush=True)
        grid_s = run(["grid", *common, "--output-dir", str(work / "grid")], work)
        grid = json.loads((work / "grid" / "optimization_results.json").read_text())["summary"]
        print("cso search --space grid ...", flush=True)
        search_s = run(
            [
                "search",
                "--trials",
                str(args.trials),
                "--space",
                "grid",
                "--pair-features",
                "off",
                "--study",
                "s",
                *common,
            ],
            work,
        )
        search = best_of_study(work, "s")
        print("cso search --space grid --pair-features on ...", flush=True)
        pairs_s = run(
            [
                "search",
                "--trials",
                str(args.trials),
                "--space",
                "grid",
                "--pair-features",
                "on",
                "--study",
                "p",
                *common,
            ],
            work,
        )
        pairs = best_of_study(work, "p")

        dataset = load_dataset(data)
        split = split_dataset(dataset, 0)
        # Training-seed noise of the baseline's validation loss: what "no worse" is measured by.
        seed_vals = [
            train_model(split, TrainConfig(epochs=args.epochs, seed=s)).val_loss for s in range(3)
        ]

    noise = statistics.stdev(seed_vals)
    var_y = float(split.y_test.var())
    floor = dataset.irreducible_mse or 0.0

    def share(mse: float) -> float:
        return (var_y - mse) / (var_y - floor)

    grid_best = grid["best"]
    report = {
        "records": args.records,
        "trials": args.trials,
        "jobs": args.jobs,
        "grid_s": round(grid_s, 2),
        "search_s": round(search_s, 2),
        "search_pair_features_s": round(pairs_s, 2),
        "time_ratio_search_over_grid": round(search_s / grid_s, 3),
        "grid_best": {
            "name": grid_best["name"],
            "val_loss": grid_best["val_loss"],
            "test_loss": grid_best["test_loss"],
        },
        "search_best": search,
        "search_pair_features_best": pairs,
        "baseline_val_loss_seed_std": noise,
        "search_minus_grid_val_loss": search["val_loss"] - grid_best["val_loss"],
        "var_y_test": var_y,
        "irreducible_mse": floor,
        "explained_share": {
            "grid_best": share(grid_best["test_loss"]),
            "search_best": share(search["test_loss"]),
            "search_pair_features_best": share(pairs["test_loss"]),
        },
    }
    print(f"cso grid:                      {grid_s:6.1f}s  best val {grid_best['val_loss']:.5f}")
    print(
        f"cso search --space grid:       {search_s:6.1f}s  best val {search['val_loss']:.5f}"
        f"  ({search['states']})"
    )
    print(f"  ... with --pair-features on: {pairs_s:6.1f}s  best val {pairs['val_loss']:.5f}")
    print(f"time ratio search/grid: {search_s / grid_s:.2f} (target: < 1)")
    print(
        f"search - grid best val loss: {report['search_minus_grid_val_loss']:+.5f} "
        f"(seed noise, std over 3 seeds: {noise:.5f})"
    )
    print(
        "explainable variance captured on the test split "
        f"(var {var_y:.5f}, irreducible {floor:.5f}):"
    )
    for name, value in report["explained_share"].items():
        print(f"  {name:28s} {value:.1%}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
