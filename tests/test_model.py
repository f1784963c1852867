"""The calling-score MLP (CONTRACTS §2): layers, parameter count, output shape, scaling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from calling_score_opt.data import Scaling
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
