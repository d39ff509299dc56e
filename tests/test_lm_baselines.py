"""Baseline decoders: greedy, sampling, best-of-N, self-consistency, beam and MCMC power sampling."""

import pytest
import torch

from lm_helpers import CharTokenizer, tiny_llama
from psdiffusion.lm.baselines import METHODS, decode, decode_samples, last_number, self_consistency
from psdiffusion.lm.model_io import forward_logits


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0, logit_scale=4.0)


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer()


def options(method):
    return {"config": "minimal"} if method == "power" else {"n": 3}


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_gives_same_tokens(model, tokenizer, method):
    first = decode(method, model, tokenizer, "abc", 6, torch.Generator().manual_seed(1), **options(method))
    second = decode(method, model, tokenizer, "abc", 6, torch.Generator().manual_seed(1), **options(method))
    assert first.token_ids == second.token_ids
    assert 1 <= len(first.token_ids) <= 6
    assert first.budget.forward_rows > 0
    assert first.budget.rollout_steps >= len(first.token_ids)


def test_greedy_takes_argmax_each_step(model, tokenizer):
    result = decode("greedy", model, tokenizer, "abc", 4, None)
    ids = tokenizer("abc")["input_ids"]
    for token in result.token_ids:
        with torch.no_grad():
            expected = int(model(input_ids=ids).logits[0, -1].argmax())
        assert token == expected
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


def test_sample_log_p_matches_recompute(model, tokenizer):
    result = decode("sample", model, tokenizer, "abc", 5, torch.Generator().manual_seed(0))
    ids = tokenizer("abc")["input_ids"]
    full = torch.cat([ids, torch.tensor([result.token_ids])], dim=1)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=full).logits[0, ids.shape[1] - 1:-1].float(), dim=-1)
    expected = float(log_probs.gather(-1, torch.tensor(result.token_ids).unsqueeze(-1)).sum())
    assert result.log_p == pytest.approx(expected, abs=1e-3)
    assert result.log_q == pytest.approx(expected, abs=1e-3), "at temperature 1 the sampler is the model"


def test_best_of_n_keeps_most_likely_sample(model, tokenizer):
    result = decode("best-of-n", model, tokenizer, "abc", 5, torch.Generator().manual_seed(0), n=6)
    ids = tokenizer("abc")["input_ids"]
    next_logits, cache = forward_logits(model, ids)
    from psdiffusion.core.decision import Budget

    samples = decode_samples(model, cache, next_logits, 6, 5, 1.0, [2], 0, torch.Generator().manual_seed(0), Budget())
    assert result.log_p == pytest.approx(float(samples.total_log_p().max()), abs=1e-6)


def test_self_consistency_returns_majority_answer(model, tokenizer):
    result = self_consistency(model, tokenizer, "abc", 4, torch.Generator().manual_seed(0), n=6,
                              answer_fn=lambda text: len(text) % 2)
    votes = result.extra["votes"]
    assert result.extra["answer"] == max(votes, key=votes.get)
    assert len(result.text) % 2 == result.extra["answer"]


def test_last_number_extracts_final_integer():
    assert last_number("12 + 7 = 19.") == "19"
    assert last_number("minus -4 then 5") == "5"
    assert last_number("no digits") is None


def test_mcmc_reports_acceptance_rate(model, tokenizer):
    result = decode("mcmc", model, tokenizer, "abc", 8, torch.Generator().manual_seed(0), alpha=4.0,
                    mcmc_steps=5, block_size=4)
    assert 0.0 <= result.extra["acceptance_rate"] <= 1.0
    assert result.budget.rollout_steps > len(result.token_ids), "MCMC should spend tokens on rejected suffixes"


def test_unknown_method_is_rejected(model, tokenizer):
    with pytest.raises(ValueError, match="unknown method 'nucleus'"):
        decode("nucleus", model, tokenizer, "abc", 4, None)
