"""Rewards over decoded rollout completions: a verifier callable, or self-consistency of extracted answers.

Each reward is called as ``reward(texts, shape)`` with B*K*M completions in
rollout order (b, k, m) and returns a (B, K, M) tensor.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Optional

import torch


class VerifierReward:
    """r = ``verifier(text)`` for each completion; the verifier returns a float (non-finite gets zero weight)."""

    def __init__(self, verifier: Callable[[str], float]):
        if not callable(verifier):
            raise TypeError(f"reward_fn must be callable as reward_fn(text) -> float, got {type(verifier).__name__}")
        self.verifier = verifier

    def __call__(self, texts: list[str], shape: tuple[int, int, int]) -> torch.Tensor:
        values = []
        for text in texts:
            value = self.verifier(text)
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, (int, float)):
                raise TypeError(f"reward_fn must return a float, got {type(value).__name__} for text {text[:60]!r}")
            values.append(float(value))
        return torch.tensor(values, dtype=torch.float64).reshape(shape)


class SelfConsistencyReward:
    """r = share of the row's K*M rollouts whose extracted answer equals this rollout's answer.

    ``extract_answer(text)`` returns a hashable answer, or ``None`` when the text
    has none; a rollout without an answer gets reward 0.
    """

    def __init__(self, extract_answer: Callable[[str], Optional[Any]]):
        if not callable(extract_answer):
            raise TypeError(
                f"answer_fn must be callable as answer_fn(text) -> answer or None, got {type(extract_answer).__name__}"
            )
        self.extract_answer = extract_answer

    def __call__(self, texts: list[str], shape: tuple[int, int, int]) -> torch.Tensor:
        B, K, M = shape
        answers = [self.extract_answer(text) for text in texts]
        rewards = torch.zeros(B * K * M, dtype=torch.float64)
        for b in range(B):
            row = answers[b * K * M:(b + 1) * K * M]
            counts = Counter(a for a in row if a is not None)
            for i, answer in enumerate(row):
                if answer is not None:
                    rewards[b * K * M + i] = counts[answer] / (K * M)
        return rewards.reshape(shape)


def make_reward(reward_fn=None, answer_fn=None, lam: float = math.inf):
    """Build the reward for ``reward_fn`` or ``answer_fn`` (at most one) and check it against ``lam``."""
    if reward_fn is not None and answer_fn is not None:
        raise ValueError("pass either reward_fn (a verifier) or answer_fn (self-consistency), not both")
    reward = None
    if reward_fn is not None:
        reward = VerifierReward(reward_fn)
    elif answer_fn is not None:
        reward = SelfConsistencyReward(answer_fn)
    if reward is not None and not math.isfinite(lam):
        raise ValueError("a reward was given but config.lam is math.inf, which ignores it; pass a finite lam, e.g. lam=1.0")
    if reward is None and math.isfinite(lam):
        raise ValueError(f"config.lam={lam} is finite but no reward was given; pass reward_fn or answer_fn, "
                         "or lam=math.inf for pure power sampling")
    return reward
