"""What can be tried: the documented grid's values and its 15 named variants (CONTRACTS §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from calling_score_opt.errors import ConfigError
from calling_score_opt.train import TrainConfig

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

BASELINE_NAME = "v1_0_baseline"

#: The documented values of each hyperparameter (hidden sizes as "128,64" strings, so they can
#: be Optuna categorical choices and read back from the ``optuna`` CLI).
GRID_CHOICES: dict[str, tuple[Any, ...]] = {
    "learning_rate": (0.0001, 0.0005, 0.001, 0.002, 0.005),
    "batch_size": (16, 32, 64, 128),
    "hidden_sizes": ("128,64", "256,128", "128,64,32", "96,48", "256,128,64"),
    "dropout": (0.1, 0.2, 0.3, 0.4),
}


def format_hidden_sizes(sizes: tuple[int, ...]) -> str:
    return ",".join(str(s) for s in sizes)


def parse_hidden_sizes(text: str) -> tuple[int, ...]:
    """``"256,128,64"`` -> ``(256, 128, 64)``; a clear ConfigError for anything else."""
    try:
        sizes = tuple(int(part) for part in text.replace(" ", "").strip("[]").split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ConfigError(
            f"hidden sizes {text!r} are not positive integers separated by commas, "
            'e.g. "256,128,64"'
        )
    return sizes


@dataclass(frozen=True)
class Variant:
    """One named point of the documented grid: all four hyperparameters, applied."""

    name: str
    learning_rate: float = 0.001
    batch_size: int = 32
    hidden_sizes: tuple[int, ...] = (128, 64)
    dropout: float = 0.2

    def train_config(self, epochs: int, seed: int) -> TrainConfig:
        return TrainConfig(
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            hidden_sizes=self.hidden_sizes,
            dropout=self.dropout,
            epochs=epochs,
            seed=seed,
        )

    def params(self) -> dict[str, Any]:
        """The variant as Optuna trial parameters (see :data:`GRID_CHOICES`)."""
        return {
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "hidden_sizes": format_hidden_sizes(self.hidden_sizes),
            "dropout": self.dropout,
        }


#: The 15 variants in the documented order; ``--max-variants N`` takes the first N.
VARIANTS: tuple[Variant, ...] = (
    Variant(BASELINE_NAME),
    *(Variant(f"v1_1_lr_{lr}", learning_rate=lr) for lr in (0.0001, 0.0005, 0.002, 0.005)),
    *(Variant(f"v1_1_batch_{b}", batch_size=b) for b in (16, 64, 128)),
    Variant("v1_1_arch_wider", hidden_sizes=(256, 128)),
    Variant("v1_1_arch_deeper", hidden_sizes=(128, 64, 32)),
    Variant("v1_1_arch_smaller", hidden_sizes=(96, 48)),
    Variant("v1_1_arch_wide_deep", hidden_sizes=(256, 128, 64)),
    *(Variant(f"v1_1_dropout_{d}", dropout=d) for d in (0.1, 0.3, 0.4)),
)


def grid_distributions() -> dict[str, BaseDistribution]:
    """Optuna distributions over the documented values (shared by the grid and the search)."""
    from optuna.distributions import CategoricalDistribution

    return {name: CategoricalDistribution(choices) for name, choices in GRID_CHOICES.items()}
