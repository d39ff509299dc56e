"""Shared machinery of the power-sampling diffusers pipelines.

A guided denoising step proposes K candidate next latents, rolls each one out
M times to a clean latent with a few-step sampler, decodes and scores the
rollouts, and picks one candidate from the reward-tilted distribution that
``psdiffusion.core`` computes. Everything here is batched over B images,
K candidates and M rollouts; the pipelines call it once per guided step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from psdiffusion.core import (
    PRESETS,
    DecisionTrace,
    PowerSamplingConfig,
    effective_sample_size,
    reweight,
    rollout_log_weights,
    select,
    standardize_rewards,
)

logger = logging.get_logger(__name__)

ANCESTRAL_SCHEDULERS = (DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, LCMScheduler, TCDScheduler)
PERTURBED_SCHEDULERS = (DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler)
CANDIDATE_MODES = ("ancestral", "perturbed")
ROLLOUT_SAMPLERS = ("ddim", "euler_ancestral")

# Defaults for diffusion: reward tilting (alpha = 1) with rewards standardised over
# each K x M set. With lam = 0.5, one standard deviation more reward multiplies a rollout's
# weight by e^2 (about 7.4). One-step rollouts are deterministic, hence M = 1 and the plain estimator.
DIFFUSION_DEFAULTS = dict(
    num_candidates=4,
    num_rollouts=1,
    rollout_length=1,
    alpha=1.0,
    lam=0.5,
    estimator="plain",
    standardize_rewards=True,
)
# Rollout denoising steps used when a preset name is passed; the presets' K and M are kept.
PRESET_ROLLOUT_STEPS = {"minimal": 2, "balanced": 4, "quality": 8}
# A spread of log p - log q across the candidates above this many nats (a factor of e^20,
# about 5e8, between candidate weights) lets the proposal correction decide the pick.
PROPOSAL_SPREAD_WARNING_NATS = 20.0


@dataclass
class PipelineBudget:
    """Compute spent by one pipeline call.

    Attributes:
        unet_calls: UNet forward calls, base steps and rollouts together.
        unet_rows: batch rows sent to the UNet (a classifier-free-guided latent counts twice).
        vae_decodes: latents decoded by the VAE, rollouts and the final image together.
        scorer_calls: calls to the scorer.
        scored_images: images scored.
        decisions: guided steps taken.
        seconds: wall time of the whole call.
        unet_seconds: wall time inside UNet forwards.
        vae_seconds: wall time inside VAE decodes.
        scorer_seconds: wall time inside scorer calls.
    """

    unet_calls: int = 0
    unet_rows: int = 0
    vae_decodes: int = 0
    scorer_calls: int = 0
    scored_images: int = 0
    decisions: int = 0
    seconds: float = 0.0
    unet_seconds: float = 0.0
    vae_seconds: float = 0.0
    scorer_seconds: float = 0.0

    @property
    def forward_seconds(self) -> float:
        """Time inside model forwards (UNet, VAE and scorer)."""
        return self.unet_seconds + self.vae_seconds + self.scorer_seconds


@contextlib.contextmanager
def timed(budget: PipelineBudget, attribute: str, device: torch.device):
    """Add the wall time of the block to ``budget.<attribute>``; on CUDA the clock waits for the kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    setattr(budget, attribute, getattr(budget, attribute) + time.perf_counter() - start)


@dataclass
class PowerSamplingPipelineOutput(BaseOutput):
    """Output of the power-sampling pipelines.

    Args:
        images (`list[PIL.Image.Image]` or `np.ndarray` or `torch.Tensor`):
            The denoised images, in the form `output_type` asks for.
        nsfw_content_detected (`list[bool]` or `None`):
            Whether each image was flagged by the safety checker; `None` without one.
        trace (`list[DecisionTrace]`):
            One record per guided step, on the CPU: `index` is the step index,
            `rewards` (B, K, M) the raw rewards of the rollouts, `log_w` (B, K, M)
            their log-weights, `log_p` (B, K) the candidates' base log-densities
            (zeros when they cancel against the proposal), `log_pi` (B, K) the
            log of the selection probabilities, `ess` (B,) their effective sample
            size, `chosen` (B,) the picked candidate, `num_rollouts` the M actually
            run, `nonfinite_rollouts` how many rollouts got zero weight for a
            non-finite reward. `extra` holds `timestep`, `candidate_mode`,
            `rollout_steps`, `rollouts_deterministic`, `reused_noise_pred` (whether
            the main chain's next step took its noise prediction from this step's
            rollout of the chosen candidate), `target`, `log_q` (B, K) and
            `proposal_log_ratio_spread` (B,), the range of log p - log q over the
            candidates in nats; the last two are `None` where p/q cancels.
        budget (`PipelineBudget`):
            UNet calls and rows, VAE decodes, scorer calls and wall-clock seconds.
    """

    images: Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]
    nsfw_content_detected: Optional[list[bool]]
    trace: list = field(default_factory=list)
    budget: Optional[PipelineBudget] = None


def resolve_diffusion_config(
    config: Union[None, str, PowerSamplingConfig],
    num_candidates: Optional[int] = None,
    num_rollouts: Optional[int] = None,
    max_batch_size: Optional[int] = None,
) -> PowerSamplingConfig:
    """Turn ``None``, a preset name or a config into a validated config for reward-tilted diffusion."""
    if config is None:
        config = PowerSamplingConfig(**DIFFUSION_DEFAULTS)
    elif isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; choose one of {sorted(PRESETS)} or pass a PowerSamplingConfig")
        config = PowerSamplingConfig.from_preset(
            config,
            alpha=1.0,
            lam=DIFFUSION_DEFAULTS["lam"],
            standardize_rewards=True,
            rollout_length=PRESET_ROLLOUT_STEPS[config],
        )
    elif not isinstance(config, PowerSamplingConfig):
        raise TypeError(
            f"power_sampling_config must be None, a preset name {sorted(PRESETS)} or a PowerSamplingConfig, "
            f"got {type(config).__name__}"
        )

    overrides = {"num_candidates": num_candidates, "num_rollouts": num_rollouts, "max_batch_size": max_batch_size}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    if overrides.get("num_rollouts", config.num_rollouts) < 2 and config.estimator == "jackknife":
        overrides["estimator"] = "plain"
    config = config.replace(**overrides) if overrides else config

    if config.alpha != 1.0:
        raise ValueError(
            f"alpha must be 1 in the diffusion pipelines, got alpha={config.alpha}: a rollout of a denoising "
            "scheduler has no tractable density, so only reward tilting is implemented. Pass alpha=1.0."
        )
    if not config.uses_reward:
        raise ValueError(
            "lam=math.inf with alpha=1 leaves the base model unchanged; pass a finite lam (e.g. 0.5) so the "
            "scorer's rewards tilt the samples"
        )
    if config.temperature != 1.0:
        raise ValueError(f"temperature must be 1 in the diffusion pipelines, got {config.temperature}")
    if config.adaptive:
        raise ValueError("adaptive rollouts (max_rollouts) are not implemented in the diffusion pipelines; "
                         "pass max_rollouts=None")
    return config


GUIDED_STEPS_FORMS = ("'all', a list of step indices such as [0, 2, 5], or a (start, end) tuple of "
                      "fractions of the schedule such as (0.0, 0.5)")


def resolve_guided_steps(guided_steps, num_steps: int, candidate_mode: str) -> list[int]:
    """Turn ``"all"``, a list of step indices or a ``(start, end)`` fraction window into sorted step indices.

    ``"all"`` leaves out the last step in ancestral mode, because every supported
    scheduler adds no noise there and the K candidates would be identical.
    Step indices may be any integers, numpy and torch ones included.
    """
    if isinstance(guided_steps, str):
        if guided_steps != "all":
            raise ValueError(f"guided_steps must be {GUIDED_STEPS_FORMS}, got {guided_steps!r}")
        last = num_steps - 1 if candidate_mode == "ancestral" else num_steps
        return list(range(last))

    if isinstance(guided_steps, tuple):
        return window_steps(guided_steps, num_steps)

    if not isinstance(guided_steps, Iterable):
        raise ValueError(f"guided_steps must be {GUIDED_STEPS_FORMS}, got {guided_steps!r}")
    steps = sorted({step_index(step, num_steps, guided_steps) for step in guided_steps})
    return steps


def window_steps(window: tuple, num_steps: int) -> list[int]:
    """Step indices i with start <= i / num_steps < end for a ``(start, end)`` window of fractions."""
    if len(window) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window):
        raise ValueError(f"a guided_steps window must be a (start, end) pair of fractions, got {window!r}")
    start, end = window
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"a guided_steps window needs 0 <= start < end <= 1, got {window!r}; "
                         "pass step indices as a list, e.g. [0, 2]")
    steps = [i for i in range(num_steps) if start <= i / num_steps < end]
    if not steps:
        raise ValueError(f"the guided_steps window {window!r} contains none of the {num_steps} steps; "
                         "widen it or pass a list of step indices")
    return steps


def step_index(step, num_steps: int, guided_steps) -> int:
    """Validate one entry of a guided_steps list and return it as a Python int."""
    if isinstance(step, bool):
        raise ValueError(f"guided_steps entries must be integer step indices, got {step!r} in {guided_steps!r}")
    try:
        index = operator.index(step)
    except TypeError:
        if isinstance(step, (float, np.floating)):
            raise ValueError(
                f"guided_steps={guided_steps!r} is a list, so its entries must be integer step indices, "
                f"got {step!r}; pass a window of fractions as a tuple, e.g. (0.0, 0.5)"
            ) from None
        raise ValueError(f"guided_steps entries must be integer step indices, got {step!r} in {guided_steps!r}; "
                         f"pass {GUIDED_STEPS_FORMS}") from None
    if not 0 <= index < num_steps:
        raise ValueError(f"guided step {index} is out of range for num_inference_steps={num_steps}; "
                         f"pass integer step indices in [0, {num_steps - 1}]")
    return index


def check_scheduler(scheduler, candidate_mode: str, eta: float) -> None:
    """Raise ValueError when the main scheduler cannot make candidates in ``candidate_mode``."""
    if candidate_mode not in CANDIDATE_MODES:
        raise ValueError(f"candidate_mode must be one of {CANDIDATE_MODES}, got {candidate_mode!r}")
    supported = ANCESTRAL_SCHEDULERS if candidate_mode == "ancestral" else PERTURBED_SCHEDULERS
    if not isinstance(scheduler, supported):
        names = ", ".join(cls.__name__ for cls in supported)
        raise ValueError(
            f"{type(scheduler).__name__} is not supported with candidate_mode={candidate_mode!r}; use one of "
            f"{names}, e.g. pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)"
        )
    if candidate_mode == "ancestral" and isinstance(scheduler, (DDIMScheduler, TCDScheduler)) and eta <= 0:
        raise ValueError(
            f"{type(scheduler).__name__} with eta={eta} is deterministic, so ancestral candidates would all be "
            "equal; pass eta > 0 (eta=1.0 for DDIM is DDPM-like) or candidate_mode='perturbed'"
        )
    if candidate_mode == "perturbed":
        config = scheduler.config
        if getattr(config, "clip_sample", False) or getattr(config, "thresholding", False):
            raise ValueError("candidate_mode='perturbed' needs a scheduler with clip_sample=False and "
                             "thresholding=False: clipping makes the proposal non-Gaussian")
        if isinstance(scheduler, DDPMScheduler) and config.variance_type not in (None, "fixed_small"):
            raise ValueError(f"candidate_mode='perturbed' supports DDPMScheduler with variance_type='fixed_small', "
                             f"got {config.variance_type!r}")


def resolve_rollout_sampler(rollout_scheduler) -> str:
    """Map ``rollout_scheduler`` (a name or a DDIM / Euler-ancestral scheduler instance) to a sampler name."""
    if isinstance(rollout_scheduler, str):
        if rollout_scheduler not in ROLLOUT_SAMPLERS:
            raise ValueError(f"rollout_scheduler must be one of {ROLLOUT_SAMPLERS} or a scheduler instance, "
                             f"got {rollout_scheduler!r}")
        return rollout_scheduler
    if isinstance(rollout_scheduler, DDIMScheduler):
        return "ddim"
    if isinstance(rollout_scheduler, EulerAncestralDiscreteScheduler):
        return "euler_ancestral"
    # TODO: step LCM/TCD/DDPM rollout schedulers through their own step() on custom timesteps
    # (cheaper consistency-model rollouts need them).
    raise ValueError(
        f"rollout_scheduler {type(rollout_scheduler).__name__} is not supported; pass 'ddim', 'euler_ancestral', "
        "a DDIMScheduler or an EulerAncestralDiscreteScheduler (a faster rollout model goes in rollout_unet)"
    )


def main_alpha_bars(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Cumulative alpha of the latent after each main step index j = 0..N; index N is the clean latent (1)."""
    if isinstance(scheduler, EulerAncestralDiscreteScheduler):
        sigmas = scheduler.sigmas.to(torch.float64)  # (N+1,), the last one 0
        return (1.0 / (1.0 + sigmas**2)).float()
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    levels = alphas_cumprod[timesteps.long().cpu()]  # (N,)
    return torch.cat([levels, torch.ones(1, dtype=torch.float64)]).float()


def to_variance_preserving(scheduler, latents: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Rescale the main scheduler's latents to sqrt(a) * x0 + sqrt(1 - a) * eps, the form the UNet reads."""
    if isinstance(scheduler, EulerAncestralDiscreteScheduler):
        return latents * math.sqrt(alpha_bar)  # Euler latents are x0 + sigma * eps
    return latents


def split_prediction(model_output, sample, alpha_bar: float, prediction_type: str):
    """Return ``(x0_pred, eps_pred)`` from a model output at a variance-preserving sample with cumulative alpha ``a``."""
    sqrt_a, sqrt_one_minus_a = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        eps_pred = model_output
        x0_pred = (sample - sqrt_one_minus_a * eps_pred) / sqrt_a
    elif prediction_type == "v_prediction":
        x0_pred = sqrt_a * sample - sqrt_one_minus_a * model_output
        eps_pred = sqrt_a * model_output + sqrt_one_minus_a * sample
    elif prediction_type == "sample":
        x0_pred = model_output
        eps_pred = (sample - sqrt_a * x0_pred) / max(sqrt_one_minus_a, 1e-12)
    else:
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    return x0_pred, eps_pred


def ddim_step(x0_pred, eps_pred, alpha_bar: float, alpha_bar_next: float, eta: float, noise):
    """DDIM update between two noise levels; eta = 1 matches the ancestral (DDPM posterior) variance."""
    sigma = eta * math.sqrt((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next))
    direction = math.sqrt(max(1 - alpha_bar_next - sigma**2, 0.0)) * eps_pred
    sample = math.sqrt(alpha_bar_next) * x0_pred + direction
    return sample + sigma * noise if sigma > 0 else sample


def euler_ancestral_step(x0_pred, eps_pred, alpha_bar: float, alpha_bar_next: float, noise):
    """Euler-ancestral update in sigma space, taking and returning variance-preserving samples."""
    sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
    sigma_next = math.sqrt((1 - alpha_bar_next) / alpha_bar_next)
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    sample = x0_pred + sigma_down * eps_pred + sigma_up * noise  # x0 + sigma * eps form
    return sample * math.sqrt(alpha_bar_next)


def randn_per_image(shape, generator, num_images: int, device, dtype) -> torch.Tensor:
    """Draw (B, *shape) Gaussian noise; a generator list seeds image b's slice with ``generator[b]``."""
    if isinstance(generator, list):
        slices = [randn_tensor((1, *shape), generator=g, device=device, dtype=dtype) for g in generator]
        return torch.cat(slices)  # (B, *shape)
    return randn_tensor((num_images, *shape), generator=generator, device=device, dtype=dtype)


def select_per_image(log_pi: torch.Tensor, selection: str, generator) -> torch.Tensor:
    """Pick one candidate per image; with K = 1 nothing is drawn, so the generator stream matches the base pipeline."""
    B, K = log_pi.shape
    if K == 1:
        return torch.zeros(B, dtype=torch.long, device=log_pi.device)
    if isinstance(generator, list):
        picks = [select(log_pi[b : b + 1], selection, generator[b]) for b in range(B)]
        return torch.cat(picks)  # (B,)
    return select(log_pi, selection, generator)


class NoisePredictor:
    """A UNet with its text conditioning and classifier-free guidance, micro-batched over latent rows.

    Row r of a call is conditioned on prompt row ``rows[r]`` of the (B, ...) embeddings,
    so K x M rollouts of B prompts never need the embeddings repeated K x M times.
    No UNet call gets more than ``max_batch_size`` rows, counting a guided latent
    twice. With guidance and ``max_batch_size=1``, the unconditional and the
    conditional half of a latent run as two separate UNet calls.
    """

    def __init__(
        self,
        unet,
        guidance_scale: float,
        guidance_rescale: float,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        max_batch_size: int,
        budget: PipelineBudget,
        added_cond: Optional[dict] = None,
        negative_added_cond: Optional[dict] = None,
        timestep_cond: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[dict] = None,
    ):
        self.unet = unet
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.do_classifier_free_guidance = guidance_scale > 1 and unet.config.time_cond_proj_dim is None
        if self.do_classifier_free_guidance and negative_prompt_embeds is None:
            raise ValueError("classifier-free guidance needs negative prompt embeddings, got None")
        self.prompt_embeds = prompt_embeds
        self.negative_prompt_embeds = negative_prompt_embeds
        self.added_cond = added_cond
        self.negative_added_cond = negative_added_cond
        self.timestep_cond = timestep_cond
        self.cross_attention_kwargs = cross_attention_kwargs
        self.max_batch_size = max_batch_size
        self.budget = budget

    @property
    def rows_per_call(self) -> int:
        """Latent rows per call; a guided latent takes two UNet rows, and a cap of 1 splits its halves."""
        return max(1, self.max_batch_size // (2 if self.do_classifier_free_guidance else 1))

    def __call__(self, latent_model_input: torch.Tensor, timestep, rows: torch.Tensor) -> torch.Tensor:
        """Guided model output (N, C, h, w) for N latent rows conditioned on prompt rows ``rows`` (N,)."""
        step = self.rows_per_call
        outputs = [
            self._forward(latent_model_input[start : start + step], timestep, rows[start : start + step])
            for start in range(0, latent_model_input.shape[0], step)
        ]
        return torch.cat(outputs)

    def _forward(self, latents, timestep, rows):
        embeds = self.prompt_embeds[rows]  # (n, L, D)
        added = None if self.added_cond is None else {k: v[rows] for k, v in self.added_cond.items()}
        if not self.do_classifier_free_guidance:
            return self._run_unet(latents, timestep, embeds, added)

        negative_embeds = self.negative_prompt_embeds[rows]  # (n, L, D)
        negative_added = None
        if added is not None:
            negative_added = {k: self.negative_added_cond[k][rows] for k in added}
        if 2 * latents.shape[0] <= self.max_batch_size:
            both_added = None if added is None else {k: torch.cat([negative_added[k], v]) for k, v in added.items()}
            output = self._run_unet(
                torch.cat([latents, latents]),  # (2n, C, h, w): unconditional rows first
                timestep,
                torch.cat([negative_embeds, embeds]),
                both_added,
            )
            output_uncond, output_text = output.chunk(2)
        else:
            output_uncond = self._run_unet(latents, timestep, negative_embeds, negative_added)
            output_text = self._run_unet(latents, timestep, embeds, added)

        guided = output_uncond + self.guidance_scale * (output_text - output_uncond)
        if self.guidance_rescale > 0.0:
            guided = rescale_noise_cfg(guided, output_text, guidance_rescale=self.guidance_rescale)
        return guided

    def _run_unet(self, latents, timestep, embeds, added):
        timestep_cond = None
        if self.timestep_cond is not None:
            timestep_cond = self.timestep_cond.expand(latents.shape[0], -1)

        with timed(self.budget, "unet_seconds", latents.device):
            output = self.unet(
                latents,
                timestep,
                encoder_hidden_states=embeds,
                timestep_cond=timestep_cond,
                cross_attention_kwargs=self.cross_attention_kwargs,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
        self.budget.unet_calls += 1
        self.budget.unet_rows += latents.shape[0]
        return output


@dataclass
class RolloutPlan:
    """How candidates are rolled out to clean latents within one pipeline call.

    Attributes:
        predictor: the noise predictor of the rollout UNet.
        timesteps: (N,) main schedule timesteps, fed to the rollout UNet.
        alpha_bars: (N+1,) cumulative alpha after each main step index, 1 at the end.
        num_steps: rollout denoising steps; ``None`` runs every remaining main step.
        sampler: ``"ddim"`` or ``"euler_ancestral"``.
        eta: DDIM stochasticity of the rollouts; 0 makes DDIM rollouts deterministic.
        prediction_type: what the rollout UNet predicts (``"epsilon"``, ``"v_prediction"``, ``"sample"``).
    """

    predictor: NoisePredictor
    timesteps: torch.Tensor
    alpha_bars: torch.Tensor
    num_steps: Optional[int]
    sampler: str
    eta: float
    prediction_type: str

    def step_indices(self, start: int) -> list[int]:
        """Main step indices the rollout visits from index ``start``, spread evenly over the rest of the schedule."""
        remaining = len(self.timesteps) - start
        if remaining <= 0:
            return []
        count = remaining if self.num_steps is None else min(self.num_steps, remaining)
        return [start + (s * remaining) // count for s in range(count)]

    def is_stochastic(self, indices: list[int]) -> bool:
        return len(indices) >= 2 and (self.sampler == "euler_ancestral" or self.eta > 0)

    def repeats_main_prediction(self, predictor: NoisePredictor) -> bool:
        """Whether a one-step rollout evaluates the same model as ``predictor``, so its output can stand in.

        A one-step rollout from step index i calls the rollout predictor once, at
        the candidate and timestep i + 1. With the main UNet and the same guidance,
        that is the main chain's next call once the candidate is chosen.
        """
        # TODO: reuse the first step of multi-step rollouts too (it is the same call, one more saved row per step).
        rollout = self.predictor
        same_guidance_embedding = (
            rollout.timestep_cond is predictor.timestep_cond
            or (rollout.timestep_cond is not None and predictor.timestep_cond is not None
                and torch.equal(rollout.timestep_cond, predictor.timestep_cond))
        )
        return (
            self.num_steps == 1
            and rollout.unet is predictor.unet
            and rollout.guidance_scale == predictor.guidance_scale
            and rollout.guidance_rescale == predictor.guidance_rescale
            and rollout.cross_attention_kwargs is predictor.cross_attention_kwargs
            and rollout.added_cond is predictor.added_cond
            and same_guidance_embedding
        )


@dataclass
class RolloutPrediction:
    """The guided model output of a one-step rollout at the chosen candidates, kept for the main chain.

    Attributes:
        step_index: main step index at which the rollout evaluated the UNet.
        latents: (B, C, h, w) UNet input of the rollout, the chosen candidates.
        model_output: (B, C, h, w) guided model output at ``latents``.
        prompt_embeds: the text embeddings the rollout was conditioned on.
        decision: trace of the guided step that made the rollout; marked when the output is used.
    """

    step_index: int
    latents: torch.Tensor
    model_output: torch.Tensor
    prompt_embeds: torch.Tensor
    decision: DecisionTrace

    def matches(self, step_index: int, latent_model_input: torch.Tensor, prompt_embeds: torch.Tensor) -> bool:
        """Whether the main chain's call at ``step_index`` has exactly the rollout's inputs."""
        # NOTE: a callback that edits the prompt embeddings in place is not detected; one that replaces them is.
        return (
            step_index == self.step_index
            and prompt_embeds is self.prompt_embeds
            and torch.equal(latent_model_input, self.latents)
        )


class PowerSamplingMixin:
    """Guided steps of a power-sampling pipeline: candidates, rollouts, scores, reweighting and selection.

    The pipeline class provides ``scheduler``, ``vae``, ``image_processor`` and
    ``scorer``; ``decode_to_unit_images`` may be overridden (SDXL upcasts its VAE).
    """

    # Whether a one-step rollout's output at the chosen candidate replaces the main chain's next UNet call.
    # Tests switch it off to compare against the images without the reuse.
    _reuse_rollout_prediction = True

    def predict_noise(self, predictor: NoisePredictor, latent_model_input, timestep, rows, step_index: int,
                      kept: Optional[RolloutPrediction]) -> torch.Tensor:
        """Guided model output of the main chain at ``step_index``, taken from ``kept`` when it has the same inputs."""
        if kept is not None and kept.matches(step_index, latent_model_input, predictor.prompt_embeds):
            kept.decision.extra["reused_noise_pred"] = True
            return kept.model_output
        return predictor(latent_model_input, timestep, rows)

    def check_power_sampling_inputs(self, scorer, candidate_mode, eta, generator, num_images, rollout_unet,
                                    scorer_prompt, prompt):
        """Raise ValueError on inputs that the power-sampling part of a call cannot use."""
        check_scheduler(self.scheduler, candidate_mode, eta)
        if scorer is None:
            raise ValueError("power sampling needs a scorer: pass scorer= to the call, or register one with "
                             "from_pretrained(..., scorer=...) or from_pipe(..., scorer=...)")
        if not callable(scorer):
            raise ValueError(f"scorer must be callable as scorer(images, prompts), got {type(scorer).__name__}")
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(
                f"generator is a list of {len(generator)} generators, but the call makes {num_images} images "
                "(batch size x num_images_per_prompt); pass one generator per image or a single generator"
            )
        if prompt is None and scorer_prompt is None:
            raise ValueError("the scorer needs prompt text, but only prompt_embeds were given; pass scorer_prompt")
        if rollout_unet is not None:
            for key in ("in_channels", "cross_attention_dim"):
                if rollout_unet.config[key] != self.unet.config[key]:
                    raise ValueError(
                        f"rollout_unet must share the main UNet's latent space and text encoder, but its {key} is "
                        f"{rollout_unet.config[key]} and the main UNet's is {self.unet.config[key]}"
                    )

    def scorer_prompts(self, prompt, scorer_prompt, batch_size: int, num_images_per_prompt: int) -> list[str]:
        """One prompt string per image, in the order of the latent batch."""
        text = scorer_prompt if scorer_prompt is not None else prompt
        texts = [text] * batch_size if isinstance(text, str) else list(text)
        if len(texts) != batch_size:
            raise ValueError(
                f"scorer_prompt must be one string or a list with one string per prompt ({batch_size}), "
                f"got a list of {len(texts)}"
            )
        return [t for t in texts for _ in range(num_images_per_prompt)]

    def warn_about_decisions(self, trace: list, config: PowerSamplingConfig, plan: "RolloutPlan") -> None:
        """Log, once per call, the guided steps whose rewards or weights did not act as configured."""
        warn_nonfinite_rewards(trace)
        warn_deterministic_rollouts(trace, config.num_rollouts, len(plan.timesteps))
        warn_dominant_proposal(trace)

    def guidance_embedding(self, unet, guidance_scale: float, device, dtype) -> Optional[torch.Tensor]:
        """Guidance-scale embedding (1, D) for UNets distilled with one (LCM), else None."""
        if unet.config.time_cond_proj_dim is None:
            return None
        w = torch.tensor([guidance_scale - 1.0])
        embedding = self.get_guidance_scale_embedding(w, embedding_dim=unet.config.time_cond_proj_dim)
        return embedding.to(device=device, dtype=dtype)

    def decode_to_unit_images(self, latents: torch.Tensor, budget: PipelineBudget) -> torch.Tensor:
        """Decode clean latents (n, C, h, w) into float images (n, 3, H, W) in [0, 1] for the scorer."""
        with timed(budget, "vae_seconds", latents.device):
            images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        budget.vae_decodes += latents.shape[0]
        images = self.image_processor.postprocess(images, output_type="pt", do_denormalize=[True] * len(images))
        return images.float()

    def score_images(self, scorer, images: torch.Tensor, prompts: list[str], budget: PipelineBudget) -> torch.Tensor:
        """Score images (n, 3, H, W) against their prompts; returns float32 rewards (n,)."""
        with timed(budget, "scorer_seconds", images.device):
            rewards = scorer(images, prompts)
        budget.scorer_calls += 1
        budget.scored_images += images.shape[0]
        if not isinstance(rewards, torch.Tensor) or rewards.shape != (images.shape[0],):
            shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
            raise ValueError(f"the scorer must return a tensor of shape ({images.shape[0]},), got {shape}")
        return rewards.to(images.device, torch.float32)

    def draw_ancestral_candidates(self, model_output, timestep, latents, num_candidates, step_kwargs):
        """K draws of the base transition per image: (B, C, h, w) -> (B*K, C, h, w), ordered (b, k).

        A copy of the main scheduler takes the step, so its state never sees the
        candidate batch; the main scheduler then takes over the copy's step index.
        """
        kwargs = dict(step_kwargs)
        if isinstance(kwargs.get("generator"), list):
            kwargs["generator"] = [g for g in kwargs["generator"] for _ in range(num_candidates)]
        candidate_scheduler = copy.deepcopy(self.scheduler)
        candidates = candidate_scheduler.step(
            model_output.repeat_interleave(num_candidates, dim=0),  # (B*K, C, h, w)
            timestep,
            latents.repeat_interleave(num_candidates, dim=0),
            **kwargs,
            return_dict=False,
        )[0]
        if hasattr(self.scheduler, "_step_index"):
            self.scheduler._step_index = candidate_scheduler._step_index
        return candidates

    def draw_perturbed_candidates(self, model_output, step_index, latents, alpha_bar, num_candidates,
                                  perturbation_scale, eta, prediction_type, generator):
        """K candidates from perturbed noise eps + s * z_k, with base and proposal log-densities.

        x_{t-1} = mean(eps) + c * eps_offset + std * xi is Gaussian around the base
        mean; the offset s * z widens it to variance c^2 s^2 + std^2 (the proposal q).
        Returns ``(candidates (B*K, C, h, w), log_p (B, K), log_q (B, K) or None, target)``.
        When the base step is deterministic (std = 0, e.g. DDIM with eta = 0) p has no
        density: log_p is 0, log_q is None, and the target is the reward tilt of q itself.
        """
        B, K = latents.shape[0], num_candidates
        sample_vp = to_variance_preserving(self.scheduler, latents, alpha_bar)
        _, eps_pred = split_prediction(model_output.float(), sample_vp.float(), alpha_bar, prediction_type)
        mean, eps_coefficient, std = self.gaussian_transition(step_index, latents.float(), eps_pred, eta)

        z = randn_per_image((K, *latents.shape[1:]), generator, B, latents.device, torch.float32)  # (B, K, C, h, w)
        xi = randn_per_image((K, *latents.shape[1:]), generator, B, latents.device, torch.float32)
        offset = eps_coefficient * perturbation_scale * z + std * xi  # (B, K, C, h, w)
        candidates = (mean.unsqueeze(1) + offset).flatten(0, 1).to(latents.dtype)  # (B*K, C, h, w)

        variance_q = (eps_coefficient * perturbation_scale) ** 2 + std**2
        log_q = gaussian_log_density(offset, variance_q)  # (B, K)
        if std > 0:
            self._advance_main_scheduler()
            return candidates, gaussian_log_density(offset, std**2), log_q, "reward tilt of the base transition"
        self._advance_main_scheduler()
        # q stands in for the base step here, so p/q is 1 and only the reward tilts (log_p zeros, log_q None).
        return candidates, torch.zeros(B, K, device=latents.device), None, "reward tilt of the perturbed proposal"

    def _advance_main_scheduler(self):
        # Perturbed candidates bypass scheduler.step, so move a stateful scheduler's step index by hand.
        if getattr(self.scheduler, "_step_index", None) is not None:
            self.scheduler._step_index += 1

    def gaussian_transition(self, step_index: int, latents: torch.Tensor, eps_pred: torch.Tensor, eta: float):
        """Base step as ``(mean (B, C, h, w), d mean / d eps, std)`` for DDIM, DDPM and Euler-ancestral."""
        scheduler = self.scheduler
        if isinstance(scheduler, EulerAncestralDiscreteScheduler):
            sigma = float(scheduler.sigmas[step_index])
            sigma_next = float(scheduler.sigmas[step_index + 1])
            sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
            return latents + (sigma_down - sigma) * eps_pred, sigma_down - sigma, sigma_up

        timestep = int(scheduler.timesteps[step_index])
        alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        alpha_bar = float(alphas_cumprod[timestep])
        if isinstance(scheduler, DDIMScheduler):
            prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            alpha_bar_prev = float(alphas_cumprod[prev_timestep]) if prev_timestep >= 0 else float(
                scheduler.final_alpha_cumprod)
            std = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
            direction = math.sqrt(max(1 - alpha_bar_prev - std**2, 0.0))
            x0_from_eps = -math.sqrt(alpha_bar_prev) * math.sqrt(1 - alpha_bar) / math.sqrt(alpha_bar)
            mean = math.sqrt(alpha_bar_prev / alpha_bar) * latents + (direction + x0_from_eps) * eps_pred
            return mean, direction + x0_from_eps, std

        # DDPM with fixed_small variance (checked by check_scheduler).
        prev_timestep = int(scheduler.previous_timestep(timestep))
        alpha_bar_prev = float(alphas_cumprod[prev_timestep]) if prev_timestep >= 0 else 1.0
        current_alpha = alpha_bar / alpha_bar_prev
        beta = 1 - current_alpha
        x0_weight = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
        sample_weight = math.sqrt(current_alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)
        x0_from_eps = -math.sqrt(1 - alpha_bar) / math.sqrt(alpha_bar)
        mean = (x0_weight / math.sqrt(alpha_bar) + sample_weight) * latents + x0_weight * x0_from_eps * eps_pred
        # The step onto the clean latent has zero variance; diffusers' 1e-20 floor there is numerical only.
        variance = max((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, 1e-20) if prev_timestep >= 0 else 0.0
        return mean, x0_weight * x0_from_eps, math.sqrt(variance)

    def rollout_rewards(self, candidates, start_index, num_rollouts, plan: RolloutPlan, scorer, prompts,
                        generator, budget: PipelineBudget):
        """Roll K candidates per image out M times, decode and score: returns rewards (B, K, M) and details.

        ``candidates`` (B*K, C, h, w) are main-scheduler latents at step index
        ``start_index``. The predictor micro-batches the UNet calls, and the clean
        latents are decoded and scored in batches of ``max_batch_size``, so peak
        memory follows ``max_batch_size``. Rollout noise is drawn up front, so
        results do not depend on the micro-batch size. Also returns the model
        output (B*K*M, C, h, w) of the rollouts' first step, ``None`` without steps.
        """
        B = len(prompts)
        K = candidates.shape[0] // B
        indices = plan.step_indices(start_index)
        stochastic = plan.is_stochastic(indices)
        M = num_rollouts if stochastic else 1
        alpha_bar = float(plan.alpha_bars[start_index])
        start = to_variance_preserving(self.scheduler, candidates, alpha_bar).repeat_interleave(M, dim=0)  # (B*K*M, ...)
        rows = torch.arange(B, device=candidates.device).repeat_interleave(K * M)  # (B*K*M,) prompt row of each

        noise = None
        if stochastic:
            shape = (K * M, len(indices) - 1, *candidates.shape[1:])
            noise = randn_per_image(shape, generator, B, candidates.device, candidates.dtype)  # (B, K*M, S-1, C, h, w)
            noise = noise.flatten(0, 1)  # (B*K*M, S-1, C, h, w)

        # All K*M latents go through the UNet together, because only the UNet's activations
        # grow with the batch and the predictor splits those; decoding and scoring go by the cap.
        clean, first_output = self._roll_out(start, rows, indices, noise, plan)  # (B*K*M, C, h, w) each
        rewards = []
        step = plan.predictor.max_batch_size
        for chunk_start in range(0, clean.shape[0], step):
            chunk = slice(chunk_start, chunk_start + step)
            images = self.decode_to_unit_images(clean[chunk], budget)
            chunk_prompts = [prompts[b] for b in rows[chunk].tolist()]
            rewards.append(self.score_images(scorer, images, chunk_prompts, budget))
        rewards = torch.cat(rewards).view(B, K, M)
        return rewards, {"rollout_steps": len(indices), "rollouts_deterministic": not stochastic}, first_output

    def _roll_out(self, sample, rows, indices, noise, plan: RolloutPlan):
        """Denoise variance-preserving samples along main step ``indices`` to clean latents.

        Returns the clean latents and the model output of the first step (``None`` without steps).
        """
        first_output = None
        for s, index in enumerate(indices):
            alpha_bar = float(plan.alpha_bars[index])
            model_output = plan.predictor(sample, plan.timesteps[index], rows)
            if s == 0:
                first_output = model_output
            x0_pred, eps_pred = split_prediction(model_output, sample, alpha_bar, plan.prediction_type)
            if s == len(indices) - 1:
                return x0_pred, first_output
            alpha_bar_next = float(plan.alpha_bars[indices[s + 1]])
            step_noise = None if noise is None else noise[:, s]
            if plan.sampler == "ddim":
                sample = ddim_step(x0_pred, eps_pred, alpha_bar, alpha_bar_next, plan.eta, step_noise)
            else:
                sample = euler_ancestral_step(x0_pred, eps_pred, alpha_bar, alpha_bar_next, step_noise)
        return sample, first_output  # no indices left: the candidate is already clean

    def power_sampling_step(self, step_index, timestep, latents, model_output, *, config: PowerSamplingConfig,
                            candidate_mode, perturbation_scale, eta, step_kwargs, plan: RolloutPlan, scorer,
                            prompts, generator, budget: PipelineBudget, keep_prediction: bool = False):
        """Take one guided step: returns the chosen next latents (B, C, h, w), the DecisionTrace and a kept prediction.

        With ``keep_prediction`` and a one-step rollout, the rollout's model output at
        the chosen candidates comes back as a RolloutPrediction for the main chain's
        next step; otherwise the third value is ``None``.
        """
        B, K = latents.shape[0], config.num_candidates

        # 1. Candidates and their base / proposal log-densities.
        if candidate_mode == "ancestral":
            candidates = self.draw_ancestral_candidates(model_output, timestep, latents, K, step_kwargs)
            # Candidates are draws of the base transition, q = p, so at alpha = 1 p/q cancels:
            # log_p is zero and log_q is None, and the weights reduce to zeta.
            log_p, log_q, target = torch.zeros(B, K, device=latents.device), None, "reward tilt of the base transition"
            if K > 1 and bool((candidates.view(B, K, -1) == candidates.view(B, K, -1)[:, :1]).all()):
                raise ValueError(
                    f"step {step_index}: the scheduler added no noise, so all {K} candidates are identical; "
                    "leave this step out of guided_steps or pass candidate_mode='perturbed'"
                )
        else:
            alpha_bar = float(plan.alpha_bars[step_index])
            candidates, log_p, log_q, target = self.draw_perturbed_candidates(
                model_output, step_index, latents, alpha_bar, K, perturbation_scale, eta,
                self.scheduler.config.prediction_type, generator)

        # 2. Rollouts, decoded and scored.
        rewards, details, first_output = self.rollout_rewards(candidates, step_index + 1, config.num_rollouts, plan, scorer,
                                                prompts, generator, budget)

        # 3. Reweight with the core estimators and pick one candidate per image.
        tilted = standardize_rewards(rewards) if config.standardize_rewards else rewards
        log_w, nonfinite = rollout_log_weights(torch.zeros_like(tilted), config.alpha, config.lam, tilted)
        log_pi, degenerate = reweight(log_p, log_w, config, log_q)  # (B, K)
        chosen = select_per_image(log_pi, config.selection, generator)  # (B,)
        images = torch.arange(B, device=latents.device)
        next_latents = candidates.view(B, K, *latents.shape[1:])[images, chosen]  # (B, C, h, w)
        budget.decisions += 1

        trace = DecisionTrace(
            index=step_index,
            log_p=log_p.detach().cpu(),
            log_pi=log_pi.detach().cpu(),
            log_w=log_w.detach().cpu(),
            rewards=rewards.detach().cpu(),
            ess=effective_sample_size(log_pi).detach().cpu(),
            chosen=chosen.detach().cpu(),
            num_rollouts=rewards.shape[-1],
            nonfinite_rollouts=int(nonfinite.sum()),
            jackknife_degenerate_rows=degenerate,
            extra={
                "timestep": float(timestep),
                "candidate_mode": candidate_mode,
                "target": target,
                "log_q": None if log_q is None else log_q.detach().cpu(),
                "proposal_log_ratio_spread": None if log_q is None else log_ratio_spread(log_p, log_q).cpu(),
                "reused_noise_pred": False,
                **details,
            },
        )

        kept = None
        if keep_prediction and details["rollout_steps"] == 1:
            alpha_bar_next = float(plan.alpha_bars[step_index + 1])
            kept = RolloutPrediction(
                step_index=step_index + 1,
                latents=to_variance_preserving(self.scheduler, next_latents, alpha_bar_next),
                model_output=first_output.view(B, K, *first_output.shape[1:])[images, chosen],  # (B, C, h, w)
                prompt_embeds=plan.predictor.prompt_embeds,
                decision=trace,
            )
        return next_latents, trace, kept


def warn_nonfinite_rewards(trace: list) -> None:
    """Warn when rollouts got zero weight because the scorer returned a non-finite reward."""
    steps = [decision.index for decision in trace if decision.nonfinite_rollouts]
    if not steps:
        return
    total = sum(decision.nonfinite_rollouts for decision in trace)
    logger.warning(
        "%d rollout(s) had non-finite rewards (inf or -inf) at guided steps %s and got zero weight; "
        "check the scorer, and see trace[i].nonfinite_rollouts for the count per step", total, steps)


def warn_deterministic_rollouts(trace: list, num_rollouts: int, num_steps: int) -> None:
    """Report the guided steps that ran one rollout per candidate although M > 1 was requested.

    A step with one main step left can only roll out to the x0 prediction, so
    those steps alone get an info message. Any other deterministic step is a
    setting the caller can change (one-step rollouts, DDIM with rollout_eta=0),
    and gets a warning naming every step that ran one rollout.
    """
    if num_rollouts < 2:
        return
    single = [decision.index for decision in trace if decision.extra["rollouts_deterministic"]]
    avoidable = [index for index in single if num_steps - (index + 1) >= 2]
    if avoidable:
        logger.warning(
            "rollouts were deterministic at guided steps %s, so 1 rollout per candidate ran there instead of %d; "
            "pass rollout_steps >= 2 and rollout_eta > 0 (or the euler_ancestral rollout sampler) for distinct "
            "rollouts", single, num_rollouts)
    elif single:
        logger.info(
            "guided steps %s have one main step or none left, so their rollouts are deterministic and 1 rollout "
            "per candidate ran there instead of %d", single, num_rollouts)


def warn_dominant_proposal(trace: list) -> None:
    """Warn when log p - log q spreads so far across candidates that the reward barely changes the pick."""
    dominated, widest, reward_widest = [], 0.0, 0.0
    for decision in trace:
        spread = decision.extra.get("proposal_log_ratio_spread")
        if spread is None:
            continue
        proposal_spread = float(spread.max())
        reward_spread = float(log_zeta_spread(decision.log_w).max())
        if proposal_spread > PROPOSAL_SPREAD_WARNING_NATS and proposal_spread > reward_spread:
            dominated.append(decision.index)
            widest, reward_widest = max(widest, proposal_spread), max(reward_widest, reward_spread)
    if dominated:
        logger.warning(
            "candidate_mode='perturbed': at guided steps %s, log p - log q spans up to %.1f nats across the "
            "candidates but the reward term only %.1f nats, so the proposal correction decides the pick and the "
            "effective sample size is near 1; use candidate_mode='ancestral' with a stochastic scheduler, or a "
            "smaller perturbation_scale", dominated, widest, reward_widest)


def log_zeta_spread(log_w: torch.Tensor) -> torch.Tensor:
    """Range over the K candidates of log mean_j w_cj, finite values only: (B, K, M) -> (B,), in nats."""
    log_zeta = torch.logsumexp(log_w, dim=-1)  # (B, K); the 1/M factor does not change a range
    finite = torch.isfinite(log_zeta)
    if not finite.any():
        return torch.zeros(log_w.shape[0])
    highest = torch.where(finite, log_zeta, torch.full_like(log_zeta, -math.inf)).max(dim=-1).values
    lowest = torch.where(finite, log_zeta, torch.full_like(log_zeta, math.inf)).min(dim=-1).values
    return torch.where(highest >= lowest, highest - lowest, torch.zeros_like(highest))


def log_ratio_spread(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Range of log p - log q over the K candidates of each image: (B, K) -> (B,), in nats."""
    log_ratio = (log_p - log_q).detach()
    return log_ratio.max(dim=-1).values - log_ratio.min(dim=-1).values


def gaussian_log_density(offset: torch.Tensor, variance: float) -> torch.Tensor:
    """Sum over (C, h, w) of log N(offset; 0, variance): (B, K, C, h, w) -> (B, K)."""
    per_element = -0.5 * (offset.square() / variance + math.log(2 * math.pi * variance))
    return per_element.flatten(2).sum(dim=-1)

