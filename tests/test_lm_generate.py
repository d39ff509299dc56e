"""power_generate, the generate(custom_generate=...) form, rewards, block mode and input errors."""

import math

import pytest
import torch
from transformers import BertConfig, BertModel

from lm_helpers import EOS_ID, CharTokenizer, tiny_llama
from psdiffusion.lm import power_generate, power_sampling_generate
from psdiffusion.lm.rewards import SelfConsistencyReward

SMALL = dict(num_candidates=3, num_rollouts=2, rollout_length=3)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0, logit_scale=4.0)


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer()


def test_same_seed_gives_same_text(model, tokenizer):
    first = power_generate(model, tokenizer, "abc", "minimal", max_new_tokens=6, seed=7, **SMALL)
    second = power_generate(model, tokenizer, "abc", "minimal", max_new_tokens=6, seed=7, **SMALL)
    other = [power_generate(model, tokenizer, "abc", "minimal", max_new_tokens=6, seed=s, **SMALL).token_ids
             for s in range(8, 12)]
    assert first.token_ids == second.token_ids
    assert first.text == second.text
    assert any(ids != first.token_ids for ids in other), "different seeds never changed the text"


def test_output_reports_budget_and_traces(model, tokenizer):
    out = power_generate(model, tokenizer, "abc", "minimal", max_new_tokens=5, seed=0, **SMALL)
    assert 1 <= len(out.token_ids) <= 5
    assert len(out.traces) == len(out.token_ids)
    assert out.budget.decisions == len(out.traces)
    assert out.budget.rollout_steps > 0
    assert out.finish_reason in ("eos", "length")


def test_streamer_receives_prompt_then_every_token(model, tokenizer):
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    streamer = Recorder()
    seen = []
    out = power_generate(model, tokenizer, "abc", "minimal", max_new_tokens=5, seed=0, streamer=streamer,
                         callback=lambda index, ids, trace: seen.extend(ids), **SMALL)
    assert streamer.chunks[0] == tokenizer("abc")["input_ids"][0].tolist()
    assert sum(streamer.chunks[1:], []) == out.token_ids
    assert seen == out.token_ids
    assert streamer.ended


def test_custom_generate_callable_matches_power_generate(model, tokenizer):
    prompt_ids = tokenizer("abc")["input_ids"]
    config = dict(num_candidates=3, num_rollouts=2, rollout_length=3, alpha=4.0)
    from psdiffusion.core.config import PowerSamplingConfig

    output = model.generate(prompt_ids, custom_generate=power_sampling_generate, max_new_tokens=5,
                            power_config=PowerSamplingConfig(**config), power_seed=3)
    reference = power_generate(model, tokenizer, "abc", PowerSamplingConfig(**config), max_new_tokens=5, seed=3)
    assert output.shape[0] == 1
    assert output[0, : prompt_ids.shape[1]].tolist() == prompt_ids[0].tolist()
    generated = output[0, prompt_ids.shape[1]:].tolist()
    assert generated[: len(reference.token_ids)] == reference.token_ids


def test_block_mode_decides_once_per_block(model, tokenizer):
    out = power_generate(model, tokenizer, "abc", "minimal", max_new_tokens=8, seed=0, block_size=4,
                         block_samples=6, **SMALL)
    assert len(out.traces) == math.ceil(len(out.token_ids) / 4)
    assert len(out.traces) <= 2


def test_verifier_reward_tilts_towards_rewarded_text(model, tokenizer):
    def reward_fn(text):
        return float(text.count("a"))

    plain = [power_generate(model, tokenizer, "abc", "minimal", max_new_tokens=4, seed=s, alpha=1.0,
                            estimator="plain", num_candidates=6, num_rollouts=2, rollout_length=2).text
             for s in range(4)]
    tilted = [power_generate(model, tokenizer, "abc", "minimal", max_new_tokens=4, seed=s, alpha=1.0, lam=0.05,
                             estimator="plain", num_candidates=6, num_rollouts=2, rollout_length=2,
                             reward_fn=reward_fn).text for s in range(4)]
    assert sum(t.count("a") for t in tilted) > sum(t.count("a") for t in plain)


def test_self_consistency_reward_is_share_of_same_answer():
    reward = SelfConsistencyReward(lambda text: text[-1] if text else None)
    texts = ["x1", "y1", "z2", "", "w1", "v3"]  # B=1, K=3, M=2
    rewards = reward(texts, (1, 3, 2))
    expected = torch.tensor([[[3 / 6, 3 / 6], [1 / 6, 0.0], [3 / 6, 1 / 6]]], dtype=torch.float64)
    torch.testing.assert_close(rewards, expected)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(prompt=""), ValueError, "prompt is empty"),
    (dict(prompt="   "), ValueError, "prompt is empty"),
    (dict(prompt=[]), ValueError, "messages must be a non-empty list"),
    (dict(num_candidates=33), ValueError, "larger than the vocabulary"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be an integer > 0"),
    (dict(max_new_tokens=-3), ValueError, "max_new_tokens must be an integer > 0"),
    (dict(alpha=0.0), ValueError, "alpha must be a finite number > 0"),
    (dict(alpha=-1.0), ValueError, "alpha must be a finite number > 0"),
    (dict(lam=1.0), ValueError, "no reward was given"),
    (dict(reward_fn=len), ValueError, "config.lam is math.inf"),
    (dict(seed=None), ValueError, "pass seed=<int>"),
    (dict(block_size=0), ValueError, "block_size must be an integer >= 1"),
])
def test_bad_input_raises_clear_error(model, tokenizer, kwargs, error, message):
    call = dict(prompt="abc", max_new_tokens=3, seed=0, **SMALL)
    call.update(kwargs)
    prompt = call.pop("prompt")
    with pytest.raises(error, match=message):
        power_generate(model, tokenizer, prompt, "minimal", **call)


def test_non_causal_model_is_rejected(tokenizer):
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)).eval()
    with pytest.raises(TypeError, match="not a causal LM"):
        power_generate(encoder, tokenizer, "abc", "minimal", max_new_tokens=3, seed=0)


def test_generation_stops_at_eos(tokenizer):
    eos_model = tiny_llama(seed=0)
    # A large constant EOS logit at every position makes EOS the most likely token everywhere.
    boost = torch.zeros(eos_model.config.vocab_size)
    boost[EOS_ID] = 30.0
    handle = eos_model.lm_head.register_forward_hook(lambda module, args, logits: logits + boost)
    try:
        out = power_generate(eos_model, tokenizer, "abc", "minimal", max_new_tokens=6, seed=0, **SMALL)
    finally:
        handle.remove()
    assert out.token_ids == [EOS_ID]
    assert out.finish_reason == "eos"
    assert out.text == ""
    assert out.traces[0].log_w[0, 0].tolist() == [0.0] * SMALL["num_rollouts"]
