"""The generic power-sampling decision loop over a small adapter protocol.

An adapter turns a model into four batched operations: propose K candidates
with their base log-probs, roll each out M times, score the rollouts, and
commit the chosen candidate. The engine does the reweighting, selection,
budget accounting and tracing; it never branches on the kind of model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

from .config import PowerSamplingConfig
from .estimators import (
    effective_sample_size,
    jackknife_log_probs,
    log_zeta,
    normalized_log_probs,
    rollout_log_weights,
    select,
    standardize_rewards,
    total_variation,
)

logger = logging.getLogger(__name__)


@dataclass
class Proposal:
    """K candidates for each of B rows.

    Attributes:
        candidates: adapter-specific candidate payload (token ids, latents, ...).
        log_p: (B, K) base log-probability of each candidate; -inf marks a padding slot.
        log_q: (B, K) log-density of the proposal that produced the candidates, or
            ``None`` when q is uniform on the set (top-K) or cancels against p.
        terminal: (B, K) bool, candidates that end the sequence (EOS): their future
            is empty, so zeta = exp(r / lam), which is exactly 1 without a reward.
        tail_mass: (B,) share of sum p^alpha left outside the set, or ``None``.
    """

    candidates: Any
    log_p: torch.Tensor
    log_q: Optional[torch.Tensor] = None
    terminal: Optional[torch.Tensor] = None
    tail_mass: Optional[torch.Tensor] = None


@dataclass
class Rollouts:
    """M rollouts of each candidate.

    Attributes:
        log_p: (B, K, M) SUM of the base log-probs of each rollout's future steps.
        log_normalizer: (B, K, M) sum of per-step log Z_s for tempered rollouts, else ``None``.
        terminals: adapter-specific end states, consumed by ``Adapter.score``.
    """

    log_p: torch.Tensor
    log_normalizer: Optional[torch.Tensor] = None
    terminals: Any = None


@dataclass
class Budget:
    """Compute spent so far. ``forward_rows`` counts model calls by batch row."""

    forward_rows: int = 0
    rollout_steps: int = 0
    scorer_calls: int = 0
    scored_items: int = 0
    decisions: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DecisionTrace:
    """Record of one decision (inputs, weights and choice) on the CPU. Shapes use B rows, K candidates, M rollouts."""

    index: int
    log_p: torch.Tensor  # (B, K)
    log_pi: torch.Tensor  # (B, K)
    log_w: torch.Tensor  # (B, K, M)
    rewards: Optional[torch.Tensor]  # (B, K, M), raw, before any standardisation
    ess: torch.Tensor  # (B,)
    chosen: torch.Tensor  # (B,)
    num_rollouts: int
    nonfinite_rollouts: int
    jackknife_degenerate_rows: int = 0
    tail_mass: Optional[torch.Tensor] = None  # (B,)
    extra: dict = field(default_factory=dict)


class Adapter(Protocol):
    """Interface a model provides to the decision loop. All calls are batched over B rows."""

    def propose(self, state, config: PowerSamplingConfig, generator, budget: Budget) -> Proposal: ...

    def rollout(
        self, state, proposal: Proposal, num_rollouts: int, config: PowerSamplingConfig, generator, budget: Budget
    ) -> Rollouts: ...

    def score(self, state, proposal: Proposal, rollouts: Rollouts) -> torch.Tensor: ...

    def commit(self, state, proposal: Proposal, chosen: torch.Tensor, budget: Budget): ...

    def done(self, state) -> torch.Tensor: ...


def reweight(
    log_p: torch.Tensor,
    log_w: torch.Tensor,
    config: PowerSamplingConfig,
    log_q: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, int]:
    """Normalised log pi over the K candidates from base log-probs and rollout log-weights.

    Returns ``(log_pi, jackknife_degenerate_rows)``. Raises ValueError when, in
    some row, no candidate has a rollout of finite weight: the sampler then has
    no estimate at all and refuses to fall back to the base distribution.
    """
    log_zeta_c = log_zeta(log_w)  # (B, K)
    reachable = torch.isfinite(log_p) & torch.isfinite(log_zeta_c)
    dead_rows = ~reachable.any(dim=-1)
    if bool(dead_rows.any()):
        rows = dead_rows.nonzero().flatten().tolist()
        raise ValueError(
            f"no rollout of any candidate has a finite weight in row(s) {rows}: every reward was NaN or "
            "infinite. Check that the scorer returns finite rewards for these inputs."
        )
    if config.estimator == "jackknife" and log_w.shape[-1] >= 2:
        log_pi, degenerate = jackknife_log_probs(log_p, log_w, config.alpha, log_q)
        return log_pi, int(degenerate.sum())
    return normalized_log_probs(log_p, log_zeta_c, config.alpha, log_q), 0


def _rollout_round(adapter, state, proposal, num_rollouts, config, generator, budget):
    rollouts = adapter.rollout(state, proposal, num_rollouts, config, generator, budget)
    rewards = None
    if config.uses_reward:
        rewards = adapter.score(state, proposal, rollouts)
        budget.scorer_calls += 1
        budget.scored_items += rewards.numel()
    log_normalizer = rollouts.log_normalizer if config.rollout_proposal == "tempered" else None
    # At alpha = 1 tempered and base rollouts coincide and the power term is 0 either way.
    if config.rollout_proposal == "tempered" and log_normalizer is None and config.alpha != 1.0:
        raise ValueError(
            "rollout_proposal='tempered' needs per-step normalisers, but the adapter returned none; "
            "use rollout_proposal='base' with this adapter"
        )
    return rollouts.log_p, log_normalizer, rewards


def _log_weights(log_p_future, log_normalizer, rewards, proposal, config):
    if rewards is not None and config.standardize_rewards:
        rewards = standardize_rewards(rewards)
    return rollout_log_weights(
        log_p_future, config.alpha, config.lam, rewards, log_normalizer, terminal=proposal.terminal
    )


def _cat(parts):
    return None if parts[0] is None else torch.cat(parts, dim=-1)


def decide(
    adapter: Adapter,
    state,
    config: PowerSamplingConfig,
    generator: Optional[torch.Generator] = None,
    budget: Optional[Budget] = None,
    index: int = 0,
) -> tuple[Proposal, torch.Tensor, DecisionTrace]:
    """Run one power-sampling decision for every row: propose, roll out, score, reweight, select.

    Returns ``(proposal, chosen, trace)`` with ``chosen`` (B,) indexing the K candidates.
    The state is not changed; call ``adapter.commit`` to advance it.
    """
    budget = budget if budget is not None else Budget()
    proposal = adapter.propose(state, config, generator, budget)

    # 1. The first round of M rollouts.
    parts = [_rollout_round(adapter, state, proposal, config.num_rollouts, config, generator, budget)]
    log_p_future, log_normalizer, rewards = (_cat(list(p)) for p in zip(*parts))
    log_w, nonfinite = _log_weights(log_p_future, log_normalizer, rewards, proposal, config)
    log_pi, degenerate = reweight(proposal.log_p, log_w, config, proposal.log_q)

    # 2. Adaptive rounds: add rollouts until the selection distribution settles.
    while config.adaptive and log_w.shape[-1] < config.max_rollouts:
        extra_m = min(config.num_rollouts, config.max_rollouts - log_w.shape[-1])
        parts.append(_rollout_round(adapter, state, proposal, extra_m, config, generator, budget))
        log_p_future, log_normalizer, rewards = (_cat(list(p)) for p in zip(*parts))
        log_w, nonfinite = _log_weights(log_p_future, log_normalizer, rewards, proposal, config)
        previous = log_pi
        log_pi, degenerate = reweight(proposal.log_p, log_w, config, proposal.log_q)
        if float(total_variation(previous, log_pi).max()) <= config.settle_tol:
            break

    # 3. Select and record.
    chosen = select(log_pi, config.selection, generator)  # (B,)
    budget.decisions += 1
    trace = DecisionTrace(
        index=index,
        log_p=proposal.log_p.detach().cpu(),
        log_pi=log_pi.detach().cpu(),
        log_w=log_w.detach().cpu(),
        rewards=None if rewards is None else rewards.detach().cpu(),
        ess=effective_sample_size(log_pi).detach().cpu(),
        chosen=chosen.detach().cpu(),
        num_rollouts=log_w.shape[-1],
        nonfinite_rollouts=int(nonfinite.sum()),
        jackknife_degenerate_rows=degenerate,
        tail_mass=None if proposal.tail_mass is None else proposal.tail_mass.detach().cpu(),
    )
    if trace.nonfinite_rollouts:
        logger.warning("decision %d: %d rollout(s) had non-finite rewards and got zero weight", index,
                       trace.nonfinite_rollouts)
    return proposal, chosen, trace


def run(
    adapter: Adapter,
    state,
    config: PowerSamplingConfig,
    generator: Optional[torch.Generator] = None,
    max_decisions: Optional[int] = None,
    callback: Optional[Callable[[int, Any, DecisionTrace], None]] = None,
    budget: Optional[Budget] = None,
):
    """Decide and commit until every row is done or ``max_decisions`` is reached.

    ``callback(index, state, trace)`` runs after each commit. Returns ``(state, traces, budget)``.
    """
    if max_decisions is not None and max_decisions < 0:
        raise ValueError(f"max_decisions must be >= 0 or None, got {max_decisions}")
    budget = budget if budget is not None else Budget()
    traces: list[DecisionTrace] = []
    start = time.perf_counter()
    index = 0
    while not bool(adapter.done(state).all()) and (max_decisions is None or index < max_decisions):
        proposal, chosen, trace = decide(adapter, state, config, generator, budget, index)
        state = adapter.commit(state, proposal, chosen, budget)
        traces.append(trace)
        if callback is not None:
            callback(index, state, trace)
        index += 1
    budget.seconds += time.perf_counter() - start
    return state, traces, budget


__all__ = [
    "Adapter",
    "Budget",
    "DecisionTrace",
    "Proposal",
    "Rollouts",
    "decide",
    "reweight",
    "run",
]
