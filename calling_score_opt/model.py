"""The calling-score MLP (docs/contract.md) with its feature scaling inside, as the app runs it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from calling_score_opt.data import FEATURE_NAMES, Array, Scaling
from calling_score_opt.weights import N_VIBE_DIMENSIONS as N_VIBE_DIMENSIONS  # re-exported
from calling_score_opt.weights import EnsembleWeights, MlpWeights
from calling_score_opt.weights import add_pair_features as add_pair_features  # re-exported


def check_pair_features(feature_names: Sequence[str]) -> None:
    """Raise ConfigError unless the data has the app's 39 inputs (pair features need them)."""
    from calling_score_opt.errors import ConfigError

    if tuple(feature_names) != FEATURE_NAMES:
        raise ConfigError(
            "pair_features needs the app's 39 features (user and spot vibe dimensions); "
            "this data has other columns"
        )


def build_network(n_features: int, hidden_sizes: Sequence[int], dropout: float) -> nn.Sequential:
    """For each hidden size Linear -> ReLU -> Dropout; then Linear -> Sigmoid (one output)."""
    layers: list[nn.Module] = []
    width = n_features
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers += [nn.Linear(width, 1), nn.Sigmoid()]
    return nn.Sequential(*layers)


class CallingScoreModel(nn.Module):
    """Raw features ``[N, F]`` in, calling score ``[N]`` out: the network behind the scaling.

    The scaling statistics are buffers, not parameters: they travel into the ONNX graph (the
    app feeds raw features) but are never trained.
    """

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(
        self, network: nn.Sequential, scaling: Scaling, pair_features: bool = False
    ) -> None:
        super().__init__()
        self.network = network
        self.pair_features = pair_features
        # With pair features the scaling covers the 12 appended differences too.
        self.register_buffer("feature_mean", torch.from_numpy(np.array(scaling.mean)))
        self.register_buffer("feature_std", torch.from_numpy(np.array(scaling.std)))

    @property
    def n_inputs(self) -> int:
        """Raw features the model takes (39 for the app's model)."""
        extra = N_VIBE_DIMENSIONS if self.pair_features else 0
        return int(self.feature_mean.shape[0]) - extra

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.pair_features:
            n = N_VIBE_DIMENSIONS
            x = torch.cat([x, (x[:, :n] - x[:, n : 2 * n]).abs()], dim=1)
        return (x - self.feature_mean) / self.feature_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # squeeze(-1), not flatten: [N, 1] -> [N] keeps N = 1 a list of one score (docs/contract.md)
        out: torch.Tensor = self.network(self.scale(x)).squeeze(-1)
        return out


class EnsembleModel(nn.Module):
    """Several calling-score models as one: the weighted mean of their scores.

    Each member keeps its own scaling (and pair features), so members trained on different
    settings combine as they are; the weights are positive and sum to 1, so the output stays a
    score in [0, 1].
    """

    def __init__(self, members: Sequence[CallingScoreModel], weights: Sequence[float]) -> None:
        super().__init__()
        if not members or len(members) != len(weights):
            raise ValueError("an ensemble needs one weight per member, and at least one member")
        if len({m.n_inputs for m in members}) != 1:
            raise ValueError("every member of an ensemble must take the same inputs")
        if min(weights) <= 0 or abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"ensemble weights must be positive and sum to 1, got {weights}")
        self.members = nn.ModuleList(members)
        self.weights = tuple(float(w) for w in weights)

    @property
    def n_inputs(self) -> int:
        first: CallingScoreModel = self.members[0]  # type: ignore[assignment]
        return first.n_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for weight, member in zip(self.weights, self.members, strict=True):
            total = total + weight * member(x)
        return total


def count_parameters(module: nn.Module) -> int:
    """Trainable weights and biases (13,441 for 39 inputs and hidden sizes [128, 64])."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def weights_of(model: CallingScoreModel | EnsembleModel) -> MlpWeights | EnsembleWeights:
    """The trained weights as NumPy arrays (what checkpoints store and export writes)."""
    if isinstance(model, EnsembleModel):
        members = tuple(weights_of(m) for m in model.members)  # type: ignore[arg-type]
        return EnsembleWeights(members, model.weights)  # type: ignore[arg-type]

    def numpy(tensor: torch.Tensor) -> Array:
        out: Array = tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        return out

    from calling_score_opt.errors import ExportError

    layers = []
    for module in model.network:  # Linear -> ReLU -> Dropout ..., Linear -> Sigmoid
        if isinstance(module, nn.Linear):
            layers.append((numpy(module.weight), numpy(module.bias)))
        elif not isinstance(module, nn.ReLU | nn.Dropout | nn.Sigmoid):
            raise ExportError(f"cannot export layer {type(module).__name__}: not part of the MLP")
    kinds = [type(m) for m in model.network if not isinstance(m, nn.Dropout)]
    if kinds != [nn.Linear, nn.ReLU] * (len(layers) - 1) + [nn.Linear, nn.Sigmoid]:
        raise ExportError("cannot export the network: it is not Linear/ReLU blocks and a sigmoid")
    return MlpWeights(
        numpy(model.feature_mean), numpy(model.feature_std), tuple(layers), model.pair_features
    )
