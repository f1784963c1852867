"""Benchmark: how long the commands that train nothing take on a study of 20 trials.

    python bench/bench_commands.py              # 10,000 gated records, 20 trials, 5 runs each
    python bench/bench_commands.py --runs 3     # a quicker look

It writes a fresh data file and a fresh 20-trial search study in a temporary folder, then runs
each command as a fresh process (exactly what a user waits for: interpreter start-up, imports,
opening the study, the work, exit), several times, and reports the median and the slowest
wall time against the target of 1.5 s. Each run also records which heavy libraries the
process imported (PyTorch, onnx, plotly, scipy): the commands must not import PyTorch or onnx.
For scale it times `python -c pass`, the bare imports of torch and onnx, and Optuna alone
opening the same study and reading its trials (the floor of any command that reads a study:
Optuna's RDBStorage imports SQLAlchemy and Alembic), in the same run. Runs go round the
commands in turn, so a busy moment on a shared machine spreads over all of them.
Results also go to bench/results/commands.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET_S = 1.5

# Runs ``cso`` in this interpreter and reports, at exit, which heavy modules it loaded.
PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write(
    "HEAVY=" + ",".join(m for m in ("torch", "onnx", "plotly", "scipy") if m in sys.modules) + "\\n"
))
from calling_score_opt.cli import main
sys.argv = ["cso", *sys.argv[1:]]
main()
"""
OPTUNA_ALONE = (
    "import optuna; optuna.logging.set_verbosity(optuna.logging.WARNING); "
    "optuna.load_study(study_name='calling-score-search', "
    "storage='sqlite:///studies/calling-score-search.db').get_trials()"
)

COMMANDS: list[tuple[str, list[str]]] = [
    ("cso studies", ["studies"]),
    ("cso trials", ["trials"]),
    ("cso best", ["best"]),
    ("cso export --best", ["export", "--best", "--output-dir", "exported"]),
    ("cso export --trial N", ["export", "--trial", "{trial}", "--output-dir", "exported"]),
    ("cso export --ensemble", ["export", "--ensemble", "--output-dir", "exported"]),
    ("cso report", ["report", "--study", "calling-score-search", "--output", "report.html"]),
]


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"benchmark: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    heavy = next((line[6:] for line in done.stderr.splitlines() if line.startswith("HEAVY=")), "?")
    return elapsed, heavy


def second_best_trial(database: Path) -> int:
    """A complete trial that is not the best (``--trial N`` exports one of those too)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="calling-score-search", storage=f"sqlite:///{database}")
    complete = sorted(
        (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda t: t.values[0],
    )
    return complete[1 if len(complete) > 1 else 0].number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    cso = [python, "-c", PROBE]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cso-bench-commands-") as tmp:
        work = Path(tmp)
        subprocess.run(
            [*cso, "data", "synth", "--kind", "gated", "--records", str(args.records),
             "--output", "data.json"],
            cwd=work, check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            [*cso, "search", "--data-path", "data.json", "--trials", str(args.trials),
             "--epochs", "10", "--quiet"],
            cwd=work, check=True, capture_output=True,
        )  # fmt: skip
        trial = second_best_trial(work / "studies" / "calling-score-search.db")
        scale = {
            "python -c pass": [python, "-c", "pass"],
            "import torch": [python, "-c", "import torch"],
            "import onnx": [python, "-c", "import onnx"],
            "optuna.load_study + trials": [python, "-c", OPTUNA_ALONE],
        }
        references = {
            name: statistics.median(timed(cmd, work)[0] for _ in range(args.runs))
            for name, cmd in scale.items()
        }
        registry = (
            "cso registry register --trial N",
            lambda run: ["registry", "register", "--version", f"bench-{run}", "--trial", "{trial}",
                         "--data-source", "synthetic"],
        )  # fmt: skip
        plain = [(name, lambda run, argv=argv: argv) for name, argv in COMMANDS]
        commands = [*plain, registry]
        times: dict[str, list[float]] = {name: [] for name, _ in commands}
        heavy: dict[str, str] = {}
        for run in range(args.runs):  # registry: a new version name each run (repeats are refused)
            for name, argv_of in commands:
                argv = [a.format(trial=trial) for a in argv_of(run)]
                elapsed, heavy[name] = timed([*cso, *argv], work)
                times[name].append(elapsed)
        for name, _ in commands:
            rows.append(
                {
                    "command": name,
                    "median_s": round(statistics.median(times[name]), 3),
                    "max_s": round(max(times[name]), 3),
                    "heavy_imports": heavy[name].split(",") if heavy[name] else [],
                    "under_target": statistics.median(times[name]) < TARGET_S,
                }
            )
    width = max(len(r["command"]) for r in rows)
    print(f"{'command':<{width}}  median    max  heavy imports")
    for r in rows:
        print(
            f"{r['command']:<{width}}  {r['median_s']:5.2f} s {r['max_s']:5.2f} s  "
            f"{', '.join(r['heavy_imports']) or '-'}"
        )
    for name, seconds in references.items():
        print(f"for scale: {name}: {seconds:.2f} s")
    out = HERE / "results" / "commands.json"
    out.parent.mkdir(exist_ok=True)
    partial = out.with_suffix(".json.partial")
    partial.write_text(
        json.dumps(
            {
                "command": "python bench/bench_commands.py " + " ".join(sys.argv[1:]),
                "records": args.records,
                "trials": args.trials,
                "runs": args.runs,
                "target_s": TARGET_S,
                "machine": f"{platform.machine()}, {platform.python_version()}",
                "commands": rows,
                "for_scale_s": {k: round(v, 3) for k, v in references.items()},
            },
            indent=2,
        )
        + "\n"
    )
    partial.replace(out)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
