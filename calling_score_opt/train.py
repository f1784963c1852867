"""One training run: Adam on MSE, early stopping on validation loss, best weights restored.

The trainer knows nothing about Optuna or the CLI: it takes a :class:`TrainConfig`, a
:class:`~calling_score_opt.data.Split` and an optional per-epoch callback (which may raise to stop
the run, which is how a search prunes a trial).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calling_score_opt.config import TrainConfig as TrainConfig  # re-exported
from calling_score_opt.data import Array, Scaling, Split
from calling_score_opt.errors import ConfigError, TrainingError
from calling_score_opt.model import (
    CallingScoreModel,
    add_pair_features,
    build_network,
    count_parameters,
)
from calling_score_opt.stats import mean_predictor_loss as mean_predictor_loss  # re-exported
from calling_score_opt.stats import no_better_than_mean as no_better_than_mean  # re-exported
from calling_score_opt.weights import MlpWeights


@dataclass(frozen=True)
class EpochStats:
    """Losses after one epoch (1-based); ``train_loss``: exact mean over the epoch's samples."""

    epoch: int
    train_loss: float
    val_loss: float


EpochCallback = Callable[[EpochStats], None]


@dataclass
class TrainResult:
    """A finished run: the best epoch's model (eval mode, on the CPU) and its exact losses."""

    model: CallingScoreModel
    config: TrainConfig
    best_epoch: int
    epochs_run: int
    train_loss: float  # all three: exact per-sample MSE of the restored model, eval mode
    val_loss: float
    test_loss: float
    #: Trained alone: the run's wall time. Trained in a stack (``stacked.train_stacked``): this
    #: member's share of the stack's wall time (each epoch's time split among the members still
    #: training in it), so the shares of one stack add up to its wall time.
    training_time_s: float
    history: list[EpochStats] = field(default_factory=list)
    #: The validation MSE of predicting the training labels' mean for every record: a model
    #: that does no better has learned nothing (see :func:`mean_predictor_loss`).
    mean_predictor_val_loss: float = math.nan
    #: How many runs trained together in this one's stack (1: alone), and the stack's wall time.
    stack_size: int = 1
    stack_wall_time_s: float | None = None  # None: trained alone (training_time_s is the wall)

    @property
    def parameters(self) -> int:
        return count_parameters(self.model)

    @property
    def no_better_than_mean(self) -> bool:
        """Whether the model predicts no better than a constant, the training labels' mean."""
        return no_better_than_mean(self.val_loss, self.mean_predictor_val_loss)

    def metrics(self) -> dict[str, float | int]:
        """The run's figures as stored with trials and in ONNX metadata (test loss included:
        recorded for people, never used to choose)."""
        return {
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "test_loss": self.test_loss,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "training_time_s": self.training_time_s,
            "parameters": self.parameters,
        }

    def predict(self, x: Array) -> Array:
        """Scores for raw features ``x`` (float32, ``[N]``)."""
        with torch.no_grad():
            out: Array = self.model(torch.from_numpy(x)).numpy()
        return out


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available) as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    # On these tiny matrices one thread is faster than two, and it makes results independent of
    # how many threads (or worker processes) happen to be in use.
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - y).double() ** 2).mean())


def train_model(
    split: Split,
    config: TrainConfig,
    device: str = "cpu",
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train one model on ``split`` and return it with the best validation epoch's weights.

    Raises:
        TrainingError: the loss became non-finite (diverged).
        ConfigError: the device is not available.
    """
    dev = resolve_device(device)
    started = time.perf_counter()
    with _single_thread(dev):
        torch.manual_seed(config.seed)  # weights and dropout masks
        shuffle = torch.Generator().manual_seed(config.seed)  # batch order, apart from dropout

        x_fit = add_pair_features(split.x_train) if config.pair_features else split.x_train
        scaling = Scaling.fit(x_fit)  # training split only
        network = build_network(x_fit.shape[1], config.hidden_sizes, config.dropout)
        model = CallingScoreModel(network, scaling, config.pair_features).to(dev)

        def tensors(x: Array, y: Array) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)

        x_train, y_train = tensors(split.x_train, split.y_train)
        x_val, y_val = tensors(split.x_val, split.y_val)
        # The network trains on pre-scaled inputs: the same arithmetic as the model's own
        # scaling, done once instead of at every step.
        x_train_scaled = model.scale(x_train)
        x_val_scaled = model.scale(x_val)

        optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate, fused=True)
        n_train = len(y_train)
        best_val, best_epoch = math.inf, 0
        best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        history: list[EpochStats] = []
        for epoch in range(1, config.epochs + 1):
            network.train()
            order = torch.randperm(n_train, generator=shuffle).to(dev)
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            for start in range(0, n_train, config.batch_size):
                batch = order[start : start + config.batch_size]
                pred = network(x_train_scaled[batch]).squeeze(-1)
                loss = F.mse_loss(pred, y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                loss_sum += loss.detach() * len(batch)  # stays on the device: no sync per batch
            network.eval()
            train_loss = float(loss_sum) / n_train
            val_loss = _mse(network, x_val_scaled, y_val.unsqueeze(-1))
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                raise TrainingError(
                    f"loss became non-finite at epoch {epoch} (train {train_loss}, val {val_loss}) "
                    f"with learning rate {config.learning_rate:g}; try a lower learning rate"
                )
            stats = EpochStats(epoch, train_loss, val_loss)
            history.append(stats)
            if on_epoch is not None:
                on_epoch(stats)
            if val_loss < best_val:
                best_val, best_epoch = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
            elif epoch - best_epoch >= config.patience:
                break

        network.load_state_dict(best_state)
        model = model.cpu().eval()
        x_t, y_t = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
        x_v, y_v = torch.from_numpy(split.x_val), torch.from_numpy(split.y_val)
        x_s, y_s = torch.from_numpy(split.x_test), torch.from_numpy(split.y_test)
        result = TrainResult(
            model=model,
            config=config,
            best_epoch=best_epoch,
            epochs_run=len(history),
            train_loss=_mse(model, x_t, y_t),
            val_loss=_mse(model, x_v, y_v),
            test_loss=_mse(model, x_s, y_s),
            training_time_s=time.perf_counter() - started,
            history=history,
            mean_predictor_val_loss=mean_predictor_loss(split),
        )
    return result


def prediction_errors(
    result: TrainResult, x: Array, y: Array
) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Per-sample squared errors of ``result`` on ``(x, y)`` (for paired comparisons)."""
    return (result.predict(x).astype(np.float64) - y.astype(np.float64)) ** 2


def checkpoint_bytes(result: TrainResult, feature_names: tuple[str, ...]) -> bytes:
    """The trained model as a file that carries its configuration and scaling (weights.py)."""
    from calling_score_opt.model import weights_of
    from calling_score_opt.weights import checkpoint_bytes as weights_checkpoint

    weights = weights_of(result.model)
    assert isinstance(weights, MlpWeights)
    return weights_checkpoint(weights, result.config, feature_names)


def model_of(weights: MlpWeights, config: TrainConfig) -> CallingScoreModel:
    """A PyTorch model (eval mode) holding stored weights, for code that trains or compares."""
    network = build_network(int(weights.feature_mean.shape[0]), config.hidden_sizes, config.dropout)
    linears = [m for m in network if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for linear, (weight, bias) in zip(linears, weights.layers, strict=True):
            linear.weight.copy_(torch.from_numpy(weight))
            linear.bias.copy_(torch.from_numpy(bias))
    scaling = Scaling(mean=weights.feature_mean, std=weights.feature_std)
    return CallingScoreModel(network, scaling, config.pair_features).eval()


def load_checkpoint(data: bytes) -> tuple[CallingScoreModel, TrainConfig, tuple[str, ...]]:
    """Rebuild the PyTorch model (eval mode), its configuration and feature names.

    Commands that only score or export use :func:`weights.read_checkpoint_bytes` instead.
    """
    from calling_score_opt.weights import read_checkpoint_bytes

    stored = read_checkpoint_bytes(data)
    return model_of(stored.weights, stored.config), stored.config, stored.feature_names
