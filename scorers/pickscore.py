"""PickScore, and any transformers CLIPModel, as a text-image scorer.

PickScore (yuvalkirstain/PickScore_v1) is a CLIP ViT-H/14 fine-tuned on human
preferences and stored as a transformers CLIPModel. Its reward is
logit_scale.exp() * cosine(image, prompt), with the tokenizer and image
settings of laion/CLIP-ViT-H-14-laion2B-s32B-b79K.

ImageReward is not supported: its model is BLIP with the `image-reward`
package's own text encoder (not the transformers BLIP classes), and that
package pins old timm and transformers releases, which this project does not
install beside the current ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from huggingface_hub.constants import is_offline_mode

from .base import Scorer
from .cache import PromptEmbeddingCache
from .preprocess import ImagePreprocessConfig, _center_crop_or_pad, preprocess_images

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# PIL resampling codes that CLIPImageProcessor stores in `resample`.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _pooled(output) -> torch.Tensor:
    # transformers 5.25 returns a model output whose pooler_output holds the
    # projected features; older releases return the projected tensor itself.
    return output.pooler_output if hasattr(output, "pooler_output") else output


def _load_pretrained(loader, source: str, component: str):
    try:
        return loader.from_pretrained(source)
    except (OSError, ValueError) as error:  # transformers raises ValueError for incomplete tokenizer folders
        if Path(source).is_dir():
            hint = f"check that the folder contains the {component} files written by save_pretrained"
        elif is_offline_mode():
            hint = "HF_HUB_OFFLINE=1 is set and it is not in the local cache; pass a local save_pretrained folder"
        else:
            hint = "pass a local folder saved with save_pretrained instead"
        raise FileNotFoundError(f"cannot load the {component} from {source!r}: {hint} ({error})") from error


def preprocess_config_from_image_processor(processor) -> tuple[int, ImagePreprocessConfig]:
    """Return (shortest_edge, crop config) for the resize-then-centre-crop of a CLIPImageProcessor."""
    resample = _PIL_RESAMPLE.get(int(processor.resample))
    if resample is None:
        raise ValueError(f"image processor resample={processor.resample!r} is not supported; expected 2 or 3")
    size = processor.size
    if "shortest_edge" not in size:
        raise ValueError(f"image processor size must contain 'shortest_edge', got {size}")
    crop = processor.crop_size if processor.do_center_crop else {"height": size["shortest_edge"], "width": size["shortest_edge"]}
    config = ImagePreprocessConfig(
        size=(int(crop["height"]), int(crop["width"])),
        mean=tuple(float(m) for m in processor.image_mean),
        std=tuple(float(s) for s in processor.image_std),
        interpolation=resample,
        resize_mode="shortest",
    )
    return int(size["shortest_edge"]), config


class HFCLIPScorer(Scorer):
    """Text-image reward from a transformers CLIPModel: scale * cosine(image, prompt).

    Args:
        model: a hub id or a local folder with a CLIPModel (save_pretrained layout).
        processor: a hub id or a local folder with the tokenizer and
            CLIPImageProcessor config; the model's location if None.
        use_logit_scale: scale by the model's logit_scale.exp() (PickScore's
            convention) instead of 100.
        device, dtype: where and in which dtype the model runs.
        max_batch_size: see Scorer.
        text_cache_size: the maximum number of prompts whose embeddings are kept.
    """

    def __init__(
        self,
        model: Union[str, Path],
        processor: Optional[Union[str, Path]] = None,
        *,
        use_logit_scale: bool = True,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: Optional[int] = None,
        text_cache_size: int = 4096,
    ):
        super().__init__(max_batch_size=max_batch_size)
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        processor = model if processor is None else processor
        self.model = _load_pretrained(CLIPModel, str(model), "CLIP model").to(device=device, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.tokenizer = _load_pretrained(AutoTokenizer, str(processor), "tokenizer")
        image_processor = _load_pretrained(CLIPImageProcessor, str(processor), "image processor")
        self.resize_shortest, self.preprocess_config = preprocess_config_from_image_processor(image_processor)
        self.use_logit_scale = use_logit_scale
        self.text_cache = PromptEmbeddingCache(self._encode_prompt, text_cache_size)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    def _apply(self, fn, *args, **kwargs):
        self.text_cache.clear()  # cached embeddings live on the old device and dtype
        return super()._apply(fn, *args, **kwargs)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize the shortest side, centre-crop and normalise images in [0, 1] into model input."""
        images = images.to(self.device)
        if self.resize_shortest != max(self.preprocess_config.size):
            # Resize-and-crop to a square of the shortest edge, then crop that to the crop size.
            square = (self.resize_shortest, self.resize_shortest)
            resize_config = ImagePreprocessConfig(square, (0.0,) * 3, (1.0,) * 3, self.preprocess_config.interpolation)
            images = _center_crop_or_pad(preprocess_images(images, resize_config), self.preprocess_config.size, 0.0)
        return preprocess_images(images, self.preprocess_config).to(self.dtype)  # (B, 3, h, w)

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            [prompt], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).to(self.device)
        features = _pooled(self.model.get_text_features(**tokens))  # (1, D)
        return F.normalize(features.float(), dim=-1)[0]

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_features = _pooled(self.model.get_image_features(pixel_values=self.preprocess(images)))  # (b, D)
        image_embeds = F.normalize(image_features.float(), dim=-1)
        text_embeds = self.text_cache.lookup(prompts)  # (b, D)
        scale = self.model.logit_scale.float().exp() if self.use_logit_scale else 100.0
        return scale * (image_embeds * text_embeds).sum(dim=-1)  # (b,)


class PickScoreScorer(HFCLIPScorer):
    """PickScore reward, logit_scale.exp() * cosine, from a local copy or the hub cache.

    Args:
        model: PickScore_v1 folder or hub id.
        processor: folder or hub id of the CLIP-ViT-H-14 tokenizer and image processor.
        Other arguments as in HFCLIPScorer.
    """

    def __init__(
        self,
        model: Union[str, Path] = PICKSCORE_MODEL,
        processor: Union[str, Path] = PICKSCORE_PROCESSOR,
        **kwargs,
    ):
        super().__init__(model, processor, use_logit_scale=True, **kwargs)
