"""The calling-score MLP (docs/contract.md): layers, parameter count, output shape, scaling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from calling_score_opt.data import Scaling, Split
from calling_score_opt.model import CallingScoreModel, build_network, count_parameters


def _scaling(n: int = 39, mean: float = 0.0, std: float = 1.0) -> Scaling:
    return Scaling(mean=np.full(n, mean, np.float32), std=np.full(n, std, np.float32))


def test_baseline_has_13441_parameters() -> None:
    network = build_network(39, (128, 64), 0.2)
    assert count_parameters(network) == 13_441
    # the scaling buffers are not parameters
    assert count_parameters(CallingScoreModel(network, _scaling())) == 13_441


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [
        ((256, 128), 39 * 256 + 256 + 256 * 128 + 128 + 128 + 1),
        ((128, 64, 32), 39 * 128 + 128 + 128 * 64 + 64 + 64 * 32 + 32 + 32 + 1),
        ((96, 48), 39 * 96 + 96 + 96 * 48 + 48 + 48 + 1),
        ((256, 128, 64), 39 * 256 + 256 + 256 * 128 + 128 + 128 * 64 + 64 + 64 + 1),
    ],
)
def test_parameter_count_of_other_architectures(hidden: tuple[int, ...], expected: int) -> None:
    assert count_parameters(build_network(39, hidden, 0.2)) == expected


@pytest.mark.parametrize("hidden", [(128, 64), (128, 64, 32), (7,)])
def test_layers_are_linear_relu_dropout_then_linear_sigmoid(hidden: tuple[int, ...]) -> None:
    network = build_network(39, hidden, 0.3)
    expected_types: list[type[nn.Module]] = []
    for _ in hidden:
        expected_types += [nn.Linear, nn.ReLU, nn.Dropout]
    expected_types += [nn.Linear, nn.Sigmoid]
    assert [type(m) for m in network] == expected_types
    linears = [m for m in network if isinstance(m, nn.Linear)]
    widths = [39, *hidden, 1]
    assert [(m.in_features, m.out_features) for m in linears] == list(itertools.pairwise(widths))
    assert all(m.p == 0.3 for m in network if isinstance(m, nn.Dropout))


@pytest.mark.parametrize("n", [1, 5])
def test_output_is_a_flat_batch_of_scores(n: int) -> None:
    torch.manual_seed(0)
    model = CallingScoreModel(build_network(39, (128, 64), 0.2), _scaling()).eval()
    out = model(torch.rand(n, 39))
    assert tuple(out.shape) == (n,)
    assert out.dtype == torch.float32
    assert bool(((out > 0) & (out < 1)).all())


def test_scaling_is_applied_inside_the_model() -> None:
    torch.manual_seed(0)
    network = build_network(39, (16,), 0.0).eval()
    model = CallingScoreModel(network, _scaling(mean=50.0, std=100.0)).eval()
    x = torch.rand(4, 39)
    raw = x * 100 + 50
    with torch.no_grad():
        torch.testing.assert_close(model(raw), network(x).squeeze(-1), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(raw), network(raw).squeeze(-1), atol=1e-3)
    assert {name for name, _ in model.named_buffers()} == {"feature_mean", "feature_std"}
    assert all(not name.startswith("feature_") for name, _ in model.named_parameters())


# --- pair features: |user - spot| per vibe dimension, computed inside the model ------------


def test_pair_features_model_takes_the_39_raw_inputs() -> None:
    from calling_score_opt.model import add_pair_features

    torch.manual_seed(0)
    network = build_network(39 + 12, (16,), 0.0).eval()
    model = CallingScoreModel(network, _scaling(39 + 12), pair_features=True).eval()
    assert model.n_inputs == 39
    x = torch.rand(6, 39)
    pairs = (x[:, :12] - x[:, 12:24]).abs()
    with torch.no_grad():
        out = model(x)
        expected = network(torch.cat([x, pairs], dim=1)).squeeze(-1)
    assert tuple(out.shape) == (6,)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    widened = add_pair_features(x.numpy())
    assert widened.shape == (6, 51)
    assert widened.dtype == np.float32
    np.testing.assert_allclose(widened, torch.cat([x, pairs], dim=1).numpy(), rtol=0, atol=1e-7)
    # the appended inputs are differences: swapping user and spot vibes leaves them unchanged
    swapped = torch.cat([x[:, 12:24], x[:, :12], x[:, 24:]], dim=1)
    torch.testing.assert_close(model.scale(swapped)[:, 39:], model.scale(x)[:, 39:])


def test_pair_features_add_12_inputs_worth_of_weights() -> None:
    network = build_network(39 + 12, (128, 64), 0.2)
    model = CallingScoreModel(network, _scaling(39 + 12), pair_features=True)
    assert count_parameters(model) == 13_441 + 12 * 128


def test_pair_features_need_the_apps_features() -> None:
    from calling_score_opt.data import FEATURE_NAMES
    from calling_score_opt.errors import ConfigError
    from calling_score_opt.model import check_pair_features

    check_pair_features(FEATURE_NAMES)
    check_pair_features(list(FEATURE_NAMES))
    for names in (("a", "b"), FEATURE_NAMES[:38], tuple(reversed(FEATURE_NAMES))):
        with pytest.raises(ConfigError, match="pair_features needs the app's 39 features"):
            check_pair_features(names)


def test_a_trained_pair_features_model_round_trips_through_its_checkpoint(
    tiny_split: Split,
) -> None:
    from calling_score_opt.data import FEATURE_NAMES
    from calling_score_opt.train import TrainConfig, checkpoint_bytes, load_checkpoint, train_model

    result = train_model(tiny_split, TrainConfig(epochs=2, pair_features=True))
    assert result.model.pair_features is True
    assert result.model.n_inputs == 39
    assert tuple(result.model.feature_mean.shape) == (51,)
    assert result.parameters == 13_441 + 12 * 128
    assert result.config.hyperparameters()["pair_features"] is True
    model, config, names = load_checkpoint(checkpoint_bytes(result, FEATURE_NAMES))
    assert config == result.config
    assert model.pair_features is True
    assert names == FEATURE_NAMES
    x = torch.from_numpy(tiny_split.x_test)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x), rtol=0, atol=0)
