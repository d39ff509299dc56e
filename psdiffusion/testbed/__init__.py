"""Miniature models trained on scikit-learn's handwritten digits, shipped for tests and benchmarks.

Three model folders live under ``assets/``, each reproducible with a script in ``samples/testbed/``:

- ``digits-sd/``: a Stable Diffusion-style diffusers folder (VAE to 8x8x4 latents,
  text-conditioned UNet, tiny CLIP text encoder and tokenizer, DDIM scheduler)
  that draws a 32x32 digit from a prompt such as "a thick handwritten digit seven";
- ``digits-clip/``: a tiny open_clip CLIP, the reward model that guides power sampling;
- ``judge/``: an independent small CNN that names the digit in an image. It was trained on
  images no other model saw and only measures results, never guides.

Images everywhere are ``(B, 3, H, W)`` tensors in [0, 1], light digits on black.
"""

import functools
from pathlib import Path

import torch

from .digits import DIGIT_WORDS, build_prompts, digit_of_prompt

__all__ = [
    "ASSETS",
    "DEFAULTS",
    "DIGIT_WORDS",
    "PROMPTS",
    "clip_model_dir",
    "digit_of_prompt",
    "judge_digits",
    "judge_model_dir",
    "load_base_pipeline",
    "load_clip",
    "load_judge",
    "sd_model_dir",
]

ASSETS = Path(__file__).resolve().parent / "assets"

# Sampling defaults of digits-sd. Guidance 1.0 turns classifier-free guidance off, so that
# the base pipeline draws the prompted digit only a little over half the time, and lookahead
# has room to help. By samples/testbed/evaluate_base.py on 200 images, the judged accuracy is
# 0.565 (95% CI 0.50-0.64) with DDIM eta 0 and 0.63 with eta 1. Guidance 3.0 reaches 0.86.
DEFAULTS = {
    "height": 32,
    "width": 32,
    "num_inference_steps": 20,
    "guidance_scale": 1.0,
    "scheduler": "DDIMScheduler",
}

# Benchmark prompts: every digit in five phrasings, bare and with one attribute word each.
PROMPTS = build_prompts()

_TRAINING_SCRIPTS = {
    "digits-sd": "samples/testbed/train_vae.py, build_tokenizer.py and train_unet.py",
    "digits-clip": "samples/testbed/train_clip.py",
    "judge": "samples/testbed/train_judge.py",
}


def _asset_dir(name, required_file):
    folder = ASSETS / name
    if not (folder / required_file).is_file():
        raise FileNotFoundError(
            f"test-bed asset {folder / required_file} is missing; "
            f"recreate it with {_TRAINING_SCRIPTS[name]} (see samples/testbed/README.md)"
        )
    return folder


def sd_model_dir():
    """Return the path of the digits-sd diffusers folder."""
    folder = _asset_dir("digits-sd", "model_index.json")
    for component in ("vae", "unet", "text_encoder"):
        _asset_dir("digits-sd", f"{component}/config.json")
    _asset_dir("digits-sd", "tokenizer/vocab.json")
    return folder


def clip_model_dir():
    """Return the path of the digits-clip open_clip folder (load it with ``"local-dir:" + path``)."""
    _asset_dir("digits-clip", "open_clip_model.safetensors")
    return _asset_dir("digits-clip", "open_clip_config.json")


def judge_model_dir():
    """Return the path of the judge folder."""
    _asset_dir("judge", "judge.safetensors")
    return _asset_dir("judge", "judge_config.json")


def load_base_pipeline(device="cpu", dtype=torch.float32):
    """Load digits-sd as a ``diffusers.StableDiffusionPipeline`` (no safety checker), offline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        sd_model_dir(), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
        local_files_only=True,
    )
    return pipe.to(device)


def load_clip(device="cpu", dtype=torch.float32):
    """Load the CLIP reward model; return ``(model, tokenizer, (mean, std))`` in eval mode.

    ``mean`` and ``std`` are the per-channel normalisation the image tower expects on
    [0, 1] images: ``model.encode_image((images - mean) / std)``.
    """
    import open_clip

    name = "local-dir:" + str(clip_model_dir())
    model, _, _ = open_clip.create_model_and_transforms(name, device=device)
    model = model.to(dtype=dtype).eval()
    tokenizer = open_clip.get_tokenizer(name)
    preprocess = model.visual.preprocess_cfg
    return model, tokenizer, (tuple(preprocess["mean"]), tuple(preprocess["std"]))


def load_judge(device="cpu"):
    """Load the digit judge: an eval-mode module mapping images ``(B, 3, H, W)`` in [0, 1] to logits ``(B, 10)``."""
    from .judge import DigitJudge

    return DigitJudge.from_pretrained(judge_model_dir()).to(device)


@functools.lru_cache(maxsize=1)
def _shared_judge():
    return load_judge()


@torch.no_grad()
def judge_digits(images):
    """Return the digit ``(B,)`` the judge predicts for each image ``(B, 3, H, W)`` in [0, 1].

    The judge is loaded once per process and moved to the images' device.
    """
    judge = _shared_judge().to(images.device)
    return judge(images).argmax(dim=1)
