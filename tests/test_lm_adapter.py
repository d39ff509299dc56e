"""The transformers adapter: exactness by enumeration, cache forks, EOS handling and the main cache."""

import math

import pytest
import torch

from lm_helpers import EOS_ID, tiny_llama
from psdiffusion.core.config import PowerSamplingConfig
from psdiffusion.core.decision import Budget, decide
from psdiffusion.lm.adapter import CausalLMAdapter
from psdiffusion.lm.model_io import fork_cache, forward_logits

PROMPT = torch.tensor([[1, 5, 9, 14]])
HORIZON = 3
ALPHA = 4.0


@pytest.fixture(scope="module")
def restricted_model():
    return tiny_llama(seed=0, restricted=True, logit_scale=8.0)


def make_adapter(model):
    return CausalLMAdapter(model, eos_ids=[EOS_ID], pad_id=0)


def full_log_probs(model, ids):
    """log p(next | ids) by a full forward with no cache: (1, T) -> (V,)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


def enumerate_sequences(model):
    """Every complete continuation of PROMPT (length HORIZON, or ending at EOS) with its log p."""
    complete, frontier = {}, [((), 0.0)]
    while frontier:
        prefix, log_p = frontier.pop()
        ids = torch.cat([PROMPT, torch.tensor([prefix], dtype=torch.long)], dim=1)
        next_log_p = full_log_probs(model, ids)
        for token in torch.isfinite(next_log_p).nonzero().flatten().tolist():
            seq, total = prefix + (token,), log_p + float(next_log_p[token])
            if token == EOS_ID or len(seq) == HORIZON:
                complete[seq] = total
            else:
                frontier.append((seq, total))
    return complete


def power_target(log_p: dict, alpha: float) -> dict:
    logits = torch.tensor([alpha * v for v in log_p.values()], dtype=torch.float64)
    return dict(zip(log_p, torch.softmax(logits, dim=0).tolist()))


def low_temperature_distribution(model, sequences) -> dict:
    dist = {}
    for seq in sequences:
        prob = 1.0
        for t, token in enumerate(seq):
            ids = torch.cat([PROMPT, torch.tensor([seq[:t]], dtype=torch.long)], dim=1)
            prob *= float(torch.softmax(ALPHA * full_log_probs(model, ids), dim=-1)[token])
        dist[seq] = prob
    return dist


def sampler_distribution(model, sequences, config, repeats, seed=0) -> dict:
    """Product over each sequence's prefixes of the expected decision probability, from ``repeats`` decisions."""
    adapter = make_adapter(model)
    generator = torch.Generator().manual_seed(seed)
    decision_probs = {}
    prefixes = {seq[:t] for seq in sequences for t in range(len(seq))}
    for prefix in sorted(prefixes):
        ids = torch.cat([PROMPT, torch.tensor([prefix], dtype=torch.long)], dim=1).repeat(repeats, 1)  # (R, T)
        state = adapter.prefill(ids, HORIZON - len(prefix), Budget())
        proposal, _, trace = decide(adapter, state, config, generator)
        token_ids = proposal.candidates.tokens[:, :, 0]  # (R, K)
        probs = torch.zeros(repeats, model.config.vocab_size, dtype=torch.float64)
        probs.scatter_add_(1, token_ids, trace.log_pi.exp())  # (R, V)
        decision_probs[prefix] = probs.mean(dim=0)
    dist = {}
    for seq in sequences:
        dist[seq] = math.prod(float(decision_probs[seq[:t]][token]) for t, token in enumerate(seq))
    return dist


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


@pytest.mark.parametrize("estimator, proposal", [
    ("jackknife", "tempered"),
    pytest.param("plain", "base", marks=pytest.mark.slow),
    pytest.param("jackknife", "base", marks=pytest.mark.slow),
])
def test_power_sampling_matches_enumerated_target(restricted_model, estimator, proposal):
    log_p = enumerate_sequences(restricted_model)
    target = power_target(log_p, ALPHA)
    config = PowerSamplingConfig(num_candidates=3, num_rollouts=8, rollout_length=None, alpha=ALPHA,
                                 estimator=estimator, rollout_proposal=proposal)
    sampler = sampler_distribution(restricted_model, list(log_p), config, repeats=200)
    low_temperature = low_temperature_distribution(restricted_model, list(log_p))

    assert sum(sampler.values()) == pytest.approx(1.0, abs=1e-6)
    assert any(seq[-1] == EOS_ID for seq in log_p), "the enumeration should include sequences ended by EOS"
    tv_low_temperature = total_variation(low_temperature, target)
    tv_sampler = total_variation(sampler, target)
    assert tv_low_temperature > 0.05, "the test model is too easy: low temperature already matches the target"
    assert tv_sampler < 0.25 * tv_low_temperature
    assert tv_sampler < 0.03


def test_forked_cache_logits_match_full_recompute():
    model = tiny_llama(seed=1)
    logits, cache = forward_logits(model, PROMPT)
    length_before = cache.get_seq_length()
    forked = fork_cache(cache, torch.tensor([0, 0, 0]))
    next_tokens = torch.tensor([[3], [7], [20]])  # (3, 1)
    forked_logits, _ = forward_logits(model, next_tokens, forked)  # (3, V)

    for row in range(3):
        ids = torch.cat([PROMPT, next_tokens[row:row + 1]], dim=1)
        with torch.no_grad():
            recomputed = model(input_ids=ids).logits[0, -1].float()
        torch.testing.assert_close(forked_logits[row], recomputed, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == length_before, "forking must leave the main cache untouched"
    assert cache.layers[0].keys.shape[0] == 1


def test_commit_advances_main_cache_by_one_token():
    model = tiny_llama(seed=2)
    adapter = make_adapter(model)
    budget = Budget()
    state = adapter.prefill(PROMPT, 5, budget)
    config = PowerSamplingConfig(num_candidates=4, num_rollouts=2, rollout_length=2)
    generator = torch.Generator().manual_seed(0)
    proposal, chosen, _ = decide(adapter, state, config, generator, budget)
    rows_before = budget.forward_rows
    new_state = adapter.commit(state, proposal, chosen, budget)

    assert budget.forward_rows - rows_before == 1, "commit should run one forward row, not recompute history"
    assert new_state.cache.get_seq_length() == PROMPT.shape[1] + 1
    with torch.no_grad():
        recomputed = model(input_ids=new_state.tokens).logits[0, -1].float()
    torch.testing.assert_close(new_state.next_logits[0], recomputed, atol=1e-4, rtol=1e-4)


def test_rollouts_use_one_forward_per_step_and_no_prefill():
    model = tiny_llama(seed=3)
    adapter = make_adapter(model)
    state = adapter.prefill(PROMPT, 10, Budget())
    config = PowerSamplingConfig(num_candidates=3, num_rollouts=4, rollout_length=5, max_batch_size=5)
    budget = Budget()
    calls = []
    hook = model.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    try:
        proposal = adapter.propose(state, config, torch.Generator().manual_seed(0), budget)
        adapter.rollout(state, proposal, 4, config, torch.Generator().manual_seed(0), budget)
    finally:
        hook.remove()
    live = int((~proposal.terminal).sum()) * 4
    chunks = math.ceil(live / config.max_batch_size)
    assert len(calls) <= chunks * config.rollout_length
    assert budget.forward_rows <= live * config.rollout_length


def test_eos_candidate_has_no_rollouts_and_unit_zeta():
    model = tiny_llama(seed=0, restricted=True, logit_scale=8.0)
    adapter = make_adapter(model)
    state = adapter.prefill(PROMPT, 4, Budget())
    config = PowerSamplingConfig(num_candidates=3, num_rollouts=4, rollout_length=3, alpha=ALPHA)
    generator = torch.Generator().manual_seed(0)
    proposal = adapter.propose(state, config, generator, Budget())
    rollouts = adapter.rollout(state, proposal, 4, config, generator, Budget())
    _, _, trace = decide(adapter, state, config, torch.Generator().manual_seed(0))

    eos_slot = (proposal.candidates.tokens[0, :, 0] == EOS_ID).nonzero().flatten()
    assert eos_slot.numel() == 1, "the restricted model always offers EOS among its 3 tokens"
    k = int(eos_slot)
    assert bool(proposal.terminal[0, k])
    M = 4
    assert rollouts.terminals.lengths[k * M:(k + 1) * M].tolist() == [0] * M
    assert rollouts.log_p[0, k].tolist() == [0.0] * M
    assert trace.log_w[0, k].tolist() == [0.0] * M


def test_rollout_stops_at_eos():
    model = tiny_llama(seed=0, restricted=True, logit_scale=8.0)
    adapter = make_adapter(model)
    state = adapter.prefill(PROMPT, 12, Budget())
    config = PowerSamplingConfig(num_candidates=2, num_rollouts=16, rollout_length=10, alpha=ALPHA)
    generator = torch.Generator().manual_seed(0)
    proposal = adapter.propose(state, config, generator, Budget())
    rollouts = adapter.rollout(state, proposal, 16, config, generator, Budget())
    future = rollouts.terminals

    ended = 0
    for r in range(future.tokens.shape[0]):
        ids = future.tokens[r, : int(future.lengths[r])].tolist()
        if EOS_ID in ids:
            ended += 1
            assert ids.index(EOS_ID) == len(ids) - 1, f"rollout {r} continued after EOS: {ids}"
    assert ended > 0, "no rollout reached EOS, so this test checked nothing"


def test_draw_returns_base_log_prob_and_power_normalizer():
    from psdiffusion.core.estimators import log_power_normalizer
    from psdiffusion.lm.adapter import _draw

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :10] = -math.inf
    drawn, log_p, log_z = _draw(logits, 0.7, ALPHA, torch.Generator().manual_seed(1))
    base = torch.log_softmax(logits / 0.7, dim=-1)
    torch.testing.assert_close(log_p, base.gather(-1, drawn.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(log_z, log_power_normalizer(base, ALPHA))
    assert bool(drawn[0] >= 10), "a token with -inf logit was drawn"
