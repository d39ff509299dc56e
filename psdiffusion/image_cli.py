"""``psdiffusion image``: generate images with power sampling or a baseline and record their rewards.

Writes ``OUT/<name>.png`` per image and ``OUT/results.jsonl`` with one JSON
record per image: prompt, seed, method, file, reward, nfe (UNet evaluations by
batch row), seconds, and the judge's verdict when the bundled test-bed model
is used.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

METHODS = ("base", "power", "best-of-n", "svdd", "fk")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "image",
        help="generate images with power sampling or a baseline",
        description="Generate images with power sampling or a baseline; writes PNGs and results.jsonl.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--model", default=None,
                        help="diffusers model folder or hub id (default: the bundled digits test bed)")
    parser.add_argument("--method", choices=METHODS, default="power", help="sampler (default: power)")
    parser.add_argument("--preset", default="minimal", choices=("minimal", "balanced", "quality"),
                        help="power-sampling preset (default: minimal: K=5, M=4, 2-step rollouts, every step "
                             "guided, about 37x the base sampler's UNet evaluations on the bundled model)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default: 0)")
    parser.add_argument("--nfe-budget", type=float, default=None,
                        help="compute budget as a multiple of the base sampler's UNet evaluations; "
                             "sets N for best-of-n, the candidate count for power and svdd, and the "
                             "particle count for fk (default for svdd and fk: 4)")
    parser.add_argument("--scorer", default=None,
                        help="reward model spec for psdiffusion.scorers.build_scorer "
                             "(default: the bundled digits CLIP with the bundled model)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 20 on the bundled model, 30 otherwise)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale (default: 1.0, no guidance, on the bundled "
                             "model; 7.5 otherwise)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--out", type=Path, default=Path("outputs/image"), help="output folder (default: outputs/image); results.jsonl there keeps "
                             "earlier records except those of images this run rewrites")
    parser.add_argument("--save-trace", action="store_true",
                        help="also write each image's per-step reward trace into results.jsonl")


def _read_prompts(args) -> list[str]:
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        if not args.prompts.is_file():
            raise SystemExit(f"error: prompts file not found: {args.prompts}")
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise SystemExit("error: empty prompt; pass --prompt TEXT or a --prompts file with one prompt per line")
    return prompts


def _check_args(args) -> None:
    if args.num_images < 1:
        raise SystemExit(f"error: --num-images must be >= 1, got {args.num_images}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"error: --steps must be >= 1, got {args.steps}")
    if args.nfe_budget is not None and args.nfe_budget < 1:
        raise SystemExit(f"error: --nfe-budget is a multiple of the base sampler's cost and must be >= 1, "
                         f"got {args.nfe_budget}")


def _quiet_progress_bars() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _file_stem(prompt: str, method: str, seed: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"
    return f"{slug}_{method}_seed{seed}"


def _drop_records(path: Path, files: set) -> None:
    """Remove the records of ``files`` from results.jsonl, because this run rewrites those images."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("file") not in files]
    path.write_text("".join(line + "\n" for line in kept))


def main(args) -> int:
    _check_args(args)
    prompts = _read_prompts(args)

    from .image_jobs import ImageJob

    if not getattr(args, "verbose", False):
        _quiet_progress_bars()

    job = ImageJob.create(model=args.model, scorer_spec=args.scorer, device=args.device, steps=args.steps,
                          guidance_scale=args.guidance_scale, preset=args.preset)
    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / "results.jsonl"
    stems = {_file_stem(p, args.method, args.seed + i) for p in prompts for i in range(args.num_images)}
    _drop_records(records_path, {f"{stem}.png" for stem in stems})
    with records_path.open("a") as records:
        for prompt in prompts:
            for offset in range(args.num_images):
                seed = args.seed + offset
                start = time.perf_counter()
                result = job.generate(prompt, seed, args.method, args.nfe_budget)
                seconds = time.perf_counter() - start
                stem = _file_stem(prompt, args.method, seed)
                result.image.save(args.out / f"{stem}.png")
                record = {
                    "prompt": prompt,
                    "seed": seed,
                    "method": args.method,
                    "file": f"{stem}.png",
                    "reward": result.reward,
                    "nfe": result.nfe,
                    "seconds": round(seconds, 3),
                    **result.extra,
                }
                if args.save_trace:
                    record["trace"] = result.trace
                records.write(json.dumps(record) + "\n")
                records.flush()
                verdict = ""
                if "judge_correct" in result.extra:
                    verdict = f" judge={result.extra['judge_digit']} ({'correct' if result.extra['judge_correct'] else 'wrong'})"
                print(f"{stem}.png reward={result.reward:.3f} nfe={result.nfe} {seconds:.1f}s{verdict}")
    print(f"wrote {records_path}")
    return 0
