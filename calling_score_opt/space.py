"""What can be tried: the documented grid's values and its 15 named variants (docs/contract.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from calling_score_opt.config import TrainConfig
from calling_score_opt.errors import ConfigError
from calling_score_opt.study import BASELINE_VARIANT

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

BASELINE_NAME = BASELINE_VARIANT

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


SPACES = ("continuous", "grid")
PAIR_FEATURES_MODES = ("search", "on", "off")


def suggest_config(
    trial: optuna.Trial, space: str, epochs: int, seed: int, pair_features: str = "search"
) -> TrainConfig:
    """Ask ``trial`` for a configuration from ``space``; the only place that calls suggest_*.

    ``grid``: the documented values as choices. ``continuous``: learning rate log-uniform in
    [1e-4, 1e-2], batch 16-128, 1-3 hidden layers of 16-512 units (log scale), dropout 0-0.5.
    ``pair_features`` is searched (``search``), forced on (``on``) or left out (``off``).
    """
    if space == "grid":
        lr = trial.suggest_categorical("learning_rate", GRID_CHOICES["learning_rate"])
        batch = trial.suggest_categorical("batch_size", GRID_CHOICES["batch_size"])
        hidden = parse_hidden_sizes(
            trial.suggest_categorical("hidden_sizes", GRID_CHOICES["hidden_sizes"])
        )
        dropout = trial.suggest_categorical("dropout", GRID_CHOICES["dropout"])
    elif space == "continuous":
        lr = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
        batch = trial.suggest_categorical("batch_size", GRID_CHOICES["batch_size"])
        layers = trial.suggest_int("n_layers", 1, 3)
        hidden = tuple(trial.suggest_int(f"units_l{i}", 16, 512, log=True) for i in range(layers))
        dropout = trial.suggest_float("dropout", 0.0, 0.5)
    else:
        raise ConfigError(f"--space must be one of {', '.join(SPACES)}, got {space!r}")
    pairs = pair_features == "on"
    if pair_features == "search":
        pairs = trial.suggest_categorical("pair_features", (False, True))
    return TrainConfig(
        learning_rate=lr,
        batch_size=batch,
        hidden_sizes=hidden,
        dropout=dropout,
        epochs=epochs,
        seed=seed,
        pair_features=pairs,
    )


def baseline_params(space: str, pair_features: str = "search") -> dict[str, Any]:
    """The v1.0 baseline as parameters of ``space``: every search starts from it."""
    base = VARIANTS[0]
    params: dict[str, Any]
    if space == "grid":
        params = base.params()
    else:
        params = {
            "learning_rate": base.learning_rate,
            "batch_size": base.batch_size,
            "n_layers": len(base.hidden_sizes),
            **{f"units_l{i}": size for i, size in enumerate(base.hidden_sizes)},
            "dropout": base.dropout,
        }
    if pair_features == "search":
        params["pair_features"] = False
    return params
