"""Load figure: trials per minute with 1, 2 and 4 `cso search` workers on one PostgreSQL study.

    . .ci/postgres.sh && start_test_postgres      # or any server you may load
    python bench/bench_workers.py --storage "$CSO_TEST_POSTGRES_URL"

Each round starts K worker processes (separate `cso search` commands, as on K machines) on a
fresh study and lets them finish a fixed number of short trials; it prints trials per minute
and the speed-up over one worker, so scaling is measured, not assumed. On a 2-core machine
expect little gain beyond 2 workers: the workers compete for the same cores. Results also go to
bench/results/workers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from calling_score_opt.synth import write_synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("CSO_TEST_POSTGRES_URL"))
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "workers.json")
    args = parser.parse_args()
    if not args.storage:
        sys.exit("bench_workers: pass --storage postgresql://... (or set CSO_TEST_POSTGRES_URL)")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }

    rounds = []
    with tempfile.TemporaryDirectory(prefix="cso-bench-workers-") as tmp:
        work = Path(tmp)
        data = work / "data.json"
        write_synthetic(data, args.records, 0)
        for k in (int(x) for x in args.workers.split(",")):
            study = f"bench-{k}-{uuid.uuid4().hex[:8]}"
            cmd = [
                sys.executable,
                "-m",
                "calling_score_opt.cli",
                "search",
                "--data-path",
                str(data),
                "--trials",
                str(args.trials),
                "--epochs",
                str(args.epochs),
                "--pruner",
                "none",
                "--study",
                study,
                "--storage",
                args.storage,
                "--artifacts",
                str(work / "art"),
                "--quiet",
            ]
            started = time.perf_counter()
            workers = [
                subprocess.Popen(
                    cmd,
                    cwd=work,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(k)
            ]
            for worker in workers:
                _, err = worker.communicate()
                if worker.returncode != 0:
                    sys.exit(f"bench_workers: a worker failed:\n{err[-2000:]}")
            elapsed = time.perf_counter() - started
            rounds.append(
                {
                    "workers": k,
                    "seconds": round(elapsed, 2),
                    "trials_per_minute": round(args.trials / elapsed * 60, 1),
                }
            )
            print(
                f"{k} worker(s): {args.trials} trials in {elapsed:.1f}s = "
                f"{args.trials / elapsed * 60:.1f} trials/min",
                flush=True,
            )
    base = rounds[0]["trials_per_minute"]
    for r in rounds:
        r["speedup_vs_first"] = round(r["trials_per_minute"] / base, 2)
        print(f"  {r['workers']} worker(s): {r['speedup_vs_first']:.2f}x the first round")
    report = {
        "trials": args.trials,
        "epochs": args.epochs,
        "records": args.records,
        "cpu_count": os.cpu_count(),
        "rounds": rounds,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
