"""Tiny seeded open_clip models for offline tests of scorers and of the pipelines that use them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Union

import open_clip
import torch
from safetensors.torch import save_file

TINY_CLIP_NAME = "psd-tiny-clip"


def tiny_clip_config(embed_dim: int = 32, image_size: int = 32) -> dict:
    """Return an open_clip model config with one transformer layer per tower (about 1.7M parameters)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def register_tiny_clip_config(directory: Union[str, Path], name: str = TINY_CLIP_NAME, **config_kwargs) -> str:
    """Write a tiny config as DIRECTORY/NAME.json and register it with open_clip; return NAME."""
    path = Path(directory) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tiny_clip_config(**config_kwargs)))
    open_clip.add_model_config(path)
    return name


@torch.no_grad()
def reinitialize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter from a torch.Generator seeded with `seed`, so weights do not depend on global RNG.

    Matrices and embeddings get N(0, 1/fan_in), LayerNorm scales 1, biases 0,
    and a CLIP logit scale log(1 / 0.07).
    """
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if name.endswith("logit_scale"):
            values = torch.full(parameter.shape, math.log(1 / 0.07))
        elif name.endswith("bias") or name.endswith("logit_bias"):
            values = torch.zeros(parameter.shape)
        elif parameter.ndim == 1 and ("ln" in name or "norm" in name):
            values = torch.ones(parameter.shape)
        else:
            fan_in = parameter.shape[-1] if parameter.ndim >= 2 else parameter.shape[0]
            values = torch.randn(parameter.shape, generator=generator) / math.sqrt(fan_in)
        parameter.copy_(values.to(parameter.dtype))
    return model


def save_tiny_clip_dir(directory: Union[str, Path], seed: int = 0, **config_kwargs) -> Path:
    """Save a seeded tiny CLIP in open_clip's local-dir layout; load it with CLIPScorer("local-dir:DIR").

    The folder gets open_clip_config.json (`model_cfg` and `preprocess_cfg`) and
    open_clip_model.safetensors.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_cfg = tiny_clip_config(**config_kwargs)
    preprocess_cfg = {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    )

    model = open_clip.CLIP(**model_cfg)
    reinitialize_(model, seed)
    state_dict = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state_dict, str(directory / "open_clip_model.safetensors"))
    return directory


def save_tiny_hf_clip_dir(directory: Union[str, Path], seed: int = 0, image_size: int = 32) -> Path:
    """Save a seeded tiny transformers CLIPModel with a character-level tokenizer and image processor.

    The folder loads with HFCLIPScorer(DIR) or PickScoreScorer(DIR, DIR).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    # A byte-pair vocabulary of single letters and no merges: enough to tokenize lowercase prompts.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tokenizer.save_pretrained(directory)

    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    model = reinitialize_(CLIPModel(config), seed)
    model.save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(open_clip.OPENAI_DATASET_MEAN),
        image_std=list(open_clip.OPENAI_DATASET_STD),
    ).save_pretrained(directory)
    return directory
