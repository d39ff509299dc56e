"""Engine adapter for transformers causal LMs: top-K tokens or sampled blocks, rollouts from a forked KV cache.

Shapes: B rows, K candidates, M rollouts, L candidate length, T tokens, V vocabulary,
N flattened rollout rows (a slice of B*K*M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..core.config import PowerSamplingConfig
from ..core.decision import Budget, Proposal, Rollouts
from ..core.estimators import tail_power_mass
from .model_io import fork_cache, forward_logits


@dataclass
class LMState:
    """B rows decoding in lockstep from a prefilled cache.

    Attributes:
        cache: the model's KV cache over every token in ``tokens``.
        next_logits: (B, V) raw logits of the next token.
        tokens: (B, T) prompt and generated tokens; rows that finished are padded.
        prompt_length: number of prompt tokens at the start of each row.
        finished: (B,) bool, rows that emitted EOS or reached ``max_new_tokens``.
        max_new_tokens: the generation horizon.
    """

    cache: Any
    next_logits: torch.Tensor
    tokens: torch.Tensor
    prompt_length: int
    finished: torch.Tensor
    max_new_tokens: int

    @property
    def num_generated(self) -> int:
        return self.tokens.shape[1] - self.prompt_length

    def generated(self, row: int, eos_ids: Sequence[int] = ()) -> list[int]:
        """Generated ids of ``row``, cut after its first EOS."""
        ids = self.tokens[row, self.prompt_length:].tolist()
        for i, token in enumerate(ids):
            if token in eos_ids:
                return ids[: i + 1]
        return ids


@dataclass
class Candidates:
    """Candidate continuations: ``tokens`` (B, K, L) padded, ``lengths`` (B, K)."""

    tokens: torch.Tensor
    lengths: torch.Tensor


@dataclass
class RolloutTokens:
    """Rollout futures for ``score`` to decode: ``tokens`` (B*K*M, S) and ``lengths`` (B*K*M,)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    shape: tuple[int, int, int]


class CausalLMAdapter:
    """Power-sampling adapter for a transformers causal LM.

    Token mode (``block_size=1``) proposes the top-K next tokens of the raw
    logits. Block mode proposes blocks of ``block_size`` tokens: it samples
    ``block_samples`` blocks from p and keeps the K most likely distinct ones,
    so q is uniform on that set, as for top-K tokens.

    Args:
        model: a decoder-only transformers model.
        eos_ids: token ids that end a sequence.
        pad_id: id appended to rows that already finished.
        block_size: tokens per decision.
        block_samples: blocks sampled per decision in block mode (default 4 * K).
        reward: ``reward(texts, shape) -> (B, K, M)`` tensor over decoded completions,
            used when the config's ``lam`` is finite.
        decode: ``decode(ids) -> str``, needed by ``reward``.
    """

    def __init__(
        self,
        model,
        eos_ids: Sequence[int],
        pad_id: int,
        block_size: int = 1,
        block_samples: Optional[int] = None,
        reward: Optional[Callable] = None,
        decode: Optional[Callable[[list[int]], str]] = None,
    ):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if block_samples is not None and (not isinstance(block_samples, int) or block_samples < 1):
            raise ValueError(f"block_samples must be an integer >= 1 or None, got {block_samples!r}")
        if reward is not None and decode is None:
            raise ValueError("a reward needs decode=<ids -> text>, for example tokenizer.decode")
        self.model = model
        self.eos_ids = [int(i) for i in eos_ids]
        self.pad_id = int(pad_id)
        self.block_size = block_size
        self.block_samples = block_samples
        self.reward = reward
        self.decode = decode
        self._eos = torch.tensor(self.eos_ids, dtype=torch.long)

    # -- state ---------------------------------------------------------------------------------------------------

    def prefill(self, prompt_ids: torch.Tensor, max_new_tokens: int, budget: Budget) -> LMState:
        """Run the prompt (B, T) through the model once and return the starting state."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be an integer > 0, got {max_new_tokens!r}")
        if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids must be (B, T) with T >= 1, got shape {tuple(prompt_ids.shape)}")
        logits, cache = forward_logits(self.model, prompt_ids)
        budget.forward_rows += prompt_ids.shape[0]
        B = prompt_ids.shape[0]
        return LMState(cache=cache, next_logits=logits, tokens=prompt_ids.clone(), prompt_length=prompt_ids.shape[1],
                       finished=torch.zeros(B, dtype=torch.bool, device=prompt_ids.device),
                       max_new_tokens=max_new_tokens)

    def done(self, state: LMState) -> torch.Tensor:
        return state.finished

    def _is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.isin(tokens, self._eos.to(tokens.device))

    def _log_probs(self, logits: torch.Tensor, config: PowerSamplingConfig) -> torch.Tensor:
        return torch.log_softmax(logits / config.temperature, dim=-1)

    # -- propose ---------------------------------------------------------------------------------------------------

    def propose(self, state: LMState, config: PowerSamplingConfig, generator, budget: Budget) -> Proposal:
        if self.block_size == 1:
            proposal = self._propose_tokens(state, config)
        else:
            proposal = self._propose_blocks(state, config, generator, budget)
        return self._mask_finished(state, proposal)

    def _propose_tokens(self, state: LMState, config: PowerSamplingConfig) -> Proposal:
        K = config.num_candidates
        log_p_full = self._log_probs(state.next_logits, config)  # (B, V)
        V = log_p_full.shape[-1]
        if K > V:
            raise ValueError(f"num_candidates={K} is larger than the vocabulary ({V} tokens); pass at most {V}")
        log_p, ids = log_p_full.topk(K, dim=-1)  # (B, K)
        ends_here = state.num_generated + 1 >= state.max_new_tokens
        # A zero-probability candidate (masked logits) only needs a padding slot, not rollouts.
        terminal = self._is_eos(ids) | ~torch.isfinite(log_p) | ends_here  # (B, K)
        candidates = Candidates(tokens=ids.unsqueeze(-1), lengths=torch.ones_like(ids))  # (B, K, 1)
        tail = tail_power_mass(log_p_full, ids, config.alpha)
        return Proposal(candidates=candidates, log_p=log_p.double(), terminal=terminal, tail_mass=tail)

    def _propose_blocks(self, state: LMState, config: PowerSamplingConfig, generator, budget: Budget) -> Proposal:
        B = state.tokens.shape[0]
        K = config.num_candidates
        S = self.block_samples or 4 * K
        L = min(self.block_size, state.max_new_tokens - state.num_generated)
        rows = torch.arange(B, device=state.tokens.device).repeat_interleave(S)  # (B*S,)

        tokens, lengths, log_p_sum = [], [], []
        for chunk in rows.split(config.max_batch_size):
            cache = fork_cache(state.cache, chunk)
            t, n, lp, _ = self._sample(cache, state.next_logits[chunk], L, config, None, generator, budget)
            tokens.append(t)
            lengths.append(n)
            log_p_sum.append(lp)
        tokens = torch.cat(tokens).reshape(B, S, L)  # (B, S, L)
        lengths = torch.cat(lengths).reshape(B, S)
        log_p_sum = torch.cat(log_p_sum).reshape(B, S)

        block_tokens = torch.full((B, K, L), self.pad_id, dtype=torch.long, device=tokens.device)
        block_lengths = torch.ones(B, K, dtype=torch.long, device=tokens.device)
        block_log_p = torch.full((B, K), -math.inf, dtype=torch.float64, device=tokens.device)
        for b in range(B):
            kept = _most_likely_distinct(tokens[b], lengths[b], log_p_sum[b], K)
            for k, s in enumerate(kept):
                block_tokens[b, k] = tokens[b, s]
                block_lengths[b, k] = lengths[b, s]
                block_log_p[b, k] = log_p_sum[b, s]

        last = block_tokens.gather(-1, (block_lengths - 1).unsqueeze(-1)).squeeze(-1)  # (B, K)
        ends_here = state.num_generated + block_lengths >= state.max_new_tokens
        terminal = self._is_eos(last) | ends_here | ~torch.isfinite(block_log_p)
        return Proposal(candidates=Candidates(block_tokens, block_lengths), log_p=block_log_p, terminal=terminal)

    def _mask_finished(self, state: LMState, proposal: Proposal) -> Proposal:
        # A finished row keeps one dummy candidate of probability 1 so the batch stays rectangular.
        finished = state.finished.unsqueeze(-1)  # (B, 1)
        K = proposal.log_p.shape[-1]
        first = torch.arange(K, device=finished.device) == 0
        dummy = torch.where(first, 0.0, -math.inf).to(proposal.log_p.dtype)
        proposal.log_p = torch.where(finished, dummy, proposal.log_p)
        proposal.terminal = proposal.terminal | finished
        return proposal

    # -- rollouts ---------------------------------------------------------------------------------------------------

    def rollout(self, state: LMState, proposal: Proposal, num_rollouts: int, config: PowerSamplingConfig,
                generator, budget: Budget) -> Rollouts:
        """Roll every non-terminal candidate out ``num_rollouts`` times in batched decode steps."""
        B, K = proposal.log_p.shape
        M = num_rollouts
        L = proposal.candidates.tokens.shape[-1]
        steps_left = state.max_new_tokens - state.num_generated - L
        S = steps_left if config.rollout_length is None else min(config.rollout_length, steps_left)
        S = max(S, 0)
        device = state.tokens.device

        log_p_sum = torch.zeros(B * K * M, dtype=torch.float64, device=device)
        log_z_sum = torch.zeros(B * K * M, dtype=torch.float64, device=device)
        future = torch.full((B * K * M, S), self.pad_id, dtype=torch.long, device=device)
        future_lengths = torch.zeros(B * K * M, dtype=torch.long, device=device)

        # Rollout r = (b*K + k)*M + m; terminal candidates have an empty future and no rollouts.
        live = (~proposal.terminal).repeat_interleave(M, dim=1).reshape(-1)  # (B*K*M,)
        live_rows = live.nonzero().flatten()
        if S > 0:
            cand_tokens = proposal.candidates.tokens.reshape(B * K, L)  # (B*K, L)
            for chunk in live_rows.split(config.max_batch_size):
                b = chunk // (K * M)
                cache = fork_cache(state.cache, b)
                logits, _ = forward_logits(self.model, cand_tokens[chunk // M], cache)  # (n, V)
                budget.forward_rows += chunk.numel()
                tokens, lengths, lp, lz = self._sample(cache, logits, S, config, config.alpha, generator, budget)
                future[chunk] = tokens
                future_lengths[chunk] = lengths
                log_p_sum[chunk] = lp
                log_z_sum[chunk] = lz

        shape = (B, K, M)
        tempered = config.rollout_proposal == "tempered"
        return Rollouts(log_p=log_p_sum.reshape(shape), log_normalizer=log_z_sum.reshape(shape) if tempered else None,
                        terminals=RolloutTokens(future, future_lengths, shape))

    def _sample(self, cache, logits: torch.Tensor, num_steps: int, config: PowerSamplingConfig,
                alpha: Optional[float], generator, budget: Budget):
        """Draw up to ``num_steps`` tokens for each of N rows, stopping a row at EOS.

        ``logits`` (N, V) are the raw logits of the first token; ``cache`` is advanced in place.
        With ``alpha`` and a tempered config, tokens are drawn at temperature 1/alpha and the
        per-step log Z_s are summed. Returns tokens (N, S), lengths (N,), the summed base
        log-probs (N,) and the summed log Z_s (N,).
        """
        N = logits.shape[0]
        device = logits.device
        tokens = torch.full((N, num_steps), self.pad_id, dtype=torch.long, device=device)
        lengths = torch.zeros(N, dtype=torch.long, device=device)
        log_p_sum = torch.zeros(N, dtype=torch.float64, device=device)
        log_z_sum = torch.zeros(N, dtype=torch.float64, device=device)
        power = alpha if alpha is not None and config.rollout_proposal == "tempered" else None
        alive = torch.arange(N, device=device)  # rows of the batch still decoding

        for s in range(num_steps):
            drawn, log_p, log_z = _draw(logits, config.temperature, power, generator)
            log_p_sum[alive] += log_p.double()
            if power is not None:
                log_z_sum[alive] += log_z.double()
            tokens[alive, s] = drawn
            lengths[alive] += 1
            budget.rollout_steps += alive.numel()
            if s == num_steps - 1:
                break

            keep = ~self._is_eos(drawn)
            if not bool(keep.all()):
                if not bool(keep.any()):
                    break
                kept = keep.nonzero().flatten()
                cache.batch_select_indices(kept)
                alive, drawn = alive[kept], drawn[kept]
            logits, _ = forward_logits(self.model, drawn.unsqueeze(-1), cache)  # (n, V)
            budget.forward_rows += alive.numel()
        return tokens, lengths, log_p_sum, log_z_sum

    # -- score and commit ------------------------------------------------------------------------------------------

    def completion_texts(self, state: LMState, proposal: Proposal, rollouts: Rollouts) -> list[str]:
        """Decoded completion of each rollout: generated text, candidate and future, B*K*M strings."""
        future: RolloutTokens = rollouts.terminals
        B, K, M = future.shape
        cand = proposal.candidates
        texts = []
        for r in range(B * K * M):
            b, k = r // (K * M), (r // M) % K
            ids = state.generated(b, self.eos_ids)
            ids = ids + cand.tokens[b, k, : int(cand.lengths[b, k])].tolist()
            ids = ids + future.tokens[r, : int(future.lengths[r])].tolist()
            texts.append(self.decode(ids))
        return texts

    def score(self, state: LMState, proposal: Proposal, rollouts: Rollouts) -> torch.Tensor:
        if self.reward is None:
            raise ValueError("config.lam is finite but no reward was given; pass reward_fn or answer_fn, "
                             "or set lam=math.inf for pure power sampling")
        texts = self.completion_texts(state, proposal, rollouts)
        return self.reward(texts, rollouts.terminals.shape)

    def commit(self, state: LMState, proposal: Proposal, chosen: torch.Tensor, budget: Budget) -> LMState:
        """Append the chosen candidate to each row and advance the main cache by its tokens."""
        cand: Candidates = proposal.candidates
        index = chosen.view(-1, 1, 1).expand(-1, 1, cand.tokens.shape[-1])  # (B, 1, L)
        new_tokens = cand.tokens.gather(1, index).squeeze(1)  # (B, L)
        new_lengths = cand.lengths.gather(1, chosen.unsqueeze(-1)).squeeze(-1)  # (B,)
        L = new_tokens.shape[1]
        positions = torch.arange(L, device=new_tokens.device)
        padded = (positions >= new_lengths.unsqueeze(-1)) | state.finished.unsqueeze(-1)  # (B, L)
        new_tokens = new_tokens.masked_fill(padded, self.pad_id)

        ended = self._is_eos(new_tokens).any(dim=-1) & ~state.finished
        tokens = torch.cat([state.tokens, new_tokens], dim=1)
        finished = state.finished | ended | (tokens.shape[1] - state.prompt_length >= state.max_new_tokens)

        next_logits, cache = state.next_logits, state.cache
        if not bool(finished.all()):
            next_logits, cache = forward_logits(self.model, new_tokens, state.cache)
            budget.forward_rows += new_tokens.shape[0]
        return LMState(cache=cache, next_logits=next_logits, tokens=tokens, prompt_length=state.prompt_length,
                       finished=finished, max_new_tokens=state.max_new_tokens)


_MIN_NORMAL_LOG = math.log(torch.finfo(torch.float32).tiny)  # about -87.3


def _draw(logits: torch.Tensor, temperature: float, alpha: Optional[float], generator):
    """Draw one token per row from p = softmax(logits / temperature), or from p^alpha when ``alpha`` is set.

    Returns the drawn ids (N,), their base log p (N,) and log Z = log sum_v p(v)^alpha (N,), or
    ``None`` without ``alpha``.
    """
    scaled = logits / temperature if temperature != 1.0 else logits  # (N, V)
    drawing = scaled * alpha if alpha is not None else scaled
    peak = drawing.amax(dim=-1, keepdim=True)  # (N, 1)
    shifted = drawing - peak  # (N, V)
    # exp below -87 gives float32 subnormals, which are ~70x slower on CPU; their weights (< 1.7e-38
    # relative to the top token) are dropped instead, so they become exact zeros.
    weights = shifted.masked_fill_(shifted < _MIN_NORMAL_LOG, -math.inf).exp_()  # (N, V)
    drawn, total = _inverse_cdf_draw(weights, generator)  # (N, 1), (N,)
    log_norm_drawing = peak.squeeze(-1) + total.log().to(peak.dtype)  # (N,)
    log_norm = log_norm_drawing if alpha is None else torch.logsumexp(scaled, dim=-1)
    log_p = scaled.gather(-1, drawn).squeeze(-1) - log_norm
    log_z = None if alpha is None else log_norm_drawing - alpha * log_norm
    return drawn.squeeze(-1), log_p, log_z


def _inverse_cdf_draw(weights: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one index per row in proportion to non-negative ``weights`` (N, V); also return the row sums (N,).

    A float64 cumulative sum and a binary search replace ``torch.multinomial``, which on CPU
    took ~30x longer than the rest of the draw for a 49k-token vocabulary (torch 2.14).
    """
    cdf = weights.double().cumsum(dim=-1)  # (N, V)
    total = cdf[:, -1]  # (N,)
    u = torch.rand(weights.shape[0], 1, generator=generator, dtype=torch.float64, device=weights.device)
    # right=True skips zero-weight entries: the index found has cdf[i-1] <= u*total < cdf[i].
    drawn = torch.searchsorted(cdf, u * total.unsqueeze(-1), right=True)  # (N, 1)
    return drawn.clamp_(max=weights.shape[-1] - 1), total


def _most_likely_distinct(tokens: torch.Tensor, lengths: torch.Tensor, log_p: torch.Tensor, K: int) -> list[int]:
    """Indices of the K most likely distinct sampled blocks: tokens (S, L), lengths (S,), log_p (S,)."""
    seen, kept = set(), []
    for s in log_p.argsort(descending=True).tolist():
        key = tuple(tokens[s, : int(lengths[s])].tolist())
        if key not in seen:
            seen.add(key)
            kept.append(s)
        if len(kept) == K:
            break
    return kept
