"""Baseline decoders in the same harness as power sampling, with the same budget accounting.

Every method takes ``(model, tokenizer, prompt, max_new_tokens, generator, ...)`` and
returns a ``DecodeResult``. ``Budget.forward_rows`` counts model calls by batch row and
``Budget.rollout_steps`` counts every sampled token, kept or not, so methods compare at
matched token budgets. Shapes: N samples, S steps, V vocabulary.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..core.config import resolve_config
from ..core.decision import Budget
from .generate import power_generate
from .model_io import check_causal_lm, encode_prompt, eos_token_ids, fork_cache, forward_logits, model_device

METHODS = ("greedy", "sample", "low-temp", "power", "best-of-n", "self-consistency", "beam", "mcmc")


@dataclass
class DecodeResult:
    """One decoded completion.

    Attributes:
        method: the decoding method.
        text: the completion, special tokens removed.
        token_ids: generated ids, up to and including the first EOS.
        log_p: sum of the base model's log-probs (temperature 1) of ``token_ids``.
        log_q: sum of the sampler's own step log-probs of ``token_ids``, where defined.
        budget: compute spent.
        extra: method-specific details (answers, acceptance rate, ...).
    """

    method: str
    text: str
    token_ids: list[int]
    log_p: float
    log_q: Optional[float]
    budget: Budget
    extra: dict = field(default_factory=dict)


@dataclass
class Samples:
    """N decoded continuations: ``tokens`` (N, S), ``lengths`` (N,), per-token base ``log_p`` and sampler ``log_q`` (N, S)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    log_p: torch.Tensor
    log_q: torch.Tensor

    def ids(self, n: int) -> list[int]:
        return self.tokens[n, : int(self.lengths[n])].tolist()

    def total_log_p(self) -> torch.Tensor:
        return self.log_p.sum(dim=-1)

    def total_log_q(self) -> torch.Tensor:
        return self.log_q.sum(dim=-1)


def decode_samples(model, cache, next_logits: torch.Tensor, num_samples: int, num_steps: int,
                   temperature: Optional[float], eos_ids, pad_id: int, generator, budget: Budget,
                   max_batch_size: int = 64) -> Samples:
    """Draw ``num_samples`` continuations of one prefix from its cache; ``temperature=None`` is greedy.

    ``cache`` covers the prefix (1 row) and is not changed; ``next_logits`` (1, V) is the next-token logits.
    """
    parts = [_decode_chunk(model, cache, next_logits, n, num_steps, temperature, eos_ids, pad_id, generator, budget)
             for n in _chunk_sizes(num_samples, max_batch_size)]
    return Samples(tokens=torch.cat([p.tokens for p in parts]), lengths=torch.cat([p.lengths for p in parts]),
                   log_p=torch.cat([p.log_p for p in parts]), log_q=torch.cat([p.log_q for p in parts]))


def _chunk_sizes(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def _decode_chunk(model, cache, next_logits, N, S, temperature, eos_ids, pad_id, generator, budget) -> Samples:
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=next_logits.device)
    tokens = torch.full((N, S), pad_id, dtype=torch.long, device=next_logits.device)
    log_p = torch.zeros(N, S, dtype=torch.float64, device=next_logits.device)
    log_q = torch.zeros(N, S, dtype=torch.float64, device=next_logits.device)
    lengths = torch.zeros(N, dtype=torch.long, device=next_logits.device)
    cache = fork_cache(cache, torch.zeros(N, dtype=torch.long, device=next_logits.device))
    logits = next_logits.expand(N, -1)  # (N, V)
    alive = torch.arange(N, device=next_logits.device)

    for s in range(S):
        base = torch.log_softmax(logits, dim=-1)
        if temperature is None:
            drawn = base.argmax(dim=-1)
            sampler = torch.zeros_like(base[:, 0])
        else:
            draw_log_probs = torch.log_softmax(logits / temperature, dim=-1)
            drawn = torch.multinomial(draw_log_probs.exp(), 1, generator=generator).squeeze(-1)
            sampler = draw_log_probs.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
        tokens[alive, s] = drawn
        log_p[alive, s] = base.gather(-1, drawn.unsqueeze(-1)).squeeze(-1).double()
        log_q[alive, s] = sampler.double()
        lengths[alive] += 1
        budget.rollout_steps += alive.numel()
        keep = ~torch.isin(drawn, eos)
        if s == S - 1 or not bool(keep.any()):
            break
        if not bool(keep.all()):
            kept = keep.nonzero().flatten()
            cache.batch_select_indices(kept)
            alive, drawn = alive[kept], drawn[kept]
        logits, _ = forward_logits(model, drawn.unsqueeze(-1), cache)
        budget.forward_rows += alive.numel()
    return Samples(tokens, lengths, log_p, log_q)


class _Harness:
    """The shared setup of every baseline: checks, prompt encoding, prefill and result building."""

    def __init__(self, model, tokenizer, prompt, max_new_tokens):
        check_causal_lm(model)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be an integer > 0, got {max_new_tokens!r}")
        self.start = time.perf_counter()
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]
        self.prompt_ids = encode_prompt(tokenizer, prompt, model_device(model))  # (1, T)
        self.budget = Budget()
        self.next_logits, self.cache = forward_logits(model, self.prompt_ids)
        self.budget.forward_rows += 1

    def samples(self, num_samples, temperature, generator, max_batch_size=64) -> Samples:
        return decode_samples(self.model, self.cache, self.next_logits, num_samples, self.max_new_tokens, temperature,
                              self.eos_ids, self.pad_id, generator, self.budget, max_batch_size)

    def result(self, method, token_ids, log_p, log_q, **extra) -> DecodeResult:
        self.budget.seconds = time.perf_counter() - self.start
        self.budget.decisions = len(token_ids)
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return DecodeResult(method, text, token_ids, float(log_p), None if log_q is None else float(log_q),
                            self.budget, extra)


def greedy(model, tokenizer, prompt, max_new_tokens, generator=None, **_) -> DecodeResult:
    """Greedy decoding: the argmax token at every step."""
    harness = _Harness(model, tokenizer, prompt, max_new_tokens)
    samples = harness.samples(1, None, generator)
    return harness.result("greedy", samples.ids(0), samples.total_log_p()[0], 0.0)


def sample(model, tokenizer, prompt, max_new_tokens, generator, temperature: float = 1.0, **_) -> DecodeResult:
    """Ancestral sampling at ``temperature`` over the full vocabulary."""
    _check_temperature(temperature)
    harness = _Harness(model, tokenizer, prompt, max_new_tokens)
    samples = harness.samples(1, temperature, generator)
    return harness.result("sample", samples.ids(0), samples.total_log_p()[0], samples.total_log_q()[0],
                          temperature=temperature)


def low_temperature(model, tokenizer, prompt, max_new_tokens, generator, alpha: float = 4.0, **_) -> DecodeResult:
    """Sampling at temperature 1/alpha: the token-wise (myopic) approximation of p^alpha."""
    _check_alpha(alpha)
    result = sample(model, tokenizer, prompt, max_new_tokens, generator, temperature=1.0 / alpha)
    result.method = "low-temp"
    return result


def best_of_n(model, tokenizer, prompt, max_new_tokens, generator, n: int = 8, temperature: float = 1.0,
              **_) -> DecodeResult:
    """Draw ``n`` samples at ``temperature`` and keep the one of highest total log p."""
    _check_count("n", n)
    _check_temperature(temperature)
    harness = _Harness(model, tokenizer, prompt, max_new_tokens)
    samples = harness.samples(n, temperature, generator)
    best = int(samples.total_log_p().argmax())
    return harness.result("best-of-n", samples.ids(best), samples.total_log_p()[best], None, n=n)


def last_number(text: str) -> Optional[str]:
    """The last integer in ``text``, the default answer of self-consistency; ``None`` when there is none."""
    numbers = re.findall(r"-?\d+", text)
    return numbers[-1] if numbers else None


def self_consistency(model, tokenizer, prompt, max_new_tokens, generator, n: int = 8, temperature: float = 1.0,
                     answer_fn: Callable[[str], Any] = last_number, **_) -> DecodeResult:
    """Draw ``n`` samples, vote on their extracted answers, and return the most likely sample of the winner."""
    _check_count("n", n)
    _check_temperature(temperature)
    harness = _Harness(model, tokenizer, prompt, max_new_tokens)
    samples = harness.samples(n, temperature, generator)
    texts = [tokenizer.decode(samples.ids(i), skip_special_tokens=True) for i in range(n)]
    answers = [answer_fn(text) for text in texts]
    votes = Counter(a for a in answers if a is not None)
    log_p = samples.total_log_p()
    if votes:
        # Ties go to the answer whose best sample is most likely, so the vote does not depend on dict order.
        top = max(votes.values())
        tied = [a for a, c in votes.items() if c == top]
        winner = max(tied, key=lambda a: max(float(log_p[i]) for i in range(n) if answers[i] == a))
        members = [i for i in range(n) if answers[i] == winner]
    else:
        winner, members = None, list(range(n))
    best = max(members, key=lambda i: float(log_p[i]))
    return harness.result("self-consistency", samples.ids(best), log_p[best], None, n=n, answer=winner,
                          votes=dict(votes))


def beam_search(model, tokenizer, prompt, max_new_tokens, generator=None, n: int = 4, **_) -> DecodeResult:
    """Beam search with ``n`` beams through transformers' ``generate``; model calls are counted by a hook."""
    _check_count("n", n)
    harness = _Harness(model, tokenizer, prompt, max_new_tokens)
    counter = {"rows": 0, "calls": 0}

    def count_rows(module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        counter["rows"] += int(input_ids.shape[0]) if input_ids is not None else 0
        counter["calls"] += 1

    handle = model.register_forward_hook(count_rows, with_kwargs=True)
    try:
        output = model.generate(harness.prompt_ids, attention_mask=torch.ones_like(harness.prompt_ids), num_beams=n,
                                do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=harness.pad_id,
                                early_stopping=True)
    finally:
        handle.remove()
    token_ids = _cut_after_eos(output[0, harness.prompt_ids.shape[1]:].tolist(), harness.eos_ids)
    harness.budget.forward_rows += counter["rows"]
    harness.budget.rollout_steps += n * len(token_ids)
    log_p = _sequence_log_prob(model, harness.prompt_ids, token_ids)
    harness.budget.forward_rows += 1
    return harness.result("beam", token_ids, log_p, 0.0, n=n)


def _cut_after_eos(ids: list[int], eos_ids) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[: i + 1]
    return ids


def _sequence_log_prob(model, prompt_ids: torch.Tensor, token_ids: list[int]) -> float:
    """Sum of the base log-probs of ``token_ids`` after the prompt, by one full forward."""
    if not token_ids:
        return 0.0
    ids = torch.cat([prompt_ids, torch.tensor([token_ids], device=prompt_ids.device)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, prompt_ids.shape[1] - 1:-1].float()  # (S, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    return float(log_probs.gather(-1, torch.tensor(token_ids, device=ids.device).unsqueeze(-1)).sum())


def mcmc_power(model, tokenizer, prompt, max_new_tokens, generator, alpha: float = 4.0, mcmc_steps: int = 4,
               block_size: int = 16, **_) -> DecodeResult:
    """Metropolis-Hastings power sampling with suffix resampling (Karan & Du, "Reasoning with Sampling", 2025).

    Targets p(x)^alpha. The text grows in blocks of ``block_size`` tokens drawn from
    the proposal q = p at temperature 1/alpha; after each block, ``mcmc_steps`` times,
    a position t is drawn uniformly, the suffix from t is redrawn from q, and the
    move is accepted with probability
    min(1, [p(x')^alpha q(x_{>=t})] / [p(x)^alpha q(x'_{>=t})]).
    """
    _check_alpha(alpha)
    _check_count("mcmc_steps", mcmc_steps, minimum=0)
    _check_count("block_size", block_size)
    harness = _Harness(model, tokenizer, prompt, max_new_tokens)
    temperature = 1.0 / alpha
    ids: list[int] = []
    log_p, log_q = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    proposals = accepted = 0

    while len(ids) < max_new_tokens and not (ids and ids[-1] in harness.eos_ids):
        # 1. Extend by one block drawn from q.
        target_length = min(len(ids) + block_size, max_new_tokens)
        block = _draw_suffix(harness, ids, target_length - len(ids), temperature, generator)
        n = int(block.lengths[0])
        ids = ids + block.ids(0)
        log_p = torch.cat([log_p, block.log_p[0, :n]])
        log_q = torch.cat([log_q, block.log_q[0, :n]])

        # 2. Resample suffixes of the current text and accept or reject each.
        for _ in range(mcmc_steps):
            t = int(torch.randint(len(ids), (1,), generator=generator))
            proposal = _draw_suffix(harness, ids[:t], len(ids) - t, temperature, generator)
            n = int(proposal.lengths[0])
            new_log_p, new_log_q = proposal.log_p[0, :n], proposal.log_q[0, :n]
            log_accept = (alpha * (new_log_p.sum() - log_p[t:].sum()) + log_q[t:].sum() - new_log_q.sum())
            proposals += 1
            if math.log(float(torch.rand((), generator=generator, dtype=torch.float64)) + 1e-300) < float(log_accept):
                accepted += 1
                ids = ids[:t] + proposal.ids(0)
                log_p = torch.cat([log_p[:t], new_log_p])
                log_q = torch.cat([log_q[:t], new_log_q])

    # NOTE: log_q is the proposal's log-prob of the final text, not the MH chain's marginal, which has no closed form.
    return harness.result("mcmc", ids, log_p.sum(), log_q.sum(), alpha=alpha, mcmc_steps=mcmc_steps,
                          block_size=block_size, acceptance_rate=accepted / max(proposals, 1))


def _draw_suffix(harness: _Harness, prefix: list[int], num_steps: int, temperature: float, generator) -> Samples:
    """One draw of ``num_steps`` tokens after prompt + ``prefix``, running the prefix through a forked cache."""
    cache, next_logits = harness.cache, harness.next_logits
    if prefix:
        cache = fork_cache(harness.cache, torch.zeros(1, dtype=torch.long, device=harness.prompt_ids.device))
        prefix_ids = torch.tensor([prefix], device=harness.prompt_ids.device)
        next_logits, _ = forward_logits(harness.model, prefix_ids, cache)
        harness.budget.forward_rows += 1
    return decode_samples(harness.model, cache, next_logits, 1, num_steps, temperature, harness.eos_ids,
                          harness.pad_id, generator, harness.budget)


def power(model, tokenizer, prompt, max_new_tokens, generator, config=None, **options) -> DecodeResult:
    """Power sampling with lookahead rollouts (``power_generate``), reported as a ``DecodeResult``."""
    config = resolve_config(config)
    passed = {k: options[k] for k in ("block_size", "block_samples", "reward_fn", "answer_fn", "streamer", "callback")
              if k in options}
    out = power_generate(model, tokenizer, prompt, config, max_new_tokens, generator=generator, **passed)
    log_p = log_q = 0.0
    for trace in out.traces:
        k = int(trace.chosen[0])
        log_p += float(trace.log_p[0, k])
        log_q += float(trace.log_pi[0, k])
    if config.temperature != 1.0:
        # The trace holds log-probs at config.temperature; the fidelity figures need the model's own.
        log_p = _sequence_log_prob(model, encode_prompt(tokenizer, prompt, model_device(model)), out.token_ids)
    return DecodeResult("power", out.text, out.token_ids, log_p, log_q, out.budget,
                        {"finish_reason": out.finish_reason, "mean_ess": _mean_ess(out.traces)})


def _mean_ess(traces) -> float:
    return float(sum(float(t.ess[0]) for t in traces) / len(traces)) if traces else float("nan")


def _check_count(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_temperature(temperature):
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_alpha(alpha):
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


DECODERS = {
    "greedy": greedy,
    "sample": sample,
    "low-temp": low_temperature,
    "power": power,
    "best-of-n": best_of_n,
    "self-consistency": self_consistency,
    "beam": beam_search,
    "mcmc": mcmc_power,
}


def decode(method: str, model, tokenizer, prompt, max_new_tokens: int, generator, **options) -> DecodeResult:
    """Run the decoder named ``method`` (one of ``METHODS``) with its options."""
    if method not in DECODERS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(DECODERS)}")
    return DECODERS[method](model, tokenizer, prompt, max_new_tokens, generator, **options)
