"""open_clip backbone shared by the CLIP and aesthetic scorers, and the CLIP text-image scorer."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub.constants import is_offline_mode
from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model
from torch import nn

from .base import Scorer
from .cache import PromptEmbeddingCache
from .preprocess import ImagePreprocessConfig, preprocess_images

logger = logging.getLogger(__name__)

LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"

# Precisions that open_clip 3.3.0 `create_model` implements: "fp16" and "bf16" are mixed
# (OpenAI style, LayerNorm and some embeddings stay float32), "pure_*" casts every weight.
# Other strings are silently treated as fp32 there, so they are rejected here.
OPEN_CLIP_PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")


def _offline_hint() -> str:
    if is_offline_mode():
        return "HF_HUB_OFFLINE=1 is set, so nothing is downloaded and the file is not in the local cache"
    return "the download failed"


def _resolve_pretrained_tag(model_name: str, tag: str) -> dict:
    """Fetch (or find in the cache) the weights of an open_clip pretrained tag; return the tag's config.

    open_clip wraps download failures in a generic RuntimeError and, for tags
    without a hub mirror, downloads over plain HTTP even when HF_HUB_OFFLINE=1.
    Resolving the file here first gives one clear error in both cases.
    """
    tag_cfg = get_pretrained_cfg(model_name, tag)
    how_to_pass_file = (
        f"pass a local checkpoint instead: CLIPScorer({model_name!r}, pretrained='/path/to/open_clip_model.safetensors') "
        f"or CLIPScorer('local-dir:/path/to/dir') for a folder with open_clip_config.json"
    )
    url_only = not tag_cfg.get("hf_hub") and tag_cfg.get("url")
    if url_only and is_offline_mode():
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(tag_cfg["url"])
        if not cached.is_file():
            raise FileNotFoundError(
                f"cannot load open_clip weights {model_name}/{tag}: HF_HUB_OFFLINE=1 is set and "
                f"{cached} does not exist; {how_to_pass_file}"
            )
    try:
        download_pretrained(tag_cfg)
    except Exception as error:  # open_clip and huggingface_hub raise several types here
        raise FileNotFoundError(
            f"cannot load open_clip weights {model_name}/{tag}: {_offline_hint()} ({error}); {how_to_pass_file}"
        ) from error
    return tag_cfg


def _check_name_and_pretrained(model_name: str, pretrained: Optional[str]) -> Optional[dict]:
    """Validate the (model_name, pretrained) pair; return the tag config when `pretrained` is a tag."""
    if model_name.startswith((LOCAL_DIR_PREFIX, HF_HUB_PREFIX)):
        if pretrained is not None:
            raise ValueError(
                f"pretrained must be None for {model_name!r}: the weights come from that "
                f"location, got pretrained={pretrained!r}"
            )
        if model_name.startswith(LOCAL_DIR_PREFIX):
            directory = Path(model_name[len(LOCAL_DIR_PREFIX):])
            if not (directory / "open_clip_config.json").is_file():
                raise FileNotFoundError(
                    f"{model_name!r} must name a folder with open_clip_config.json and the weights "
                    f"(for example open_clip_model.safetensors); {directory / 'open_clip_config.json'} not found"
                )
        return None

    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model name {model_name!r}; pass one of open_clip.list_models(), "
            f"'local-dir:/path' or 'hf-hub:org/repo'"
        )
    if pretrained is None or os.path.isfile(pretrained):
        return None
    if get_pretrained_cfg(model_name, pretrained):
        return _resolve_pretrained_tag(model_name, pretrained)
    raise ValueError(
        f"pretrained={pretrained!r} is neither an existing checkpoint file nor a pretrained tag of "
        f"{model_name}; known tags: {list_pretrained_tags_by_model(model_name)}"
    )


class OpenCLIPBackbone(nn.Module):
    """One loaded open_clip model with its tokenizer, tensor preprocessing and text-embedding cache.

    Pass the same backbone to a CLIPScorer and an AestheticScorer to load the
    model once. Image and text embeddings are returned L2-normalised in float32.

    Args:
        model_name: an open_clip model name (`open_clip.list_models()`),
            `local-dir:/path` (a folder with open_clip_config.json and weights)
            or `hf-hub:org/repo`.
        pretrained: for a plain model name, a pretrained tag (`openai`,
            `laion2b_s34b_b79k`, ...) or a local checkpoint path; None builds the
            model with random weights (tests and benchmarks only).
        device: device to load the model on.
        precision: one of OPEN_CLIP_PRECISIONS: "fp32", mixed "fp16" / "bf16"
            (OpenAI style), or "pure_fp16" / "pure_bf16".
        text_cache_size: the maximum number of prompts whose embeddings are kept.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: Optional[str] = None,
        device: Union[str, torch.device] = "cpu",
        precision: str = "fp32",
        text_cache_size: int = 4096,
    ):
        super().__init__()
        if precision not in OPEN_CLIP_PRECISIONS:
            raise ValueError(f"precision must be one of {OPEN_CLIP_PRECISIONS}, got {precision!r}")
        self.text_cache = PromptEmbeddingCache(self._encode_prompt, text_cache_size)
        tag_cfg = _check_name_and_pretrained(model_name, pretrained)
        if pretrained is None and not model_name.startswith((LOCAL_DIR_PREFIX, HF_HUB_PREFIX)):
            logger.warning("CLIP model %s has random weights: pass pretrained= to load trained ones", model_name)

        # The weights of tags such as "openai" were trained with QuickGELU. open_clip
        # 3.3.0 only warns when the model config lacks it, and then embeds wrongly.
        force_quick_gelu = bool(tag_cfg and tag_cfg.get("quick_gelu", False))
        try:
            model = open_clip.create_model(
                model_name, pretrained=pretrained, device=device, precision=precision, force_quick_gelu=force_quick_gelu
            )
        except RuntimeError as error:
            if not model_name.startswith(HF_HUB_PREFIX):
                raise
            # open_clip wraps hub failures, including offline mode, in a RuntimeError.
            raise FileNotFoundError(
                f"cannot load open_clip model {model_name}: {_offline_hint()} ({error}); "
                f"pass 'local-dir:/path' to a folder with open_clip_config.json and the weights instead"
            ) from error
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name = model_name
        self.pretrained = pretrained
        self.preprocess_config = ImagePreprocessConfig.from_open_clip(open_clip.get_model_preprocess_cfg(self.model))

    @property
    def embed_dim(self) -> int:
        """Width of the image embedding."""
        output_dim = getattr(self.model.visual, "output_dim", None)
        if isinstance(output_dim, int):
            return output_dim
        height, width = self.preprocess_config.size
        probe = torch.zeros(1, 3, height, width, device=self.device, dtype=self.image_dtype)
        with torch.no_grad():
            return self.model.encode_image(probe).shape[-1]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's first parameter; under mixed precision this stays float32."""
        return next(self.model.parameters()).dtype

    @property
    def image_dtype(self) -> torch.dtype:
        """Dtype that the image tower's input layer expects.

        Under open_clip's mixed "fp16" / "bf16" precision the first parameter
        (the float32 positional embedding) does not tell the dtype of the patch-embedding
        convolution, which is half, so this reads the first Conv2d weight.
        """
        for module in self.model.visual.modules():
            if isinstance(module, nn.Conv2d):
                return module.weight.dtype
        for parameter in self.model.visual.parameters():
            if parameter.ndim >= 2:
                return parameter.dtype
        return self.dtype

    def _apply(self, fn, *args, **kwargs):
        # Cached text embeddings live on the old device and dtype.
        self.text_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Turn images (B, 3, H, W) in [0, 1] into model input (B, 3, h, w) on the model's device and input dtype."""
        pixels = preprocess_images(images.to(self.device), self.preprocess_config)
        return pixels.to(self.image_dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised image embeddings (B, D) in float32 for images in [0, 1]."""
        features = self.model.encode_image(self.preprocess(images))  # (B, D)
        return F.normalize(features.float(), dim=-1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Return L2-normalised text embeddings (B, D) in float32, from the cache where possible."""
        return self.text_cache.lookup(prompts)

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer([prompt]).to(self.device)  # (1, T)
        features = self.model.encode_text(tokens)  # (1, D)
        return F.normalize(features.float(), dim=-1)[0]

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, pretrained={self.pretrained!r}"


class CLIPScorer(Scorer):
    """Text-image alignment: reward = 100 * cosine(image embedding, prompt embedding).

    The cosine is not clipped at 0 by default: a reward for reweighting keeps
    its order among poorly aligned images, and real CLIP models rarely give
    negative cosines. `clip_negative=True` returns 100 * max(cosine, 0), the
    CLIPScore convention of torchmetrics.

    Preprocessing runs on the images' device as tensor operations, following
    the model's own `preprocess_cfg`: antialiased bicubic resize of the shortest
    side, centre crop, the model's mean and std. Prompt embeddings are cached.

    Args:
        model_name: open_clip model name, `local-dir:/path` or `hf-hub:org/repo`;
            leave None when passing `backbone`.
        pretrained: a pretrained tag or a local checkpoint path, for a plain model name.
            A tag sets QuickGELU when its weights need it, but a path carries no such flag, so
            load OpenAI weights from a file as "ViT-B-32-quickgelu", "ViT-L-14-quickgelu", ...
        backbone: an OpenCLIPBackbone to share with another scorer.
        device, precision, text_cache_size: passed to OpenCLIPBackbone.
        max_batch_size: see Scorer.
        clip_negative: clip cosines below 0 to 0.
    """

    def __init__(
        self,
        model_name: Optional[str] = None,
        pretrained: Optional[str] = None,
        *,
        backbone: Optional[OpenCLIPBackbone] = None,
        device: Union[str, torch.device] = "cpu",
        precision: str = "fp32",
        text_cache_size: int = 4096,
        max_batch_size: Optional[int] = None,
        clip_negative: bool = False,
    ):
        super().__init__(max_batch_size=max_batch_size)
        if backbone is None and model_name is None:
            raise ValueError(
                "model_name is missing: pass an open_clip model name with pretrained "
                "(CLIPScorer('ViT-B-32', 'openai')), 'local-dir:/path', 'hf-hub:org/repo', "
                "or backbone=OpenCLIPBackbone(...)"
            )
        if backbone is not None and model_name is not None:
            raise ValueError("pass either model_name (with pretrained) or backbone=OpenCLIPBackbone(...), not both")
        if backbone is None:
            backbone = OpenCLIPBackbone(model_name, pretrained, device, precision, text_cache_size)
        elif pretrained is not None:
            raise ValueError("pretrained must be None when backbone is passed")
        self.backbone = backbone
        self.clip_negative = clip_negative

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_embeds = self.backbone.encode_images(images)  # (b, D)
        text_embeds = self.backbone.encode_prompts(prompts)  # (b, D)
        cosine = (image_embeds * text_embeds).sum(dim=-1)  # (b,)
        if self.clip_negative:
            cosine = cosine.clamp_min(0.0)
        return 100.0 * cosine

    def extra_repr(self) -> str:
        return f"clip_negative={self.clip_negative}, max_batch_size={self.max_batch_size}"
