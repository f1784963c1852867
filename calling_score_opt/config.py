"""What decides a training run: a frozen configuration of plain values (no PyTorch here).

Kept apart from train.py so that commands that only read stored trials (export, best, the
registry) know a trial's configuration without importing PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from calling_score_opt.errors import ConfigError

PATIENCE = 10


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's result (the seed included)."""

    learning_rate: float = 0.001
    batch_size: int = 32
    hidden_sizes: tuple[int, ...] = (128, 64)
    dropout: float = 0.2
    epochs: int = 100
    patience: int = PATIENCE
    seed: int = 0
    pair_features: bool = False  # append |user - spot| per vibe dimension inside the model

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ConfigError(f"hidden sizes must be positive widths, got {self.hidden_sizes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.epochs < 1 or self.patience < 1:
            raise ConfigError(
                f"epochs and patience must be >= 1, got {self.epochs}, {self.patience}"
            )

    def hyperparameters(self) -> dict[str, Any]:
        """The searchable settings, as JSON-friendly values."""
        values: dict[str, Any] = {
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "hidden_sizes": list(self.hidden_sizes),
            "dropout": self.dropout,
        }
        if self.pair_features:
            values["pair_features"] = True
        return values

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["hidden_sizes"] = list(self.hidden_sizes)
        return values
