"""Benchmark: the grid's 8 stackable variants trained as one stacked model vs one at a time.

The baseline, the four learning-rate and the three dropout variants share batch size 32 and
hidden sizes [128, 64], so `train_stacked` trains them together (K = 8). This script times an
epoch of that stack against 8 solo `train_model` epochs on the same data (7,000 training rows of
a 10,000-record synthetic file), then shows where one stacked step's time goes:

    python bench/bench_stacked.py                  # 3 epochs each, best of 2 rounds
    python bench/bench_stacked.py --epochs 5 --rounds 3
    python bench/bench_stacked.py --costs          # stacks of 1-8 against plan_stacks' model

Epoch times are the gaps between consecutive epoch callbacks (a full epoch: every step plus the
validation pass), the best over all epochs and rounds, measured both as wall time and as this
thread's CPU time (training runs on one thread; on a shared machine the CPU time is the steadier
number, the wall time includes waiting for a core).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from calling_score_opt import stacked  # noqa: E402
from calling_score_opt.data import Split, load_dataset, split_dataset  # noqa: E402
from calling_score_opt.model import build_network  # noqa: E402
from calling_score_opt.space import VARIANTS  # noqa: E402
from calling_score_opt.synth import write_synthetic  # noqa: E402
from calling_score_opt.train import EpochStats, TrainConfig, train_model  # noqa: E402

Clock = Callable[[], float]
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.thread_time}


def stackable_configs(epochs: int) -> list[TrainConfig]:
    first = VARIANTS[0].train_config(epochs, 0)
    configs = [v.train_config(epochs, 0) for v in VARIANTS]
    return [
        c
        for c in configs
        if c.batch_size == first.batch_size and c.hidden_sizes == first.hidden_sizes
    ]


def epoch_gaps(stamps: list[dict[str, float]]) -> dict[str, list[float]]:
    return {name: [b[name] - a[name] for a, b in itertools.pairwise(stamps)] for name in CLOCKS}


def stamp() -> dict[str, float]:
    return {name: clock() for name, clock in CLOCKS.items()}


def time_solo(split: Split, config: TrainConfig) -> dict[str, list[float]]:
    stamps: list[dict[str, float]] = []

    def on_epoch(stats: EpochStats) -> None:
        stamps.append(stamp())

    train_model(split, config, on_epoch=on_epoch)
    return epoch_gaps(stamps)


def time_stacked(split: Split, configs: list[TrainConfig]) -> dict[str, list[float]]:
    stamps: list[dict[str, float]] = []
    seen: set[int] = set()

    def on_epoch(index: int, stats: EpochStats) -> None:
        if stats.epoch not in seen:  # the first member's callback ends the epoch's work
            seen.add(stats.epoch)
            stamps.append(stamp())

    stacked.train_stacked(split, configs, on_epoch=on_epoch)
    return epoch_gaps(stamps)


def best(f: Callable[[], object], n: int = 100, rounds: int = 7) -> float:
    """Best per-call CPU time of ``f`` in microseconds (min over rounds of n calls)."""
    for _ in range(10):
        f()
    times = []
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(n):
            f()
        times.append((time.thread_time() - start) / n)
    return min(times) * 1e6


def _stack_of(split: Split, configs: list[TrainConfig]) -> stacked._Stack:
    """The configs as one stack, ready to train (as train_stacked builds it)."""
    trainer = stacked.StackedTrainer(split, plan=stacked._one_stack, share_masks=True)
    for index, config in enumerate(configs):
        trainer.add(index, config)
    trainer._replan()
    return trainer._stacks[0]


def step_breakdown(split: Split, configs: list[TrainConfig]) -> None:
    """Time each part of one stacked step (K = len(configs)) and of one solo step."""
    torch.set_num_threads(1)
    first = configs[0]
    k, batch = len(configs), first.batch_size
    stack = _stack_of(split, configs)
    assert stack._masks is not None
    masks = stack._masks
    x_all, y_all = stack.x_train, torch.from_numpy(split.y_train)
    n_train = len(y_all)
    order = torch.randperm(n_train)
    n_steps = -(-n_train // batch)
    x_epoch = x_all[order]
    x, y = x_epoch[:batch].expand(k, batch, -1), y_all[order][:batch]
    masks.begin_epoch()
    drawn = masks.at(0, batch, n_train)
    squared = torch.empty(k)
    everyone = tuple(range(k))

    def fresh_masks() -> None:  # a new chunk of masks each time, spread over its batches
        masks.begin_epoch()
        masks.at(0, batch, n_train)

    rows: list[tuple[str, float]] = []
    rows.append(
        (
            "dropout masks (NumPy bits, a chunk per call, per batch)",
            best(fresh_masks, n=5) * batch / masks._chunk,
        )
    )
    rows.append(
        (
            "batch indexing (per-epoch gather / steps + slices)",
            best(lambda: (x_all[order], y_all[order]), n=20) / n_steps
            + best(lambda: (x_epoch[:batch], y_all[:batch])),
        )
    )
    rows.append(
        (
            "forward + backward by hand (bmm, sums, ReLU/sigmoid grads)",
            best(lambda: stack._train_step(x, y, drawn, squared, 2.0 / batch)),
        )
    )
    rows.append(("Adam (fused kernel + per-member lr)", best(lambda: stack.adam_step(everyone))))
    fused = stack._fused
    stack._fused = None
    hand_adam = best(lambda: stack.adam_step(everyone))
    stack._fused = fused
    total = sum(t for _, t in rows)

    # The alternative: the same stacked forward with autograd doing the backward.
    leaves = [b.detach().clone().requires_grad_(True) for b in stack.params]

    def autograd_forward_backward() -> None:
        h = x
        for layer in range(len(first.hidden_sizes)):
            h = torch.baddbmm(leaves[2 * layer + 1], h, leaves[2 * layer]).relu() * drawn[layer]
        o = torch.linalg.vecdot(h, leaves[-2].transpose(1, 2)) + leaves[-1].view(k, 1)
        loss = ((o.sigmoid() - y) ** 2).mean(dim=1).sum()  # gradients separate per member
        torch.autograd.grad(loss, leaves)

    autograd = best(autograd_forward_backward)
    by_hand = rows[2][1]

    # One solo step of train_model's loop, for reference.
    torch.manual_seed(first.seed)
    network = build_network(split.x_train.shape[1], first.hidden_sizes, first.dropout).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=first.learning_rate, fused=True)
    x_solo = x[0]
    state: dict[str, torch.Tensor] = {}

    def solo_forward() -> None:
        state["loss"] = F.mse_loss(network(x_solo).squeeze(-1), y)

    def solo_backward() -> None:
        solo_forward()
        optimizer.zero_grad(set_to_none=True)
        state["loss"].backward()  # type: ignore[no-untyped-call]

    solo_fwd = best(solo_forward)
    solo_bwd = best(solo_backward) - solo_fwd
    solo_opt = best(optimizer.step)

    print(f"\nWhere one stacked step goes (K = {k}, batch {batch}, CPU us, best of rounds):")
    for name, value in rows:
        print(f"  {name:60s} {value:7.1f}  {value / total:5.1%}")
    print(f"  {'sum of the parts':60s} {total:7.1f}")
    print(
        f"  alternatives: forward + autograd backward {autograd:7.1f} us vs by hand {by_hand:.1f}"
    )
    print(f"                Adam as hand-written tensor ops {hand_adam:7.1f} us vs fused kernel")
    print(
        f"\nOne solo train_model step for reference (CPU us): forward {solo_fwd:.1f}, "
        f"backward {solo_bwd:.1f}, optimizer {solo_opt:.1f}, "
        f"total {solo_fwd + solo_bwd + solo_opt:.1f}; x {k} = "
        f"{k * (solo_fwd + solo_bwd + solo_opt):.1f} vs stacked {total:.1f}"
    )


def epoch_costs(split: Split) -> None:
    """One epoch of stacks of 1 to 8 members against the cost model (stacked.epoch_cost)."""
    base = TrainConfig(dropout=0.2, pair_features=True, epochs=3, patience=10)
    print("\nOne epoch of a stack (CPU s) against the cost model plan_stacks uses:")
    print(f"  {'batch':>5s} {'hidden':16s} {'K':>2s} {'measured':>9s} {'modelled':>9s}")
    n_features, n_train, n_val = split.x_train.shape[1], len(split.y_train), len(split.y_val)
    for batch in (16, 32, 128):
        for hidden in [(32,), (128, 64), (256, 256, 128)]:
            for k in (1, 2, 4, 8):
                configs = [
                    replace(base, batch_size=batch, hidden_sizes=hidden, learning_rate=1e-3 * i)
                    for i in range(1, k + 1)
                ]
                trainer = stacked.StackedTrainer(split, plan=stacked._one_stack)
                for index, config in enumerate(configs):
                    trainer.add(index, config)
                trainer.run_epoch()  # warm-up
                started = time.thread_time()
                trainer.run_epoch()
                measured = time.thread_time() - started
                model = stacked.epoch_cost(configs, n_features, n_train, n_val)
                print(f"  {batch:5d} {list(hidden)!s:16s} {k:2d} {measured:9.3f} {model:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--costs", action="store_true", help="only measure epochs against the cost model"
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (epoch times are gaps between epochs)")

    with tempfile.TemporaryDirectory(prefix="cso-bench-") as tmp:
        path = Path(tmp) / "data.json"
        write_synthetic(path, args.records, args.data_seed)
        split = split_dataset(load_dataset(path), 0)
    if args.costs:
        epoch_costs(split)
        return
    # patience above the epochs: every run trains every epoch, so the stack stays at K = 8
    configs = [replace(c, patience=args.epochs + 1) for c in stackable_configs(args.epochs)]
    k = len(configs)
    print(
        f"{k} stackable variants, {split.sizes['train']} training rows, batch "
        f"{configs[0].batch_size}, hidden {list(configs[0].hidden_sizes)}, torch "
        f"{torch.__version__}, {args.epochs} epochs x {args.rounds} rounds"
    )

    train_model(split, replace(configs[0], epochs=1))  # warm-up
    stacked.train_stacked(split, [replace(c, epochs=1) for c in configs])
    solo: dict[str, list[list[float]]] = {name: [[] for _ in configs] for name in CLOCKS}
    stack: dict[str, list[float]] = {name: [] for name in CLOCKS}
    for _ in range(args.rounds):
        for i, config in enumerate(configs):
            for name, gaps in time_solo(split, config).items():
                solo[name][i].extend(gaps)
        for name, gaps in time_stacked(split, configs).items():
            stack[name].extend(gaps)

    print(
        f"\nTime per epoch ({'best' if args.rounds * (args.epochs - 1) > 1 else 'one'} "
        "epoch gap; seconds):"
    )
    print(
        f"  {'clock':6s} {'solo (mean of 8)':>17s} {'8 x solo':>10s} {'stacked K=8':>12s} "
        f"{'speed-up':>9s}"
    )
    for name in CLOCKS:
        per_config = [min(gaps) for gaps in solo[name]]
        eight = sum(per_config)
        mine = min(stack[name])
        print(
            f"  {name:6s} {statistics.fmean(per_config):17.4f} {eight:10.4f} {mine:12.4f} "
            f"{eight / mine:8.1f}x"
        )
    step_breakdown(split, configs)


if __name__ == "__main__":
    main()
