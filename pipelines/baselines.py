"""Baseline samplers that power sampling is benchmarked against: SVDD-PM and FK steering.

Both run on a loaded ``PowerSamplingStableDiffusionPipeline`` and reuse its text
encoder, noise predictor, VAE decode and scorer wrapper, so they count compute in
the same ``PipelineBudget`` (UNet rows, VAE decodes, scorer calls, seconds) as the
power-sampling pipeline does. Best-of-N needs no sampler of its own: it is N calls
of the base pipeline (``guided_steps=[]``) and a max over the rewards.

- SVDD-PM (Li et al., 2024, "Derivative-Free Guidance in Continuous and Discrete
  Diffusion Models with Soft Value-Based Decoding"): at every denoising step draw
  K candidates from the base transition, value each by the reward of its one-step
  x0 prediction, and keep one, by argmax (lam = 0) or sampled with weights
  exp(value / lam).
- FK steering (Singhal et al., 2025, "A General Framework for Inference-Time
  Scaling and Steering of Diffusion Models"): k particles follow the base sampler;
  at the resampling steps a potential of the rewards of their x0 predictions
  weights them, and multinomial resampling (always, or only when the effective
  sample size falls below a threshold) keeps the promising ones.

Both samplers implement DDIM (``eta > 0`` makes the base transition ancestral),
the scheduler of the bundled test bed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from diffusers import DDIMScheduler

from psdiffusion.core import DecisionTrace, effective_sample_size
from psdiffusion.pipelines.power_sampling_utils import (
    NoisePredictor,
    PipelineBudget,
    PowerSamplingPipelineOutput,
    ddim_step,
    randn_per_image,
    select_per_image,
    split_prediction,
)

POTENTIALS = ("difference", "max", "sum")
FINAL_SELECTIONS = ("argmax", "sample")


@dataclass
class DenoisingSetup:
    """Prompt conditioning, schedule and initial latents of one baseline call.

    Attributes:
        predictor: the main UNet with text conditioning and classifier-free guidance.
        prompts: one prompt string per image, for the scorer.
        timesteps: (N,) timesteps of the main schedule.
        alpha_bars: (N+1,) cumulative alpha of the latent before each step; the last
            entry is the level DDIM steps onto at the end (``final_alpha_cumprod``).
        latents: (B, C, h, w) initial noise, drawn exactly as the base pipeline draws it.
        prediction_type: what the UNet predicts (``"epsilon"``, ``"v_prediction"``, ``"sample"``).
    """

    predictor: NoisePredictor
    prompts: list
    timesteps: torch.Tensor
    alpha_bars: torch.Tensor
    latents: torch.Tensor
    prediction_type: str


@dataclass
class ResamplingTrace:
    """One potential evaluation of FK steering, on the CPU. Shapes use B images and k particles.

    Attributes:
        index: denoising step index.
        rewards: (B, k) rewards of the particles' x0 predictions.
        log_weights: (B, k) normalised log-weights before resampling.
        ess: (B,) effective sample size of those weights.
        resampled: (B,) whether the image's particles were resampled.
        ancestors: (B, k) particle each new particle was copied from (identity when not resampled).
    """

    index: int
    rewards: torch.Tensor
    log_weights: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    ancestors: torch.Tensor
    extra: dict = field(default_factory=dict)


def ddim_alpha_bars(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Cumulative alpha before each DDIM step and after the last one: (N+1,), as ``DDIMScheduler.step`` uses them."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    levels = alphas_cumprod[timesteps.long().cpu()]  # (N,)
    last_prev = int(timesteps[-1]) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = alphas_cumprod[last_prev] if last_prev >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod)
    return torch.cat([levels, final.reshape(1).to(torch.float64)]).float()


def check_baseline_inputs(pipe, scorer, eta: float, generator, num_images: int) -> None:
    """Raise ValueError on a scheduler, scorer or generator list that the baseline samplers cannot use."""
    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise ValueError(
            f"the SVDD and FK steering samplers step DDIM, got {type(pipe.scheduler).__name__}; "
            "set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    if pipe.scheduler.config.clip_sample or pipe.scheduler.config.thresholding:
        raise ValueError("the baseline samplers do not clip or threshold x0; pass a DDIMScheduler with "
                         "clip_sample=False and thresholding=False")
    if eta <= 0:
        raise ValueError(f"eta={eta} makes DDIM deterministic, so candidates and particles would not differ; "
                         "pass eta > 0 (eta=1.0 matches the ancestral DDPM variance)")
    if scorer is None or not callable(scorer):
        raise ValueError("the baseline samplers need a scorer callable as scorer(images, prompts) -> (B,) rewards")
    if isinstance(generator, list) and len(generator) != num_images:
        raise ValueError(f"generator is a list of {len(generator)} generators for {num_images} images; "
                         "pass one generator per image or a single generator")


def prepare_denoising(pipe, prompt, *, num_inference_steps: int, guidance_scale: float, negative_prompt,
                      generator, budget: PipelineBudget, max_batch_size: int) -> DenoisingSetup:
    """Encode the prompts, set the DDIM schedule and draw the initial latents as the base pipeline does."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    device = pipe._execution_device
    do_cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(prompts, device, 1, do_cfg, negative_prompt)
    predictor = NoisePredictor(pipe.unet, guidance_scale, 0.0, prompt_embeds, negative_prompt_embeds,
                               max_batch_size, budget)

    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    height = width = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = pipe.prepare_latents(len(prompts), pipe.unet.config.in_channels, height, width,
                                   prompt_embeds.dtype, device, generator)
    return DenoisingSetup(predictor, prompts, timesteps, ddim_alpha_bars(pipe.scheduler, timesteps), latents,
                          pipe.scheduler.config.prediction_type)


@torch.no_grad()
def sample_svdd(
    pipe,
    prompt: Union[str, list[str]],
    *,
    scorer,
    num_candidates: int = 4,
    lam: float = 0.0,
    guided_steps: Optional[list[int]] = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    negative_prompt=None,
    eta: float = 1.0,
    generator=None,
    max_batch_size: int = 64,
) -> PowerSamplingPipelineOutput:
    """Sample with SVDD-PM: K base-transition candidates per step, valued by the reward of their x0 prediction.

    The UNet output of the kept candidate is reused as the next step's noise
    prediction, so a guided step costs K UNet rows (times 2 with classifier-free
    guidance) and the whole call costs (1 + K * G + (N - 1 - G)) rows per image
    and guidance branch, for G guided steps out of N.

    Args:
        pipe: a loaded ``PowerSamplingStableDiffusionPipeline`` with a DDIM scheduler.
        prompt: one prompt or a list, one image each.
        scorer: reward model, ``scorer(images (n, 3, H, W) in [0, 1], prompts) -> (n,)``.
        num_candidates: K, candidates per guided step; 1 is the base sampler.
        lam: temperature of the soft value; 0 keeps the best candidate (argmax), lam > 0 samples
            a candidate with probability proportional to exp(value / lam) on raw rewards.
        guided_steps: step indices that draw K candidates; ``None`` guides every step but the last,
            which adds no noise.
        eta: DDIM stochasticity; must be > 0.
        generator: one generator or one per image; the same generators give the same images.
        max_batch_size: largest number of rows in one UNet call.

    Returns:
        ``PowerSamplingPipelineOutput`` with images (B, 3, H, W) in [0, 1], one ``DecisionTrace``
        per guided step (rewards (B, K, 1), chosen (B,)) and the budget.
    """
    start_time = time.perf_counter()
    budget = PipelineBudget()
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if lam < 0 or math.isnan(lam):
        raise ValueError(f"lam must be >= 0 (0 keeps the best candidate), got {lam}")
    num_images = 1 if isinstance(prompt, str) else len(prompt)
    check_baseline_inputs(pipe, scorer, eta, generator, num_images)
    setup = prepare_denoising(pipe, prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              negative_prompt=negative_prompt, generator=generator, budget=budget,
                              max_batch_size=max_batch_size)
    N = len(setup.timesteps)
    guided = set(range(N - 1)) if guided_steps is None else set(guided_steps)
    if any(not 0 <= i < N - 1 for i in guided):
        raise ValueError(f"guided_steps must be step indices in [0, {N - 2}] (the last step adds no noise), "
                         f"got {sorted(guided)}")

    latents = setup.latents
    B, K = latents.shape[0], num_candidates
    rows = torch.arange(B, device=latents.device)
    candidate_rows = rows.repeat_interleave(K)  # (B*K,)
    model_output = setup.predictor(latents, setup.timesteps[0], rows)
    trace = []

    for i in range(N):
        alpha_bar, alpha_bar_next = float(setup.alpha_bars[i]), float(setup.alpha_bars[i + 1])
        x0_pred, eps_pred = split_prediction(model_output, latents, alpha_bar, setup.prediction_type)
        if i == N - 1:
            latents = ddim_step(x0_pred, eps_pred, alpha_bar, alpha_bar_next, eta,
                                randn_per_image(latents.shape[1:], generator, B, latents.device, latents.dtype))
            break

        if i not in guided or K == 1:
            noise = randn_per_image(latents.shape[1:], generator, B, latents.device, latents.dtype)  # (B, C, h, w)
            latents = ddim_step(x0_pred, eps_pred, alpha_bar, alpha_bar_next, eta, noise)
            model_output = setup.predictor(latents, setup.timesteps[i + 1], rows)
            continue

        # 1. K draws of the base transition per image.
        noise = randn_per_image((K, *latents.shape[1:]), generator, B, latents.device, latents.dtype)  # (B, K, C, h, w)
        candidates = ddim_step(x0_pred.unsqueeze(1), eps_pred.unsqueeze(1), alpha_bar, alpha_bar_next, eta, noise)
        candidates = candidates.flatten(0, 1)  # (B*K, C, h, w)

        # 2. Value of each candidate: the reward of its one-step x0 prediction.
        candidate_output = setup.predictor(candidates, setup.timesteps[i + 1], candidate_rows)
        candidate_x0, _ = split_prediction(candidate_output, candidates, alpha_bar_next, setup.prediction_type)
        images = pipe.decode_to_unit_images(candidate_x0, budget)
        candidate_prompts = [setup.prompts[b] for b in candidate_rows.tolist()]
        rewards = pipe.score_images(scorer, images, candidate_prompts, budget).view(B, K)

        # 3. Keep one candidate per image and its UNet output for the next step.
        log_pi = torch.log_softmax(rewards / lam, dim=-1) if lam > 0 else _argmax_log_probs(rewards)
        chosen = select_per_image(log_pi, "argmax" if lam == 0 else "sample", generator)  # (B,)
        pick = rows * K + chosen  # (B,) rows of the (B*K) batch
        latents, model_output = candidates[pick], candidate_output[pick]
        budget.decisions += 1
        trace.append(_svdd_trace(i, rewards, log_pi, chosen, lam))

    images = pipe.decode_to_unit_images(latents, budget)
    budget.seconds = time.perf_counter() - start_time
    return PowerSamplingPipelineOutput(images=images, nsfw_content_detected=None, trace=trace, budget=budget)


def _argmax_log_probs(rewards: torch.Tensor) -> torch.Tensor:
    """Log of a one-hot distribution on each row's best reward: (B, K) -> (B, K)."""
    one_hot = torch.zeros_like(rewards)
    one_hot[torch.arange(rewards.shape[0]), rewards.argmax(dim=-1)] = 1.0
    return one_hot.log()


def _svdd_trace(index: int, rewards: torch.Tensor, log_pi: torch.Tensor, chosen: torch.Tensor,
                lam: float) -> DecisionTrace:
    B, K = rewards.shape
    return DecisionTrace(
        index=index,
        log_p=torch.zeros(B, K),
        log_pi=log_pi.cpu(),
        log_w=(rewards / lam if lam > 0 else rewards).unsqueeze(-1).cpu(),
        rewards=rewards.unsqueeze(-1).cpu(),
        ess=effective_sample_size(log_pi).cpu(),
        chosen=chosen.cpu(),
        num_rollouts=1,
        nonfinite_rollouts=int((~torch.isfinite(rewards)).sum()),
        extra={"sampler": "svdd", "lam": lam},
    )


def fk_resampling_steps(num_steps: int, interval: int) -> list[int]:
    """Step indices with a potential evaluation: every ``interval`` steps from 0, never the last step."""
    if interval < 1:
        raise ValueError(f"resample_interval must be >= 1, got {interval}")
    return list(range(0, num_steps - 1, interval))


@torch.no_grad()
def sample_fk_steering(
    pipe,
    prompt: Union[str, list[str]],
    *,
    scorer,
    num_particles: int = 4,
    lam: float = 10.0,
    potential: str = "max",
    resample_interval: int = 4,
    ess_threshold: Optional[float] = None,
    final_selection: str = "argmax",
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    negative_prompt=None,
    eta: float = 1.0,
    generator=None,
    max_batch_size: int = 64,
) -> PowerSamplingPipelineOutput:
    """Sample with FK steering: k particles of the base sampler, resampled by reward potentials of x0 predictions.

    At each resampling step (every ``resample_interval`` steps) every particle's x0
    prediction, which its own noise prediction already gives, is decoded and scored.
    The potential turns the particle's rewards into a log-weight increment:
    ``"difference"`` lam * (r_now - r_previous), ``"max"`` lam * max of its rewards so
    far, ``"sum"`` lam * sum of its rewards so far. Weights accumulate between
    resamplings and reset after one. Particles cost no extra UNet rows, so a call
    costs k times the base sampler's rows, plus a decode and a score per particle and
    resampling step.

    Args:
        pipe: a loaded ``PowerSamplingStableDiffusionPipeline`` with a DDIM scheduler.
        prompt: one prompt or a list, one image each.
        scorer: reward model, ``scorer(images (n, 3, H, W) in [0, 1], prompts) -> (n,)``.
        num_particles: k, particles per image; 1 is the base sampler.
        lam: inverse temperature of the potentials, on raw rewards.
        potential: ``"difference"``, ``"max"`` or ``"sum"``.
        resample_interval: steps between potential evaluations.
        ess_threshold: ``None`` resamples at every potential evaluation; a value in (0, 1] resamples an
            image's particles only when their effective sample size is below ``ess_threshold * k``.
        final_selection: ``"argmax"`` returns the particle with the highest final reward,
            ``"sample"`` draws one with the final potential weights.
        eta: DDIM stochasticity; must be > 0.
        generator: one generator or one per image. Particle 0 of each image starts from the
            base pipeline's initial noise for that generator.
        max_batch_size: largest number of rows in one UNet call.

    Returns:
        ``PowerSamplingPipelineOutput`` with images (B, 3, H, W) in [0, 1], one ``ResamplingTrace`` per
        potential evaluation and the budget.
    """
    start_time = time.perf_counter()
    budget = PipelineBudget()
    _check_fk_arguments(num_particles, lam, potential, ess_threshold, final_selection)
    num_images = 1 if isinstance(prompt, str) else len(prompt)
    check_baseline_inputs(pipe, scorer, eta, generator, num_images)
    setup = prepare_denoising(pipe, prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              negative_prompt=negative_prompt, generator=generator, budget=budget,
                              max_batch_size=max_batch_size)
    N = len(setup.timesteps)
    resampling_steps = set(fk_resampling_steps(N, resample_interval))

    # 1. Particles: particle 0 starts from the base noise, the others from fresh draws.
    B, k = setup.latents.shape[0], num_particles
    device = setup.latents.device
    extra_noise = randn_per_image((k - 1, *setup.latents.shape[1:]), generator, B, device, setup.latents.dtype)
    extra_noise = extra_noise * pipe.scheduler.init_noise_sigma  # (B, k-1, C, h, w), scaled as prepare_latents does
    latents = torch.cat([setup.latents.unsqueeze(1), extra_noise], dim=1).flatten(0, 1)  # (B*k, C, h, w)
    particle_rows = torch.arange(B, device=device).repeat_interleave(k)  # (B*k,)
    particle_prompts = [setup.prompts[b] for b in particle_rows.tolist()]
    state = _ParticleState.empty(B, k, device)
    trace = []

    # 2. Denoise all particles; weigh and resample them at the resampling steps.
    for i in range(N):
        alpha_bar, alpha_bar_next = float(setup.alpha_bars[i]), float(setup.alpha_bars[i + 1])
        model_output = setup.predictor(latents, setup.timesteps[i], particle_rows)
        x0_pred, eps_pred = split_prediction(model_output, latents, alpha_bar, setup.prediction_type)

        if i in resampling_steps and k > 1:
            images = pipe.decode_to_unit_images(x0_pred, budget)
            rewards = pipe.score_images(scorer, images, particle_prompts, budget).view(B, k)
            state.add_potential(rewards, lam, potential)
            ancestors, record = _resample(state, ess_threshold, generator, i)
            state.reorder(ancestors)
            flat = (ancestors + torch.arange(B, device=device).unsqueeze(1) * k).flatten()  # (B*k,)
            x0_pred, eps_pred = x0_pred[flat], eps_pred[flat]
            trace.append(record)

        noise = randn_per_image((k, *latents.shape[1:]), generator, B, device, latents.dtype).flatten(0, 1)
        latents = ddim_step(x0_pred, eps_pred, alpha_bar, alpha_bar_next, eta, noise)

    # 3. Pick one particle per image from the clean samples.
    images = pipe.decode_to_unit_images(latents, budget)  # (B*k, 3, H, W)
    if k == 1:
        chosen = torch.zeros(B, dtype=torch.long, device=device)
    else:
        rewards = pipe.score_images(scorer, images, particle_prompts, budget).view(B, k)
        chosen = _final_choice(state, rewards, lam, potential, final_selection, generator)
        trace.append(ResamplingTrace(N, rewards.cpu(), state.log_weights.cpu(),
                                     effective_sample_size(torch.log_softmax(state.log_weights, -1)).cpu(),
                                     torch.zeros(B, dtype=torch.bool), chosen.cpu().unsqueeze(1),
                                     extra={"final_selection": final_selection}))
    images = images.view(B, k, *images.shape[1:])[torch.arange(B, device=device), chosen]
    budget.seconds = time.perf_counter() - start_time
    return PowerSamplingPipelineOutput(images=images, nsfw_content_detected=None, trace=trace, budget=budget)


def _check_fk_arguments(num_particles, lam, potential, ess_threshold, final_selection) -> None:
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    if not lam > 0 or math.isinf(lam):
        raise ValueError(f"lam must be a finite number > 0, got {lam}")
    if potential not in POTENTIALS:
        raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
    if ess_threshold is not None and not 0 < ess_threshold <= 1:
        raise ValueError(f"ess_threshold must be None (always resample) or in (0, 1], got {ess_threshold}")
    if final_selection not in FINAL_SELECTIONS:
        raise ValueError(f"final_selection must be one of {FINAL_SELECTIONS}, got {final_selection!r}")


@dataclass
class _ParticleState:
    """Per-particle reward history and accumulated log-weights, all (B, k)."""

    log_weights: torch.Tensor
    last_reward: torch.Tensor
    max_reward: torch.Tensor
    sum_reward: torch.Tensor
    evaluated: bool = False

    @classmethod
    def empty(cls, B: int, k: int, device) -> "_ParticleState":
        zeros = torch.zeros(B, k, device=device)
        return cls(zeros, zeros.clone(), torch.full((B, k), -math.inf, device=device), zeros.clone())

    def add_potential(self, rewards: torch.Tensor, lam: float, potential: str) -> None:
        """Multiply each particle's weight by its potential at these rewards and record them."""
        self.max_reward = torch.maximum(self.max_reward, rewards)
        self.sum_reward = self.sum_reward + rewards
        if potential == "difference":
            previous = self.last_reward if self.evaluated else torch.zeros_like(rewards)
            self.log_weights = self.log_weights + lam * (rewards - previous)
        elif potential == "max":
            self.log_weights = self.log_weights + lam * self.max_reward
        else:
            self.log_weights = self.log_weights + lam * self.sum_reward
        self.last_reward = rewards
        self.evaluated = True

    def reorder(self, ancestors: torch.Tensor) -> None:
        """Copy each particle's history from its ancestor (B, k); weights of resampled images are reset."""
        for name in ("last_reward", "max_reward", "sum_reward", "log_weights"):
            setattr(self, name, torch.gather(getattr(self, name), 1, ancestors))


def _resample(state: _ParticleState, ess_threshold, generator, index: int):
    """Multinomial resampling of each image's particles; returns ancestors (B, k) and the trace record."""
    B, k = state.log_weights.shape
    log_weights = torch.log_softmax(state.log_weights, dim=-1)  # (B, k)
    ess = effective_sample_size(log_weights)  # (B,)
    resample = torch.ones(B, dtype=torch.bool) if ess_threshold is None else (ess < ess_threshold * k).cpu()
    ancestors = torch.arange(k, device=log_weights.device).repeat(B, 1)  # (B, k)
    generators = generator if isinstance(generator, list) else [generator] * B
    for b in torch.nonzero(resample).flatten().tolist():
        g = generators[b]
        device = g.device if g is not None else log_weights.device
        probs = log_weights[b].exp().to(device, torch.float64)
        ancestors[b] = torch.multinomial(probs, k, replacement=True, generator=g).to(log_weights.device)
    record = ResamplingTrace(index, state.last_reward.cpu(), log_weights.cpu(), ess.cpu(), resample,
                             ancestors.cpu())
    # Resampled particles start with equal weights; the others keep accumulating.
    state.log_weights = torch.where(resample.to(log_weights.device).unsqueeze(1), torch.zeros_like(log_weights),
                                    state.log_weights)
    return ancestors, record


def _final_choice(state: _ParticleState, rewards, lam, potential, final_selection, generator) -> torch.Tensor:
    """Index (B,) of the returned particle: the best final reward, or a draw from the final weights."""
    if final_selection == "argmax":
        return rewards.argmax(dim=-1)
    state.add_potential(rewards, lam, potential)
    return select_per_image(torch.log_softmax(state.log_weights, dim=-1), "sample", generator)
