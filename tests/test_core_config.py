import math

import pytest

from psdiffusion.core import PRESETS, PowerSamplingConfig, resolve_config


def test_presets_match_documented_budgets():
    assert (PRESETS["minimal"].num_candidates, PRESETS["minimal"].num_rollouts, PRESETS["minimal"].rollout_length) == (5, 4, 16)
    assert (PRESETS["balanced"].num_candidates, PRESETS["balanced"].num_rollouts, PRESETS["balanced"].rollout_length) == (10, 8, 32)
    assert (PRESETS["quality"].num_candidates, PRESETS["quality"].num_rollouts, PRESETS["quality"].rollout_length) == (15, 16, 64)


def test_from_preset_applies_overrides():
    config = PowerSamplingConfig.from_preset("minimal", alpha=2.0, selection="argmax")
    assert config.num_candidates == 5
    assert config.alpha == 2.0
    assert config.selection == "argmax"


def test_config_is_frozen():
    config = PowerSamplingConfig()
    with pytest.raises(AttributeError):
        config.alpha = 2.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_candidates": 0}, "num_candidates must be an integer >= 1"),
        ({"num_rollouts": 0}, "num_rollouts must be an integer >= 1"),
        ({"num_rollouts": 2.5}, "num_rollouts must be an integer"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": -1.0}, "alpha must be a finite number > 0"),
        ({"lam": 0.0}, "lam must be > 0"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"estimator": "mean"}, "estimator must be one of"),
        ({"rollout_proposal": "greedy"}, "rollout_proposal must be one of"),
        ({"selection": "best"}, "selection must be one of"),
        ({"num_rollouts": 1}, "estimator='jackknife' needs num_rollouts >= 2"),
        ({"num_rollouts": 8, "max_rollouts": 4}, "max_rollouts must be an integer >= 8"),
        ({"settle_tol": 2.0}, "settle_tol"),
        ({"max_batch_size": 0}, "max_batch_size"),
    ],
)
def test_invalid_config_raises_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        PowerSamplingConfig(**changes)


def test_single_rollout_allowed_with_plain_estimator():
    config = PowerSamplingConfig(num_rollouts=1, estimator="plain")
    assert config.num_rollouts == 1


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="balanced"):
        PowerSamplingConfig.from_preset("fast")


def test_resolve_config_accepts_name_config_and_none():
    assert resolve_config(None) == PRESETS["balanced"]
    assert resolve_config("quality", alpha=2.0).alpha == 2.0
    config = PowerSamplingConfig(lam=0.5)
    assert resolve_config(config) is config
    assert config.uses_reward
    assert not PowerSamplingConfig(lam=math.inf).uses_reward
    with pytest.raises(TypeError, match="preset name"):
        resolve_config(3)
