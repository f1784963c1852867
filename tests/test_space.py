"""The documented grid (docs/contract.md): 15 named variants, in order, one factor at a time."""

from __future__ import annotations

import pytest

from calling_score_opt.errors import ConfigError
from calling_score_opt.space import (
    BASELINE_NAME,
    GRID_CHOICES,
    VARIANTS,
    grid_distributions,
    parse_hidden_sizes,
)
from calling_score_opt.train import TrainConfig

#: docs/contract.md, row by row: (name, learning rate, batch, hidden sizes, dropout).
DOCUMENTED = [
    ("v1_0_baseline", 0.001, 32, (128, 64), 0.2),
    ("v1_1_lr_0.0001", 0.0001, 32, (128, 64), 0.2),
    ("v1_1_lr_0.0005", 0.0005, 32, (128, 64), 0.2),
    ("v1_1_lr_0.002", 0.002, 32, (128, 64), 0.2),
    ("v1_1_lr_0.005", 0.005, 32, (128, 64), 0.2),
    ("v1_1_batch_16", 0.001, 16, (128, 64), 0.2),
    ("v1_1_batch_64", 0.001, 64, (128, 64), 0.2),
    ("v1_1_batch_128", 0.001, 128, (128, 64), 0.2),
    ("v1_1_arch_wider", 0.001, 32, (256, 128), 0.2),
    ("v1_1_arch_deeper", 0.001, 32, (128, 64, 32), 0.2),
    ("v1_1_arch_smaller", 0.001, 32, (96, 48), 0.2),
    ("v1_1_arch_wide_deep", 0.001, 32, (256, 128, 64), 0.2),
    ("v1_1_dropout_0.1", 0.001, 32, (128, 64), 0.1),
    ("v1_1_dropout_0.3", 0.001, 32, (128, 64), 0.3),
    ("v1_1_dropout_0.4", 0.001, 32, (128, 64), 0.4),
]


def test_exactly_the_15_documented_variants_in_order() -> None:
    actual = [(v.name, v.learning_rate, v.batch_size, v.hidden_sizes, v.dropout) for v in VARIANTS]
    assert actual == DOCUMENTED
    assert VARIANTS[0].name == BASELINE_NAME


def test_variant_train_config_carries_everything() -> None:
    variant = VARIANTS[11]  # v1_1_arch_wide_deep
    config = variant.train_config(epochs=7, seed=3)
    assert config == TrainConfig(
        learning_rate=0.001,
        batch_size=32,
        hidden_sizes=(256, 128, 64),
        dropout=0.2,
        epochs=7,
        seed=3,
    )
    assert config.patience == 10


def test_variant_params_are_optuna_choices() -> None:
    distributions = grid_distributions()
    assert set(distributions) == {"learning_rate", "batch_size", "hidden_sizes", "dropout"}
    for variant in VARIANTS:
        params = variant.params()
        for name, value in params.items():
            assert value in GRID_CHOICES[name]
            assert value in distributions[name].choices  # type: ignore[attr-defined]
    assert VARIANTS[9].params()["hidden_sizes"] == "128,64,32"
    assert parse_hidden_sizes(VARIANTS[9].params()["hidden_sizes"]) == (128, 64, 32)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("256,128,64", (256, 128, 64)), ("[128, 64]", (128, 64)), ("7", (7,)), (" 96, 48", (96, 48))],
)
def test_parse_hidden_sizes(text: str, expected: tuple[int, ...]) -> None:
    assert parse_hidden_sizes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "128,,64", "128,0", "-1", "1.5"])
def test_parse_hidden_sizes_rejects_garbage(text: str) -> None:
    with pytest.raises(ConfigError, match="not positive integers"):
        parse_hidden_sizes(text)
