"""Reward models for power sampling: images (B, 3, H, W) in [0, 1] plus prompts in, (B,) float32 rewards out."""

from .aesthetic import AestheticHead, AestheticScorer, load_aesthetic_head
from .base import CallableScorer, Scorer, TextScorer, validate_images
from .build import SPEC_FORMS, build_scorer
from .clip import CLIPScorer, OpenCLIPBackbone
from .composite import CompositeScorer, standardize_sets
from .pickscore import HFCLIPScorer, PickScoreScorer
from .preprocess import ImagePreprocessConfig, preprocess_images

__all__ = [
    "AestheticHead",
    "AestheticScorer",
    "CallableScorer",
    "CLIPScorer",
    "CompositeScorer",
    "HFCLIPScorer",
    "ImagePreprocessConfig",
    "OpenCLIPBackbone",
    "PickScoreScorer",
    "SPEC_FORMS",
    "Scorer",
    "TextScorer",
    "build_scorer",
    "load_aesthetic_head",
    "preprocess_images",
    "standardize_sets",
    "validate_images",
]
