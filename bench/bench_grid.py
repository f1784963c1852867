"""Benchmark: the old one-process-per-variant script against `cso grid`, on the same data.

Both sides run as fresh processes from the command line, in this one run, on the same
10,000-record file, so their ratio is meaningful even on a shared, noisy machine:

    python bench/bench_grid.py                 # full: 15 variants, up to 100 epochs
    python bench/bench_grid.py --max-variants 3 --epochs 20   # a quick look

It prints both wall times, their ratio (target: `cso grid` at least 4x faster, exports and
parity checks included), and the share of the grid's time spent writing the Optuna study
(target: under 5%). Results also go to bench/results/grid.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from calling_score_opt.space import VARIANTS  # noqa: E402
from calling_score_opt.synth import write_synthetic  # noqa: E402


def run(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"benchmark: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--max-variants", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=None, help="cso grid --jobs (default: cores)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "grid.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cso-bench-") as tmp:
        work = Path(tmp)
        data = work / "calling_score_training_data_v1_hybrid.json"
        write_synthetic(data, args.records, args.data_seed)
        variants = [v.name for v in VARIANTS[: args.max_variants]]

        print(f"old approach: {len(variants)} fresh processes ...", flush=True)
        old_s = 0.0
        for name in variants:
            old_s += run(
                [sys.executable, str(HERE / "old_approach.py"), "--data-path", str(data),
                 "--output-dir", str(work / "old"), "--variant", name,
                 "--epochs", str(args.epochs)],
                work,
            )  # fmt: skip
        print(f"old approach: {old_s:.1f}s", flush=True)

        cso = [sys.executable, "-m", "calling_score_opt.cli", "grid", "--data-path", str(data),
               "--output-dir", str(work / "grid"), "--max-variants", str(args.max_variants),
               "--epochs", str(args.epochs), "--quiet"]  # fmt: skip
        if args.jobs:
            cso += ["--jobs", str(args.jobs)]
        env_path = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
        os.environ["PYTHONPATH"] = env_path
        grid_s = run(cso, work)
        results = json.loads((work / "grid" / "optimization_results.json").read_text())

    timing = results["summary"]["timing"]
    report = {
        "records": args.records,
        "variants": len(variants),
        "epochs": args.epochs,
        "cpu_count": os.cpu_count(),
        "old_approach_s": round(old_s, 2),
        "cso_grid_s": round(grid_s, 2),
        "speedup": round(old_s / grid_s, 2),
        "cso_grid_jobs": timing["jobs"],
        "storage_s": timing["storage_s"],
        "storage_share_of_grid": round(timing["storage_s"] / grid_s, 4),
        "best_variant": results["summary"]["best_variant"],
        "best_val_loss": results["summary"].get("best", {}).get("val_loss"),
    }
    print(f"cso grid:     {grid_s:.1f}s ({timing['jobs']} worker processes)")
    print(f"speedup:      {report['speedup']:.2f}x  (target: >= 4x)")
    print(f"storage:      {timing['storage_s']:.2f}s = {report['storage_share_of_grid']:.1%} "
          "of the grid's time (target: < 5%)")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
