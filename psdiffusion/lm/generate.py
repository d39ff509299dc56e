"""``power_generate`` and its ``model.generate(custom_generate=...)`` form."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..core.config import resolve_config
from ..core.decision import Budget, DecisionTrace, run
from .adapter import CausalLMAdapter, LMState
from .model_io import check_causal_lm, encode_prompt, eos_token_ids, make_generator, model_device
from .rewards import make_reward

logger = logging.getLogger(__name__)


@dataclass
class PowerGenerateOutput:
    """Result of ``power_generate``.

    Attributes:
        text: the decoded completion, special tokens removed.
        token_ids: generated ids, up to and including the first EOS.
        traces: one ``DecisionTrace`` per decision.
        budget: compute spent, prefill included.
        finish_reason: ``"eos"`` or ``"length"``.
    """

    text: str
    token_ids: list[int]
    traces: list[DecisionTrace] = field(repr=False)
    budget: Budget
    finish_reason: str


def _pad_id(model, tokenizer, eos_ids) -> int:
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None and eos_ids:
        pad = eos_ids[0]
    return 0 if pad is None else int(pad)


def build_adapter(model, tokenizer=None, *, block_size=1, block_samples=None, reward_fn=None, answer_fn=None,
                  lam=float("inf")) -> CausalLMAdapter:
    """Build a ``CausalLMAdapter`` for ``model``, with the reward that ``reward_fn`` or ``answer_fn`` defines."""
    check_causal_lm(model)
    eos_ids = eos_token_ids(model, tokenizer)
    reward = make_reward(reward_fn, answer_fn, lam)
    decode = None
    if tokenizer is not None:
        def decode(ids):
            return tokenizer.decode(ids, skip_special_tokens=True)
    return CausalLMAdapter(model, eos_ids, _pad_id(model, tokenizer, eos_ids), block_size=block_size,
                           block_samples=block_samples, reward=reward, decode=decode)


def power_generate(
    model,
    tokenizer,
    prompt,
    config=None,
    max_new_tokens: int = 64,
    *,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    block_size: int = 1,
    block_samples: Optional[int] = None,
    reward_fn: Optional[Callable[[str], float]] = None,
    answer_fn: Optional[Callable[[str], Any]] = None,
    streamer=None,
    callback: Optional[Callable[[int, list[int], DecisionTrace], None]] = None,
    **config_overrides,
) -> PowerGenerateOutput:
    """Decode with power sampling: pi(x) ∝ p(x)^alpha * exp(r(x)/lam), one decision per token or block.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer.
        prompt: a plain-text prompt, or chat messages ``[{"role": ..., "content": ...}]``
            that go through the tokenizer's chat template.
        config: a ``PowerSamplingConfig``, a preset name, or ``None`` (``"balanced"``).
        max_new_tokens: the maximum number of tokens to generate.
        seed: seed of a new generator; pass this or ``generator``.
        generator: the ``torch.Generator`` for every draw, on the model's device.
        block_size: tokens per decision; above 1 the candidates are sampled blocks.
        block_samples: blocks sampled per decision in block mode (default 4 * K).
        reward_fn: a verifier ``reward_fn(completion_text) -> float``; needs a finite ``lam``.
        answer_fn: ``answer_fn(completion_text) -> answer or None`` for the self-consistency
            reward (the share of the decision's rollouts reaching the same answer).
        streamer: a transformers streamer (``put``/``end``), fed the prompt ids first, as ``generate`` does.
        callback: ``callback(index, new_token_ids, trace)`` after each decision.
        **config_overrides: fields of ``PowerSamplingConfig`` to override.

    Returns:
        ``PowerGenerateOutput`` with ``text``, ``token_ids``, ``traces``, ``budget`` and ``finish_reason``.
    """
    start = time.perf_counter()
    config = resolve_config(config, **config_overrides)
    adapter = build_adapter(model, tokenizer, block_size=block_size, block_samples=block_samples,
                            reward_fn=reward_fn, answer_fn=answer_fn, lam=config.lam)
    device = model_device(model)
    generator = make_generator(seed, generator, device)
    prompt_ids = encode_prompt(tokenizer, prompt, device)  # (1, T)

    # 1. Prefill the prompt once.
    budget = Budget()
    state = adapter.prefill(prompt_ids, max_new_tokens, budget)
    if streamer is not None:
        streamer.put(prompt_ids.cpu())

    # 2. Decide, commit and stream until EOS or max_new_tokens.
    def on_decision(index: int, new_state: LMState, trace: DecisionTrace):
        new_ids = new_state.generated(0, adapter.eos_ids)[on_decision.emitted:]
        on_decision.emitted += len(new_ids)
        if streamer is not None and new_ids:
            streamer.put(torch.tensor(new_ids))
        if callback is not None:
            callback(index, new_ids, trace)

    on_decision.emitted = 0
    state, traces, budget = run(adapter, state, config, generator, callback=on_decision, budget=budget)
    if streamer is not None:
        streamer.end()

    # 3. Decode.
    token_ids = state.generated(0, adapter.eos_ids)
    finish_reason = "eos" if token_ids and token_ids[-1] in adapter.eos_ids else "length"
    budget.seconds = time.perf_counter() - start
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return PowerGenerateOutput(text=text, token_ids=token_ids, traces=traces, budget=budget,
                               finish_reason=finish_reason)


def power_sampling_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    power_config=None,
    power_seed: Optional[int] = None,
    power_generator: Optional[torch.Generator] = None,
    **model_kwargs,
) -> torch.LongTensor:
    """Power sampling as a ``model.generate(custom_generate=power_sampling_generate, ...)`` callable.

    Pass ``power_config`` (config or preset name) and ``power_seed`` or ``power_generator``
    to ``generate``; ``max_new_tokens`` comes from the generation config. Logits processors
    and stopping criteria are not applied, since the target is set by ``power_config``.
    Rows of ``input_ids`` (B, T) must not be padded. Returns (B, T + new) ids, padded
    after EOS with the pad id.
    """
    check_causal_lm(model)
    if logits_processor is not None and len(logits_processor) > 0:
        logger.warning("power sampling ignores %d logits processor(s); its target is set by power_config",
                       len(logits_processor))
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is not None and not bool((attention_mask == 1).all()):
        raise ValueError("power sampling through generate needs unpadded rows of equal length; "
                         "call generate once per prompt instead of passing a padded batch")
    max_new_tokens = generation_config.max_length - input_ids.shape[1]
    if max_new_tokens <= 0:
        raise ValueError(f"max_length={generation_config.max_length} leaves no room after the "
                         f"{input_ids.shape[1]}-token prompt; pass max_new_tokens > 0 to generate")

    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError(f"streamers take one row, got {input_ids.shape[0]} prompts; stream one prompt at a time")
    config = resolve_config(power_config)
    adapter = build_adapter(model)
    generator = make_generator(power_seed, power_generator, input_ids.device)
    budget = Budget()
    state = adapter.prefill(input_ids, max_new_tokens, budget)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    def on_decision(index, new_state, trace):
        if streamer is not None:
            streamer.put(new_state.tokens[0, on_decision.length:].cpu())
        on_decision.length = new_state.tokens.shape[1]

    on_decision.length = input_ids.shape[1]
    state, _, _ = run(adapter, state, config, generator, callback=on_decision, budget=budget)
    if streamer is not None:
        streamer.end()
    return _pad_after_eos(state.tokens, state.prompt_length, adapter.eos_ids, adapter.pad_id)


def _pad_after_eos(tokens: torch.Tensor, prompt_length: int, eos_ids, pad_id: int) -> torch.Tensor:
    generated = tokens[:, prompt_length:]  # (B, T_new)
    is_eos = torch.isin(generated, torch.tensor(eos_ids, dtype=torch.long, device=tokens.device))
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    return torch.cat([tokens[:, :prompt_length], generated.masked_fill(after_eos, pad_id)], dim=1)
