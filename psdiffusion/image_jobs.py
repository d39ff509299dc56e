"""One image per call from a loaded power-sampling pipeline, with its reward, cost and judged verdict.

Shared by ``psdiffusion image`` and ``make demo``. With no model given it loads
the bundled digits test bed, guides with its CLIP and judges with its
independent classifier.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

logger = logging.getLogger(__name__)


@dataclass
class ImageResult:
    """A generated image and what it cost.

    Attributes:
        image: the image as a PIL image.
        pixels: the image as a float tensor (3, H, W) in [0, 1].
        reward: the scorer's reward of the final image.
        nfe: UNet evaluations by batch row (a guided latent with classifier-free guidance counts twice).
        trace: per guided step, the step index, the mean and max rollout reward and the chosen candidate's mean.
        extra: the judge's verdict for the bundled model, and method details.
    """

    image: object
    pixels: torch.Tensor
    reward: float
    nfe: int
    trace: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def summarize_trace(trace) -> list[dict]:
    """Per guided step: mean and max rollout reward over all candidates, and the chosen candidate's mean."""
    rows = []
    for decision in trace:
        rewards = decision.rewards[0]  # (K, M) of the first image
        chosen = int(decision.chosen[0])
        rows.append({
            "step": int(decision.index),
            "mean_reward": float(rewards.mean()),
            "max_reward": float(rewards.max()),
            "chosen_reward": float(rewards[chosen].mean()),
            "ess": float(decision.ess[0]),
        })
    return rows


class ImageJob:
    """A pipeline, a scorer and (for the bundled model) a judge, ready to generate one image at a time."""

    def __init__(self, pipe, scorer, judge=None, steps=20, guidance_scale=3.0, preset="minimal", device="cpu"):
        self.pipe = pipe
        self.scorer = scorer
        self.judge = judge
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.preset = preset
        self.device = torch.device(device)

    @classmethod
    def create(cls, model: Optional[str] = None, scorer_spec: Optional[str] = None, device: str = "cpu",
               steps: Optional[int] = None, guidance_scale: Optional[float] = None,
               preset: str = "minimal") -> "ImageJob":
        """Load the pipeline, scorer and judge for ``model`` (default: the bundled digits test bed)."""
        from psdiffusion import testbed
        from psdiffusion.pipelines import PowerSamplingStableDiffusionPipeline
        from psdiffusion.scorers import CLIPScorer, build_scorer

        bundled = model is None
        model_dir = str(testbed.sd_model_dir()) if bundled else model
        if scorer_spec is not None:
            scorer = build_scorer(scorer_spec)
        elif bundled:
            scorer = CLIPScorer("local-dir:" + str(testbed.clip_model_dir()))
        else:
            raise SystemExit("error: --scorer is required with --model; for example --scorer clip:ViT-B-32/openai "
                             "or clip:local-dir:/path/to/open_clip_folder")
        pipe = PowerSamplingStableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                                    requires_safety_checker=False)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        scorer = scorer.to(device)
        defaults = testbed.DEFAULTS if bundled else {"num_inference_steps": 30, "guidance_scale": 7.5}
        return cls(
            pipe,
            scorer,
            judge=testbed if bundled else None,
            steps=defaults["num_inference_steps"] if steps is None else steps,
            guidance_scale=defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
            preset=preset,
            device=device,
        )

    def _call(self, prompt: str, generator: torch.Generator, guided_steps, **power_kwargs):
        return self.pipe(
            prompt,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            eta=1.0,
            generator=generator,
            output_type="pt",
            scorer=self.scorer,
            guided_steps=guided_steps,
            power_sampling_config=self.preset,
            **power_kwargs,
        )

    def base_nfe(self) -> int:
        """UNet rows of one unguided sample."""
        rows_per_step = 2 if self.guidance_scale > 1.0 else 1
        return rows_per_step * self.steps

    def generate(self, prompt: str, seed: int, method: str, nfe_budget: Optional[float] = None) -> ImageResult:
        """Generate one image for ``prompt`` with ``method`` (base, power, best-of-n, svdd or fk) from ``seed``."""
        if method == "base":
            result = self._base(prompt, seed)
        elif method == "power":
            result = self._power(prompt, seed, nfe_budget)
        elif method == "best-of-n":
            result = self._best_of_n(prompt, seed, nfe_budget)
        elif method in ("svdd", "fk"):
            result = self._baseline(prompt, seed, method, nfe_budget)
        else:
            raise ValueError(f"method must be one of base, power, best-of-n, svdd, fk; got {method!r}")
        if self.judge is not None:
            result.extra.update(self._verdict(prompt, result.pixels))
        return result

    def _score(self, pixels: torch.Tensor, prompt: str) -> torch.Tensor:
        with torch.no_grad():
            return self.scorer(pixels.to(self.device), [prompt] * pixels.shape[0]).float().cpu()

    def _base(self, prompt: str, seed: int) -> ImageResult:
        # The pipeline warns when no step is guided; for the base method that is the intent.
        pipeline_logger = logging.getLogger(type(self.pipe).__module__)
        level = pipeline_logger.level
        pipeline_logger.setLevel(logging.ERROR)
        try:
            output = self._call(prompt, torch.Generator(self.device).manual_seed(seed), guided_steps=[])
        finally:
            pipeline_logger.setLevel(level)
        pixels = output.images[0].cpu()
        reward = float(self._score(pixels[None], prompt)[0])
        return ImageResult(_to_pil(pixels), pixels, reward, output.budget.unet_rows)

    def _power(self, prompt: str, seed: int, nfe_budget: Optional[float]) -> ImageResult:
        kwargs = {}
        if nfe_budget is not None:
            kwargs["num_candidates"] = self._candidates_for_budget(nfe_budget)
        output = self._call(prompt, torch.Generator(self.device).manual_seed(seed), guided_steps="all", **kwargs)
        pixels = output.images[0].cpu()
        reward = float(self._score(pixels[None], prompt)[0])
        extra = {"preset": self.preset, "guided_steps": len(output.trace)}
        if output.trace:
            extra["num_candidates"] = int(output.trace[0].log_pi.shape[-1])
            extra["num_rollouts"] = int(output.trace[0].num_rollouts)
        return ImageResult(_to_pil(pixels), pixels, reward, output.budget.unet_rows, summarize_trace(output.trace),
                           extra)

    def _candidates_for_budget(self, nfe_budget: float) -> int:
        """Largest K whose power-sampling cost stays within ``nfe_budget`` times the base cost."""
        from psdiffusion.pipelines.power_sampling_utils import resolve_diffusion_config

        config = resolve_diffusion_config(self.preset)
        rows_per_step = 2 if self.guidance_scale > 1.0 else 1
        rollout_steps = config.rollout_length or 1
        per_candidate = 0
        for step in range(self.steps - 1):  # ancestral mode guides every step but the last
            # A rollout runs min(R, remaining steps) steps; with one step it is deterministic, so M = 1.
            count = min(rollout_steps, self.steps - (step + 1))
            rollouts = config.num_rollouts if count >= 2 else 1
            per_candidate += count * rollouts * rows_per_step
        extra_rows = nfe_budget * self.base_nfe() - self.base_nfe()
        candidates = int(math.floor(extra_rows / per_candidate)) if per_candidate > 0 else 1
        if candidates < 2:
            needed = (self.base_nfe() + 2 * per_candidate) / self.base_nfe()
            raise SystemExit(f"error: --nfe-budget {nfe_budget} is too small for power sampling with preset "
                             f"{self.preset!r}, whose {config.num_rollouts} rollouts of {rollout_steps} steps "
                             f"need {needed:.1f}x for two candidates; pass --nfe-budget {math.ceil(needed)} "
                             "or more")
        return candidates

    def _best_of_n(self, prompt: str, seed: int, nfe_budget: Optional[float]) -> ImageResult:
        n = 4 if nfe_budget is None else int(math.floor(nfe_budget))
        best, nfe, rewards = None, 0, []
        for index in range(n):
            # Draw 0 reuses the base seed, so best-of-N and base are paired on their first sample.
            result = self._base(prompt, seed + 1_000_003 * index)
            nfe += result.nfe
            rewards.append(result.reward)
            if best is None or result.reward > best.reward:
                best = result
        best.nfe = nfe
        best.extra = {"n": n, "candidate_rewards": rewards}
        return best

    def _baseline(self, prompt: str, seed: int, method: str, nfe_budget: Optional[float]) -> ImageResult:
        """SVDD-PM or FK steering with the benchmark's settings, sized to ``nfe_budget`` (default 4x the base)."""
        from psdiffusion.image_bench import BenchSettings, plan_method
        from psdiffusion.pipelines.baselines import sample_fk_steering, sample_svdd

        settings = BenchSettings(prompts=(prompt,), steps=self.steps, guidance_scale=self.guidance_scale)
        multiple = 4.0 if nfe_budget is None else nfe_budget
        plan = plan_method(method, multiple, settings)
        if plan is None:
            raise SystemExit(f"error: --nfe-budget {multiple} is too small for {method}, which needs at least "
                             "2x the base sampler's cost; raise the budget")
        common = dict(scorer=self.scorer, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                      eta=1.0, generator=[torch.Generator(self.device).manual_seed(seed)])
        if method == "svdd":
            output = sample_svdd(self.pipe, [prompt], lam=settings.svdd_lam, **plan.settings, **common)
        else:
            output = sample_fk_steering(self.pipe, [prompt], lam=settings.fk_lam, potential=settings.fk_potential,
                                        resample_interval=settings.fk_interval, **plan.settings, **common)
        pixels = output.images[0].cpu()
        reward = float(self._score(pixels[None], prompt)[0])
        extra = {key: value for key, value in plan.settings.items() if key != "guided_steps"}
        if "guided_steps" in plan.settings:
            extra["guided_steps"] = len(plan.settings["guided_steps"])
        return ImageResult(_to_pil(pixels), pixels, reward, output.budget.unet_rows, extra=extra)

    def _verdict(self, prompt: str, pixels: torch.Tensor) -> dict:
        try:
            target = self.judge.digit_of_prompt(prompt)
        except ValueError:
            return {}
        predicted = int(self.judge.judge_digits(pixels[None])[0])
        return {"target_digit": target, "judge_digit": predicted, "judge_correct": predicted == target}


def _to_pil(pixels: torch.Tensor):
    from PIL import Image

    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)
