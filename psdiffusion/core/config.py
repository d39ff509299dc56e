"""Hyperparameters of power sampling, as a frozen dataclass with named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

ESTIMATORS = ("plain", "jackknife")
ROLLOUT_PROPOSALS = ("base", "tempered")
SELECTIONS = ("sample", "argmax")


@dataclass(frozen=True)
class PowerSamplingConfig:
    """Power sampling hyperparameters.

    The target over whole trajectories is ``pi(tau) ∝ p(tau)^alpha * exp(r(tau) / lam)``,
    where ``p`` is the base model at ``temperature``.

    Args:
        num_candidates: K, candidates proposed at each decision.
        num_rollouts: M, rollouts per candidate. With ``max_rollouts`` set, the
            first round's M and the size of every further round.
        rollout_length: length of each rollout, in tokens (LM) or denoising steps
            (diffusion). ``None`` rolls out to the end of the sequence.
        alpha: power of the base probability; 1 means reward tilting only.
        lam: reward temperature; ``math.inf`` means no reward term.
        temperature: temperature of the base model ``p`` itself; 1 is the model.
        estimator: ``"plain"`` (plug-in normalised ratio) or ``"jackknife"``
            (leave-one-rollout-out bias correction of the normalised probabilities).
        rollout_proposal: ``"base"`` draws rollouts from p at temperature 1 and
            weights them by ``p(future)^(alpha-1)``. ``"tempered"`` draws them at
            temperature 1/alpha and weights them by the product of per-step
            normalisers ``Z_s = sum_v p(v|h_s)^alpha``.
        selection: ``"sample"`` draws from the reweighted distribution,
            ``"argmax"`` takes its mode.
        max_rollouts: enables adaptive rollouts: more rounds of ``num_rollouts``
            are added until the selection distribution moves by at most
            ``settle_tol`` in total variation, or ``max_rollouts`` is reached.
        settle_tol: total-variation threshold of the adaptive stopping rule.
        standardize_rewards: standardise rewards over each candidate set (K x M)
            before tilting, so ``lam`` is in units of the set's standard deviation.
        max_batch_size: largest number of rows sent to a model in one forward call.
    """

    num_candidates: int = 10
    num_rollouts: int = 8
    rollout_length: Optional[int] = 32
    alpha: float = 4.0
    lam: float = math.inf
    temperature: float = 1.0
    estimator: str = "jackknife"
    # Tempered rollouts with the jackknife had the lowest or a tied-lowest TV to the exact
    # target on both toy models of samples/bench_engine.py (figures in docs/benchmarks.md).
    rollout_proposal: str = "tempered"
    selection: str = "sample"
    max_rollouts: Optional[int] = None
    settle_tol: float = 0.02
    standardize_rewards: bool = False
    max_batch_size: int = 64

    def __post_init__(self):
        _check_int("num_candidates", self.num_candidates, 1)
        _check_int("num_rollouts", self.num_rollouts, 1)
        if self.rollout_length is not None:
            _check_int("rollout_length", self.rollout_length, 1)
        _check_int("max_batch_size", self.max_batch_size, 1)
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if math.isnan(self.lam) or self.lam <= 0:
            raise ValueError(f"lam must be > 0 (math.inf disables the reward term), got {self.lam!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        _check_choice("estimator", self.estimator, ESTIMATORS)
        _check_choice("rollout_proposal", self.rollout_proposal, ROLLOUT_PROPOSALS)
        _check_choice("selection", self.selection, SELECTIONS)
        if self.estimator == "jackknife" and self.num_rollouts < 2:
            raise ValueError(
                "estimator='jackknife' needs num_rollouts >= 2 (it leaves one rollout out); "
                f"got num_rollouts={self.num_rollouts}. Pass estimator='plain' for a single rollout."
            )
        if self.max_rollouts is not None:
            _check_int("max_rollouts", self.max_rollouts, self.num_rollouts)
        if not (0 <= self.settle_tol <= 1):
            raise ValueError(f"settle_tol is a total-variation distance in [0, 1], got {self.settle_tol!r}")

    @property
    def uses_reward(self) -> bool:
        return math.isfinite(self.lam)

    @property
    def adaptive(self) -> bool:
        return self.max_rollouts is not None and self.max_rollouts > self.num_rollouts

    def replace(self, **changes) -> "PowerSamplingConfig":
        """Return a copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PowerSamplingConfig":
        """Build the named preset (``minimal``, ``balanced``, ``quality``) with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# The three budgets of the original write-up: latency-sensitive, general use, offline.
PRESETS = {
    "minimal": PowerSamplingConfig(num_candidates=5, num_rollouts=4, rollout_length=16),
    "balanced": PowerSamplingConfig(num_candidates=10, num_rollouts=8, rollout_length=32),
    "quality": PowerSamplingConfig(num_candidates=15, num_rollouts=16, rollout_length=64),
}


def resolve_config(config=None, **overrides) -> PowerSamplingConfig:
    """Turn a config, a preset name or ``None`` (balanced) into a validated config."""
    if config is None:
        config = "balanced"
    if isinstance(config, str):
        return PowerSamplingConfig.from_preset(config, **overrides)
    if isinstance(config, PowerSamplingConfig):
        return config.replace(**overrides) if overrides else config
    raise TypeError(
        f"config must be a PowerSamplingConfig or a preset name {sorted(PRESETS)}, got {type(config).__name__}"
    )
