"""Monte Carlo estimators of the power-sampling next-decision distribution.

Every function works in log space on tensors with any leading batch shape:
``(..., K)`` for per-candidate values and ``(..., K, M)`` for per-rollout values.

For candidate c after history h, the target marginal is

    pi(c | h) ∝ p(c | h)^alpha * zeta(c),
    zeta(c)   = E_{f ~ p(.|h,c)} [ p(f | h,c)^(alpha-1) * exp(r(h,c,f) / lam) ],

estimated from M rollouts f_c1..f_cM per candidate.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def logmeanexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(mean(exp(x))) along ``dim``; an all -inf slice gives -inf."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def log_power_normalizer(log_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """log Z = log sum_v p(v)^alpha over the last dim (the per-step normaliser of tempered rollouts)."""
    return torch.logsumexp(alpha * log_probs, dim=-1)


def standardize_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """Standardise rewards over each candidate set (the last two dims, K x M), ignoring non-finite ones."""
    finite = torch.isfinite(rewards)
    count = finite.sum(dim=(-2, -1), keepdim=True).clamp(min=1)
    filled = torch.where(finite, rewards, torch.zeros_like(rewards))
    mean = filled.sum(dim=(-2, -1), keepdim=True) / count
    centred = torch.where(finite, rewards - mean, torch.zeros_like(rewards))
    std = (centred.square().sum(dim=(-2, -1), keepdim=True) / count).sqrt()
    # A set whose rewards are all equal carries no preference: it standardises to 0, not to NaN.
    scaled = centred / torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(finite, scaled, rewards)


def rollout_log_weights(
    log_p_future: torch.Tensor,
    alpha: float,
    lam: float = math.inf,
    rewards: Optional[torch.Tensor] = None,
    log_normalizer: Optional[torch.Tensor] = None,
    terminal: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rollout log-weights log w = (alpha-1) * log p(f) + r / lam.

    ``log_p_future`` (..., K, M) is the SUM of the rollout's per-step base
    log-probs (never their mean); the candidate's own log p is not included.
    With tempered rollouts (drawn at temperature 1/alpha) pass ``log_normalizer``,
    the summed per-step log Z_s, which replaces the power term. A candidate marked
    ``terminal`` (..., K) has an empty future, so its power term is exactly 0.

    Returns ``(log_w, nonfinite)``: rollouts whose reward (or log-prob) is not
    finite get log w = -inf (zero weight), and ``nonfinite`` marks them.
    """
    if log_normalizer is not None:
        power_term = log_normalizer
    else:
        power_term = (alpha - 1.0) * log_p_future
    if terminal is not None:
        power_term = power_term.masked_fill(terminal.unsqueeze(-1), 0.0)

    nonfinite = ~torch.isfinite(power_term)
    log_w = power_term
    if math.isfinite(lam):
        if rewards is None:
            raise ValueError(f"lam={lam} is finite, so rollout rewards are required; pass rewards or lam=math.inf")
        nonfinite = nonfinite | ~torch.isfinite(rewards)
        log_w = log_w + rewards.to(log_w.dtype) / lam
    log_w = log_w.masked_fill(nonfinite, -math.inf)
    return log_w, nonfinite


def log_zeta(log_w: torch.Tensor) -> torch.Tensor:
    """log zeta_c = logmeanexp_j log w_cj over the M rollouts: (..., K, M) -> (..., K)."""
    return logmeanexp(log_w, dim=-1)


def normalized_log_probs(
    log_p: torch.Tensor,
    log_zeta_c: torch.Tensor,
    alpha: float,
    log_q: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log pi_c = alpha * log p(c|h) + log zeta_c - log q(c), normalised over the K candidates."""
    logits = alpha * log_p + log_zeta_c
    if log_q is not None:
        logits = logits - log_q
    return torch.log_softmax(logits, dim=-1)


def jackknife_log_probs(
    log_p: torch.Tensor,
    log_w: torch.Tensor,
    alpha: float,
    log_q: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jackknife-corrected normalised log-probs of the candidates.

    The plug-in p_hat is a ratio of Monte Carlo means, biased at O(1/M). With
    p_hat(-s) the estimate that leaves rollout s out of EVERY candidate,
    p_JK = M * p_hat - (M-1)/M * sum_s p_hat(-s), clipped at 0 and renormalised.

    Returns ``(log_probs, degenerate)``. A row where leaving some rollout out
    leaves no candidate with a finite weight has no jackknife estimate: it gets
    the plain estimate and ``degenerate`` (...,) marks it.
    """
    M = log_w.shape[-1]
    if M < 2:
        raise ValueError(f"the jackknife needs at least 2 rollouts per candidate, got M={M}")
    base = alpha * log_p if log_q is None else alpha * log_p - log_q  # (..., K)
    log_probs_full = torch.log_softmax(base + log_zeta(log_w), dim=-1)  # (..., K)

    leave_out = torch.eye(M, dtype=torch.bool, device=log_w.device)  # (M_s, M_j)
    log_w_loo = log_w.unsqueeze(-2).masked_fill(leave_out, -math.inf)  # (..., K, M_s, M_j)
    log_zeta_loo = torch.logsumexp(log_w_loo, dim=-1) - math.log(M - 1)  # (..., K, M_s)
    log_probs_loo = torch.log_softmax(base.unsqueeze(-1) + log_zeta_loo, dim=-2)  # (..., K, M_s)

    degenerate = torch.isnan(log_probs_loo).any(dim=-1).any(dim=-1)  # (...,)
    probs_loo_sum = torch.nan_to_num(log_probs_loo.exp(), nan=0.0).sum(dim=-1)  # (..., K)
    probs_jk = M * log_probs_full.exp() - (M - 1) / M * probs_loo_sum
    probs_jk = probs_jk.clamp(min=0.0)
    probs_jk = probs_jk / probs_jk.sum(dim=-1, keepdim=True)

    log_probs = torch.where(degenerate.unsqueeze(-1), log_probs_full, probs_jk.log())
    if bool(degenerate.any()):
        logger.warning(
            "jackknife undefined for %d row(s): one rollout carried all finite weight; used the plain estimate",
            int(degenerate.sum()),
        )
    return log_probs, degenerate


def effective_sample_size(log_probs: torch.Tensor) -> torch.Tensor:
    """ESS = 1 / sum_c pi_c^2 over the last dim, in [1, K]."""
    return 1.0 / torch.exp(torch.logsumexp(2.0 * log_probs, dim=-1))


def tail_power_mass(log_p_full: torch.Tensor, candidate_ids: torch.Tensor, alpha: float) -> torch.Tensor:
    """Share of sum_v p(v)^alpha outside the candidate set: an upper bound on the target mass top-K drops.

    ``log_p_full`` is (..., V), ``candidate_ids`` (..., K) indexes into V.
    """
    log_total = torch.logsumexp(alpha * log_p_full, dim=-1)
    log_kept = torch.logsumexp(alpha * log_p_full.gather(-1, candidate_ids), dim=-1)
    return (-torch.expm1(log_kept - log_total)).clamp(min=0.0)


def select(log_probs: torch.Tensor, selection: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick one candidate per row: a draw from pi (``"sample"``) or its mode (``"argmax"``)."""
    if selection == "argmax":
        return log_probs.argmax(dim=-1)
    if selection != "sample":
        raise ValueError(f"selection must be 'sample' or 'argmax', got {selection!r}")
    K = log_probs.shape[-1]
    probs = log_probs.exp().reshape(-1, K)  # (B, K)
    # The generator must live on the device it samples on, so draw on its device.
    device = generator.device if generator is not None else probs.device
    chosen = torch.multinomial(probs.to(device, torch.float64), 1, generator=generator)  # (B, 1)
    return chosen.reshape(log_probs.shape[:-1]).to(log_probs.device)


def total_variation(log_probs_a: torch.Tensor, log_probs_b: torch.Tensor) -> torch.Tensor:
    """Total-variation distance between two distributions given as log-probs over the last dim."""
    return 0.5 * (log_probs_a.exp() - log_probs_b.exp()).abs().sum(dim=-1)
