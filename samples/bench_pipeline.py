"""Benchmark the power-sampling SD pipeline on tiny seeded components, on the CPU.

Prints and writes to JSON:
  (a) batched against looped rollouts: the same decisions (same seed, so the same
      candidates and choices) run with max_batch_size large enough for one UNet call per
      rollout step, and with max_batch_size=1 (one row per call); the time ratio.
  (b) orchestration overhead: total wall time / time inside the UNet, VAE and scorer forwards.

Run: HF_HUB_OFFLINE=1 python samples/bench_pipeline.py --out bench-results/pipeline.json
"""

import argparse
import json
import statistics
import string
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from psdiffusion.core import PowerSamplingConfig
from psdiffusion.pipelines import PowerSamplingStableDiffusionPipeline
from psdiffusion.scorers import CallableScorer


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    letters = list(string.ascii_lowercase)
    tokens = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_pipeline(folder: Path) -> PowerSamplingStableDiffusionPipeline:
    """Seeded tiny SD: UNet (32, 64) at 16x16 latents, 2-layer CLIP text encoder of width 32, 32x32 images."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=16, attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=52, eos_token_id=53, pad_token_id=53, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=16,
    ))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, steps_offset=1)
    scorer = CallableScorer(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="brightness")
    pipe = PowerSamplingStableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tiny_tokenizer(folder), unet=unet.eval(),
        scheduler=scheduler, scorer=scorer, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, config, max_batch_size, args):
    return pipe("a cat", num_inference_steps=args.steps, guidance_scale=2.0, output_type="pt",
                generator=torch.Generator().manual_seed(0), power_sampling_config=config,
                max_batch_size=max_batch_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results/pipeline.json"), help="JSON output file")
    parser.add_argument("--steps", type=int, default=4, help="main denoising steps")
    parser.add_argument("--candidates", type=int, default=4, help="K")
    parser.add_argument("--rollouts", type=int, default=4, help="M")
    parser.add_argument("--rollout-steps", type=int, default=2, help="denoising steps per rollout")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the median is reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        pipe = tiny_pipeline(Path(folder))
    config = PowerSamplingConfig(num_candidates=args.candidates, num_rollouts=args.rollouts,
                                 rollout_length=args.rollout_steps, alpha=1.0, lam=0.5, estimator="plain",
                                 standardize_rewards=True)
    run(pipe, config, 256, args)  # warm-up

    results = {}
    for name, max_batch_size in (("batched", 256), ("looped", 1)):
        outputs = [run(pipe, config, max_batch_size, args) for _ in range(args.repeats)]
        budgets = [output.budget for output in outputs]
        results[name] = {
            "max_batch_size": max_batch_size,
            "seconds": statistics.median(b.seconds for b in budgets),
            "forward_seconds": statistics.median(b.forward_seconds for b in budgets),
            "overhead_ratio": statistics.median(b.seconds / b.forward_seconds for b in budgets),
            "unet_calls": budgets[0].unet_calls,
            "unet_rows": budgets[0].unet_rows,
            "vae_decodes": budgets[0].vae_decodes,
            "scorer_calls": budgets[0].scorer_calls,
            "chosen": [d.chosen.tolist() for d in outputs[0].trace],
        }

    report = {
        "setup": vars(args) | {"out": str(args.out), "torch_threads": torch.get_num_threads(),
                               "device": "cpu", "components": "tiny seeded SD, 32x32 images"},
        "batched": results["batched"],
        "looped": results["looped"],
        "looped_over_batched_time": results["looped"]["seconds"] / results["batched"]["seconds"],
        "same_decisions": results["looped"]["chosen"] == results["batched"]["chosen"],
        "overhead_ratio": results["batched"]["overhead_ratio"],
        "overhead_goal": 1.15,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"batched: {results['batched']['seconds']:.2f} s, {results['batched']['unet_calls']} UNet calls")
    print(f"looped:  {results['looped']['seconds']:.2f} s, {results['looped']['unet_calls']} UNet calls")
    print(f"(a) looped / batched time: {report['looped_over_batched_time']:.2f}x "
          f"(same decisions: {report['same_decisions']})")
    print(f"(b) overhead = wall / forward time: {report['overhead_ratio']:.3f} (goal <= 1.15)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
