"""Trained weights as NumPy arrays: what a checkpoint holds, what export writes, what scores.

A trained model is a few small matrices: the training split's scaling, then Linear -> ReLU
blocks and a Linear -> Sigmoid head. Everything that only *uses* a trained model (export, the
parity check, ``cso best``, the report, the registry) works on :class:`MlpWeights` and never
imports PyTorch, which costs seconds to import while these commands need well under one.
Training (train.py, stacked.py) stays in PyTorch and converts at the end (model.weights_of).

The checkpoint is a NumPy ``.npz`` archive (no pickle): the arrays, plus the configuration and
feature names as JSON.
"""

from __future__ import annotations

import io
import itertools
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from calling_score_opt.config import TrainConfig
from calling_score_opt.data import Array, constant_columns
from calling_score_opt.errors import TrainingError

CHECKPOINT_FORMAT = "cso-checkpoint/2"
LEGACY_CHECKPOINT_FORMAT = "cso-checkpoint/1"  # torch.save of the same content (cso <= 0.x)

#: pair_features: |user - spot| for each of the 12 vibe dimensions (columns 0-11 vs 12-23), the
#: differences the app's own formula scores compatibility from.
N_VIBE_DIMENSIONS = 12

Layer = tuple[Array, Array]  # (weight [out, in], bias [out]), as torch.nn.Linear stores them


def add_pair_features(x: Array) -> Array:
    """Raw features with |user - spot| per vibe dimension appended (what the model computes)."""
    n = N_VIBE_DIMENSIONS
    pairs = np.abs(x[:, :n] - x[:, n : 2 * n])
    return np.concatenate([x, pairs], axis=1).astype(np.float32)


def _sigmoid(z: Array) -> Array:
    e = np.exp(-np.abs(z))  # never overflows: a saturated unit gives 0 or 1, not a warning
    out: Array = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)
    return out


@dataclass(frozen=True)
class MlpWeights:
    """One trained network: raw features ``[N, F]`` in, calling score ``[N]`` out.

    ``feature_mean`` / ``feature_std`` cover the network's inputs: the raw features, then with
    ``pair_features`` the twelve ``|user - spot|`` vibe differences appended to them.
    """

    feature_mean: Array
    feature_std: Array
    layers: tuple[Layer, ...]
    pair_features: bool = False
    #: Raw inputs held at a fixed value whatever is fed (see :meth:`pinning`): (keep, fill),
    #: the input becomes ``x * keep + fill``; None: every input is used as fed.
    pins: tuple[Array, Array] | None = None

    @property
    def n_inputs(self) -> int:
        """Raw features the model takes (39 for the app's model)."""
        return int(self.feature_mean.shape[0]) - (N_VIBE_DIMENSIONS if self.pair_features else 0)

    @property
    def parameters(self) -> int:
        """Weights and biases (13,441 for 39 inputs and hidden sizes [128, 64])."""
        return sum(int(w.size + b.size) for w, b in self.layers)

    def scaled(self, x: Array) -> Array:
        """The network's input: raw features (plus pair features), standardised."""
        x = np.ascontiguousarray(x, np.float32)
        if self.pins is not None:
            keep, fill = self.pins
            x = x * keep + fill
        if self.pair_features:
            x = add_pair_features(x)
        out: Array = (x - self.feature_mean) / self.feature_std
        return out

    def predict(self, x: Array) -> Array:
        """Scores of raw features ``x`` (float32 ``[N]``), computed as the ONNX graph does."""
        h = self.scaled(x)
        for index, (weight, bias) in enumerate(self.layers):
            h = h @ weight.T + bias
            h = _sigmoid(h) if index == len(self.layers) - 1 else np.maximum(h, 0, dtype=np.float32)
        scores: Array = h[:, 0]
        return scores

    def pinning(self, columns: Sequence[int], values: Array) -> MlpWeights:
        """These weights with raw inputs ``columns`` held at ``values`` whatever is fed.

        What zeroing first-layer weights (:meth:`ignoring`) cannot do alone when the network
        also sees ``|user - spot|`` differences: a pinned vibe input must not reach those either.
        """
        keep = np.ones(self.n_inputs, np.float32)
        fill = np.zeros(self.n_inputs, np.float32)
        keep[list(columns)] = 0.0
        fill[list(columns)] = values
        return replace(self, pins=(keep, fill)) if columns else self

    def ignoring(self, columns: Sequence[int]) -> MlpWeights:
        """These weights with the first layer's weights from network inputs ``columns`` zeroed.

        A column the training data held constant reaches the network as 0 in every training
        record, so its weights kept their random initial values and never mattered: zeroing them
        changes no score on training-like inputs, and makes whatever the app sends there count
        for nothing instead of for noise.
        """
        if not columns:
            return self
        weight, bias = self.layers[0]
        weight = weight.copy()
        weight[:, list(columns)] = 0.0
        return replace(self, layers=((weight, bias), *self.layers[1:]))


@dataclass(frozen=True)
class EnsembleWeights:
    """Several trained networks as one: the weighted mean of their scores.

    Each member keeps its own scaling; the weights are positive and sum to 1, so the output
    stays a score in [0, 1].
    """

    members: tuple[MlpWeights, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.members or len(self.members) != len(self.weights):
            raise ValueError("an ensemble needs one weight per member, and at least one member")
        if len({m.n_inputs for m in self.members}) != 1:
            raise ValueError("every member of an ensemble must take the same inputs")
        if min(self.weights) <= 0 or abs(sum(self.weights) - 1.0) > 1e-6:
            raise ValueError(f"ensemble weights must be positive and sum to 1, got {self.weights}")

    @property
    def n_inputs(self) -> int:
        return self.members[0].n_inputs

    @property
    def parameters(self) -> int:
        return sum(m.parameters for m in self.members)

    def predict(self, x: Array) -> Array:
        total = np.zeros(len(x), dtype=np.float32)
        for weight, member in zip(self.weights, self.members, strict=True):
            total = total + np.float32(weight) * member.predict(x)
        return total

    def ignoring(self, columns: Sequence[int]) -> EnsembleWeights:
        return replace(self, members=tuple(m.ignoring(columns) for m in self.members))


Weights = MlpWeights | EnsembleWeights


def never_learned_columns(x_train: Array, pair_features: bool = False) -> tuple[int, ...]:
    """Network inputs the training split holds constant (with pair features: of the widened
    input), which a model trained on it never learns."""
    x = np.asarray(x_train, np.float32)
    return constant_columns(add_pair_features(x) if pair_features else x)


@dataclass(frozen=True)
class Checkpoint:
    """A stored trial: its weights, the configuration that trained them, its input names."""

    weights: MlpWeights
    config: TrainConfig
    feature_names: tuple[str, ...]


def checkpoint_bytes(
    weights: MlpWeights, config: TrainConfig, feature_names: Sequence[str]
) -> bytes:
    """The weights as a file that carries its configuration, scaling and input names."""
    header = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "feature_names": list(feature_names),
        "layers": len(weights.layers),
    }
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
        "feature_mean": weights.feature_mean,
        "feature_std": weights.feature_std,
    }
    for index, (weight, bias) in enumerate(weights.layers):
        arrays[f"layer{index}_weight"] = weight
        arrays[f"layer{index}_bias"] = bias
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def _legacy_checkpoint(data: bytes) -> Checkpoint:
    """A checkpoint written with torch.save by earlier cso releases (needs PyTorch)."""
    import torch

    payload = torch.load(io.BytesIO(data), weights_only=True)
    if payload.get("format") != LEGACY_CHECKPOINT_FORMAT:
        raise ValueError(f"format {payload.get('format')!r}")
    network = payload["network"]
    n_layers = len(network) // 2
    layers = tuple(
        (
            network[key + ".weight"].numpy().astype(np.float32),
            network[key + ".bias"].numpy().astype(np.float32),
        )
        for key in sorted({k.rsplit(".", 1)[0] for k in network}, key=int)
    )
    if len(layers) != n_layers:
        raise ValueError("the network's weights and biases do not pair up")
    return _checkpoint(
        payload["config"],
        payload["feature_names"],
        payload["feature_mean"].numpy(),
        payload["feature_std"].numpy(),
        layers,
    )


def _checkpoint(
    config_values: dict[str, Any],
    feature_names: Sequence[str],
    mean: Array,
    std: Array,
    layers: tuple[Layer, ...],
) -> Checkpoint:
    values = dict(config_values)
    values["hidden_sizes"] = tuple(values["hidden_sizes"])
    config = TrainConfig(**values)
    widths = [int(mean.shape[0]), *config.hidden_sizes, 1]
    shapes = [(w.shape, b.shape) for w, b in layers]
    expected = [((out, inp), (out,)) for inp, out in itertools.pairwise(widths)]
    if shapes != expected or std.shape != mean.shape:
        raise ValueError(f"layer shapes {shapes} do not match the configuration's {expected}")
    weights = MlpWeights(
        np.asarray(mean, np.float32), np.asarray(std, np.float32), layers, config.pair_features
    )
    return Checkpoint(weights, config, tuple(str(n) for n in feature_names))


def read_checkpoint_bytes(data: bytes) -> Checkpoint:
    """The weights, configuration and input names stored in a checkpoint.

    Raises:
        TrainingError: the bytes are no checkpoint cso can read (damaged, foreign, unknown).
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if "header" not in archive.files:
                return _legacy_checkpoint(data)  # torch.save writes a zip too, without these
            header = json.loads(archive["header"].tobytes().decode())
            if header.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {header.get('format')!r}")
            layers = tuple(
                (
                    archive[f"layer{i}_weight"].astype(np.float32),
                    archive[f"layer{i}_bias"].astype(np.float32),
                )
                for i in range(int(header["layers"]))
            )
            return _checkpoint(
                header["config"],
                header["feature_names"],
                archive["feature_mean"],
                archive["feature_std"],
                layers,
            )
    except (zipfile.BadZipFile, ValueError, KeyError, TypeError, OSError, EOFError) as exc:
        raise TrainingError(f"stored weights cannot be read ({exc}); retrain the trial") from exc
    except Exception as exc:  # torch.load of a foreign file fails in many ways
        raise TrainingError(f"stored weights cannot be read ({exc}); retrain the trial") from exc
