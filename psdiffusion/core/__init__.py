"""The model-agnostic power-sampling engine. Imports torch only."""

from .config import PRESETS, PowerSamplingConfig, resolve_config
from .decision import Adapter, Budget, DecisionTrace, Proposal, Rollouts, decide, reweight, run
from .estimators import (
    effective_sample_size,
    jackknife_log_probs,
    log_power_normalizer,
    log_zeta,
    logmeanexp,
    normalized_log_probs,
    rollout_log_weights,
    select,
    standardize_rewards,
    tail_power_mass,
    total_variation,
)

__all__ = [
    "PRESETS",
    "Adapter",
    "Budget",
    "DecisionTrace",
    "PowerSamplingConfig",
    "Proposal",
    "Rollouts",
    "decide",
    "effective_sample_size",
    "jackknife_log_probs",
    "log_power_normalizer",
    "log_zeta",
    "logmeanexp",
    "normalized_log_probs",
    "resolve_config",
    "reweight",
    "rollout_log_weights",
    "run",
    "select",
    "standardize_rewards",
    "tail_power_mass",
    "total_variation",
]
