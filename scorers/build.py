"""Build scorers from command-line spec strings such as "clip:ViT-B-32/openai+aesthetic:head.pth@0.1"."""

from __future__ import annotations

import re
from typing import Optional, Union

import torch

from .aesthetic import DEFAULT_AESTHETIC_CLIP, AestheticScorer
from .base import Scorer
from .clip import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, CLIPScorer, OpenCLIPBackbone
from .composite import CompositeScorer
from .pickscore import PICKSCORE_PROCESSOR, PickScoreScorer

SCORER_KINDS = ("clip", "aesthetic", "pickscore")

_PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

SPEC_FORMS = """accepted scorer specs:
  clip:MODEL/TAG             open_clip model and pretrained tag, e.g. clip:ViT-B-32/openai
  clip:MODEL//abs/path.pt    open_clip model and a local checkpoint (everything after the first '/')
  clip:local-dir:DIR         folder with open_clip_config.json and open_clip_model.safetensors
  clip:hf-hub:ORG/REPO       open_clip model on the Hugging Face hub
  aesthetic:HEAD             LAION improved aesthetic head (.pth/.safetensors path or hf-hub:ORG/REPO/FILE)
                             on CLIP `aesthetic_clip` (default ViT-L-14/openai)
  pickscore:MODEL            PickScore (hub id yuvalkirstain/PickScore_v1 or a local folder), with the
                             tokenizer and image processor of `pickscore_processor`
  A+B                        weighted sum of components; '+' starts a new component only before 'clip:',
                             'aesthetic:' or 'pickscore:', so file names like sac+logos+ava1-l14-linearMSE.pth stay whole
  COMPONENT@W                weight W of a component in a sum (default 1, nonzero; negative penalises),
                             e.g. clip:ViT-B-32/openai+aesthetic:h.pth@0.1
  Spaces around '+' and '@' are ignored."""

_COMPONENT_SPLIT = re.compile(r"\s*\+\s*(?=(?:%s):)" % "|".join(SCORER_KINDS))


def _invalid_spec(spec: str, reason: str) -> ValueError:
    return ValueError(f"invalid scorer spec {spec!r}: {reason}\n{SPEC_FORMS}")


def parse_clip_source(source: str, spec: str) -> tuple[str, Optional[str]]:
    """Split a CLIP source "MODEL/TAG", "MODEL//path", "local-dir:DIR" or "hf-hub:ORG/REPO" into (model_name, pretrained)."""
    if source.startswith((LOCAL_DIR_PREFIX, HF_HUB_PREFIX)):
        return source, None
    model_name, separator, pretrained = source.partition("/")
    if not model_name or not separator or not pretrained:
        raise _invalid_spec(spec, f"CLIP source {source!r} needs a pretrained tag or checkpoint path after '/'")
    return model_name, pretrained


def _split_weight(component: str, spec: str) -> tuple[str, Optional[float]]:
    body, separator, tail = component.rpartition("@")
    if not separator:
        return component, None
    try:
        weight = float(tail)
    except ValueError:
        return component, None  # an '@' inside a path, not a weight
    if weight == 0.0:
        raise _invalid_spec(spec, f"weight 0 in {component!r} would drop that scorer; remove it or pass a nonzero weight")
    return body.strip(), weight


def build_scorer(
    spec: str,
    *,
    device: Union[str, torch.device] = "cpu",
    precision: str = "fp32",
    max_batch_size: Optional[int] = None,
    standardize: bool = False,
    set_size: Optional[int] = None,
    aesthetic_clip: str = "/".join(DEFAULT_AESTHETIC_CLIP),
    clip_negative: bool = False,
    pickscore_processor: str = PICKSCORE_PROCESSOR,
) -> Scorer:
    """Build a scorer from a spec string (see SPEC_FORMS); unknown specs raise ValueError listing the forms.

    Components of one spec that name the same CLIP source share one loaded
    model, so "clip:ViT-L-14/openai+aesthetic:head.pth" loads ViT-L/14 once.

    Args:
        spec: the scorer spec.
        device, precision: where and in which precision CLIP models load.
        max_batch_size: micro-batch size of each component.
        standardize, set_size: passed to CompositeScorer when the spec has
            several components or a weight.
        aesthetic_clip: CLIP source of aesthetic components, "MODEL/TAG",
            "MODEL//path" or "local-dir:DIR"; for a local copy of the OpenAI
            weights use "ViT-L-14-quickgelu//path/to/open_clip_model.safetensors".
        clip_negative: clip CLIP cosines at 0 (see CLIPScorer).
        pickscore_processor: hub id or local folder of PickScore's tokenizer and
            image processor.
    """
    if not isinstance(spec, str):
        raise ValueError(f"the scorer spec must be a string, got {type(spec).__name__}\n{SPEC_FORMS}")
    if not spec.strip():
        raise _invalid_spec(spec, "the spec is empty")
    backbones: dict[tuple[str, Optional[str]], OpenCLIPBackbone] = {}

    def backbone_for(source: str) -> OpenCLIPBackbone:
        key = parse_clip_source(source, spec)
        if key not in backbones:
            backbones[key] = OpenCLIPBackbone(*key, device=device, precision=precision)
        return backbones[key]

    scorers, weights = [], []
    for component in _COMPONENT_SPLIT.split(spec.strip()):
        body, weight = _split_weight(component, spec)
        kind, separator, argument = body.partition(":")
        if not separator or kind not in SCORER_KINDS:
            raise _invalid_spec(spec, f"unknown scorer kind in {component!r}; expected one of {SCORER_KINDS}")
        if not argument:
            raise _invalid_spec(spec, f"{kind}: needs an argument")

        if kind == "clip":
            scorer = CLIPScorer(
                backbone=backbone_for(argument), max_batch_size=max_batch_size, clip_negative=clip_negative
            )
        elif kind == "aesthetic":
            scorer = AestheticScorer(argument, backbone=backbone_for(aesthetic_clip), max_batch_size=max_batch_size)
        else:
            if precision not in _PRECISION_DTYPES:
                raise ValueError(f"precision for pickscore must be one of {list(_PRECISION_DTYPES)}, got {precision!r}")
            scorer = PickScoreScorer(
                argument, pickscore_processor, device=device, dtype=_PRECISION_DTYPES[precision],
                max_batch_size=max_batch_size,
            )
        scorers.append(scorer)
        weights.append(1.0 if weight is None else weight)

    if len(scorers) == 1 and weights[0] == 1.0 and not standardize:
        return scorers[0]
    return CompositeScorer(scorers, weights, standardize=standardize, set_size=set_size)
