"""Scorer protocol: images in [0, 1] plus prompts in, one float32 reward per image out."""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

Prompts = Union[str, Sequence[str]]


def validate_images(images: torch.Tensor) -> None:
    """Raise ValueError unless `images` is a float (B, 3, H, W) tensor with values in [0, 1].

    The message names what was wrong and how to convert the common alternatives
    (uint8, [-1, 1] VAE output, channels-last arrays) into the expected form.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(
            f"images must be a torch.Tensor of shape (B, 3, H, W) with values in [0, 1], "
            f"got {type(images).__name__}; convert PIL images or arrays with "
            f"torchvision.transforms.functional.to_tensor or "
            f"VaeImageProcessor.postprocess(..., output_type='pt')"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}; "
            f"for uint8 pixels pass images.float() / 255"
        )
    if images.ndim == 3 and images.shape[0] == 3:
        raise ValueError(
            f"images must have shape (B, 3, H, W), got a single image of shape "
            f"{tuple(images.shape)}; pass images.unsqueeze(0)"
        )
    if images.ndim == 4 and images.shape[1] != 3 and images.shape[-1] == 3:
        raise ValueError(
            f"images must be channels-first (B, 3, H, W), got channels-last shape "
            f"{tuple(images.shape)}; pass images.permute(0, 3, 1, 2)"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must have shape (B, 3, H, W) with 3 RGB channels, got shape {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        return
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must have a positive height and width, got shape {tuple(images.shape)}")

    low, high = torch.aminmax(images.detach())
    low, high = low.item(), high.item()
    if low != low or high != high:
        raise ValueError("images contain NaN values; pass finite values in [0, 1]")
    if low >= 0.0 and high <= 1.0:
        return
    if low >= -1.0 and high <= 1.0:
        hint = "they look like [-1, 1] VAE output: pass (images + 1) / 2, clamped to [0, 1]"
    elif low >= 0.0 and high <= 2.0:
        # A max this close to 1 is overshoot (resampling, float error), not 8-bit pixels.
        hint = "pass images.clamp(0, 1)"
    elif low >= 0.0 and high <= 255.0:
        hint = "they look like [0, 255] pixels: pass images / 255"
    else:
        hint = "pass VaeImageProcessor.postprocess(..., output_type='pt') output"
    raise ValueError(f"images must have values in [0, 1], got values in [{low:.4g}, {high:.4g}]; {hint}")


def normalize_prompts(prompts: Prompts, batch_size: int) -> list[str]:
    """Return one prompt per image: a single string is repeated, a sequence must have length B."""
    if isinstance(prompts, str):
        return [prompts] * batch_size
    if not isinstance(prompts, Sequence):
        raise ValueError(
            f"prompts must be a string or a list of {batch_size} strings, got {type(prompts).__name__}"
        )
    prompt_list = list(prompts)
    if len(prompt_list) != batch_size:
        raise ValueError(
            f"prompts must contain one string per image: got {len(prompt_list)} prompts for "
            f"{batch_size} images; pass a list of {batch_size} strings or one string for all"
        )
    for index, prompt in enumerate(prompt_list):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{index}] must be a string, got {type(prompt).__name__}")
    return prompt_list


def as_rewards(values, batch_size: int, source: str) -> torch.Tensor:
    """Convert a callable's output to a float32 (B,) tensor, raising ValueError on a wrong shape or NaN."""
    rewards = torch.as_tensor(values).detach().to(torch.float32)
    if rewards.ndim == 2 and rewards.shape[1] == 1:
        rewards = rewards[:, 0]  # (B, 1) -> (B,)
    if rewards.shape != (batch_size,):
        raise ValueError(
            f"{source} must return one reward per input, shape ({batch_size},), "
            f"got shape {tuple(rewards.shape)}"
        )
    if torch.isnan(rewards).any():
        rows = torch.nonzero(torch.isnan(rewards)).flatten().tolist()
        raise ValueError(f"{source} returned NaN rewards at rows {rows}")
    return rewards


class Scorer(nn.Module):
    """Base class of image scorers: `scorer(images, prompts)` returns rewards of shape (B,).

    Args:
        max_batch_size: the maximum number of images passed to the model at once.
            A larger call is split into consecutive micro-batches, and their rewards
            are concatenated in input order. None scores the whole call at once.

    Contract of a call:
        images: float tensor (B, 3, H, W) with values in [0, 1], the range that
            `VaeImageProcessor.postprocess(..., output_type="pt")` returns.
        prompts: a list of B strings, or one string used for every image.
        returns: float32 tensor (B,) on the device of `images`.

    A scorer keeps no state that changes its output: the only cache is of
    deterministic text embeddings. Results under different `max_batch_size`
    agree to float rounding (BLAS kernels may pick another blocking for
    another batch size), not bit for bit.

    Subclasses implement `score_batch`, which receives validated images on the
    caller's device and a list of prompts, and returns a (b,) tensor. A subclass
    whose rewards do not depend on the prompts sets `uses_prompts = False`, and
    then `prompts=None` is accepted (score_batch receives empty strings).
    Scorers are inference-only: `train()` keeps every submodule in eval mode, so
    dropout never makes a reward random.
    """

    uses_prompts = True

    def __init__(self, max_batch_size: Optional[int] = None):
        super().__init__()
        self.max_batch_size = max_batch_size

    @property
    def max_batch_size(self) -> Optional[int]:
        return self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"max_batch_size must be None or an int >= 1, got {value!r}")
        self._max_batch_size = value

    def train(self, mode: bool = True) -> "Scorer":
        return super().train(False)

    def forward(self, images: torch.Tensor, prompts: Optional[Prompts]) -> torch.Tensor:
        validate_images(images)
        if prompts is None and not self.uses_prompts:
            prompts = ""
        prompt_list = normalize_prompts(prompts, images.shape[0])
        if images.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32, device=images.device)
        with torch.no_grad():
            rewards = self.score_validated(images, prompt_list)
        return rewards.to(device=images.device, dtype=torch.float32)

    def score_validated(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score validated inputs in micro-batches of at most `max_batch_size` images."""
        batch_size = images.shape[0]
        step = self.max_batch_size or batch_size
        chunks = []
        for start in range(0, batch_size, step):
            stop = min(start + step, batch_size)
            rewards = self.score_batch(images[start:stop], prompts[start:stop])  # (b,)
            chunks.append(as_rewards(rewards.to(images.device), stop - start, type(self).__name__))
        return torch.cat(chunks)  # (B,)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Return rewards (b,) for one micro-batch of validated images."""
        raise NotImplementedError


class CallableScorer(Scorer):
    """Scorer that wraps any Python callable `fn(images, prompts) -> rewards`.

    `fn` receives a validated (b, 3, H, W) tensor in [0, 1] and a list of b
    prompts, and returns b rewards as a tensor, array or list of floats.
    """

    def __init__(self, fn: Callable, max_batch_size: Optional[int] = None, name: Optional[str] = None):
        super().__init__(max_batch_size=max_batch_size)
        if not callable(fn):
            raise ValueError(f"fn must be callable as fn(images, prompts), got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return as_rewards(self.fn(images, prompts), images.shape[0], f"scorer function {self.name}")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, max_batch_size={self.max_batch_size}"


def _accepts_two_positional(fn: Callable) -> bool:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    positional = 0
    for parameter in signature.parameters.values():
        if parameter.kind == parameter.VAR_POSITIONAL:
            return True
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 2


class TextScorer:
    """Verifier reward for the language-model path: `scorer(texts, prompts=None)` returns (B,) float32.

    Wraps `fn(texts) -> rewards` or `fn(texts, prompts) -> rewards`, where rewards
    is a list of floats or a tensor with one value per text. Which form `fn` has
    is read from its signature unless `takes_prompts` sets it.

    Args:
        fn: the reward function.
        takes_prompts: True if `fn` takes `(texts, prompts)`, False if it takes
            `(texts)`; None reads it from the signature (two positional
            parameters mean prompts are passed).
        device: device of the returned tensor; None keeps the device of a
            tensor that `fn` returns, or the CPU for lists.
    """

    def __init__(
        self,
        fn: Callable,
        takes_prompts: Optional[bool] = None,
        device: Optional[Union[str, torch.device]] = None,
    ):
        if not callable(fn):
            raise ValueError(f"fn must be callable as fn(texts) or fn(texts, prompts), got {type(fn).__name__}")
        self.fn = fn
        self.takes_prompts = _accepts_two_positional(fn) if takes_prompts is None else takes_prompts
        self.device = None if device is None else torch.device(device)
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, texts: Sequence[str], prompts: Optional[Prompts] = None) -> torch.Tensor:
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, got one string; pass [text]")
        text_list = list(texts)
        for index, text in enumerate(text_list):
            if not isinstance(text, str):
                raise ValueError(f"texts[{index}] must be a string, got {type(text).__name__}")

        if self.takes_prompts:
            if prompts is None:
                raise ValueError(f"text scorer {self.name} takes (texts, prompts), but prompts is None")
            values = self.fn(text_list, normalize_prompts(prompts, len(text_list)))
        else:
            values = self.fn(text_list)

        rewards = as_rewards(values, len(text_list), f"text scorer {self.name}")
        return rewards if self.device is None else rewards.to(self.device)

    def __repr__(self) -> str:
        return f"TextScorer(name={self.name!r}, takes_prompts={self.takes_prompts})"
