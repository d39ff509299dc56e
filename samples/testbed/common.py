"""Helpers shared by the test-bed training scripts: arguments, seeding, batching, fp16 saving."""

import argparse
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parents[2] / "psdiffusion" / "testbed" / "assets"

logger = logging.getLogger("testbed")


def make_parser(description, steps, batch_size, lr):
    """Build the argument parser every training script shares, with that script's defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="number of optimiser steps")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per optimiser step")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate of AdamW")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, batches and noise")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets folder to write into")
    return parser


def setup(args):
    """Apply the thread count and seed, start logging, and return a seeded generator for batches."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.Generator().manual_seed(args.seed)


def cosine_lr(step, steps, lr, warmup=50):
    """Learning rate at ``step``: linear warm-up, then cosine decay to a tenth of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))


def batches(n, batch_size, generator):
    """Yield index batches forever, reshuffling the ``n`` items with ``generator`` each epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


class Timer:
    """Wall-clock seconds since construction, for the training logs and the README."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self):
        return time.perf_counter() - self.start


def augment(images, generator, strength=1.0):
    """Apply a random affine warp, blur and contrast change to each image ``(B, 3, H, W)``.

    At ``strength`` 1 the warp rotates up to 15 degrees, scales by up to 15% and shifts by
    up to 1/16 of the side; blur and contrast (x0.7 to x1.2) scale with ``strength`` too.
    """
    B = images.shape[0]
    angle = (torch.rand(B, generator=generator) - 0.5) * (2 * math.radians(15)) * strength
    scale = 1 + (torch.rand(B, generator=generator) - 0.5) * 0.3 * strength
    shift = (torch.rand(B, 2, generator=generator) - 0.5) * 0.25 * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # B, 2, 3
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, align_corners=False)

    blurred = F.avg_pool2d(warped, 3, stride=1, padding=1, count_include_pad=False)
    mix = torch.rand(B, 1, 1, 1, generator=generator) * strength
    contrast = 1 + (torch.rand(B, 1, 1, 1, generator=generator) - 0.6) * 0.5 * strength
    return ((1 - mix) * warped + mix * blurred).mul(contrast).clamp(0, 1)
