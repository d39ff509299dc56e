"""The engine against exact targets computed by enumerating small tabular models."""

import math
from collections import Counter

import pytest
import torch

from psdiffusion.core import PowerSamplingConfig, decide, run
from psdiffusion.toy import (
    TabularModel,
    ToyAdapter,
    ToyState,
    exact_target,
    low_temperature_distribution,
    prefix_state,
    sampler_distribution,
    total_variation_dist,
)

ALPHA = 3.0


@pytest.fixture(scope="module")
def model():
    # Seeded so that token-wise low-temperature sampling is far from the power target (TV 0.34).
    return TabularModel(vocab_size=3, horizon=4, concentration=2.0, seed=2)


def config(**changes):
    base = dict(num_candidates=3, num_rollouts=8, rollout_length=None, alpha=ALPHA, estimator="plain",
                rollout_proposal="base")
    base.update(changes)
    return PowerSamplingConfig(**base)


def first_token_marginal(target: dict, vocab_size: int) -> torch.Tensor:
    marginal = torch.zeros(vocab_size, dtype=torch.float64)
    for seq, prob in target.items():
        marginal[seq[0]] += prob
    return marginal


def test_total_variation_falls_as_rollouts_grow(model):
    target = exact_target(model, ALPHA)
    distances = []
    for num_rollouts in (2, 8, 32):
        sampler = sampler_distribution(model, config(num_rollouts=num_rollouts), 1000, torch.Generator().manual_seed(0))
        distances.append(total_variation_dist(sampler, target))
    assert distances[1] < distances[0]
    assert distances[2] < distances[1]
    assert distances[2] < 0.01
    assert distances[0] > 0.02


def test_power_sampler_beats_low_temperature(model):
    target = exact_target(model, ALPHA)
    low_temperature = total_variation_dist(low_temperature_distribution(model, ALPHA), target)
    sampler = sampler_distribution(model, config(num_rollouts=8), 1000, torch.Generator().manual_seed(1))
    assert low_temperature > 0.3
    assert total_variation_dist(sampler, target) < low_temperature / 2


def test_jackknife_reduces_bias_of_normalised_probs(model):
    exact = first_token_marginal(exact_target(model, ALPHA), model.vocab_size)
    repeats = 20000
    biases = {}
    for estimator in ("plain", "jackknife"):
        state = prefix_state(model, [()], repeats)
        proposal, _, trace = decide(ToyAdapter(model), state, config(num_rollouts=2, estimator=estimator),
                                    torch.Generator().manual_seed(5))
        probs = torch.zeros(repeats, model.vocab_size, dtype=torch.float64)
        probs.scatter_(1, proposal.candidates, trace.log_pi.exp().double())
        biases[estimator] = (probs.mean(0) - exact).abs().sum().item()
    assert biases["jackknife"] < 0.5 * biases["plain"]


def test_tempered_rollouts_with_normalisers_match_target(model):
    target = exact_target(model, ALPHA)
    sampler = sampler_distribution(model, config(num_rollouts=8, rollout_proposal="tempered"), 1000,
                                   torch.Generator().manual_seed(2))
    assert total_variation_dist(sampler, target) < 0.01


def test_summed_not_mean_log_probs_recover_marginal(model):
    exact = first_token_marginal(exact_target(model, ALPHA), model.vocab_size)
    cfg = config(num_rollouts=256)
    adapter = ToyAdapter(model)
    state = prefix_state(model, [()], 1)
    proposal, _, trace = decide(adapter, state, cfg, torch.Generator().manual_seed(3))
    summed = torch.zeros(model.vocab_size, dtype=torch.float64)
    summed[proposal.candidates[0]] = trace.log_pi[0].exp().double()

    # The same rollouts weighted by the per-token MEAN log-prob target a different distribution.
    future_steps = model.horizon - 1
    log_w_mean = trace.log_w / future_steps
    log_pi_mean = torch.log_softmax(ALPHA * trace.log_p + torch.logsumexp(log_w_mean, -1), -1)
    mean_based = torch.zeros(model.vocab_size, dtype=torch.float64)
    mean_based[proposal.candidates[0]] = log_pi_mean[0].exp().double()

    assert (summed - exact).abs().sum().item() < 0.05
    assert (mean_based - exact).abs().sum().item() > 0.1


def test_reward_tilt_matches_exact_target(model):
    lam = 1.0
    target = exact_target(model, 1.0, lam=lam)
    base = exact_target(model, 1.0)
    distances = []
    for num_rollouts in (4, 16):
        cfg = config(alpha=1.0, lam=lam, num_rollouts=num_rollouts, estimator="jackknife")
        sampler = sampler_distribution(model, cfg, 1000, torch.Generator().manual_seed(4))
        distances.append(total_variation_dist(sampler, target))
    assert total_variation_dist(base, target) > 0.4
    assert distances[1] < distances[0]
    assert distances[1] < 0.01


def test_eos_model_matches_target():
    model = TabularModel(vocab_size=4, horizon=4, eos_token=3, concentration=5.0, seed=1)
    target = exact_target(model, 2.0)
    sampler = sampler_distribution(model, config(alpha=2.0, num_candidates=4, num_rollouts=16), 500,
                                   torch.Generator().manual_seed(6))
    assert total_variation_dist(sampler, target) < 0.02

    state = prefix_state(model, [(0,)], 1)
    proposal, _, trace = decide(ToyAdapter(model), state, config(alpha=2.0, num_candidates=4),
                                torch.Generator().manual_seed(7))
    is_eos = proposal.candidates[0] == model.eos_token
    assert proposal.terminal[0][is_eos].all()
    assert (trace.log_w[0][is_eos] == 0).all()


def test_run_empirical_distribution_approaches_target(model):
    target = exact_target(model, ALPHA)
    samples = 4000
    state, traces, budget = run(ToyAdapter(model), ToyState.empty(samples, model.horizon),
                                config(num_rollouts=16, rollout_proposal="tempered", estimator="jackknife"),
                                torch.Generator().manual_seed(8))
    counts = Counter(state.to_tuples())
    empirical = {seq: count / samples for seq, count in counts.items()}
    assert len(traces) == model.horizon
    assert budget.decisions == model.horizon
    assert budget.forward_rows > 0
    # Sampling noise alone gives TV around 0.03 for 81 outcomes and 4000 draws.
    assert total_variation_dist(empirical, target) < 0.06


def test_same_seed_same_sequences(model):
    cfg = config(num_rollouts=4)
    outputs = []
    for _ in range(2):
        state, _, _ = run(ToyAdapter(model), ToyState.empty(16, model.horizon), cfg, torch.Generator().manual_seed(9))
        outputs.append(state.to_tuples())
    assert outputs[0] == outputs[1]


def test_adaptive_rollouts_stop_between_min_and_max(model):
    cfg = config(num_rollouts=2, max_rollouts=64, settle_tol=0.05, estimator="jackknife")
    state = prefix_state(model, [()], 1)
    _, _, trace = decide(ToyAdapter(model), state, cfg, torch.Generator().manual_seed(10))
    assert 2 <= trace.num_rollouts <= 64
    assert trace.num_rollouts % 2 == 0
    strict = cfg.replace(settle_tol=0.0)
    _, _, trace_strict = decide(ToyAdapter(model), state, strict, torch.Generator().manual_seed(10))
    assert trace_strict.num_rollouts == 64


def test_top_k_truncation_reports_tail_mass(model):
    state = prefix_state(model, [()], 1)
    _, _, trace = decide(ToyAdapter(model), state, config(num_candidates=2), torch.Generator().manual_seed(11))
    log_p_full = model.next_log_probs(torch.tensor([0]), torch.tensor([model.start]))[0]
    weights = (ALPHA * log_p_full).exp()
    expected = weights.sort().values[0] / weights.sum()
    assert trace.tail_mass[0].item() == pytest.approx(expected.item())
    assert math.isfinite(trace.ess[0].item())
