"""Tabular autoregressive toy models whose power-sampling target is computable by enumeration.

A ``TabularModel`` emits tokens 0..V-1 for at most H steps; the next-token table
depends on the position and the previous token, drawn from a seeded Dirichlet.
An optional EOS token ends a sequence early, and an optional toy reward
``r(tau) = sum_t u[t, x_t]`` scores whole sequences. ``exact_target`` enumerates
every sequence and returns pi(tau) ∝ p(tau)^alpha * exp(r(tau) / lam).

``ToyAdapter`` drives the engine's decision loop on a batch of prefixes, so the
engine's empirical distribution can be compared with the exact target.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .core.config import PowerSamplingConfig
from .core.decision import Budget, Proposal, Rollouts
from .core.estimators import log_power_normalizer, tail_power_mass


class TabularModel:
    """Seeded tabular next-token model over V tokens with horizon H."""

    def __init__(
        self,
        vocab_size: int = 3,
        horizon: int = 4,
        eos_token: Optional[int] = None,
        concentration: float = 0.5,
        reward_scale: float = 1.0,
        seed: int = 0,
    ):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if eos_token is not None and not 0 <= eos_token < vocab_size:
            raise ValueError(f"eos_token must be in [0, {vocab_size}), got {eos_token}")
        rng = np.random.default_rng(seed)
        # Row V of the previous-token axis is the start-of-sequence context.
        table = rng.dirichlet(np.full(vocab_size, concentration), size=(horizon, vocab_size + 1))
        self.log_table = torch.from_numpy(table).clamp(min=1e-12).log()  # (H, V+1, V)
        self.reward_table = reward_scale * torch.from_numpy(rng.standard_normal((horizon, vocab_size)))  # (H, V)
        self.vocab_size = vocab_size
        self.horizon = horizon
        self.eos_token = eos_token
        self.start = vocab_size

    def next_log_probs(self, position: torch.Tensor, previous: torch.Tensor, temperature: float = 1.0):
        """Log p(. | previous token, position) at ``temperature``: (N,) x (N,) -> (N, V)."""
        log_p = self.log_table[position.clamp(max=self.horizon - 1), previous]  # (N, V)
        if temperature != 1.0:
            log_p = torch.log_softmax(log_p / temperature, dim=-1)
        return log_p

    def sequences(self) -> list[tuple[int, ...]]:
        """List every complete sequence: length H without EOS, or ending at the first EOS."""
        complete = []
        for length in range(1, self.horizon + 1):
            for seq in itertools.product(range(self.vocab_size), repeat=length):
                body, last = seq[:-1], seq[-1]
                if self.eos_token is not None and self.eos_token in body:
                    continue
                if length == self.horizon or last == self.eos_token:
                    complete.append(seq)
        return complete

    def sequence_log_prob(self, seq, temperature: float = 1.0) -> float:
        log_p, previous = 0.0, self.start
        for t, token in enumerate(seq):
            row = self.next_log_probs(torch.tensor([t]), torch.tensor([previous]), temperature)[0]
            log_p += float(row[token])
            previous = token
        return log_p

    def reward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """r(tau) = sum_t u[t, x_t] over the first ``lengths`` tokens: (N, H), (N,) -> (N,)."""
        positions = torch.arange(self.horizon).expand_as(tokens)  # (N, H)
        mask = positions < lengths.unsqueeze(-1)
        gathered = self.reward_table[positions, tokens.clamp(min=0)]  # (N, H)
        return torch.where(mask, gathered, torch.zeros_like(gathered)).sum(-1)

    def sequence_reward(self, seq) -> float:
        tokens = torch.full((1, self.horizon), -1, dtype=torch.long)
        tokens[0, : len(seq)] = torch.tensor(seq)
        return float(self.reward(tokens, torch.tensor([len(seq)]))[0])


def exact_target(model: TabularModel, alpha: float, lam: float = math.inf, temperature: float = 1.0) -> dict:
    """pi(tau) ∝ p(tau)^alpha * exp(r(tau)/lam) over every complete sequence, by enumeration."""
    seqs = model.sequences()
    logits = torch.tensor([
        alpha * model.sequence_log_prob(s, temperature) + (model.sequence_reward(s) / lam if math.isfinite(lam) else 0.0)
        for s in seqs
    ], dtype=torch.float64)
    probs = torch.softmax(logits, dim=0)
    return {s: float(p) for s, p in zip(seqs, probs)}


def low_temperature_distribution(model: TabularModel, alpha: float, temperature: float = 1.0) -> dict:
    """Exact distribution of token-wise sampling at temperature 1/alpha (the naive reference)."""
    dist = {}
    for seq in model.sequences():
        log_q, previous = 0.0, model.start
        for t, token in enumerate(seq):
            log_p = model.next_log_probs(torch.tensor([t]), torch.tensor([previous]), temperature)[0]
            log_q += float(torch.log_softmax(alpha * log_p, dim=-1)[token])
            previous = token
        dist[seq] = math.exp(log_q)
    return dist


def total_variation_dist(p: dict, q: dict) -> float:
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


@dataclass
class ToyState:
    """A batch of prefixes: ``tokens`` (B, H) padded with -1, ``lengths`` (B,), ``finished`` (B,) bool."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor

    @classmethod
    def empty(cls, batch_size: int, horizon: int) -> "ToyState":
        return cls(
            tokens=torch.full((batch_size, horizon), -1, dtype=torch.long),
            lengths=torch.zeros(batch_size, dtype=torch.long),
            finished=torch.zeros(batch_size, dtype=torch.bool),
        )

    def to_tuples(self) -> list[tuple[int, ...]]:
        return [tuple(row[:n].tolist()) for row, n in zip(self.tokens, self.lengths)]


class ToyAdapter:
    """Engine adapter for a ``TabularModel``: candidates are the top-K next tokens."""

    def __init__(self, model: TabularModel):
        self.model = model

    def done(self, state: ToyState) -> torch.Tensor:
        return state.finished

    def _previous(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        last = tokens.gather(-1, (lengths - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(lengths > 0, last, torch.full_like(last, self.model.start))

    def propose(self, state: ToyState, config: PowerSamplingConfig, generator, budget: Budget) -> Proposal:
        K = min(config.num_candidates, self.model.vocab_size)
        log_p_full = self.model.next_log_probs(state.lengths, self._previous(state.tokens, state.lengths),
                                               config.temperature)  # (B, V)
        budget.forward_rows += state.lengths.shape[0]
        log_p, candidate_ids = log_p_full.topk(K, dim=-1)  # (B, K)
        # A finished row keeps one dummy candidate with probability 1 so the batch stays rectangular.
        finished = state.finished.unsqueeze(-1)  # (B, 1)
        first = torch.arange(K) == 0
        log_p = torch.where(finished, torch.where(first, 0.0, -math.inf).to(log_p.dtype), log_p)
        ends_here = (state.lengths + 1 >= self.model.horizon).unsqueeze(-1)  # (B, 1)
        terminal = (ends_here | finished).expand_as(candidate_ids)  # (B, K)
        if self.model.eos_token is not None:
            terminal = terminal | (candidate_ids == self.model.eos_token)
        tail = tail_power_mass(log_p_full, candidate_ids, config.alpha)
        return Proposal(candidates=candidate_ids, log_p=log_p, terminal=terminal, tail_mass=tail)

    def rollout(self, state: ToyState, proposal: Proposal, num_rollouts: int, config: PowerSamplingConfig,
                generator, budget: Budget) -> Rollouts:
        B, K = proposal.log_p.shape
        M = num_rollouts
        H = self.model.horizon
        tokens = state.tokens.repeat_interleave(K * M, dim=0)  # (B*K*M, H)
        lengths = state.lengths.repeat_interleave(K * M, dim=0)  # (B*K*M,)
        first = proposal.candidates.repeat_interleave(M, dim=1).reshape(-1)  # (B*K*M,)
        terminal = proposal.terminal.repeat_interleave(M, dim=1).reshape(-1)  # (B*K*M,)
        tokens = tokens.scatter(1, lengths.clamp(max=H - 1).unsqueeze(-1), first.unsqueeze(-1))
        lengths = (lengths + 1).clamp(max=H)
        alive = ~terminal

        log_p_sum = torch.zeros(B * K * M, dtype=torch.float64)
        log_z_sum = torch.zeros(B * K * M, dtype=torch.float64)
        max_steps = H if config.rollout_length is None else config.rollout_length
        for _ in range(max_steps):
            alive = alive & (lengths < H)
            if not bool(alive.any()):
                break
            log_p = self.model.next_log_probs(lengths, self._previous(tokens, lengths), config.temperature)
            budget.forward_rows += int(alive.sum())
            budget.rollout_steps += int(alive.sum())
            if config.rollout_proposal == "tempered":
                log_draw = torch.log_softmax(config.alpha * log_p, dim=-1)
                log_z_sum += torch.where(alive, log_power_normalizer(log_p, config.alpha), 0.0)
            else:
                log_draw = log_p
            drawn = torch.multinomial(log_draw.exp(), 1, generator=generator).squeeze(-1)  # (N,)
            log_p_sum += torch.where(alive, log_p.gather(-1, drawn.unsqueeze(-1)).squeeze(-1), 0.0)
            position = lengths.clamp(max=H - 1).unsqueeze(-1)
            tokens = torch.where(alive.unsqueeze(-1), tokens.scatter(1, position, drawn.unsqueeze(-1)), tokens)
            lengths = torch.where(alive, lengths + 1, lengths)
            if self.model.eos_token is not None:
                alive = alive & (drawn != self.model.eos_token)

        shape = (B, K, M)
        log_normalizer = log_z_sum.reshape(shape) if config.rollout_proposal == "tempered" else None
        return Rollouts(log_p=log_p_sum.reshape(shape), log_normalizer=log_normalizer,
                        terminals=(tokens, lengths, shape))

    def score(self, state: ToyState, proposal: Proposal, rollouts: Rollouts) -> torch.Tensor:
        tokens, lengths, shape = rollouts.terminals
        return self.model.reward(tokens, lengths).reshape(shape)

    def commit(self, state: ToyState, proposal: Proposal, chosen: torch.Tensor, budget: Budget) -> ToyState:
        token = proposal.candidates.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)  # (B,)
        active = ~state.finished
        position = state.lengths.clamp(max=self.model.horizon - 1).unsqueeze(-1)
        tokens = torch.where(active.unsqueeze(-1), state.tokens.scatter(1, position, token.unsqueeze(-1)),
                             state.tokens)
        lengths = torch.where(active, state.lengths + 1, state.lengths)
        finished = state.finished | (lengths >= self.model.horizon)
        if self.model.eos_token is not None:
            finished = finished | (active & (token == self.model.eos_token))
        return ToyState(tokens=tokens, lengths=lengths, finished=finished)


def prefix_state(model: TabularModel, prefixes: list[tuple[int, ...]], repeats: int = 1) -> ToyState:
    """Build a ToyState that contains each prefix ``repeats`` times in a row (prefix-major order)."""
    state = ToyState.empty(len(prefixes) * repeats, model.horizon)
    for i, prefix in enumerate(prefixes):
        rows = slice(i * repeats, (i + 1) * repeats)
        state.tokens[rows, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        state.lengths[rows] = len(prefix)
    return state


def open_prefixes(model: TabularModel) -> list[tuple[int, ...]]:
    """List every prefix at which a decision is taken: shorter than H and not ended by EOS."""
    prefixes = []
    for length in range(model.horizon):
        for seq in itertools.product(range(model.vocab_size), repeat=length):
            if model.eos_token is None or model.eos_token not in seq:
                prefixes.append(seq)
    return prefixes


def expected_decision_probs(model: TabularModel, config: PowerSamplingConfig, repeats: int,
                            generator: Optional[torch.Generator] = None, max_elements: int = 20_000_000) -> dict:
    """E[pi_hat(. | h)] for every open prefix h, averaged over ``repeats`` independent decisions.

    Each decision draws fresh rollouts, so the sampler's distribution over whole
    sequences is exactly the product of these expected next-token probabilities.
    Decisions run in batches of at most ``max_elements`` rollout-pair entries
    (the jackknife holds B x K x M x M values). Returns {prefix: tensor (V,)}
    with zeros for tokens outside the top-K set.
    """
    from .core.decision import decide

    prefixes = open_prefixes(model)
    M = config.max_rollouts or config.num_rollouts
    per_repeat = len(prefixes) * config.num_candidates * M * M
    chunk = max(1, min(repeats, max_elements // per_repeat))
    total = torch.zeros(len(prefixes), model.vocab_size, dtype=torch.float64)
    for start in range(0, repeats, chunk):
        count = min(chunk, repeats - start)
        state = prefix_state(model, prefixes, count)
        proposal, _, trace = decide(ToyAdapter(model), state, config, generator)
        probs = torch.zeros(len(prefixes) * count, model.vocab_size, dtype=torch.float64)
        probs.scatter_(1, proposal.candidates, trace.log_pi.exp().to(torch.float64))  # (P*R, V)
        total += probs.reshape(len(prefixes), count, model.vocab_size).sum(dim=1)  # (P, V)
    mean = total / repeats
    return {prefix: mean[i] for i, prefix in enumerate(prefixes)}


def sampler_distribution(model: TabularModel, config: PowerSamplingConfig, repeats: int,
                         generator: Optional[torch.Generator] = None) -> dict:
    """Compute the sampler's distribution over whole sequences as the product of expected decision probabilities."""
    decision_probs = expected_decision_probs(model, config, repeats, generator)
    dist = {}
    for seq in model.sequences():
        prob = 1.0
        for t, token in enumerate(seq):
            prob *= float(decision_probs[seq[:t]][token])
        dist[seq] = prob
    return dist
