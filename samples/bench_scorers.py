"""Measure CLIPScorer throughput on CPU and the share of scorer time spent in preprocessing.

Uses a ViT-B-32 with random weights (the same compute as the trained model,
nothing is downloaded) on images of the size a diffusion VAE decodes, and
times whole scorer calls at batch sizes 1 to 64. Preprocessing time is
measured inside those calls by timing the backbone's `preprocess` step.

    python samples/bench_scorers.py --out bench-results/scorers.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from psdiffusion.scorers import CLIPScorer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name, built with random weights")
    parser.add_argument(
        "--batch-sizes", default="1,2,4,8,16,32,64", help="comma-separated batch sizes (images per scorer call)"
    )
    parser.add_argument("--image-size", type=int, default=512, help="height and width of the input images in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator that draws the images")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this path")
    return parser.parse_args()


class PreprocessTimer:
    """Wrap a backbone's preprocess step and add up the seconds it takes."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.original = backbone.preprocess
        self.seconds = 0.0
        backbone.preprocess = self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        pixels = self.original(images)
        self.seconds += time.perf_counter() - start
        return pixels


def time_batch_size(scorer: CLIPScorer, timer: PreprocessTimer, images: torch.Tensor, repeats: int) -> dict:
    """Time `repeats` scorer calls on `images`; return medians of call and preprocess seconds."""
    scorer(images, "a photo of a cat")  # warm-up: fills the text cache and allocator
    call_seconds, preprocess_seconds = [], []
    for _ in range(repeats):
        timer.seconds = 0.0
        start = time.perf_counter()
        scorer(images, "a photo of a cat")
        call_seconds.append(time.perf_counter() - start)
        preprocess_seconds.append(timer.seconds)

    call = statistics.median(call_seconds)
    preprocess = statistics.median(preprocess_seconds)
    return {
        "batch_size": images.shape[0],
        "call_seconds_median": call,
        "images_per_second": images.shape[0] / call,
        "preprocess_seconds_median": preprocess,
        "preprocess_share": preprocess / call,
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)  # open_clip warns about the random weights
    torch.set_num_threads(args.threads)
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]

    scorer = CLIPScorer(args.model, pretrained=None)
    timer = PreprocessTimer(scorer.backbone)
    generator = torch.Generator().manual_seed(args.seed)
    all_images = torch.rand(max(batch_sizes), 3, args.image_size, args.image_size, generator=generator)

    rows = []
    print(f"{args.model}, random weights, CPU, {args.threads} thread(s), {args.image_size}x{args.image_size} input")
    print(f"{'batch':>6} {'call s':>9} {'images/s':>9} {'preprocess s':>13} {'preprocess %':>13}")
    for batch_size in batch_sizes:
        row = time_batch_size(scorer, timer, all_images[:batch_size], args.repeats)
        rows.append(row)
        print(
            f"{batch_size:>6} {row['call_seconds_median']:>9.4f} {row['images_per_second']:>9.2f} "
            f"{row['preprocess_seconds_median']:>13.4f} {100 * row['preprocess_share']:>12.1f}%"
        )

    if args.out is not None:
        result = {
            "benchmark": "scorers",
            "model": args.model,
            "weights": "random",
            "device": "cpu",
            "threads": args.threads,
            "image_size": args.image_size,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "results": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
