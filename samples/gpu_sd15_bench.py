"""GPU benchmark: full-size SD 1.5 architecture with random weights, fp16, base against power sampling.

Builds the SD 1.5 UNet, VAE and CLIP ViT-L/14 text encoder from their published
architecture settings with random weights (nothing is downloaded), and a tokenizer
from open_clip's bundled BPE file. It times the base StableDiffusionPipeline and
PowerSamplingStableDiffusionPipeline on the same components, and reports the power-sampling
overhead ratio (wall time / time inside UNet, VAE and scorer forwards). Images are noise:
only the timings mean anything. Fails at once without CUDA. Meant to finish in under 5 minutes.

Run: HF_HUB_OFFLINE=1 python samples/gpu_sd15_bench.py --out bench-results/gpu_sd15.json
"""

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from psdiffusion.core import PowerSamplingConfig
from psdiffusion.pipelines import PowerSamplingStableDiffusionPipeline
from psdiffusion.scorers import CallableScorer

TOKENIZER_BUILDER = Path(__file__).resolve().parent / "testbed" / "build_tokenizer.py"


def build_tokenizer(folder: Path):
    """CLIP tokenizer from open_clip's bundled BPE, built by the test bed's script (no download)."""
    sys.path.insert(0, str(TOKENIZER_BUILDER.parent))
    spec = importlib.util.spec_from_file_location("build_tokenizer", TOKENIZER_BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = module.build_tokenizer(folder)
    tokenizer.model_max_length = 77
    return tokenizer


def sd15_components(folder: Path, dtype: torch.dtype, device: str) -> dict:
    """SD 1.5 UNet, VAE and text encoder architectures with seeded random weights."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, steps_offset=1, set_alpha_to_one=False)
    return {
        "unet": unet.to(device, dtype).eval(),
        "vae": vae.to(device, dtype).eval(),
        "text_encoder": text_encoder.to(device, dtype).eval(),
        "tokenizer": build_tokenizer(folder),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def timed_call(pipe, **kwargs):
    torch.cuda.synchronize()
    start = time.perf_counter()
    output = pipe("a photograph of a cat", generator=torch.Generator("cuda").manual_seed(0), output_type="pt",
                  **kwargs)
    torch.cuda.synchronize()
    return output, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu_sd15.json"), help="JSON output file")
    parser.add_argument("--steps", type=int, default=20, help="main denoising steps")
    parser.add_argument("--candidates", type=int, default=4, help="K")
    parser.add_argument("--rollouts", type=int, default=2, help="M")
    parser.add_argument("--rollout-steps", type=int, default=2, help="denoising steps per rollout")
    parser.add_argument("--window", type=float, nargs=2, default=(0.0, 0.5),
                        help="guided steps, as a (start, end) fraction of the schedule")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows per UNet call, VAE decode, scorer call")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_sd15_bench.py needs a CUDA GPU, but torch.cuda.is_available() is False")

    with tempfile.TemporaryDirectory() as folder:
        components = sd15_components(Path(folder), torch.float16, "cuda")
    base = StableDiffusionPipeline(**components)
    base.set_progress_bar_config(disable=True)
    scorer = CallableScorer(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="brightness")
    pipe = PowerSamplingStableDiffusionPipeline.from_pipe(base, scorer=scorer, torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    config = PowerSamplingConfig(num_candidates=args.candidates, num_rollouts=args.rollouts,
                                 rollout_length=args.rollout_steps, alpha=1.0, lam=0.5, estimator="plain",
                                 standardize_rewards=True, max_batch_size=args.max_batch_size)

    timed_call(base, num_inference_steps=2)  # warm-up: kernels and allocator
    _, base_seconds = timed_call(base, num_inference_steps=args.steps)
    torch.cuda.reset_peak_memory_stats()
    output, power_seconds = timed_call(pipe, num_inference_steps=args.steps, power_sampling_config=config,
                                       guided_steps=tuple(args.window))
    budget = output.budget
    report = {
        "setup": vars(args) | {"out": str(args.out), "window": list(args.window),
                               "gpu": torch.cuda.get_device_name(), "dtype": "float16"},
        "base_seconds": base_seconds,
        "power_sampling_seconds": power_seconds,
        "power_over_base_time": power_seconds / base_seconds,
        "overhead_ratio": budget.seconds / budget.forward_seconds,
        "overhead_goal": 1.15,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "budget": {name: getattr(budget, name) for name in budget.__dataclass_fields__},
        "decisions": len(output.trace),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"base: {base_seconds:.2f} s; power sampling: {power_seconds:.2f} s "
          f"({report['power_over_base_time']:.1f}x, {report['decisions']} guided steps)")
    print(f"overhead = wall / forward time: {report['overhead_ratio']:.3f} (goal <= 1.15)")
    print(f"peak memory {report['peak_memory_gib']:.2f} GiB; wrote {args.out}")


if __name__ == "__main__":
    main()
