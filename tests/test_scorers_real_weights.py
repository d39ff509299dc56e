"""Scorers on real weights, run only where the files already exist locally (nothing is downloaded).

Set PSD_CLIP_VIT_L14 to the OpenAI ViT-L/14 weights as open_clip stores them
(open_clip_model.safetensors of timm/vit_large_patch14_clip_224.openai) and
PSD_AESTHETIC_HEAD to sac+logos+ava1-l14-linearMSE.pth, PSD_PICKSCORE_DIR and
PSD_PICKSCORE_PROCESSOR_DIR to save_pretrained folders of PickScore_v1 and
CLIP-ViT-H-14-laion2B-s32B-b79K, or have ViT-B-32/openai in the Hugging Face
hub cache.
"""

import os

import pytest
import torch

from psdiffusion.scorers import AestheticScorer, CLIPScorer, PickScoreScorer

pytestmark = pytest.mark.slow


def cached_vit_b32_openai():
    from huggingface_hub import try_to_load_from_cache

    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache("timm/vit_base_patch32_clip_224.openai", filename)
        if isinstance(path, str):
            return path
    return None


def solid_images(colours, size=256):
    return torch.tensor(colours, dtype=torch.float32).view(-1, 3, 1, 1).expand(-1, 3, size, size).contiguous()


def test_clip_vit_b32_prefers_matching_colour():
    if cached_vit_b32_openai() is None:
        pytest.skip("ViT-B-32/openai weights are not in the local hub cache")
    scorer = CLIPScorer("ViT-B-32", pretrained="openai")
    images = solid_images([[1.0, 0.0, 0.0], [0.0, 0.6, 0.0]])

    red_prompt = scorer(images, "a plain red square")
    green_prompt = scorer(images, "a plain green square")

    assert red_prompt[0] > green_prompt[0]
    assert green_prompt[1] > red_prompt[1]
    assert ((red_prompt > 10) & (red_prompt < 45)).all()


def test_aesthetic_vit_l14_scores_in_laion_range():
    clip_path = os.environ.get("PSD_CLIP_VIT_L14")
    head_path = os.environ.get("PSD_AESTHETIC_HEAD")
    if not (clip_path and head_path and os.path.isfile(clip_path) and os.path.isfile(head_path)):
        pytest.skip("set PSD_CLIP_VIT_L14 and PSD_AESTHETIC_HEAD to local files to run")
    # The OpenAI weights were trained with QuickGELU, which a checkpoint path cannot state.
    scorer = AestheticScorer(head_path, "ViT-L-14-quickgelu", clip_path)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 256, 256, generator=generator)

    rewards = scorer(images, "")

    assert rewards.shape == (2,)
    assert ((rewards > 0) & (rewards < 10)).all()


def test_pickscore_prefers_matching_colour():
    model_dir = os.environ.get("PSD_PICKSCORE_DIR")
    processor_dir = os.environ.get("PSD_PICKSCORE_PROCESSOR_DIR")
    if not (model_dir and processor_dir and os.path.isdir(model_dir) and os.path.isdir(processor_dir)):
        pytest.skip("set PSD_PICKSCORE_DIR and PSD_PICKSCORE_PROCESSOR_DIR to local folders to run")
    scorer = PickScoreScorer(model_dir, processor_dir)
    images = solid_images([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])

    red_prompt = scorer(images, "a plain red square")
    blue_prompt = scorer(images, "a plain blue square")

    assert red_prompt[0] > blue_prompt[0]
    assert blue_prompt[1] > red_prompt[1]
