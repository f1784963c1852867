"""Many training runs at once, as one stacked model: the grid's variants and the search's trials.

On a small CPU these tiny networks spend their time on the per-operation overhead of small
matrices, not on arithmetic. Runs trained together as one model whose weights have shape
``[K, in, out]`` pay that overhead once per step for all ``K`` members: every step is a handful
of batched matrix products and element-wise operations.

Any runs can share a stack, and each member trains as it would alone: the same initial weights,
the same batch order, Adam with the same constants, MSE, early stopping on its own validation
loss with its own patience and epochs, the best epoch's weights restored, the same exact final
losses. Members may differ in everything:

- **Shapes** (hidden sizes, depth, pair features): the stack's layers are as wide as its widest
  member's. A narrower member's extra units have zero weights, so their output and gradient are
  exactly zero and they never change; a shallower member passes its last hidden layer on
  through identity layers; a member without pair features has zero weights on those 12 inputs.
  Those weights have a learning rate of 0: they never change.
- **Batch size**: the stack steps through each epoch in micro-batches (the greatest common divisor
  of its members' batch sizes). A member with larger batches adds up the gradients of their
  micro-batches, each scaled by the size of the member's own batch, so the sum is its batch's
  mean-loss gradient, and takes its optimizer step at the end of each of its batches.
- **Dropout**: each member draws its masks from its own stream, seeded by its seed, exactly as a
  stack of one (:func:`train_one`) draws them, so a run does not depend on who trains beside it.
- **Where they are**: members join at any epoch boundary and leave when they stop (early
  stopping, a non-finite loss, or their epoch callback saying so: a pruned trial), each at its
  own epoch, with its own batch order and Adam step count.

So a member agrees with its run alone through :func:`train_one` up to float rounding (the order
of a few sums differs), dropout included, and with dropout 0 with
:func:`~calling_score_opt.train.train_model` too (which draws dropout masks from torch's
generator instead: another, equally likely draw).

The backward pass is written out by hand (for ``Linear -> ReLU -> Dropout`` blocks and a sigmoid
output with MSE it is a few lines) because it is cheaper than autograd's graph on these tiny
matrices, and Adam runs over one flat buffer holding every member's parameters: the fused kernel
``Adam(fused=True)`` uses, then one multiply-add for the per-member learning rates
(``bench/bench_stacked.py`` measures both choices against their alternatives). That kernel is a
private op, so it is checked against the hand-written update once per process, at first use, and
the hand-written update takes over if it fails or disagrees.

:class:`StackedTrainer` is the engine (members added and stopped at any epoch; which of them share
a stack is decided by :func:`plan_stacks` from a cost model). :func:`train_stacked` trains a fixed
list of runs as one stack (the grid), :func:`train_one` a single run.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from calling_score_opt.data import Scaling, Split
from calling_score_opt.errors import TrainingError
from calling_score_opt.model import CallingScoreModel, add_pair_features, build_network
from calling_score_opt.train import (
    EpochStats,
    TrainConfig,
    TrainResult,
    _mse,
    _single_thread,
    mean_predictor_loss,
    resolve_device,
)

StackedEpochCallback = Callable[[int, EpochStats], None]
#: A member's epoch callback: returning True stops the member after this epoch (a pruned trial).
MemberEpochCallback = Callable[[EpochStats], "bool | None"]

# torch.optim.Adam's defaults, as train_model uses them.
BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-8

#: The kernel behind ``torch.optim.Adam(fused=True)`` (a private op; hand-written ops without it).
_FUSED_ADAM: Callable[..., None] | None = getattr(torch, "_fused_adam_", None)
#: Per device type: the fused kernel last checked there and whether it agreed with the
#: hand-written update (see :func:`_fused_adam`).
_FUSED_VERDICTS: dict[str, tuple[Callable[..., None], bool]] = {}

_SIGMOID_BACKWARD = torch.ops.aten.sigmoid_backward.default
_THRESHOLD_BACKWARD = torch.ops.aten.threshold_backward.default

#: Mixed into the seed of the dropout masks' random stream, so it is not the split's stream.
_MASK_STREAM = 0x5EED_D209


def _adam_fused(
    kernel: Callable[..., None],
    flat: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr: torch.Tensor,
    update: torch.Tensor,
    step: torch.Tensor,
) -> None:
    """One Adam step through the fused kernel: it computes the step for a learning rate of 1
    into the zeroed ``update``, which is then scaled by each element's learning rate."""
    update.zero_()
    kernel(
        [update],
        [grad],
        [exp_avg],
        [exp_avg_sq],
        [],
        [step],
        lr=1.0,
        beta1=BETA1,
        beta2=BETA2,
        weight_decay=0.0,
        eps=EPS,
        amsgrad=False,
        maximize=False,
    )
    flat.addcmul_(update, lr)


def _adam_plain(
    flat: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr: torch.Tensor,
    step: int,
) -> None:
    """One Adam step in public operations (``step`` counts from 1)."""
    bias1 = 1.0 - BETA1**step
    root2 = math.sqrt(1.0 - BETA2**step)
    # p -= lr / bias1 * m / (sqrt(v) / root2 + eps)
    #    = lr * m * (root2 / bias1) / (sqrt(v) + eps * root2)
    exp_avg.lerp_(grad, 1.0 - BETA1)
    exp_avg_sq.mul_(BETA2).addcmul_(grad, grad, value=1.0 - BETA2)
    denom = torch.sqrt(exp_avg_sq).add_(EPS * root2)
    flat.addcdiv_(exp_avg * lr, denom, value=-root2 / bias1)


def _fused_adam_agrees(kernel: Callable[..., None], device: torch.device) -> bool:
    """Whether ``kernel`` does what :func:`_adam_plain` does: three steps on a tiny buffer.

    Any exception (a changed signature: a TypeError; a kernel missing for this device: a
    RuntimeError) or any disagreement beyond float rounding means no.
    """
    n = 8
    lr = torch.tensor([1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 0.1, 1.0], device=device)
    fused = [torch.linspace(-1.0, 1.0, n, device=device)] + [
        torch.zeros(n, device=device) for _ in range(2)
    ]
    plain = [t.clone() for t in fused]
    update, step_tensor = torch.empty(n, device=device), torch.zeros((), device=device)
    try:
        for step in (1, 2, 3):
            # gradients of mixed sign and size, changing from step to step
            grad = torch.linspace(-0.5, 2.0, n, device=device).roll(step) * (-1.5) ** step
            step_tensor.fill_(step)
            _adam_fused(kernel, fused[0], grad, fused[1], fused[2], lr, update, step_tensor)
            _adam_plain(plain[0], grad, plain[1], plain[2], lr, step)
        return all(
            bool(torch.allclose(a, b, rtol=1e-5, atol=1e-7))
            for a, b in zip(fused, plain, strict=True)
        )
    except Exception:  # whatever a changed private op raises: use the public operations
        return False


def _fused_adam(device: torch.device) -> Callable[..., None] | None:
    """The fused Adam kernel when this torch has it and it agrees with the hand-written update
    on ``device``, else None.

    ``torch._fused_adam_`` is private: a torch release may change its arguments or its meaning,
    which would fail (or silently change) every grid variant. So it is checked once per process
    and device type, at first use, and the hand-written update takes over if it fails.
    """
    kernel = _FUSED_ADAM
    if kernel is None:
        return None
    checked = _FUSED_VERDICTS.get(device.type)
    if checked is None or checked[0] is not kernel:
        checked = (kernel, _fused_adam_agrees(kernel, device))
        _FUSED_VERDICTS[device.type] = checked
    return kernel if checked[1] else None


# --- one member: its own state, whichever stack it trains in --------------------------------


class _MaskStream:
    """A member's dropout bits: uniform 32-bit integers from its own stream, one per hidden unit
    and training row, row after row through its epochs (as its run alone draws them, however
    many rows a stack asks for at once).

    The bits come from NumPy (PCG64DXSM), several times faster than torch's generator here: a
    unit is kept when its integer is at least ``round(p * 2**32)`` (shifted to the signed
    range), which is Bernoulli(1 - p) to 2**-32, finer than torch.rand's float32 resolution.
    Members that start together with the same seed and widths may share one stream
    (:func:`train_stacked` lets them): they would draw the same bits anyway.
    """

    def __init__(self, seed: int, total: int) -> None:
        seed &= 2**64 - 1  # SeedSequence takes no negative numbers, torch.manual_seed does
        self.total = total
        self._bits = np.random.PCG64DXSM(np.random.SeedSequence([seed, _MASK_STREAM]))
        self._spare: np.ndarray | None = None  # half of the last 64-bit draw, not used yet

    def take(self, rows: int) -> np.ndarray:
        """The bits of the next ``rows`` rows: int32 ``[rows, total]``."""
        n = rows * self.total
        spare = self._spare
        words = self._bits.random_raw((n - (0 if spare is None else 1) + 1) // 2)
        values = words.view(np.int32)
        if spare is not None:
            values = np.concatenate([spare, values])
        self._spare = values[n:] if len(values) > n else None
        return values[:n].reshape(rows, self.total)


@dataclass
class _Member:
    """One run: its configuration and everything it carries from one stack to the next."""

    key: Hashable
    config: TrainConfig
    network: nn.Sequential  # the initial weights; receives the best weights at the end
    in_features: int  # the first layer's inputs (12 more with pair features)
    on_epoch: MemberEpochCallback | None
    masks: _MaskStream | None  # None: no dropout
    params: list[torch.Tensor]  # weight [in, out], bias [1, out] per layer, the output's last
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    adam_steps: int = 0
    history: list[EpochStats] = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int = 0
    best_state: list[torch.Tensor] | None = None
    time_share: float = 0.0  # its share of its stacks' wall time (see StackedTrainer)
    stack_wall: float = 0.0  # the wall time of the stack epochs it trained in
    stack_size: int = 1  # the most members it trained beside, itself included

    @property
    def epoch(self) -> int:
        return len(self.history)

    @property
    def depth(self) -> int:
        return len(self.config.hidden_sizes)

    @property
    def dims(self) -> list[int]:
        return [self.in_features, *self.config.hidden_sizes, 1]

    def state(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        return self.params, self.exp_avg, self.exp_avg_sq


def _linear_layers(network: nn.Sequential) -> list[nn.Linear]:
    return [m for m in network if isinstance(m, nn.Linear)]


@dataclass
class MemberOutcome:
    """How a member left: with its result (it completed), its error (its loss became
    non-finite: a TrainingError; or its stack failed: out of memory, say), or neither (its epoch
    callback stopped it after epoch ``stopped_at``).

    ``training_time_s`` is its share of the stacks' time; ``history`` holds every epoch it ran.
    """

    key: Hashable
    config: TrainConfig
    history: list[EpochStats]
    training_time_s: float
    result: TrainResult | None = None
    error: Exception | None = None  # TrainingError, or what failed its whole stack
    stopped_at: int | None = None


# --- the data every stack reads -------------------------------------------------------------


class _Data:
    """The split on the device, scaled as each member's model scales it, and each seed's batch
    orders (one permutation per epoch, drawn as ``train_model`` draws them)."""

    def __init__(self, split: Split, device: torch.device) -> None:
        self.split = split
        self.device = device
        self.n_train = len(split.y_train)
        self.n_val = len(split.y_val)
        self.n_features = int(split.x_train.shape[1])
        self.y_train = torch.from_numpy(split.y_train).to(device)
        self.y_val = torch.from_numpy(split.y_val).to(device)
        self._x: dict[bool, tuple[torch.Tensor, torch.Tensor, Scaling]] = {}
        self._orders: dict[int, tuple[torch.Generator, list[torch.Tensor]]] = {}

    def scaled(self, pair_features: bool) -> tuple[torch.Tensor, torch.Tensor, Scaling]:
        """Training and validation inputs scaled by the training split's statistics (pair
        features appended first), and that scaling: what ``train_model`` trains on.

        With pair features the first columns are the plain ones, scaled exactly as without
        (each column's statistics are its own), so a member without them reads those.
        """
        if pair_features not in self._x:
            split = self.split
            x_fit = add_pair_features(split.x_train) if pair_features else split.x_train
            scaling = Scaling.fit(x_fit)  # training split only
            scaler = CallingScoreModel(nn.Sequential(), scaling, pair_features).to(self.device)
            self._x[pair_features] = (
                scaler.scale(torch.from_numpy(split.x_train).to(self.device)),
                scaler.scale(torch.from_numpy(split.x_val).to(self.device)),
                scaling,
            )
        return self._x[pair_features]

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The batch order of ``epoch`` (1-based) for ``seed``."""
        generator, orders = self._orders.setdefault(seed, (torch.Generator().manual_seed(seed), []))
        while len(orders) < epoch:
            orders.append(torch.randperm(self.n_train, generator=generator).to(self.device))
        return orders[epoch - 1]


# --- a stack: its members' parameters side by side, padded to the widest ---------------------


def _stack_dims(configs: Sequence[TrainConfig], n_features: int) -> list[int]:
    """The stack's layer widths: its inputs, the widest member's width at each hidden layer (a
    shallower member's last width stands for the identity layers below it), 1."""
    depth = max(len(c.hidden_sizes) for c in configs)
    inputs = n_features + (N_PAIR_FEATURES if any(c.pair_features for c in configs) else 0)
    hidden = [
        max(c.hidden_sizes[min(layer, len(c.hidden_sizes) - 1)] for c in configs)
        for layer in range(depth)
    ]
    return [inputs, *hidden, 1]


#: Inputs a member with pair features has beyond the raw ones (one per vibe dimension).
N_PAIR_FEATURES = 12


def _member_blocks(member: _Member, depth: int) -> list[tuple[int, int, tuple[slice, slice]]]:
    """(index into the member's parameters, the stack block it sits in, its place there) for
    each of its parameters: its hidden layers in the first blocks, its output in the last."""
    dims, layers = member.dims, member.depth
    places = []
    for layer in range(layers + 1):
        block = 2 * (layer if layer < layers else depth)
        fan_in, fan_out = dims[layer], dims[layer + 1]
        places.append((2 * layer, block, (slice(0, fan_in), slice(0, fan_out))))
        places.append((2 * layer + 1, block + 1, (slice(0, 1), slice(0, fan_out))))
    return places


class _Stack:
    """The members' parameters, gradients and Adam state, padded to common shapes.

    Each is one flat buffer; ``params[i]`` / ``grads[i]`` are views of it, block ``i`` being layer
    ``i // 2``'s weight ``[K, in, out]`` (``i`` even) or bias ``[K, 1, out]`` (``i`` odd), so the
    optimizer runs over every member and parameter at once, with a flat tensor of learning rates
    beside them (0 wherever a member has no parameter: padding and identity layers).
    """

    def __init__(self, members: Sequence[_Member], data: _Data) -> None:
        device = data.device
        self.members = list(members)
        self.k = k = len(self.members)
        configs = [m.config for m in self.members]
        self.dims = dims = _stack_dims(configs, data.n_features)
        self.depth = len(dims) - 2
        self.x_train, self.x_val, _ = data.scaled(dims[0] != data.n_features)
        self.batch_sizes = [c.batch_size for c in configs]
        self.micro = math.gcd(*self.batch_sizes)
        self.uniform = len(set(self.batch_sizes)) == 1  # all step together: no accumulation
        self.shapes: list[tuple[int, ...]] = []
        for layer in range(self.depth + 1):
            self.shapes += [(dims[layer], dims[layer + 1]), (1, dims[layer + 1])]
        total = sum(k * math.prod(s) for s in self.shapes)
        self.flat = torch.zeros(total, device=device)
        self.exp_avg = torch.zeros(total, device=device)
        self.exp_avg_sq = torch.zeros(total, device=device)
        self.lr = torch.zeros(total, device=device)
        self.grad = torch.zeros(total, device=device)
        self.params = self._views(self.flat)
        self.grads = self._views(self.grad)
        states = (self.params, self._views(self.exp_avg), self._views(self.exp_avg_sq))
        rates = self._views(self.lr)
        for position, member in enumerate(self.members):
            for own, block, place in _member_blocks(member, self.depth):
                for stacked_state, own_state in zip(states, member.state(), strict=True):
                    stacked_state[block][position][place].copy_(own_state[own])
                rates[block][position][place].fill_(member.config.learning_rate)
            last = member.config.hidden_sizes[-1]
            for layer in range(member.depth, self.depth):  # identity layers (never trained)
                self.params[2 * layer][position, :last, :last] = torch.eye(last, device=device)
        # the views the training step uses, made once
        self._weights = self.params[0:-2:2]
        self._biases = self.params[1:-2:2]
        self._transposed = [w.transpose(1, 2) for w in self._weights]
        self._out_weight = self.params[-2].view(k, -1).unsqueeze(1)  # [K, 1, in]
        self._out_bias = self.params[-1].view(k, 1)
        self._grad_weights = self.grads[0:-2:2]
        self._grad_biases = self.grads[1::2]
        self._grad_out_weight = self.grads[-2].view(k, -1)  # [K, in]
        # a stack of one has no padding: its one learning rate can go to the kernel directly
        self._one_rate = self.members[0].config.learning_rate if k == 1 else None
        self.steps = [m.adam_steps for m in self.members]
        self._in_step = self.uniform and len(set(self.steps)) == 1
        self._step_counts = torch.tensor(self.steps, dtype=torch.float32, device=device)
        self._step = torch.full((), float(self.steps[0]), device=device)  # when all are equal
        self._update = torch.zeros_like(self.flat)
        self._fused = _fused_adam(device)
        # Each member's slice of every block (contiguous), for the steps only some members take
        buffers = (self.flat, self.grad, self.exp_avg, self.exp_avg_sq, self.lr, self._update)
        views = [self._views(b) for b in buffers]
        self._pieces = [[[v[p] for v in per] for per in views] for p in range(k)]
        self._stepping: dict[tuple[int, ...], tuple[Any, ...]] = {}
        self._plan: tuple[int, list[Any]] | None = None  # (rows per epoch, its micro-batches)
        self._masks = None
        if any(m.masks is not None for m in self.members):
            self._masks = _StackMasks(self, data.n_train)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, start = [], 0
        for shape in self.shapes:
            n = self.k * math.prod(shape)
            views.append(flat[start : start + n].view(self.k, *shape))
            start += n
        return views

    def member_params(self, position: int) -> list[torch.Tensor]:
        """A copy of one member's parameters, in its own shapes."""
        return self._own(position, self.params)

    def _own(self, position: int, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        member = self.members[position]
        own: list[torch.Tensor] = [torch.empty(0)] * (2 * member.depth + 2)
        for index, block, place in _member_blocks(member, self.depth):
            own[index] = blocks[block][position][place].clone()
        return own

    def write_back(self) -> None:
        """Give each member its parameters, Adam moments and step count (it leaves the stack)."""
        moments, squares = self._views(self.exp_avg), self._views(self.exp_avg_sq)
        for position, member in enumerate(self.members):
            member.params = self._own(position, self.params)
            member.exp_avg = self._own(position, moments)
            member.exp_avg_sq = self._own(position, squares)
            member.adam_steps = self.steps[position]

    # --- one epoch --------------------------------------------------------------------------

    def _schedule(self, n: int) -> list[tuple[int, int, tuple[int, ...], Any]]:
        """Per micro-batch: its first row, its rows, the members whose batch ends there (they
        step) and each member's gradient scale (2 / rows of its batch: a float when all share
        the batch size)."""
        micro, positions = self.micro, range(self.k)
        plan = []
        for start in range(0, n, micro):
            rows = min(micro, n - start)
            firsts = [(start // b) * b for b in self.batch_sizes]
            ends = [min(first + b, n) for first, b in zip(firsts, self.batch_sizes, strict=True)]
            stepping = tuple(p for p in positions if ends[p] == start + rows)
            if self.uniform:
                scale: Any = 2.0 / rows
            else:
                scale = torch.tensor(
                    [2.0 / (ends[p] - firsts[p]) for p in positions], device=self.flat.device
                ).view(-1, 1)
            plan.append((start, rows, stepping, scale))
        return plan

    def train_epoch(self, data: _Data) -> list[float]:
        """One epoch of every member (each its own next epoch); each member's train loss."""
        n = data.n_train
        orders = [data.order(m.config.seed, m.epoch + 1) for m in self.members]
        shared = all(o is orders[0] for o in orders)  # one batch order: slice it, no gather
        if shared:
            x_epoch, y_epoch = self.x_train[orders[0]], data.y_train[orders[0]]
        else:
            index = torch.stack(orders)
        if self._plan is None or self._plan[0] != n:
            self._plan = (n, self._schedule(n))
        plan = self._plan[1]
        masks = None
        if self._masks is not None:
            self._masks.begin_epoch()
        squared = torch.empty(len(plan), self.k, device=self.flat.device)
        for i, (start, rows, stepping, scale) in enumerate(plan):
            if shared:
                x = x_epoch[start : start + rows].expand(self.k, rows, -1)  # no copy
                y = y_epoch[start : start + rows]
            else:
                rows_index = index[:, start : start + rows]
                x, y = self.x_train[rows_index], data.y_train[rows_index]
            if self._masks is not None:
                masks = self._masks.at(start, rows, n)
            self._train_step(x, y, masks, squared[i], scale)
            self.adam_step(stepping)
        losses: list[float] = (squared.double().sum(dim=0) / n).tolist()
        return losses

    def _train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        masks: list[torch.Tensor] | None,
        squared_error: torch.Tensor,
        scale: float | torch.Tensor,
    ) -> None:
        """Forward and backward through one micro-batch ``x`` ``[K, B, in]``: the gradients of
        each member's mean squared error over its batch into ``grads``, written when every
        member steps after every micro-batch, else added up until it steps.

        ``squared_error`` (``[K]``) receives each member's summed squared error; ``scale`` is
        2 / (rows of the member's batch), one for all or ``[K, 1]``. (One method, not two, and
        the views made once per stack: on these tiny matrices Python's own time counts.)
        """
        weights, biases, transposed = self._weights, self._biases, self._transposed
        h = x
        inputs = [h]
        for layer in range(self.depth):
            h = torch.baddbmm(biases[layer], h, weights[layer]).relu_()
            if masks is not None:
                h.mul_(masks[layer])
            inputs.append(h)
        # The output layer has one unit: a dot product per row beats a batched matmul here.
        out = torch.linalg.vecdot(h, self._out_weight).add_(self._out_bias).sigmoid_()

        diff = out - y
        torch.linalg.vecdot(diff, diff, out=squared_error)
        # d mean((out - y)^2) / d out = 2 (out - y) / B, through the sigmoid: * out (1 - out)
        grad = _SIGMOID_BACKWARD(diff.mul_(scale), out).unsqueeze(-1)  # [K, B, 1]
        grad_weights, grad_biases = self._grad_weights, self._grad_biases
        if self.uniform:
            torch.linalg.vecdot(h, grad, dim=1, out=self._grad_out_weight)
            torch.sum(grad, dim=1, keepdim=True, out=grad_biases[-1])
        else:
            self._grad_out_weight.add_(torch.linalg.vecdot(h, grad, dim=1))
            grad_biases[-1].add_(grad.sum(dim=1, keepdim=True))
        grad_h = grad * self._out_weight
        for layer in range(self.depth - 1, -1, -1):
            if masks is not None:
                grad_h.mul_(masks[layer])
            # ReLU: the layer's output (after dropout) is > 0 exactly where the gradient passes
            grad = _THRESHOLD_BACKWARD(grad_h, h, 0)
            h = inputs[layer]
            if self.uniform:
                torch.bmm(h.transpose(1, 2), grad, out=grad_weights[layer])
                torch.sum(grad, dim=1, keepdim=True, out=grad_biases[layer])
            else:
                grad_weights[layer].baddbmm_(h.transpose(1, 2), grad)
                grad_biases[layer].add_(grad.sum(dim=1, keepdim=True))
            if layer > 0:
                grad_h = torch.bmm(grad, transposed[layer])

    def adam_step(self, stepping: tuple[int, ...]) -> None:
        """torch.optim.Adam's update (bias-corrected, no weight decay) for the members at
        ``stepping``, each with its own learning rate and step count.

        Through the fused kernel ``Adam(fused=True)`` uses when it passed its check (see
        :func:`_fused_adam`), else through public operations: over the flat buffers when every
        member steps every time (their step counts stay equal), else over the stepping
        members' pieces.
        """
        if not stepping:
            return
        for position in stepping:
            self.steps[position] += 1
        if not self._in_step:
            self._step_pieces(stepping)
            return
        step = self.steps[0]
        if self._fused is None:
            _adam_plain(self.flat, self.grad, self.exp_avg, self.exp_avg_sq, self.lr, step)
            return
        self._step.fill_(step)
        if self._one_rate is not None:  # no per-member rates, no frozen weights: lr directly
            self._fused(
                [self.flat],
                [self.grad],
                [self.exp_avg],
                [self.exp_avg_sq],
                [],
                [self._step],
                lr=self._one_rate,
                beta1=BETA1,
                beta2=BETA2,
                weight_decay=0.0,
                eps=EPS,
                amsgrad=False,
                maximize=False,
            )
            return
        _adam_fused(
            self._fused,
            self.flat,
            self.grad,
            self.exp_avg,
            self.exp_avg_sq,
            self.lr,
            self._update,
            self._step,
        )

    def _stepping_lists(self, stepping: tuple[int, ...]) -> tuple[Any, ...]:
        """For the members at ``stepping``: their pieces of the gradients, Adam moments and
        update buffer, each piece's step count (a view into the members' step counts), the
        increment of those counts, and a mask that zeroes their gradients only."""
        lists = self._stepping.get(stepping)
        if lists is None:
            pieces = [self._pieces[p] for p in stepping]
            columns = [[q for member in pieces for q in member[i]] for i in (1, 2, 3, 5)]
            steps = [self._step_counts[p] for p in stepping for _ in self._pieces[p][0]]
            increment = torch.zeros(self.k, device=self.flat.device)
            increment[list(stepping)] = 1.0
            keep = torch.ones_like(self.flat)
            for piece in self._keep_views(keep, stepping):
                piece.zero_()
            lists = (*columns, steps, increment, keep)
            self._stepping[stepping] = lists
        return lists

    def _keep_views(self, flat: torch.Tensor, positions: tuple[int, ...]) -> list[torch.Tensor]:
        return [view[p] for view in self._views(flat) for p in positions]

    def _step_pieces(self, stepping: tuple[int, ...]) -> None:
        """Adam for the members at ``stepping``, each with its own step count: the fused kernel
        over their pieces (the others' updates stay 0), then the flat multiply-add."""
        grads, moments, squares, updates, steps, increment, keep = self._stepping_lists(stepping)
        self._step_counts.add_(increment)
        if self._fused is not None:
            self._update.zero_()
            self._fused(
                updates,
                grads,
                moments,
                squares,
                [],
                steps,
                lr=1.0,
                beta1=BETA1,
                beta2=BETA2,
                weight_decay=0.0,
                eps=EPS,
                amsgrad=False,
                maximize=False,
            )
            self.flat.addcmul_(self._update, self.lr)
        else:
            for position in stepping:  # the public operations, member by member
                for param, grad, moment, square, rate in zip(
                    *self._pieces[position][:5], strict=True
                ):
                    _adam_plain(param, grad, moment, square, rate, self.steps[position])
        if not self.uniform:  # gradients were added up: their next batch starts from zero
            if len(stepping) == self.k:
                self.grad.zero_()
            else:
                self.grad.mul_(keep)

    # --- evaluation -----------------------------------------------------------------------

    def mse(self, x: torch.Tensor, y: torch.Tensor) -> list[float]:
        """Each member's exact MSE on ``(x, y)`` in eval mode (no dropout), like ``_mse``."""
        with torch.no_grad():
            h = x.expand(self.k, *x.shape)  # every member sees the same rows: no copy
            for layer in range(self.depth):
                h = torch.baddbmm(self._biases[layer], h, self._weights[layer]).relu_()
            out = torch.linalg.vecdot(h, self._out_weight).add_(self._out_bias).sigmoid_()
            values: list[float] = ((out - y).double() ** 2).mean(dim=1).tolist()
        return values


class _StackMasks:
    """The dropout masks of a stack's members, one ``[K, rows, width]`` tensor per hidden layer:
    each member's from its own stream (ones where it has no dropout, no unit, or an identity
    layer). Made for a chunk of rows at a time (a few MB), sliced for each micro-batch."""

    #: The most mask values (floats) one chunk holds.
    CHUNK_VALUES = 2**22

    def __init__(self, stack: _Stack, n: int) -> None:
        self._stack = stack
        self._device = stack.flat.device
        hidden = stack.dims[1:-1]
        self._offsets = [sum(hidden[:i]) for i in range(len(hidden))]
        self._widths = hidden
        chunk = max(1, self.CHUNK_VALUES // (stack.k * sum(hidden) * stack.micro))
        self._chunk = min(chunk * stack.micro, n)  # whole micro-batches
        self._array = np.ones((stack.k, self._chunk, sum(hidden)), dtype=np.float32)
        self._tensor = torch.from_numpy(self._array).to(self._device)
        self._layers = self._layer_views(self._tensor)
        self._start = self._end = 0
        # Each member's keep threshold (a signed 32-bit integer) and scale 1 / (1 - p).
        rates = [m.config.dropout for m in stack.members]
        self._thresholds = [np.int32(min(round(p * 2.0**32) - 2.0**31, 2.0**31 - 1)) for p in rates]
        self._scales = [np.float32(1.0 / (1.0 - p)) for p in rates]
        self._places = [self._layer_places(m) for m in stack.members]
        whole = [list(m.config.hidden_sizes) == hidden for m in stack.members]
        # The members with dropout, grouped by stream: a shared stream is drawn once, and a group
        # of members side by side that fill the stack's layers gets its masks in one operation.
        groups: dict[int, list[int]] = {}
        streams: dict[int, _MaskStream] = {}
        for position, member in enumerate(stack.members):
            if member.masks is not None:
                groups.setdefault(id(member.masks), []).append(position)
                streams[id(member.masks)] = member.masks
        self._groups: list[tuple[_MaskStream, list[int], Any]] = []
        for key, positions in groups.items():
            block = None
            contiguous = positions == list(range(positions[0], positions[-1] + 1))
            if contiguous and all(whole[p] for p in positions):
                block = (
                    slice(positions[0], positions[-1] + 1),
                    np.array([self._thresholds[p] for p in positions]).reshape(-1, 1, 1),
                    np.array([self._scales[p] for p in positions]).reshape(-1, 1, 1),
                )
            self._groups.append((streams[key], positions, block))
        self._whole = {p for p, w in enumerate(whole) if w}

    def _layer_views(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [
            tensor[:, :, offset : offset + width]
            for offset, width in zip(self._offsets, self._widths, strict=True)
        ]

    def _layer_places(self, member: _Member) -> list[tuple[slice, slice]]:
        """For each of the member's hidden layers: its columns among its own bits, and where
        they go in the stack's mask row."""
        own_offset, places = 0, []
        for layer, width in enumerate(member.config.hidden_sizes):
            stacked_offset = self._offsets[layer]
            places.append(
                (
                    slice(own_offset, own_offset + width),
                    slice(stacked_offset, stacked_offset + width),
                )
            )
            own_offset += width
        return places

    def begin_epoch(self) -> None:
        self._start = self._end = 0

    def at(self, start: int, rows: int, n: int) -> list[torch.Tensor]:
        """The masks of the micro-batch of ``rows`` rows from row ``start`` of an epoch of
        ``n`` rows (micro-batches come in order)."""
        if start >= self._end:
            self._fill(start, min(self._chunk, n - start))
        offset = start - self._start
        return [layer[:, offset : offset + rows] for layer in self._layers]

    def _fill(self, start: int, rows: int) -> None:
        array = self._array
        for stream, positions, block in self._groups:
            bits = stream.take(rows)
            if block is not None:  # the whole group at once
                np.multiply(bits[None] >= block[1], block[2], out=array[block[0], :rows])
                continue
            for position in positions:
                keep = bits >= self._thresholds[position]
                scale, target = self._scales[position], array[position, :rows]
                if position in self._whole:
                    np.multiply(keep, scale, out=target)
                    continue
                for own, place in self._places[position]:
                    np.multiply(keep[:, own], scale, out=target[:, place])
        if self._device.type != "cpu":
            self._tensor[:, :rows].copy_(torch.from_numpy(array[:, :rows]))
        self._start, self._end = start, start + rows


# --- which members share a stack -------------------------------------------------------------

#: The cost model behind :func:`plan_stacks`, in seconds: per micro-batch a fixed part and a
#: part per layer (the operations' dispatch), per member a part of its own, one per parameter
#: (the optimizer, writing its gradient) and the arithmetic (6 FLOP per row and parameter) at
#: ``_COST_FLOPS``. Fitted to one epoch of stacks of 1 to 8 members (batch 16 to 128, hidden
#: sizes [32] to [256, 256, 128]) on the 2-core machine (``bench/bench_stacked.py --costs``);
#: only their ratios matter.
_COST_MICRO_BATCH = 78e-6
_COST_LAYER = 23e-6
_COST_MEMBER = 8e-6
_COST_PARAMETER = 1.5e-9
_COST_FLOPS = 55e9
#: Beyond this many parameters in a stack (its six flat buffers: about 7 MB) they no longer stay
#: in the caches, and every member's step costs about half as much again.
_COST_CACHE_PARAMETERS = 300_000
_COST_OUT_OF_CACHE = 1.5


def epoch_cost(configs: Sequence[TrainConfig], n_features: int, n_train: int, n_val: int) -> float:
    """The modelled seconds of one epoch of ``configs`` trained as one stack."""
    dims = _stack_dims(configs, n_features)
    micro = math.gcd(*(c.batch_size for c in configs))
    weights = sum(a * b + b for a, b in itertools.pairwise(dims))
    member = _COST_MEMBER + weights * (_COST_PARAMETER + 6 * micro / _COST_FLOPS)
    if len(configs) * weights > _COST_CACHE_PARAMETERS:
        member *= _COST_OUT_OF_CACHE
    per_micro = _COST_MICRO_BATCH + _COST_LAYER * (len(dims) - 1) + len(configs) * member
    evaluation = len(configs) * 2 * n_val * weights / _COST_FLOPS
    return math.ceil(n_train / micro) * per_micro + evaluation


def plan_stacks(
    configs: Sequence[TrainConfig], n_features: int, n_train: int, n_val: int
) -> list[list[int]]:
    """Which runs to train together: groups of indices into ``configs``, each one stack.

    Greedy on :func:`epoch_cost`: the costliest run first, each joins the stack where it adds
    the least time, or starts its own where that is cheaper (a wide network padded into a
    narrow stack, or a narrow one into a wide stack, can cost more than it saves). The plan
    depends on the configurations only, never on timings: the same runs train the same way.
    """

    def cost(group: Sequence[int]) -> float:
        return epoch_cost([configs[i] for i in group], n_features, n_train, n_val)

    order = sorted(range(len(configs)), key=lambda i: -cost([i]))
    groups: list[list[int]] = []
    costs: list[float] = []
    for index in order:
        alone = cost([index])
        best, best_added = None, alone
        for g, group in enumerate(groups):
            added = cost([*group, index]) - costs[g]
            if added < best_added:
                best, best_added = g, added
        if best is None:
            groups.append([index])
            costs.append(alone)
        else:
            groups[best].append(index)
            costs[best] += best_added
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


Plan = Callable[[Sequence[TrainConfig], int, int, int], list[list[int]]]


def _one_stack(configs: Sequence[TrainConfig], *_: int) -> list[list[int]]:
    return [list(range(len(configs)))]


# --- the engine ------------------------------------------------------------------------------


class StackedTrainer:
    """Trains runs in stacks: add members at any time; each :meth:`run_epoch` trains every
    member one epoch (each its own next epoch) and returns the members that left.

    Between epochs the members are planned into stacks anew when some joined or left
    (``plan``: :func:`plan_stacks` by default); a member's run is the same whichever stack it
    is in. A member's ``training_time_s`` is its share of the stacks' wall time: each stack's
    set-up and epoch split among its members, its own set-up and final evaluation its own.

    Raises:
        ConfigError: the device is not available.
    """

    def __init__(
        self,
        split: Split,
        device: str = "cpu",
        *,
        plan: Plan = plan_stacks,
        share_masks: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self._data = _Data(split, self.device)
        self._plan = plan
        self._share_masks = share_masks  # see _MaskStream; only for members that never move
        self._shared_streams: dict[tuple[int, tuple[int, ...]], _MaskStream] = {}
        self._members: list[_Member] = []
        self._stacks: list[_Stack] = []
        self._planned = True
        self.mean_predictor_val_loss = mean_predictor_loss(split)
        self._mark = time.perf_counter()

    @property
    def active(self) -> int:
        """Members still training."""
        return len(self._members)

    @property
    def stack_sizes(self) -> list[int]:
        """The sizes of the stacks the last epoch trained."""
        return [s.k for s in self._stacks]

    def add(
        self, key: Hashable, config: TrainConfig, on_epoch: MemberEpochCallback | None = None
    ) -> None:
        """A new member, which trains from the next epoch on. Its initial weights are what
        ``train_model`` draws for ``config``."""
        started = time.perf_counter()
        in_features = self._data.n_features + (N_PAIR_FEATURES if config.pair_features else 0)
        with _single_thread(self.device):
            torch.manual_seed(config.seed)  # what train_model does before it trains
            network = build_network(in_features, config.hidden_sizes, config.dropout)
            params: list[torch.Tensor] = []
            with torch.no_grad():
                for linear in _linear_layers(network):
                    # copies: the network keeps its initial weights until the best are restored
                    params.append(linear.weight.detach().t().contiguous().clone().to(self.device))
                    params.append(linear.bias.detach().view(1, -1).clone().to(self.device))
        masks = None
        if config.dropout > 0:
            total = sum(config.hidden_sizes)
            shared = (config.seed, config.hidden_sizes)
            masks = self._shared_streams.get(shared) if self._share_masks else None
            if masks is None:
                masks = _MaskStream(config.seed, total)
                if self._share_masks:
                    self._shared_streams[shared] = masks
        member = _Member(
            key,
            config,
            network,
            in_features,
            on_epoch,
            masks,
            params,
            [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params],
        )
        member.time_share += time.perf_counter() - started
        self._members.append(member)
        self._planned = False

    def _charge(self, members: Sequence[_Member], wall: bool = False) -> float:
        """Split the time since the last mark among ``members``; returns it."""
        now = time.perf_counter()
        spent = now - self._mark
        for member in members:
            member.time_share += spent / len(members)
            if wall:
                member.stack_wall += spent
        self._mark = now
        return spent

    def run_epoch(self) -> list[MemberOutcome]:
        """Train every member one epoch; the members that left, in the order they trained.

        An exception from a member's epoch callback ends the epoch there (the caller decides
        what becomes of the members: this trainer is then done).
        """
        self._mark = time.perf_counter()
        outcomes: list[MemberOutcome] = []
        with _single_thread(self.device):
            if not self._planned:
                self._replan()
            for stack in self._stacks:
                outcomes += self._epoch(stack)
        if outcomes:
            left = {o.key for o in outcomes}
            self._members = [m for m in self._members if m.key not in left]
            self._planned = False
        return outcomes

    def _replan(self) -> None:
        """Plan the members into stacks; build the stacks that changed (a stack that lost or
        gained members hands them their state first)."""
        data = self._data
        groups = self._plan(
            [m.config for m in self._members], data.n_features, data.n_train, data.n_val
        )
        planned = [[self._members[i] for i in group] for group in groups]
        kept = {tuple(id(m) for m in s.members): s for s in self._stacks}
        stacks: list[_Stack | None] = []
        for group in planned:
            stacks.append(kept.pop(tuple(id(m) for m in group), None))
        for stack in kept.values():
            stack.write_back()
        for i, group in enumerate(planned):
            if stacks[i] is None:
                stacks[i] = _Stack(group, data)
                self._charge(group)  # building a stack serves its members
        self._stacks = [s for s in stacks if s is not None]
        for stack in self._stacks:
            for member in stack.members:
                member.stack_size = max(member.stack_size, stack.k)
        self._planned = True

    def _epoch(self, stack: _Stack) -> list[MemberOutcome]:
        """One epoch of one stack: train, evaluate, report, and let the finished members go."""
        data = self._data
        try:
            train_losses = stack.train_epoch(data)
            val_losses = stack.mse(stack.x_val, data.y_val)
        except (RuntimeError, MemoryError) as exc:  # out of memory, a device fault: this stack
            self._charge(stack.members, wall=True)
            return [self._outcome(member, error=exc) for member in stack.members]
        self._charge(stack.members, wall=True)  # this epoch, shared by its members
        outcomes: list[MemberOutcome] = []
        for position, member in enumerate(stack.members):
            config = member.config
            train_loss, val_loss = train_losses[position], val_losses[position]
            epoch = member.epoch + 1
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                error = TrainingError(
                    f"loss became non-finite at epoch {epoch} (train {train_loss}, "
                    f"val {val_loss}) with learning rate {config.learning_rate:g}; "
                    "try a lower learning rate"
                )
                outcomes.append(self._outcome(member, error=error))
                continue
            stats = EpochStats(epoch, train_loss, val_loss)
            member.history.append(stats)
            stop = bool(member.on_epoch(stats)) if member.on_epoch is not None else False
            self._mark = time.perf_counter()  # the callback's time is the caller's
            if stop:
                outcomes.append(self._outcome(member, stopped_at=epoch))
                continue
            if val_loss < member.best_val:
                member.best_val, member.best_epoch = val_loss, epoch
                member.best_state = stack.member_params(position)
            elif epoch - member.best_epoch >= config.patience:
                outcomes.append(self._finish(member))  # stopped early
                continue
            if epoch >= config.epochs:
                outcomes.append(self._finish(member))
        return outcomes

    def _outcome(
        self, member: _Member, error: Exception | None = None, stopped_at: int | None = None
    ) -> MemberOutcome:
        return MemberOutcome(
            member.key,
            member.config,
            member.history,
            member.time_share,
            error=error,
            stopped_at=stopped_at,
        )

    def _finish(self, member: _Member) -> MemberOutcome:
        """The member's best epoch's weights as a model, evaluated exactly on every split."""
        assert member.best_state is not None
        with torch.no_grad():
            for linear, (weight, bias) in zip(
                _linear_layers(member.network),
                zip(member.best_state[::2], member.best_state[1::2], strict=True),
                strict=True,
            ):
                linear.weight.copy_(weight.t())
                linear.bias.copy_(bias.view(-1))
        _, _, scaling = self._data.scaled(member.config.pair_features)
        model = CallingScoreModel(member.network, scaling, member.config.pair_features)
        model = model.cpu().eval()
        split = self._data.split
        x_t, y_t = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
        x_v, y_v = torch.from_numpy(split.x_val), torch.from_numpy(split.y_val)
        x_s, y_s = torch.from_numpy(split.x_test), torch.from_numpy(split.y_test)
        losses = _mse(model, x_t, y_t), _mse(model, x_v, y_v), _mse(model, x_s, y_s)
        self._charge([member])  # its own final evaluation
        result = TrainResult(
            model=model,
            config=member.config,
            best_epoch=member.best_epoch,
            epochs_run=len(member.history),
            train_loss=losses[0],
            val_loss=losses[1],
            test_loss=losses[2],
            training_time_s=member.time_share,
            history=member.history,
            mean_predictor_val_loss=self.mean_predictor_val_loss,
            stack_size=member.stack_size,
            stack_wall_time_s=member.stack_wall if member.stack_size > 1 else None,
        )
        outcome = self._outcome(member)
        outcome.result = result
        return outcome


def train_stacked(
    split: Split,
    configs: Sequence[TrainConfig],
    device: str = "cpu",
    on_epoch: StackedEpochCallback | None = None,
) -> list[TrainResult | TrainingError]:
    """Train every config on ``split`` as one stacked model; one result per config, in order.

    Each result is what ``train_one(split, config, device)`` returns (a ``TrainingError`` in the
    slot of a member whose loss became non-finite; the others go on), except for the time:
    ``training_time_s`` is the member's share of the stack's wall time (the set-up, each epoch
    split among the members still training in it, its own final evaluation its own), so a
    stack's shares add up to its wall time, ``stack_wall_time_s``; ``stack_size`` is
    ``len(configs)``. For a stack of one, the share is the wall time. ``on_epoch(index, stats)``
    is called for every active member after every epoch, with ``index`` its position in
    ``configs``; an exception it raises ends the whole run.

    Raises:
        ConfigError: the device is not available.
    """
    if not configs:
        return []
    trainer = StackedTrainer(split, device, plan=_one_stack, share_masks=True)
    for index, config in enumerate(configs):
        relay = None
        if on_epoch is not None:

            def relay(stats: EpochStats, index: int = index) -> None:
                on_epoch(index, stats)

        trainer.add(index, config, relay)
    outcomes: dict[int, MemberOutcome] = {}
    while trainer.active:
        for outcome in trainer.run_epoch():
            outcomes[int(outcome.key)] = outcome  # type: ignore[call-overload]
    wall = math.fsum(o.training_time_s for o in outcomes.values())
    finished: list[TrainResult | TrainingError] = []
    for index in range(len(configs)):
        outcome = outcomes[index]
        if outcome.result is None:
            if not isinstance(outcome.error, TrainingError):
                raise outcome.error or RuntimeError("a member stopped without a result")
            finished.append(outcome.error)
            continue
        outcome.result.stack_size = len(configs)
        outcome.result.stack_wall_time_s = wall
        finished.append(outcome.result)
    return finished


def train_one(
    split: Split,
    config: TrainConfig,
    device: str = "cpu",
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """One model through the stacked engine (a stack of one): about twice as fast as
    :func:`~calling_score_opt.train.train_model` on these tiny matrices, same training process.

    Raises:
        TrainingError: the loss became non-finite.
    """
    relay = None if on_epoch is None else (lambda _index, stats: on_epoch(stats))
    (result,) = train_stacked(split, [config], device, relay)
    if isinstance(result, TrainingError):
        raise result
    return result
