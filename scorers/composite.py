"""Weighted sum of scorers, optionally standardised within each candidate set."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .base import Scorer


def standardize_sets(rewards: torch.Tensor, set_size: Optional[int] = None) -> torch.Tensor:
    """Return (r - mean) / std within consecutive sets of `set_size` rewards (the whole batch if None).

    The std is the population std (correction 0). A set whose rewards are all
    equal, including a set of one, standardises to zeros.
    """
    batch_size = rewards.shape[0]
    set_size = batch_size if set_size is None else set_size
    if batch_size % set_size != 0:
        raise ValueError(
            f"batch size {batch_size} is not a multiple of set_size {set_size}; pass whole candidate sets"
        )
    grouped = rewards.view(batch_size // set_size, set_size)  # (B / S, S)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, correction=0, keepdim=True)
    standardized = torch.where(std > 0, centred / std.clamp_min(torch.finfo(std.dtype).tiny), torch.zeros_like(centred))
    return standardized.view(batch_size)  # (B,)


class CompositeScorer(Scorer):
    """Weighted sum of several scorers: sum_i w_i * r_i, each r_i optionally standardised first.

    Rewards of different scorers differ in scale by up to 100x (typical values:
    CLIP 100 * cosine 20 to 35, aesthetic 4 to 7, a callable in [0, 1]). With
    `standardize=True`, each component's rewards are standardised within each
    candidate set of a call before weighting, so a temperature `lam` on the
    composite means the same thing whatever the components' scales are.

    Args:
        scorers: the component scorers.
        weights: one nonzero weight per scorer; all 1 if None. A negative
            weight penalises its scorer's reward.
        standardize: standardise each component within each set before weighting.
        set_size: number of consecutive images in one candidate set (K * M for
            one decision); None treats each call as one set.

    Components micro-batch with their own `max_batch_size`; the composite does
    not split a call, because standardisation needs whole sets.
    """

    def __init__(
        self,
        scorers: Sequence[Scorer],
        weights: Optional[Sequence[float]] = None,
        standardize: bool = False,
        set_size: Optional[int] = None,
    ):
        super().__init__(max_batch_size=None)
        scorers = list(scorers)
        if not scorers:
            raise ValueError("scorers must contain at least one Scorer")
        for index, scorer in enumerate(scorers):
            if not isinstance(scorer, Scorer):
                raise ValueError(
                    f"scorers[{index}] must be a Scorer, got {type(scorer).__name__}; "
                    f"wrap a function with CallableScorer(fn)"
                )
        weights = [1.0] * len(scorers) if weights is None else [float(w) for w in weights]
        if len(weights) != len(scorers):
            raise ValueError(f"weights must have one value per scorer: got {len(weights)} for {len(scorers)} scorers")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite, got {weights}")
        for index, weight in enumerate(weights):
            if weight == 0.0:
                raise ValueError(
                    f"weights[{index}] is 0, so {type(scorers[index]).__name__} would add nothing to the "
                    f"reward; remove that scorer or pass a nonzero weight"
                )
        if set_size is not None and (isinstance(set_size, bool) or not isinstance(set_size, int) or set_size < 1):
            raise ValueError(f"set_size must be None or an int >= 1, got {set_size!r}")

        self.scorers = nn.ModuleList(scorers)
        self.weights = weights
        self.standardize = standardize
        self.set_size = set_size

    @property
    def uses_prompts(self) -> bool:
        """True when any component reads prompts; otherwise `prompts=None` is accepted."""
        return any(scorer.uses_prompts for scorer in self.scorers)

    @Scorer.max_batch_size.setter
    def max_batch_size(self, value: Optional[int]) -> None:
        if value is not None:
            raise ValueError(
                "CompositeScorer does not split calls, because standardisation needs whole sets; "
                "set max_batch_size on its component scorers instead"
            )
        self._max_batch_size = None

    def component_rewards(self, images: torch.Tensor, prompts) -> torch.Tensor:
        """Return each component's raw rewards, shape (N, B) for N scorers."""
        # TODO: components sharing one OpenCLIPBackbone each encode the images again
        # (CLIP plus aesthetic runs the image tower twice per call).
        return torch.stack([scorer(images, prompts) for scorer in self.scorers])  # (N, B)

    def score_validated(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for weight, rewards in zip(self.weights, self.component_rewards(images, prompts)):
            if self.standardize:
                rewards = standardize_sets(rewards, self.set_size)
            total = total + weight * rewards
        return total  # (B,)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, standardize={self.standardize}, set_size={self.set_size}"
