"""Thin helpers over a transformers causal LM: input checks, prompt encoding, forward calls, cache forks.

Shapes: B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any, Optional, Sequence, Union

import torch

PromptLike = Union[str, Sequence[dict]]


def check_causal_lm(model) -> None:
    """Raise TypeError unless ``model`` is a decoder-only transformers model that can generate."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if config is None or can_generate is None:
        raise TypeError(
            f"model must be a transformers causal LM (for example from AutoModelForCausalLM.from_pretrained), "
            f"got {type(model).__name__}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(
            f"{type(model).__name__} is an encoder-decoder model; power sampling here needs a decoder-only "
            "causal LM loaded with AutoModelForCausalLM"
        )
    if not can_generate():
        raise TypeError(
            f"{type(model).__name__} has no language-modelling head for generation (it is not a causal LM); "
            "load the checkpoint with AutoModelForCausalLM instead"
        )


def eos_token_ids(model, tokenizer=None) -> list[int]:
    """Return the end-of-sequence ids of the model's generation config, else of the tokenizer."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def encode_prompt(tokenizer, prompt: PromptLike, device=None) -> torch.Tensor:
    """Token ids (1, T) of a plain-text prompt, or of chat messages through the tokenizer's chat template."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty; pass a non-empty string or a list of chat messages")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    elif isinstance(prompt, (list, tuple)):
        if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise ValueError(
                "messages must be a non-empty list of dicts with 'role' and 'content', "
                f"for example [{{'role': 'user', 'content': 'Hi'}}]; got {prompt!r}"
            )
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template, so pass the prompt as a plain string")
        encoded = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, return_tensors="pt")
        ids = encoded["input_ids"] if not isinstance(encoded, torch.Tensor) else encoded
    else:
        raise TypeError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if ids.shape[-1] == 0:
        raise ValueError("the prompt encodes to zero tokens; pass a prompt with some text")
    return ids if device is None else ids.to(device)


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    # transformers 5 renamed `past_key_values` to `cache`; a subclass may hide both behind **kwargs.
    for cls in model_class.__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        parameters = inspect.signature(forward).parameters
        if "cache" in parameters:
            return "cache"
        if "past_key_values" in parameters:
            return "past_key_values"
    return "past_key_values"


def forward_logits(model, input_ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, Any]:
    """Run ``input_ids`` (B, T) after ``cache``; return the last position's logits (B, V) and the grown cache.

    A cache passed in is extended in place (transformers' dynamic caches do that).
    """
    kwargs = {"input_ids": input_ids, "use_cache": True}
    if cache is not None:
        kwargs[_cache_argument(type(model))] = cache
    with torch.no_grad():
        output = model(**kwargs)
    new_cache = getattr(output, "cache", None)
    if new_cache is None:
        new_cache = output.past_key_values
    return output.logits[:, -1, :].float(), new_cache


def fork_cache(cache, rows: torch.Tensor):
    """Copy rows ``rows`` (N,) of ``cache`` into a new cache, leaving the original untouched.

    Layers are shallow-copied and then re-indexed, so only the selected rows are copied.
    """
    if not hasattr(cache, "layers") or not hasattr(cache, "batch_select_indices"):
        # TODO: support legacy tuple caches (transformers < 4.56 returned them for some models)
        raise TypeError(
            f"cannot fork a {type(cache).__name__}; power sampling needs a layered transformers Cache "
            "such as DynamicCache (transformers >= 4.56)"
        )
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    forked.batch_select_indices(rows)
    return forked


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def make_generator(seed: Optional[int], generator: Optional[torch.Generator], device) -> torch.Generator:
    """The generator to draw with: the one passed in, else a new one seeded with ``seed``."""
    if generator is not None:
        if seed is not None:
            raise ValueError("pass either seed or generator, not both")
        return generator
    if seed is None:
        raise ValueError("pass seed=<int> or generator=torch.Generator(...): every draw needs an explicit seed")
    return torch.Generator(device=device).manual_seed(int(seed))
