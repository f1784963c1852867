"""Benchmark: the old one-process-per-variant script against `cso grid`, on the same data.

Both sides run as fresh processes from the command line, in this one run, on the same
10,000-record file, so their ratio is meaningful even on a shared, noisy machine:

    python bench/bench_grid.py                 # full: 15 variants, up to 100 epochs
    python bench/bench_grid.py --max-variants 3 --epochs 20   # a quick look

It prints both wall times, their ratio (targets: `cso grid` at least 4x faster, exports and
parity checks included, and 10x with stacked training), the share of the grid's time spent
writing the Optuna study (target: under 5%), the share of the machine's measured
matrix-multiply throughput the grid's training reached (FLOPs of the training it did / its
wall time / a large matmul's FLOP/s), and onnxruntime latency (one record) and throughput
(10,000 records) of the exported models, whose graphs may hold only the scaling, the layers
and the sigmoid. Results also go to bench/results/grid.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from calling_score_opt.space import VARIANTS  # noqa: E402
from calling_score_opt.synth import write_synthetic  # noqa: E402

CPU_S: dict[str, float] = {}  # CPU seconds (user + system) of each side's processes


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], cwd: Path, side: str = "") -> float:
    """Run ``cmd``; its wall time. Its CPU time (workers included) is added to CPU_S[side]:
    on a shared machine the steadier figure, since waiting for a core is not counted."""
    started, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    CPU_S[side] = CPU_S.get(side, 0.0) + _children_cpu() - cpu
    if done.returncode != 0:
        sys.exit(f"benchmark: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


ALLOWED_OPS = {"Sub", "Div", "Gemm", "Relu", "Sigmoid", "Squeeze"}


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    """The machine's dense float32 matmul throughput, all cores (the best of a few runs)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn: object) -> float:
    started = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - started


def training_flops(results: dict[str, object]) -> float:
    """6 x parameters per training sample per epoch, plus 2 x parameters per validation sample."""
    split = results["data"]["split"]  # type: ignore[index]
    total = 0.0
    for variant in results["variants"]:  # type: ignore[attr-defined]
        for run in variant.get("runs", []):
            params = variant["parameters"]
            total += run["epochs_run"] * params * (6 * split["train"] + 2 * split["val"])
    return total


def onnx_inference(out_dir: Path) -> dict[str, object]:
    """Latency for one record and throughput for 10,000, and the ops of every exported graph."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    ops: set[str] = set()
    for path in out_dir.glob("*.onnx"):
        ops |= {node.op_type for node in onnx.load(str(path)).graph.node}
    model = out_dir / "calling_score_model_v1_0_baseline.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    one = rng.random((1, 39), dtype=np.float32)
    many = rng.random((10_000, 39), dtype=np.float32)
    for _ in range(50):
        session.run(None, {"input": one})
    latencies = []
    for _ in range(2000):
        started = time.perf_counter()
        session.run(None, {"input": one})
        latencies.append(time.perf_counter() - started)
    batch = min(_timed(lambda: session.run(None, {"input": many})) for _ in range(20))
    return {
        "model": model.name,
        "latency_one_record_us_median": round(float(np.median(latencies)) * 1e6, 1),
        "latency_one_record_us_p99": round(float(np.percentile(latencies, 99)) * 1e6, 1),
        "throughput_records_per_s": round(10_000 / batch),
        "graph_ops": sorted(ops),
        "graph_ops_allowed": ops <= ALLOWED_OPS,
    }


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
                [
                    sys.executable,
                    str(HERE / "old_approach.py"),
                    "--data-path",
                    str(data),
                    "--output-dir",
                    str(work / "old"),
                    "--variant",
                    name,
                    "--epochs",
                    str(args.epochs),
                ],
                work,
                "old",
            )
        print(f"old approach: {old_s:.1f}s", flush=True)

        cso = [
            sys.executable,
            "-m",
            "calling_score_opt.cli",
            "grid",
            "--data-path",
            str(data),
            "--output-dir",
            str(work / "grid"),
            "--max-variants",
            str(args.max_variants),
            "--epochs",
            str(args.epochs),
            "--quiet",
        ]
        if args.jobs:
            cso += ["--jobs", str(args.jobs)]
        env_path = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
        os.environ["PYTHONPATH"] = env_path
        grid_s = run(cso, work, "grid")
        results = json.loads((work / "grid" / "optimization_results.json").read_text())
        inference = onnx_inference(work / "grid")
    flops = training_flops(results)
    peak = matmul_flops_per_s()

    timing = results["summary"]["timing"]
    report = {
        "records": args.records,
        "variants": len(variants),
        "epochs": args.epochs,
        "cpu_count": os.cpu_count(),
        "old_approach_s": round(old_s, 2),
        "cso_grid_s": round(grid_s, 2),
        "speedup": round(old_s / grid_s, 2),
        "old_approach_cpu_s": round(CPU_S["old"], 2),
        "cso_grid_cpu_s": round(CPU_S["grid"], 2),
        "cpu_ratio": round(CPU_S["old"] / CPU_S["grid"], 2),
        "cso_grid_jobs": timing["jobs"],
        "storage_s": timing["storage_s"],
        "storage_share_of_grid": round(timing["storage_s"] / grid_s, 4),
        "storage_setup_s": timing["storage_setup_s"],
        "storage_runs_s": timing["storage_runs_s"],
        "storage_runs_share_of_grid": round(timing["storage_runs_s"] / grid_s, 4),
        "training_gflop": round(flops / 1e9, 1),
        "matmul_gflops_machine": round(peak / 1e9, 1),
        "share_of_matmul_throughput": round(flops / grid_s / peak, 4),
        "onnx": inference,
        "best_variant": results["summary"]["best_variant"],
        "best_val_loss": results["summary"].get("best", {}).get("val_loss"),
    }
    print(f"cso grid:     {grid_s:.1f}s ({timing['jobs']} worker processes)")
    print(f"speedup:      {report['speedup']:.2f}x  (targets: >= 4x; >= 10x with stacking; 20x)")
    print(
        f"CPU time:     old {report['old_approach_cpu_s']:.1f}s, grid "
        f"{report['cso_grid_cpu_s']:.1f}s (all its processes): {report['cpu_ratio']:.2f}x"
    )
    print(
        f"storage:      {timing['storage_s']:.2f}s = {report['storage_share_of_grid']:.1%} "
        "of the grid's time (target: < 5%): opening/creating the study "
        f"{timing['storage_setup_s']:.2f}s; claiming, finishing and reading back the runs "
        f"{timing['storage_runs_s']:.2f}s = {report['storage_runs_share_of_grid']:.1%}"
    )
    print(
        f"training:     {flops / 1e9:.0f} GFLOP in {grid_s:.1f}s = "
        f"{report['share_of_matmul_throughput']:.1%} of the machine's "
        f"{peak / 1e9:.0f} GFLOP/s large-matmul throughput"
    )
    print(
        f"onnxruntime:  one record {inference['latency_one_record_us_median']} us (median), "
        f"{inference['throughput_records_per_s']:,} records/s in batches of 10,000; "
        f"graph ops {inference['graph_ops']} (only scaling, layers, sigmoid: "
        f"{inference['graph_ops_allowed']})"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
