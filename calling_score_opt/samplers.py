"""Optuna samplers and pruners by their CLI names, seeded so that no two trials share a draw.

A sampler seeded once per process replays the same random draws in every process that starts
with that seed: a resumed study, each ``--jobs`` worker and each machine on a shared study would
propose the configurations the study already holds, and training is deterministic, so those
trials are exact, wasted copies that also skew TPE. Instead, every trial's draws come from a
sampler seeded with ``(--seed, trial number)``: trial numbers are unique within a study, so no
two trials share a stream, and a fresh study run with the same seed still proposes the same
configurations.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

SAMPLERS = ("tpe", "gp", "cmaes", "random")
PRUNERS = ("median", "hyperband", "none")


def trial_seed(seed: int, trial_number: int) -> int:
    """The sampler seed of one trial: a 32-bit digest of ``(seed, trial_number)``."""
    digest = hashlib.sha256(f"cso-sampler:{seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _new_sampler(name: str, seed: int) -> BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # CMA-ES: categorical params fall back
        if name == "tpe":
            # constant_liar: a running trial counts as a poor result, so workers sharing a study
            # spread out instead of all proposing the current favourite.
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(
                seed=seed,
                independent_sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True),
                warn_independent_sampling=False,  # categorical batch sizes: expected, not news
            )
        return optuna.samplers.RandomSampler(seed=seed)


class PerTrialSeededSampler(BaseSampler):
    """Delegates to a sampler of one kind that is seeded anew for every trial by its number.

    Optuna calls :meth:`before_trial` with the trial's number before it samples anything for
    that trial, which is where the inner sampler is replaced. The samplers cso offers keep no
    state between trials that a fresh instance would lose (TPE, GP and random read the study;
    CMA-ES restores its state from the trials' system attributes).
    """

    def __init__(self, name: str, seed: int) -> None:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}")
        self.name = name
        self._seed = seed
        self._factory: Callable[[int], BaseSampler] = lambda s: _new_sampler(name, s)
        self._inner = self._factory(trial_seed(seed, -1))

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._inner = self._factory(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # the seed comes from the trial number, by design
        pass


def make_sampler(name: str, seed: int) -> BaseSampler:
    """The sampler ``name`` (tpe, gp, cmaes, random), its draws seeded per trial from ``seed``."""
    return PerTrialSeededSampler(name, seed)


#: The median pruner waits for this many complete trials, and this many epochs of each trial.
MEDIAN_STARTUP_TRIALS = 5
MEDIAN_WARMUP_EPOCHS = 5


def pruner_startup_trials(name: str) -> int:
    """How many complete trials the pruner ``name`` waits for before it prunes anything."""
    return MEDIAN_STARTUP_TRIALS if name == "median" else 0


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """Median (after 5 trials and 5 epochs), Hyperband over epochs, or none."""
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=MEDIAN_WARMUP_EPOCHS
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=3, max_resource=epochs)
    return optuna.pruners.NopPruner()
