"""Several variants of one network shape, trained together as one stacked model.

On a small CPU the grid's variants spend their time on the per-operation overhead of tiny
matrices, not on arithmetic. Variants that share the batch size, the layer shapes, the epochs,
the patience and the seed (in the documented grid: the baseline, the four learning-rate and the
three dropout variants) can instead train as one model whose weights have shape ``[K, in, out]``:
every step is a handful of batched matrix products and element-wise operations over all ``K``
members, so the overhead is paid once.

Each member trains exactly as :func:`~calling_score_opt.train.train_model` would train it alone:
the same initial weights, the same batch order, Adam with the same constants (its own learning
rate), MSE, early stopping on its own validation loss with its own patience counter, the best
epoch's weights restored, the same exact final losses. Only the dropout masks come from another
random stream (they are drawn for all members at once), so with dropout a member's run is a
different, equally likely draw of the same training process; with dropout 0 it agrees with the
solo run up to float rounding. A member that stops early or whose loss becomes non-finite leaves
the stack, so later epochs cost less.

The backward pass is written out by hand (for ``Linear -> ReLU -> Dropout`` blocks and a sigmoid
output with MSE it is a few lines) because it is cheaper than autograd's graph on these tiny
matrices, and Adam runs once over one flat buffer holding every member's parameters: the fused
kernel ``Adam(fused=True)`` uses, then one multiply-add for the per-member learning rates
(``bench/bench_stacked.py`` measures both choices against their alternatives). That kernel is a
private op, so it is checked against the hand-written update once per process, at first use, and
the hand-written update takes over if it fails or disagrees.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from calling_score_opt.data import Scaling, Split
from calling_score_opt.errors import ConfigError, TrainingError
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

#: Settings every member of one stack must share (each may have its own learning rate, dropout).
SHARED_SETTINGS = ("batch_size", "hidden_sizes", "pair_features", "epochs", "patience", "seed")

StackedEpochCallback = Callable[[int, EpochStats], None]

# torch.optim.Adam's defaults, as train_model uses them.
BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-8

#: The kernel behind ``torch.optim.Adam(fused=True)`` (a private op; hand-written ops without it).
_FUSED_ADAM: Callable[..., None] | None = getattr(torch, "_fused_adam_", None)
#: Per device type: the fused kernel last checked there and whether it agreed with the
#: hand-written update (see :func:`_fused_adam`).
_FUSED_VERDICTS: dict[str, tuple[Callable[..., None], bool]] = {}

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


def check_stackable(configs: Sequence[TrainConfig]) -> None:
    """Raise ConfigError unless ``configs`` differ only in learning rate and dropout."""
    if not configs:
        return
    first = configs[0]
    for index, config in enumerate(configs[1:], start=1):
        for name in SHARED_SETTINGS:
            if getattr(config, name) != getattr(first, name):
                raise ConfigError(
                    f"stacked training needs the same {name} for every variant: variant 0 has "
                    f"{getattr(first, name)!r}, variant {index} has {getattr(config, name)!r}; "
                    "train it on its own"
                )


class _Masks:
    """Dropout masks (kept / (1 - p), else 0) for every member at once, one tensor per layer.

    On the CPU the random bits come from NumPy (PCG64DXSM), several times faster than torch's
    generator here: a unit is kept when a uniform 32-bit integer is at least ``round(p * 2**32)``
    (shifted to the signed range), which is Bernoulli(1 - p) to 2**-32, finer than torch.rand's
    float32 resolution. Members with dropout 0 get masks of ones (always kept, scale 1).
    """

    def __init__(
        self, dropouts: Sequence[float], widths: Sequence[int], seed: int, device: torch.device
    ) -> None:
        self.widths = tuple(widths)
        self.device = device
        seed &= 2**64 - 1  # SeedSequence takes no negative numbers, torch.manual_seed does
        self._bits = np.random.PCG64DXSM(np.random.SeedSequence([seed, _MASK_STREAM]))
        self._torch_gen: torch.Generator | None = None
        if device.type != "cpu":
            self._torch_gen = torch.Generator(device=device).manual_seed(seed ^ _MASK_STREAM)
        self.set_members(dropouts)

    def set_members(self, dropouts: Sequence[float]) -> None:
        """Use the dropout rates of the (remaining) members, in stack order."""
        p = np.asarray(dropouts, dtype=np.float64).reshape(-1, 1, 1)
        self.k = len(dropouts)
        self.enabled = bool((p > 0).any())
        threshold = np.round(p * 2.0**32) - 2.0**31
        self._threshold = np.minimum(threshold, 2.0**31 - 1).astype(np.int32)
        self._scale = (1.0 / (1.0 - p)).astype(np.float32)
        self._p = torch.from_numpy(p.astype(np.float32)).to(self.device)
        self._scale_t = torch.from_numpy(self._scale).to(self.device)

    def draw(self, batch: int) -> list[torch.Tensor]:
        """One mask ``[K, batch, width]`` per hidden layer (float32, on the device)."""
        k, total = self.k, sum(self.widths)
        if self._torch_gen is not None:
            u = torch.rand(k, batch, total, generator=self._torch_gen, device=self.device)
            keep = (u >= self._p) * self._scale_t
            return list(torch.split(keep, list(self.widths), dim=2))
        n = k * batch * total
        bits = self._bits.random_raw((n + 1) // 2).view(np.int32)[:n].reshape(k, batch, total)
        masks = []
        start = 0
        for width in self.widths:
            mask = np.multiply(bits[:, :, start : start + width] >= self._threshold, self._scale)
            masks.append(torch.from_numpy(mask))
            start += width
        return masks


class _Stack:
    """The active members' parameters, gradients and Adam state.

    Each is one flat buffer; ``params[i]`` / ``grads[i]`` are views of it, block ``i`` being layer
    ``i // 2``'s weight ``[K, in, out]`` (``i`` even) or bias ``[K, 1, out]`` (``i`` odd), so the
    optimizer runs over every member and parameter at once, with the per-member learning rate as
    a flat tensor beside them.
    """

    def __init__(
        self,
        blocks: Sequence[torch.Tensor],
        exp_avg: Sequence[torch.Tensor],
        exp_avg_sq: Sequence[torch.Tensor],
        learning_rates: Sequence[float],
        step: int,
    ) -> None:
        self.k = int(blocks[0].shape[0])
        self.shapes = [tuple(b.shape[1:]) for b in blocks]
        self.flat = torch.cat([b.reshape(-1) for b in blocks])
        self.exp_avg = torch.cat([b.reshape(-1) for b in exp_avg])
        self.exp_avg_sq = torch.cat([b.reshape(-1) for b in exp_avg_sq])
        self.grad = torch.zeros_like(self.flat)
        self.params = self._views(self.flat)
        self.grads = self._views(self.grad)
        lr = torch.tensor(learning_rates, dtype=torch.float32, device=self.flat.device)
        self.lr = torch.cat(
            [lr.view(-1, 1).expand(self.k, math.prod(s)).reshape(-1) for s in self.shapes]
        )
        self.learning_rates = list(learning_rates)
        self.step = step
        self._step = torch.full((), float(step), device=self.flat.device)  # the fused kernel's
        self._update = torch.empty_like(self.flat)
        self._fused = _fused_adam(self.flat.device)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, start = [], 0
        for shape in self.shapes:
            n = self.k * math.prod(shape)
            views.append(flat[start : start + n].view(self.k, *shape))
            start += n
        return views

    def without(self, positions: Sequence[int]) -> _Stack:
        """A stack of the members not at ``positions`` (their parameters and Adam state)."""
        gone = set(positions)
        keep = [i for i in range(self.k) if i not in gone]
        index = torch.tensor(keep, dtype=torch.long, device=self.flat.device)

        def pick(flat: torch.Tensor) -> list[torch.Tensor]:
            return [v.index_select(0, index) for v in self._views(flat)]

        return _Stack(
            pick(self.flat),
            pick(self.exp_avg),
            pick(self.exp_avg_sq),
            [self.learning_rates[i] for i in keep],
            self.step,
        )

    def member(self, position: int) -> list[torch.Tensor]:
        """A copy of one member's parameters (weight ``[in, out]``, bias ``[1, out]``, ...)."""
        return [p[position].clone() for p in self.params]

    # --- one training step ----------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, masks: Sequence[torch.Tensor] | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each layer's input ``[K, B, in]`` (after ReLU and dropout) and the scores ``[K, B]``."""
        h = x.expand(self.k, *x.shape)  # every member sees the same batch: no copy
        inputs = [h]
        for layer in range(len(self.params) // 2 - 1):
            h = torch.baddbmm(self.params[2 * layer + 1], h, self.params[2 * layer]).relu_()
            if masks is not None:
                h.mul_(masks[layer])
            inputs.append(h)
        # The output layer has one unit: a dot product per row beats a batched matmul here.
        weight, bias = self.params[-2].transpose(1, 2), self.params[-1].view(self.k, 1)
        out = torch.linalg.vecdot(h, weight).add_(bias).sigmoid_()
        return inputs, out

    def backward(
        self,
        inputs: Sequence[torch.Tensor],
        out: torch.Tensor,
        y: torch.Tensor,
        masks: Sequence[torch.Tensor] | None,
        squared_error: torch.Tensor,
    ) -> None:
        """Gradients of each member's mean squared error into ``grads``.

        ``squared_error`` (``[K]``) receives each member's summed squared error.
        """
        batch = y.shape[0]
        diff = out - y
        torch.linalg.vecdot(diff, diff, out=squared_error)
        # d mean((out - y)^2) / d out = 2 (out - y) / B, through the sigmoid: * out (1 - out)
        grad: torch.Tensor = torch.ops.aten.sigmoid_backward(diff.mul_(2.0 / batch), out)
        grad = grad.unsqueeze(-1)  # [K, B, 1]
        last = len(self.params) // 2 - 1
        h = inputs[last]
        torch.linalg.vecdot(h, grad, dim=1, out=self.grads[-2].view(self.k, -1))
        torch.sum(grad, dim=1, keepdim=True, out=self.grads[-1])
        grad_h = grad * self.params[-2].transpose(1, 2)
        for layer in range(last - 1, -1, -1):
            if masks is not None:
                grad_h.mul_(masks[layer])
            # ReLU: the layer's output (after dropout) is > 0 exactly where the gradient passes
            grad = torch.ops.aten.threshold_backward(grad_h, h, 0)
            h = inputs[layer]
            torch.bmm(h.transpose(1, 2), grad, out=self.grads[2 * layer])
            torch.sum(grad, dim=1, keepdim=True, out=self.grads[2 * layer + 1])
            if layer > 0:
                grad_h = torch.bmm(grad, self.params[2 * layer].transpose(1, 2))

    def adam_step(self) -> None:
        """torch.optim.Adam's update (bias-corrected, no weight decay), lr per member.

        Through the fused kernel ``Adam(fused=True)`` uses when it passed its check (see
        :func:`_fused_adam`), else through public operations.
        """
        self.step += 1
        if self._fused is not None:
            self._step.fill_(self.step)
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
        else:
            _adam_plain(self.flat, self.grad, self.exp_avg, self.exp_avg_sq, self.lr, self.step)

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        masks: Sequence[torch.Tensor] | None,
        squared_error: torch.Tensor,
    ) -> None:
        inputs, out = self.forward(x, masks)
        self.backward(inputs, out, y, masks, squared_error)
        self.adam_step()

    # --- evaluation -----------------------------------------------------------------------

    def mse(self, x: torch.Tensor, y: torch.Tensor) -> list[float]:
        """Each member's exact MSE on ``(x, y)`` in eval mode (no dropout), like ``_mse``."""
        with torch.no_grad():
            _, out = self.forward(x, None)
            values: list[float] = ((out - y).double() ** 2).mean(dim=1).tolist()
        return values


def _linear_layers(network: nn.Sequential) -> list[nn.Linear]:
    return [m for m in network if isinstance(m, nn.Linear)]


@dataclass
class _Member:
    """What one member keeps between epochs (its network receives the best weights at the end)."""

    config: TrainConfig
    network: nn.Sequential
    history: list[EpochStats]
    best_val: float = math.inf
    best_epoch: int = 0
    best_state: list[torch.Tensor] | None = None


def train_stacked(
    split: Split,
    configs: Sequence[TrainConfig],
    device: str = "cpu",
    on_epoch: StackedEpochCallback | None = None,
) -> list[TrainResult | TrainingError]:
    """Train every config on ``split`` as one stacked model; one result per config, in order.

    Each result is what ``train_model(split, config, device)`` returns (a ``TrainingError`` in the
    slot of a member whose loss became non-finite; the others go on), except for the time:
    ``training_time_s`` is the member's share of the stack's wall time (the set-up split among
    all members, each epoch's time among the members still training in it, its own final
    evaluation its own), so a stack's shares add up to its wall time, ``stack_wall_time_s``;
    ``stack_size`` is ``len(configs)``. For a stack of one, the share is the wall time.
    ``on_epoch(index, stats)`` is called for every active member after every epoch, with
    ``index`` its position in ``configs``; an exception it raises ends the whole run.

    Raises:
        ConfigError: the configs differ in anything but learning rate and dropout, or the
            device is not available.
    """
    check_stackable(configs)
    if not configs:
        return []
    dev = resolve_device(device)
    started = time.perf_counter()
    first = configs[0]
    results: list[TrainResult | TrainingError | None] = [None] * len(configs)
    # Each member's share of the wall time: every stretch of time since ``mark`` is charged to
    # the members it was spent on, so the shares add up to the stack's wall time.
    shares = [0.0] * len(configs)
    mark = started

    def charge(indices: Sequence[int]) -> None:
        nonlocal mark
        now = time.perf_counter()
        for index in indices:
            shares[index] += (now - mark) / len(indices)
        mark = now

    mean_val_loss = mean_predictor_loss(split)
    with _single_thread(dev):
        x_fit = add_pair_features(split.x_train) if first.pair_features else split.x_train
        scaling = Scaling.fit(x_fit)  # training split only
        members: list[_Member] = []
        for config in configs:  # what train_model does before it trains: the same weights
            torch.manual_seed(config.seed)
            network = build_network(x_fit.shape[1], config.hidden_sizes, config.dropout)
            members.append(_Member(config, network, []))
        shuffle = torch.Generator().manual_seed(first.seed)  # the same batch order

        blocks: list[torch.Tensor] = []
        for layer in range(len(first.hidden_sizes) + 1):
            linears = [_linear_layers(m.network)[layer] for m in members]
            with torch.no_grad():
                blocks.append(torch.stack([lin.weight.t() for lin in linears]).to(dev))
                blocks.append(torch.stack([lin.bias.view(1, -1) for lin in linears]).to(dev))
        stack = _Stack(
            blocks,
            [torch.zeros_like(b) for b in blocks],
            [torch.zeros_like(b) for b in blocks],
            [c.learning_rate for c in configs],
            step=0,
        )
        masks = _Masks([c.dropout for c in configs], first.hidden_sizes, first.seed, dev)
        active = list(range(len(configs)))  # stack position -> index into configs

        # The network trains on pre-scaled inputs, scaled like train_model does it.
        scaler = CallingScoreModel(nn.Sequential(), scaling, first.pair_features).to(dev)
        x_train_scaled = scaler.scale(torch.from_numpy(split.x_train).to(dev))
        y_train = torch.from_numpy(split.y_train).to(dev)
        x_val_scaled = scaler.scale(torch.from_numpy(split.x_val).to(dev))
        y_val = torch.from_numpy(split.y_val).to(dev)
        n_train, batch_size = len(y_train), first.batch_size
        starts = range(0, n_train, batch_size)

        def finish(index: int) -> None:
            member = members[index]
            assert member.best_state is not None
            with torch.no_grad():
                for linear, (weight, bias) in zip(
                    _linear_layers(member.network),
                    zip(member.best_state[::2], member.best_state[1::2], strict=True),
                    strict=True,
                ):
                    linear.weight.copy_(weight.t())
                    linear.bias.copy_(bias.view(-1))
            model = CallingScoreModel(member.network, scaling, member.config.pair_features)
            model = model.cpu().eval()
            x_t, y_t = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
            x_v, y_v = torch.from_numpy(split.x_val), torch.from_numpy(split.y_val)
            x_s, y_s = torch.from_numpy(split.x_test), torch.from_numpy(split.y_test)
            losses = _mse(model, x_t, y_t), _mse(model, x_v, y_v), _mse(model, x_s, y_s)
            charge([index])  # its own final evaluation
            results[index] = TrainResult(
                model=model,
                config=member.config,
                best_epoch=member.best_epoch,
                epochs_run=len(member.history),
                train_loss=losses[0],
                val_loss=losses[1],
                test_loss=losses[2],
                training_time_s=shares[index],  # completed with the others' times at the end
                history=member.history,
                mean_predictor_val_loss=mean_val_loss,
                stack_size=len(configs),
            )

        charge(range(len(configs)))  # the set-up served every member
        for epoch in range(1, first.epochs + 1):
            order = torch.randperm(n_train, generator=shuffle).to(dev)
            x_epoch, y_epoch = x_train_scaled[order], y_train[order]
            squared = torch.empty(len(starts), stack.k, device=dev)
            for i, start in enumerate(starts):
                x = x_epoch[start : start + batch_size]
                drawn = masks.draw(x.shape[0]) if masks.enabled else None
                stack.train_step(x, y_epoch[start : start + batch_size], drawn, squared[i])
            train_losses = (squared.double().sum(dim=0).view(-1) / n_train).tolist()
            val_losses = stack.mse(x_val_scaled, y_val)

            leaving: list[int] = []
            for position, index in enumerate(active):
                member, config = members[index], configs[index]
                train_loss, val_loss = train_losses[position], val_losses[position]
                if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                    results[index] = TrainingError(
                        f"loss became non-finite at epoch {epoch} (train {train_loss}, "
                        f"val {val_loss}) with learning rate {config.learning_rate:g}; "
                        "try a lower learning rate"
                    )
                    leaving.append(position)
                    continue
                stats = EpochStats(epoch, train_loss, val_loss)
                member.history.append(stats)
                if on_epoch is not None:
                    on_epoch(index, stats)
                if val_loss < member.best_val:
                    member.best_val, member.best_epoch = val_loss, epoch
                    member.best_state = stack.member(position)
                elif epoch - member.best_epoch >= config.patience:
                    leaving.append(position)  # stopped early
            charge(active)  # this epoch, shared by the members that trained in it
            for position in leaving:
                if results[active[position]] is None:
                    finish(active[position])
            if leaving:
                if len(leaving) == len(active):
                    active = []
                    break
                stack = stack.without(leaving)
                active = [i for p, i in enumerate(active) if p not in set(leaving)]
                masks.set_members([configs[i].dropout for i in active])
        for index in active:
            finish(index)
    wall = mark - started  # == sum(shares)
    finished: list[TrainResult | TrainingError] = []
    for index, result in enumerate(results):
        assert result is not None
        if isinstance(result, TrainResult):
            result.training_time_s = shares[index]
            result.stack_wall_time_s = wall
        finished.append(result)
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
