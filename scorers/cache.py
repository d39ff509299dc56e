"""Least-recently-used cache of prompt embeddings with hit and miss counters."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


class PromptEmbeddingCache:
    """Map each prompt to its embedding (D,), computing missing ones with `encode_prompt`.

    Prompts are encoded one at a time, so an embedding never depends on which
    other prompts were encoded with it and rewards do not depend on call order.
    `max_size=0` turns caching off.
    """

    def __init__(self, encode_prompt: Callable[[str], torch.Tensor], max_size: int = 4096):
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
            raise ValueError(f"text_cache_size must be an int >= 0, got {max_size!r}")
        self.encode_prompt = encode_prompt
        self.max_size = max_size
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.entries.clear()

    def lookup(self, prompts: list[str]) -> torch.Tensor:
        """Return embeddings (B, D) for the prompts, in order."""
        embeddings = []
        for prompt in prompts:
            embedding = self.entries.get(prompt)
            if embedding is None:
                self.misses += 1
                embedding = self.encode_prompt(prompt)
                if self.max_size > 0:
                    self.entries[prompt] = embedding
                    if len(self.entries) > self.max_size:
                        self.entries.popitem(last=False)
            else:
                self.hits += 1
                self.entries.move_to_end(prompt)
            embeddings.append(embedding)
        return torch.stack(embeddings)  # (B, D)
