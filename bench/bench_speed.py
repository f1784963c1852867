"""Benchmark: how fast `cso search` is against the optuna-examples pattern, in one run.

    python bench/bench_speed.py                     # gated data, seed 0, 10,000 records
    python bench/bench_speed.py --data-seed 2       # another data file
    python bench/bench_speed.py --profile-only      # only where one search's seconds go

On one fresh `cso data synth --kind gated` file (10,000 records), each side as a fresh process
(what a user waits for: interpreter start-up, imports, data, the work, the summary):

- the optuna-examples PyTorch pattern, 15 trials (bench/optuna_example.py: TPE, the median
  pruner, a DataLoader loop);
- `cso search --trials 15` (one worker), then `--jobs 2` on a fresh study; TPE's choices depend
  on what has finished when it is asked, so these two train different trials: the same pair
  again with `--sampler random` (each trial's draw seeded by its number) trains the same ones;
- `cso search --trials 1` (the start-up and the baseline: what every search pays);
- one more `cso search --trials 15` with a probe that times its parts (start-up, data, opening
  the study, claiming and sampling trials, training, reporting and pruning, storing, the
  summary).

It prints the wall times, the ratios (targets: the search 8x faster than the example with a best
validation loss no worse, `--jobs 2` 1.6x faster than `--jobs 1`) and the best validation losses
(the example's is the last epoch's validation MSE of its best trial, as it reports it; cso's the
restored best epoch's), and writes everything to bench/results/speed.json. The commands that
train nothing (`cso best`, `cso export`, ...) are timed by bench/bench_commands.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
TRIALS = 15
TARGETS = {"search_vs_example": 8.0, "jobs2_vs_jobs1": 1.6}

# The optuna-examples pattern in a fresh process: its result as one JSON line.
EXAMPLE = """
import json, sys, time
sys.path.insert(0, {here!r})
import optuna_example
from pathlib import Path
result = optuna_example.run(Path(sys.argv[1]), int(sys.argv[2]))
result.pop("test_predictions")
print("RESULT=" + json.dumps(result))
"""

# `cso search` in a fresh process, with its parts timed by wrapping the functions that do them.
PROBE = """
import json, sys, time
started = time.perf_counter()
spent = {}
def timed(owner, name, part):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[part] = spent.get(part, 0.0) + time.perf_counter() - t0
    setattr(owner, name, wrapper)
from calling_score_opt import cli, search, stacked
imported = time.perf_counter() - started
timed(search, "load_dataset", "data: load")
timed(search, "split_dataset", "data: split")
timed(search, "_open_search_study", "storage: open the study")
timed(search._SearchWorker, "claim", "claim and sample")
timed(search._SearchWorker, "start", "claim and sample")
timed(search._SearchWorker, "report", "report and prune")
timed(search._SearchWorker, "finish", "store and tell")
timed(stacked.StackedTrainer, "run_epoch", "training (with report and prune)")
timed(cli, "_print_best", "summary: best trial against the baseline")
sys.argv = ["cso", *sys.argv[1:]]
try:
    cli.main()
except SystemExit as exc:
    if exc.code:
        raise
total = time.perf_counter() - started
spent["training"] = spent.pop("training (with report and prune)") - spent.get("report and prune", 0)
spent["start-up: imports (Python, cso, Optuna, PyTorch)"] = imported
spent["total (from the first line of Python)"] = total
print("PROFILE=" + json.dumps(spent))
"""


SIZES: dict[str, int] = {}  # the split's rows: train, val, test
CPU_S: list[float] = []  # the CPU seconds (user + system, workers included) of the last run


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command: list[str], cwd: Path) -> tuple[float, str]:
    """Run a fresh process; its wall time and its standard output (its CPU time: CPU_S[-1])."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    started, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    CPU_S.append(_children_cpu() - cpu)
    if done.returncode != 0:
        sys.exit(f"benchmark: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return elapsed, done.stdout


def tagged(output: str, tag: str) -> Any:
    line = next(line for line in output.splitlines() if line.startswith(tag))
    return json.loads(line[len(tag) :])


def search(work: Path, data: Path, study: str, *options: str) -> tuple[float, dict[str, Any]]:
    """`cso search` on a fresh study: its wall time, best validation loss and trial counts."""
    command = [sys.executable, "-m", "calling_score_opt.cli", "search", "--data-path", str(data)]
    elapsed, _ = run([*command, "--study", study, "--quiet", *options], work)
    return elapsed, {"cpu_s": round(CPU_S[-1], 2), **study_summary(work, study)}


def study_summary(work: Path, study: str) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{work}/studies/{study}.db")
    states = [t.state.name for t in loaded.trials]
    complete = [t for t in loaded.trials if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.values[0])
    return {
        "best_val_loss": best.values[0],
        "best_test_loss": best.user_attrs.get("test_loss"),
        "best_trial": best.number,
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "epochs_trained": sum(len(t.intermediate_values) for t in loaded.trials),
        # complete trials that trained in a stack with others at some point (stacked.py)
        "complete_trials_stacked": sum(t.user_attrs.get("stack_size", 1) > 1 for t in complete),
        "training_gflop": round(sum(training_flop(t, SIZES) for t in loaded.trials) / 1e9, 1),
    }


def training_flop(trial: Any, sizes: dict[str, int]) -> float:
    """6 FLOP per parameter per training row and 2 per validation row, for every epoch the
    trial trained: the arithmetic no implementation of this trial can skip."""
    if "hidden_sizes" not in trial.user_attrs:
        return 0.0
    inputs = 39 + (12 if trial.params.get("pair_features") else 0)
    dims = [inputs, *trial.user_attrs["hidden_sizes"], 1]
    weights = sum(a * b + b for a, b in itertools.pairwise(dims))
    rows = 6 * sizes["train"] + 2 * sizes["val"]
    return float(len(trial.intermediate_values) * rows * weights)


def profile(work: Path, data: Path, trials: int) -> dict[str, float]:
    """Where one `cso search --trials N` spends its seconds (a fresh study)."""
    command = [sys.executable, "-c", PROBE, "search", "--data-path", str(data)]
    command += ["--trials", str(trials), "--study", "profiled", "--quiet"]
    elapsed, output = run(command, work)
    parts = tagged(output, "PROFILE=")
    parts["process wall (interpreter start-up included)"] = elapsed
    return {k: round(v, 3) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=TRIALS)
    parser.add_argument("--profile-only", action="store_true")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "speed.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cso-bench-speed-") as tmp:
        work = Path(tmp)
        data = work / "gated.json"
        run([sys.executable, "-m", "calling_score_opt.cli", "data", "synth", "--kind", "gated",
             "--records", str(args.records), "--seed", str(args.data_seed),
             "--output", str(data)], work)  # fmt: skip
        from calling_score_opt.data import load_dataset, split_dataset

        SIZES.update(split_dataset(load_dataset(data), 0).sizes)
        report: dict[str, Any] = {
            "data": f"cso data synth --kind gated --records {args.records} --seed {args.data_seed}",
            "trials": args.trials,
            "cpu_count": os.cpu_count(),
        }
        if not args.profile_only:
            print(f"optuna-examples pattern, {args.trials} trials ...", flush=True)
            example_s, output = run(
                [sys.executable, "-c", EXAMPLE.format(here=str(HERE)), str(data), str(args.trials)],
                work,
            )
            example = tagged(output, "RESULT=")
            example_cpu = CPU_S[-1]
            print(f"cso search --trials {args.trials} ...", flush=True)
            one_s, one = search(work, data, "one", "--trials", str(args.trials))
            print(f"cso search --trials {args.trials} --jobs 2 ...", flush=True)
            two_s, two = search(work, data, "two", "--trials", str(args.trials), "--jobs", "2")
            # TPE's choices depend on what has finished when it is asked, so the two searches
            # above train different trials; the random sampler's do not (seeded per trial).
            print(f"cso search --trials {args.trials} --sampler random, 1 and 2 jobs ...")
            same = ["--trials", str(args.trials), "--sampler", "random"]
            rand1_s, rand1 = search(work, data, "random1", *same)
            rand2_s, rand2 = search(work, data, "random2", *same, "--jobs", "2")
            print("cso search --trials 1 ...", flush=True)
            start_s, start = search(work, data, "start", "--trials", "1")
            report.update(
                optuna_example={
                    "wall_s": round(example_s, 2),
                    "cpu_s": round(example_cpu, 2),
                    "optimize_s": round(example["wall_s"], 2),
                    "best_val_loss": example["val_loss"],
                    "best_test_loss": example["test_loss"],
                    "complete": example["complete"],
                    "pruned": example["pruned"],
                    "training_gflop": round(example["training_gflop"], 1),
                },
                cso_search={"wall_s": round(one_s, 2), **one},
                cso_search_jobs2={"wall_s": round(two_s, 2), **two},
                cso_search_trials1={"wall_s": round(start_s, 2), **start},
                cso_search_random={"wall_s": round(rand1_s, 2), **rand1},
                cso_search_random_jobs2={"wall_s": round(rand2_s, 2), **rand2},
                ratios={
                    "search_vs_example": round(example_s / one_s, 2),
                    "jobs2_vs_jobs1": round(one_s / two_s, 2),
                    "jobs2_vs_jobs1_same_trials": round(rand1_s / rand2_s, 2),
                    "jobs2_vs_example": round(example_s / two_s, 2),
                    "search_vs_example_cpu": round(example_cpu / one["cpu_s"], 2),
                },
                targets=TARGETS,
                # Added by bench/bench_commands.py's owner when merged: the commands that train
                # nothing (export, best, trials, studies, report, registry register).
                commands=None,
            )
        print("profile of one cso search ...", flush=True)
        report["profile_cso_search"] = profile(work, data, args.trials)

    if not args.profile_only:
        ratios = report["ratios"]
        notes = {
            "cso_search": f"{ratios['search_vs_example']}x the example's speed, target 8x",
            "cso_search_jobs2": f"{ratios['jobs2_vs_jobs1']}x --jobs 1's speed, target 1.6x",
            "cso_search_random_jobs2": f"{ratios['jobs2_vs_jobs1_same_trials']}x, same trials",
        }
        for name in (
            "optuna_example",
            "cso_search",
            "cso_search_jobs2",
            "cso_search_trials1",
            "cso_search_random",
            "cso_search_random_jobs2",
        ):
            side = report[name]
            note = notes.get(name, "")
            wall, best = side["wall_s"], side["best_val_loss"]
            print(f"{name:20s} {wall:6.1f} s  best val {best:.5f}  {note}")
    print("profile:", json.dumps(report["profile_cso_search"], indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
