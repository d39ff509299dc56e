"""Measure the shipped test bed: judged prompt accuracy of the base pipeline, CLIP zero-shot accuracy, sizes.

Judged prompt accuracy: for each digit, ``--per-digit`` images from the prompt
"a handwritten digit <word>" with seeds 0, 1, ...; the judge names each image's digit,
and the accuracy is the share that match the prompt, with a percentile-bootstrap 95% CI.

Run from the repository root: ``PYTHONPATH=. HF_HUB_OFFLINE=1 python samples/testbed/evaluate_base.py``.
"""

import argparse
import json
import logging

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from psdiffusion import testbed
from psdiffusion.testbed.digits import DIGIT_WORDS, load_split, make_caption

logger = logging.getLogger("testbed")


@torch.no_grad()
def generate(pipe, prompts, seeds, guidance_scale, num_inference_steps, eta=0.0, batch_size=50):
    """Return images ``(N, 3, H, W)`` in [0, 1], one per (prompt, seed) pair, generated in batches."""
    images = []
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start : start + batch_size]]
        output = pipe(
            prompt=list(prompts[start : start + batch_size]),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generators,
            output_type="pt",
        )
        images.append(output.images.float().cpu())
    return torch.cat(images)


def bootstrap_ci(hits, num_resamples=10_000, seed=0):
    """Percentile-bootstrap 95% interval of the mean of 0/1 ``hits``."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(hits), (num_resamples, len(hits)), generator=generator)  # R, N
    means = hits.float()[index].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975]))
    return low.item(), high.item()


def judged_accuracy(pipe, judge, per_digit, guidance_scale, num_inference_steps, eta=0.0):
    """Return ``(accuracy, hits (N,), per-digit accuracy list)`` of prompts judged by ``judge``."""
    digits = torch.arange(10).repeat_interleave(per_digit)  # N
    prompts = [make_caption(int(d)) for d in digits]
    seeds = list(range(per_digit)) * 10
    images = generate(pipe, prompts, seeds, guidance_scale, num_inference_steps, eta)
    with torch.no_grad():
        hits = judge(images).argmax(dim=1) == digits
    per_digit_accuracy = hits.view(10, per_digit).float().mean(dim=1).tolist()
    return hits.float().mean().item(), hits, per_digit_accuracy


@torch.no_grad()
def clip_zero_shot_accuracy(model, tokenizer, preprocess_mean, preprocess_std):
    """Zero-shot accuracy of the CLIP reward model on the held-out "test" split."""
    images, labels = load_split("test")
    mean = torch.tensor(preprocess_mean)[None, :, None, None]  # 1, 3, 1, 1
    std = torch.tensor(preprocess_std)[None, :, None, None]  # 1, 3, 1, 1
    text = F.normalize(model.encode_text(tokenizer([make_caption(d) for d in range(10)])), dim=-1)  # 10, D
    image = F.normalize(model.encode_image((images - mean) / std), dim=-1)  # N, D
    return ((image @ text.T).argmax(dim=1) == labels).float().mean().item()


def folder_megabytes(folder):
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6


def measure_reference_models(judge, results):
    """Add the CLIP zero-shot accuracy, the judge's test accuracy and the asset sizes to ``results``."""
    model, tokenizer, preprocess = testbed.load_clip()
    results["clip_zero_shot_accuracy"] = clip_zero_shot_accuracy(model, tokenizer, *preprocess)
    logger.info("CLIP zero-shot accuracy on the held-out test split: %.3f", results["clip_zero_shot_accuracy"])

    images, labels = load_split("test")
    with torch.no_grad():
        results["judge_test_accuracy"] = (judge(images).argmax(dim=1) == labels).float().mean().item()
    logger.info("judge accuracy on the held-out test split: %.3f", results["judge_test_accuracy"])

    results["asset_megabytes"] = {folder.name: folder_megabytes(folder) for folder in testbed.ASSETS.iterdir()}
    logger.info("asset sizes (MB): %s", results["asset_megabytes"])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-digit", type=int, default=20, help="images per digit")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[testbed.DEFAULTS["guidance_scale"]],
                        help="classifier-free guidance scales to measure")
    parser.add_argument("--steps", type=int, default=testbed.DEFAULTS["num_inference_steps"],
                        help="scheduler steps per image")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM eta: 0 is deterministic DDIM, 1 adds DDPM-like noise at every step")
    parser.add_argument("--model-dir", help="diffusers folder to measure instead of the shipped digits-sd")
    parser.add_argument("--skip-reference-models", action="store_true",
                        help="measure only the pipeline, not CLIP, the judge and the asset sizes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)

    results = {"judged_accuracy": {}}
    if args.model_dir:
        pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
    else:
        pipe = testbed.load_base_pipeline()
    pipe.set_progress_bar_config(disable=True)
    judge = testbed.load_judge()
    for scale in args.guidance_scales:
        accuracy, hits, per_digit = judged_accuracy(pipe, judge, args.per_digit, scale, args.steps, args.eta)
        low, high = bootstrap_ci(hits)
        results["judged_accuracy"][str(scale)] = {"accuracy": accuracy, "ci95": [low, high], "per_digit": per_digit}
        logger.info("guidance %.1f: judged accuracy %.3f (95%% CI %.3f-%.3f) over %d images; per digit %s",
                    scale, accuracy, low, high, len(hits),
                    " ".join(f"{DIGIT_WORDS[d]}={a:.2f}" for d, a in enumerate(per_digit)))

    if not args.skip_reference_models:
        measure_reference_models(judge, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
