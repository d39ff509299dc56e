"""Locally generated exact-match tasks and fixed prompts for the language-model benchmark.

Every item is built from a seeded ``random.Random``, so the same seed gives the same items.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

WORDS = ["banana", "strawberry", "committee", "bookkeeper", "mississippi", "letter", "balloon", "coffee",
         "parallel", "assessment", "necessary", "tomorrow", "google", "address", "success", "pepper"]

TOPICS = ["the ocean", "a cat", "winter", "a library", "the moon", "coffee", "a bicycle", "rain", "a volcano",
          "friendship", "a robot", "the desert", "music", "a forest", "trains", "honey bees", "a lighthouse",
          "chess", "the river", "a garden", "snow", "a city at night", "bread", "the wind", "a museum",
          "mountains", "a clock", "the sun", "a bridge", "tea", "a storm", "birds", "an old map", "the stars",
          "a market", "paper", "a violin", "the sea shore", "a candle", "ice cream", "a dragon", "the harvest",
          "a castle", "a mirror", "autumn leaves", "a kite", "a telescope", "a village", "the fog", "a letter"]


@dataclass(frozen=True)
class Item:
    """One exact-match question: ``task`` name, ``prompt`` text and the expected ``answer`` string."""

    task: str
    prompt: str
    answer: str


def make_items(per_task: int = 30, seed: int = 0) -> list[Item]:
    """``per_task`` items each of addition, subtraction, sorting three numbers and counting letters."""
    rng = random.Random(seed)
    items = []
    for _ in range(per_task):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        items.append(Item("add", f"What is {a} + {b}? Answer with just the number.", str(a + b)))
    for _ in range(per_task):
        a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        items.append(Item("sub", f"What is {a} - {b}? Answer with just the number.", str(a - b)))
    for _ in range(per_task):
        numbers = rng.sample(range(1, 100), 3)
        items.append(Item("sort", "Sort these numbers from smallest to largest: "
                          f"{numbers[0]}, {numbers[1]}, {numbers[2]}. Answer with the numbers separated by commas.",
                          ", ".join(str(n) for n in sorted(numbers))))
    for _ in range(per_task):
        word = rng.choice(WORDS)
        letter = rng.choice(sorted(set(word)))
        items.append(Item("count", f"How many times does the letter '{letter}' appear in the word '{word}'? "
                          "Answer with just the number.", str(word.count(letter))))
    return items


def extract_answer(task: str, text: str):
    """The answer a completion gives: the first integer, or for sorting the first three integers."""
    numbers = re.findall(r"-?\d+", text)
    if task == "sort":
        return ", ".join(numbers[:3]) if len(numbers) >= 3 else None
    return numbers[0] if numbers else None


def is_correct(item: Item, text: str) -> bool:
    return extract_answer(item.task, text) == item.answer


def fidelity_prompts(count: int = 50) -> list[str]:
    return [f"Write one sentence about {topic}." for topic in TOPICS[:count]]
