"""The calling-score MLP (CONTRACTS §2) with its feature scaling inside, as the app runs it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from calling_score_opt.data import Scaling


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

    def __init__(self, network: nn.Sequential, scaling: Scaling) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("feature_mean", torch.from_numpy(np.array(scaling.mean)))
        self.register_buffer("feature_std", torch.from_numpy(np.array(scaling.std)))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.feature_mean) / self.feature_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # squeeze(-1), not flatten: [N, 1] -> [N] keeps N = 1 a list of one score (CONTRACTS §3)
        out: torch.Tensor = self.network(self.scale(x)).squeeze(-1)
        return out


def count_parameters(module: nn.Module) -> int:
    """Trainable weights and biases (13,441 for 39 inputs and hidden sizes [128, 64])."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
