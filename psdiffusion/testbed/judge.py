"""The digit judge: a small CNN that names the digit in an image and never guides sampling."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "judge_config.json"
WEIGHTS_NAME = "judge.safetensors"


@dataclass(frozen=True)
class JudgeConfig:
    """Shape of the judge: input side in pixels and the channels of its three conv stages."""

    image_size: int = 32
    channels: tuple = (16, 32, 64)
    num_classes: int = 10


class DigitJudge(nn.Module):
    """Map images ``(B, 3, H, W)`` in [0, 1] to digit logits ``(B, 10)``.

    The image is averaged to grey and resized to ``image_size`` first, so any
    size and any RGB rendering of a light-on-dark digit is accepted.
    """

    def __init__(self, config=JudgeConfig()):
        super().__init__()
        self.config = config
        layers = []
        in_channels = 1
        for out_channels in config.channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, config.num_classes)

    def forward(self, images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        grey = images.float().mean(dim=1, keepdim=True)  # B, 1, H, W
        size = self.config.image_size
        if grey.shape[-2:] != (size, size):
            grey = F.interpolate(grey, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        features = self.features(grey * 2 - 1)  # B, C, h, w
        return self.head(features.mean(dim=(2, 3)))  # B, 10

    def save_pretrained(self, folder):
        """Write ``judge_config.json`` and ``judge.safetensors`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({name: tensor.contiguous() for name, tensor in self.state_dict().items()}, folder / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, folder):
        """Load a judge written by :meth:`save_pretrained`, in eval mode."""
        folder = Path(folder)
        values = json.loads((folder / CONFIG_NAME).read_text())
        values["channels"] = tuple(values["channels"])
        judge = cls(JudgeConfig(**values))
        judge.load_state_dict(load_file(folder / WEIGHTS_NAME))
        return judge.eval()
