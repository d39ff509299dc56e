import math

import pytest
import torch

from psdiffusion.core import (
    PowerSamplingConfig,
    effective_sample_size,
    jackknife_log_probs,
    log_power_normalizer,
    log_zeta,
    normalized_log_probs,
    reweight,
    rollout_log_weights,
    select,
    standardize_rewards,
    tail_power_mass,
)


def test_rollout_weight_uses_summed_log_prob():
    step_log_probs = torch.log(torch.tensor([[[[0.5, 0.25, 0.1], [0.9, 0.9, 0.9]]]]))  # (1, K=1, M=2, S=3)
    log_p_future = step_log_probs.sum(-1)  # (1, 1, 2)
    log_w, nonfinite = rollout_log_weights(log_p_future, alpha=3.0)
    expected = 2.0 * torch.log(torch.tensor([[[0.5 * 0.25 * 0.1, 0.9**3]]]))
    torch.testing.assert_close(log_w, expected)
    assert not nonfinite.any()


def test_reward_tilt_adds_reward_over_lam():
    log_p_future = torch.zeros(1, 2, 3)
    rewards = torch.tensor([[[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]]])
    log_w, _ = rollout_log_weights(log_p_future, alpha=1.0, lam=0.5, rewards=rewards)
    torch.testing.assert_close(log_w, rewards / 0.5)


def test_finite_lam_without_rewards_raises():
    with pytest.raises(ValueError, match="rewards are required"):
        rollout_log_weights(torch.zeros(1, 2, 3), alpha=1.0, lam=1.0)


def test_terminal_candidate_has_zeta_exactly_one():
    log_p_future = torch.tensor([[[-3.0, -5.0], [-2.0, -7.0]]])  # (1, K=2, M=2)
    terminal = torch.tensor([[True, False]])
    log_w, _ = rollout_log_weights(log_p_future, alpha=4.0, terminal=terminal)
    zeta = log_zeta(log_w)
    assert zeta[0, 0].item() == 0.0
    assert zeta[0, 1].item() < 0.0


def test_nonfinite_rewards_get_zero_weight_and_are_flagged():
    rewards = torch.tensor([[[1.0, float("nan")], [float("inf"), 2.0]]])
    log_w, nonfinite = rollout_log_weights(torch.zeros(1, 2, 2), alpha=1.0, lam=1.0, rewards=rewards)
    assert nonfinite.tolist() == [[[False, True], [True, False]]]
    assert torch.isneginf(log_w[nonfinite]).all()
    assert torch.isfinite(log_w[~nonfinite]).all()


def test_reweight_raises_when_no_rollout_is_finite():
    config = PowerSamplingConfig(num_candidates=2, num_rollouts=2, alpha=1.0, lam=1.0)
    log_w = torch.full((2, 2, 2), -math.inf)
    log_w[0] = 0.0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        reweight(torch.zeros(2, 2), log_w, config)


def test_normalized_log_probs_cancel_a_uniform_proposal():
    log_p = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    log_zeta_c = torch.tensor([[-1.0, 0.5, 0.0]])
    uniform = torch.full((1, 3), -math.log(3))
    with_q = normalized_log_probs(log_p, log_zeta_c, 2.0, uniform)
    without_q = normalized_log_probs(log_p, log_zeta_c, 2.0)
    torch.testing.assert_close(with_q, without_q)
    expected = torch.softmax(2.0 * log_p + log_zeta_c, dim=-1).log()
    torch.testing.assert_close(without_q, expected)


def test_proposal_density_corrects_sampled_candidates():
    # Candidates drawn from q = p at alpha = 1: p/q cancels and only zeta remains.
    log_p = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    log_zeta_c = torch.tensor([[0.0, 1.0, 2.0]])
    corrected = normalized_log_probs(log_p, log_zeta_c, 1.0, log_q=log_p)
    torch.testing.assert_close(corrected, torch.log_softmax(log_zeta_c, dim=-1))


def test_jackknife_equals_plain_when_rollouts_agree():
    log_p = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    log_w = torch.tensor([[[0.1] * 4, [-0.3] * 4, [0.7] * 4]])
    jackknife, degenerate = jackknife_log_probs(log_p, log_w, 2.0)
    plain = normalized_log_probs(log_p, log_zeta(log_w), 2.0)
    torch.testing.assert_close(jackknife, plain)
    assert not degenerate.any()


def test_jackknife_output_is_a_distribution():
    generator = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(5, 4, generator=generator), dim=-1)
    log_w = 3.0 * torch.randn(5, 4, 3, generator=generator)
    log_probs, _ = jackknife_log_probs(log_p, log_w, 4.0)
    probs = log_probs.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=probs.dtype))
    assert (probs >= 0).all()


def test_jackknife_flags_rows_where_one_rollout_carries_everything():
    log_p = torch.zeros(1, 2)
    log_w = torch.full((1, 2, 2), -math.inf)
    log_w[0, 0, 0] = 0.0
    log_probs, degenerate = jackknife_log_probs(log_p, log_w, 1.0)
    assert degenerate.tolist() == [True]
    assert log_probs.exp()[0, 0].item() == pytest.approx(1.0)


def test_standardize_rewards_per_candidate_set():
    rewards = torch.tensor([[[1.0, 3.0], [5.0, 7.0]], [[2.0, 2.0], [2.0, 2.0]]])
    standardized = standardize_rewards(rewards)
    assert standardized[0].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert standardized[0].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert (standardized[1] == 0).all()


def test_standardize_rewards_keeps_nonfinite_entries():
    rewards = torch.tensor([[[1.0, float("nan")], [3.0, 5.0]]])
    standardized = standardize_rewards(rewards)
    assert torch.isnan(standardized[0, 0, 1])
    assert standardized[0][torch.isfinite(standardized[0])].mean().item() == pytest.approx(0.0, abs=1e-6)


def test_effective_sample_size_bounds():
    uniform = torch.full((1, 4), -math.log(4))
    certain = torch.log(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert effective_sample_size(uniform).item() == pytest.approx(4.0)
    assert effective_sample_size(certain).item() == pytest.approx(1.0)


def test_select_argmax_and_seeded_sampling():
    log_probs = torch.log(torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.0, 0.5]]))
    assert select(log_probs, "argmax").tolist() == [1, 0]
    first = select(log_probs, "sample", torch.Generator().manual_seed(3))
    second = select(log_probs, "sample", torch.Generator().manual_seed(3))
    assert first.tolist() == second.tolist()
    draws = select(log_probs[:1].repeat(2000, 1), "sample", torch.Generator().manual_seed(0))
    assert abs((draws == 1).float().mean().item() - 0.7) < 0.05


def test_tail_power_mass_counts_what_top_k_drops():
    log_p_full = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    kept = torch.tensor([[0, 1]])
    expected = 0.2**2 / (0.5**2 + 0.3**2 + 0.2**2)
    assert tail_power_mass(log_p_full, kept, 2.0).item() == pytest.approx(expected)


def test_log_power_normalizer():
    log_p = torch.log(torch.tensor([0.5, 0.5]))
    assert log_power_normalizer(log_p, 3.0).item() == pytest.approx(math.log(2 * 0.125))
