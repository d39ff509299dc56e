"""Reward models for power sampling: images (B, 3, H, W) in [0, 1] plus prompts in, (B,) float32 rewards out."""

from .base import CallableScorer, Scorer, TextScorer, validate_images
from .clip import CLIPScorer, OpenCLIPBackbone
from .preprocess import ImagePreprocessConfig, preprocess_images

__all__ = [
    "CallableScorer",
    "CLIPScorer",
    "ImagePreprocessConfig",
    "OpenCLIPBackbone",
    "Scorer",
    "TextScorer",
    "preprocess_images",
    "validate_images",
]
