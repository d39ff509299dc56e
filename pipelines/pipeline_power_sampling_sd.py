"""Power sampling for Stable Diffusion 1.x / 2.x and Turbo: reward-tilted denoising with lookahead rollouts.

Load it like any diffusers community pipeline::

    pipe = DiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        custom_pipeline="/path/to/psdiffusion/pipelines/pipeline_power_sampling_sd.py",
        trust_remote_code=True,
        scorer=my_scorer,
    )

or import ``psdiffusion.pipelines.PowerSamplingStableDiffusionPipeline`` and call
its ``from_pretrained`` or ``from_pipe``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Union

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from psdiffusion.core import PowerSamplingConfig
from psdiffusion.pipelines.power_sampling_utils import (
    NoisePredictor,
    PipelineBudget,
    PowerSamplingMixin,
    PowerSamplingPipelineOutput,
    RolloutPlan,
    check_scheduler,
    main_alpha_bars,
    resolve_diffusion_config,
    resolve_guided_steps,
    resolve_rollout_sampler,
)

logger = logging.get_logger(__name__)


class PowerSamplingStableDiffusionPipeline(PowerSamplingMixin, StableDiffusionPipeline):
    r"""
    Text-to-image Stable Diffusion with power sampling (inference-time lookahead).

    At each guided step the pipeline proposes K candidate next latents, rolls each
    one out M times to a clean image with a few-step sampler, scores the rollouts
    with `scorer`, and draws the next latent from the reward-tilted distribution
    `pi(c) ∝ p(c) * mean_j exp(r_cj / lam)`. Unguided steps are the base pipeline's steps.

    Components are those of [`StableDiffusionPipeline`]. The pipeline also keeps:
        scorer (`Callable`, *optional*):
            A reward model called as `scorer(images, prompts)` with float images (B, 3, H, W)
            in [0, 1] and a list of B prompts, returning float32 rewards (B,), e.g. a
            `psdiffusion.scorers.CLIPScorer`. Pass it to `__init__`, `from_pretrained(..., scorer=...)`,
            `from_pipe(..., scorer=...)` or to each call. It is not a pipeline component: `pipe.to()`
            does not move it and `save_pretrained` does not save it, so place it on the pipeline's device.

    The main scheduler must be one of DDIM (with `eta > 0` for ancestral candidates),
    DDPM, Euler-ancestral, LCM or TCD (with `eta > 0`).
    """

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Optional[StableDiffusionSafetyChecker] = None,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        image_encoder: Optional[CLIPVisionModelWithProjection] = None,
        scorer: Optional[torch.nn.Module] = None,
        requires_safety_checker: bool = True,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        # The scorer is kept as a plain attribute, not a registered component: diffusers'
        # to(), device and save_pretrained expect ModelMixin-like components with
        # .device/.dtype, which a scorer (any callable) need not have.
        self.scorer = scorer

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[list[int]] = None,
        sigmas: Optional[list[float]] = None,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[Union[str, list[str]]] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        power_sampling_config: Union[None, str, PowerSamplingConfig] = None,
        num_candidates: Optional[int] = None,
        num_rollouts: Optional[int] = None,
        scorer: Optional[Callable] = None,
        scorer_prompt: Optional[Union[str, list[str]]] = None,
        guided_steps: Union[str, list[int], tuple[float, float]] = "all",
        candidate_mode: str = "ancestral",
        perturbation_scale: float = 0.5,
        rollout_steps: Optional[int] = None,
        rollout_scheduler: Union[str, Any] = "ddim",
        rollout_eta: float = 1.0,
        rollout_unet: Optional[torch.nn.Module] = None,
        rollout_guidance_scale: Optional[float] = None,
        max_batch_size: Optional[int] = None,
    ):
        r"""
        Generate images with power sampling.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts to guide generation. If not given, pass `prompt_embeds` and `scorer_prompt`.
            height (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                Height in pixels of the generated image.
            width (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                Width in pixels of the generated image.
            num_inference_steps (`int`, *optional*, defaults to 50):
                Number of denoising steps of the main chain.
            timesteps (`list[int]`, *optional*):
                Custom timesteps for schedulers whose `set_timesteps` accepts them.
            sigmas (`list[float]`, *optional*):
                Custom sigmas for schedulers whose `set_timesteps` accepts them.
            guidance_scale (`float`, *optional*, defaults to 7.5):
                Classifier-free guidance scale; 1 or less (0 for Turbo models) disables guidance. Guidance
                applies to the main step, the candidates and (unless `rollout_guidance_scale` says otherwise)
                the rollouts.
            negative_prompt (`str` or `list[str]`, *optional*):
                What to guide away from; ignored without classifier-free guidance.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                Images generated per prompt.
            eta (`float`, *optional*, defaults to 0.0):
                Stochasticity of DDIM (and gamma of TCD). Ancestral candidates need `eta > 0` with these
                schedulers, otherwise the call raises a ValueError; DDIM with `eta=0` works in perturbed mode.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Source of all randomness: initial noise, candidates, rollout noise and selection. A list
                needs one generator per image; the same generators give the same images.
            latents (`torch.Tensor`, *optional*):
                Initial noisy latents; drawn from `generator` if not given.
            prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed text embeddings, in place of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed negative text embeddings.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`PowerSamplingPipelineOutput`] instead of a tuple.
            cross_attention_kwargs (`dict`, *optional*):
                Passed to the attention processors of the main and rollout UNets.
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                Rescale factor of the guided noise prediction (Lin et al., 2023, "Common Diffusion Noise
                Schedules and Sample Steps are Flawed").
            clip_skip (`int`, *optional*):
                Number of final CLIP text-encoder layers to skip.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after every denoising step as `callback_on_step_end(self, step, timestep, callback_kwargs)`;
                at a guided step `latents` is the chosen candidate.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                Tensors passed in `callback_kwargs`, from `self._callback_tensor_inputs`.
            power_sampling_config (`PowerSamplingConfig` or `str`, *optional*):
                Hyperparameters. `None` uses K=4 candidates, M=1 one-step rollout, alpha=1, lam=0.5 on
                rewards standardised over each K x M set. A preset name (`"minimal"`, `"balanced"`,
                `"quality"`) keeps the preset's K and M but sets alpha=1, lam=0.5, standardised rewards and
                2, 4 or 8 rollout steps; the presets' own alpha and lam are meant for language models.
                Only alpha=1 (reward tilting) is supported.
            num_candidates (`int`, *optional*):
                Overrides K of the config.
            num_rollouts (`int`, *optional*):
                Overrides M of the config. Deterministic rollouts (one step, or DDIM with `rollout_eta=0`)
                run once per candidate whatever M is, and the trace records it. A warning names those steps,
                unless the only ones are the last guided steps, whose rollouts have one main step left.
            scorer (`Callable`, *optional*):
                Reward model for this call; defaults to the registered `self.scorer`.
            scorer_prompt (`str` or `list[str]`, *optional*):
                Text passed to the scorer in place of `prompt`.
            guided_steps (`"all"`, `list[int]` or `(float, float)`, *optional*, defaults to `"all"`):
                Steps that run power sampling: every step that adds noise (`"all"`; the last step is left
                out in ancestral mode), a list of integer step indices (numpy integers work too), or a
                tuple `(start, end)` of fractions of the schedule. A list is always read as step indices.
            candidate_mode (`str`, *optional*, defaults to `"ancestral"`):
                `"ancestral"` draws K candidates from the base transition (q = p). `"perturbed"` uses noise
                predictions eps + s * z_k with `s = perturbation_scale`; the Gaussian densities of base and
                proposal enter the weights, and with a deterministic base step (DDIM, `eta=0`) the target
                becomes the reward tilt of the proposal itself (recorded as `target` in the trace).
                Perturbed mode supports DDIM, DDPM and Euler-ancestral. Use `"ancestral"` with a stochastic
                scheduler (DDPM, DDIM with `eta > 0`, Euler-ancestral): in perturbed mode the weight p/q is a
                ratio of Gaussian densities over all D latent elements, and its log varies across candidates
                with a standard deviation of about sqrt(D / 2) * v nats, where v is the proposal's extra
                variance over the base step's variance. That swamps a reward term of a few nats, so the
                effective sample size falls to about 1 and the reward is ignored. The call then logs a
                warning, and the trace's `extra["proposal_log_ratio_spread"]` records the spread per image.
            perturbation_scale (`float`, *optional*, defaults to 0.5):
                s, the scale of the noise added to the noise prediction in perturbed mode.
            rollout_steps (`int`, *optional*):
                Denoising steps of each rollout, spread evenly over the remaining main timesteps; overrides
                `rollout_length` of the config. 1 is the one-step x0 prediction. With the main UNet and guidance
                (no separate `rollout_unet` or `rollout_guidance_scale`), a one-step rollout's noise prediction
                at the chosen candidate is reused as the main chain's next one, saving one UNet row per image and
                guided step (two with classifier-free guidance).
            rollout_scheduler (`str` or scheduler, *optional*, defaults to `"ddim"`):
                Rollout sampler: `"ddim"` (with `rollout_eta`) or `"euler_ancestral"`, or a `DDIMScheduler` /
                `EulerAncestralDiscreteScheduler` instance, whose `prediction_type` then applies to the
                rollout UNet. Rollouts never step the main scheduler.
            rollout_eta (`float`, *optional*, defaults to 1.0):
                Stochasticity of DDIM rollouts; 0 makes them deterministic.
            rollout_unet (`UNet2DConditionModel`, *optional*):
                A cheaper UNet for rollouts (e.g. a distilled model) sharing the latent space and text
                encoder of `self.unet`.
            rollout_guidance_scale (`float`, *optional*):
                Guidance scale of the rollouts; defaults to `guidance_scale` (0 suits Turbo rollout UNets).
            max_batch_size (`int`, *optional*):
                Largest number of rows in one UNet call (a guided latent counts twice), one VAE decode and
                one scorer call; overrides the config's `max_batch_size`. Peak memory follows this, not K x M.
                With classifier-free guidance and `max_batch_size=1`, the unconditional and conditional
                halves of each latent run as two UNet calls.

        Returns:
            [`PowerSamplingPipelineOutput`] or `tuple`:
                With `return_dict=True`, the images, the NSFW flags, the per-step `trace` and the `budget`.
                Otherwise the tuple `(images, nsfw_content_detected, trace, budget)`.
        """
        call_start = time.perf_counter()
        budget = PipelineBudget()

        # 0. Default height and width to the UNet's sample size.
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs.
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            None,
            None,
            callback_on_step_end_tensor_inputs,
        )
        config = resolve_diffusion_config(power_sampling_config, num_candidates, num_rollouts, max_batch_size)
        if rollout_steps is not None:
            config = config.replace(rollout_length=rollout_steps)
        scorer = scorer if scorer is not None else getattr(self, "scorer", None)
        rollout_sampler = resolve_rollout_sampler(rollout_scheduler)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 2. Define call parameters.
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        num_images = batch_size * num_images_per_prompt
        device = self._execution_device
        self.check_power_sampling_inputs(scorer, candidate_mode, eta, generator, num_images, rollout_unet,
                                         scorer_prompt, prompt)
        prompts = self.scorer_prompts(prompt, scorer_prompt, batch_size, num_images_per_prompt)
        rollout_unet = rollout_unet if rollout_unet is not None else self.unet
        rollout_guidance_scale = guidance_scale if rollout_guidance_scale is None else rollout_guidance_scale
        rollout_uses_cfg = rollout_guidance_scale > 1 and rollout_unet.config.time_cond_proj_dim is None

        # 3. Encode the prompt once for the main chain and the rollouts.
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance or rollout_uses_cfg,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )

        # 4. Prepare timesteps and the guided step indices.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps,
                                                            sigmas)
        guided = set(resolve_guided_steps(guided_steps, len(timesteps), candidate_mode))
        if not guided:
            logger.warning("no denoising step is guided (num_inference_steps=%d, candidate_mode=%r); the call "
                           "samples from the base model", len(timesteps), candidate_mode)

        # 5. Prepare the initial latents.
        latents = self.prepare_latents(
            num_images,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 6. Prepare step arguments, the noise predictors and the rollout plan.
        step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        predictor = NoisePredictor(
            self.unet,
            guidance_scale,
            guidance_rescale,
            prompt_embeds,
            negative_prompt_embeds,
            config.max_batch_size,
            budget,
            timestep_cond=self.guidance_embedding(self.unet, guidance_scale, device, latents.dtype),
            cross_attention_kwargs=cross_attention_kwargs,
        )
        rollout_predictor = NoisePredictor(
            rollout_unet,
            rollout_guidance_scale,
            guidance_rescale,
            prompt_embeds,
            negative_prompt_embeds,
            config.max_batch_size,
            budget,
            timestep_cond=self.guidance_embedding(rollout_unet, rollout_guidance_scale, device, latents.dtype),
            cross_attention_kwargs=cross_attention_kwargs,
        )
        prediction_config = rollout_scheduler.config if not isinstance(rollout_scheduler, str) else self.scheduler.config
        plan = RolloutPlan(
            predictor=rollout_predictor,
            timesteps=timesteps,
            alpha_bars=main_alpha_bars(self.scheduler, timesteps),
            num_steps=config.rollout_length,
            sampler=rollout_sampler,
            eta=rollout_eta,
            prediction_type=prediction_config.prediction_type,
        )
        rows = torch.arange(num_images, device=device)
        reuse_rollouts = self._reuse_rollout_prediction and plan.repeats_main_prediction(predictor)
        kept = None

        # 7. Denoising loop: base steps, and power-sampling decisions at the guided steps.
        trace = []
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                latent_model_input = self.scheduler.scale_model_input(latents, t)
                noise_pred = self.predict_noise(predictor, latent_model_input, t, rows, i, kept)

                if i in guided:
                    latents, decision, kept = self.power_sampling_step(
                        i, t, latents, noise_pred, config=config, candidate_mode=candidate_mode,
                        perturbation_scale=perturbation_scale, eta=eta, step_kwargs=step_kwargs, plan=plan,
                        scorer=scorer, prompts=prompts, generator=generator, budget=budget,
                        keep_prediction=reuse_rollouts,
                    )
                    trace.append(decision)
                else:
                    latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                    kept = None

                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": prompt_embeds,
                                 "negative_prompt_embeds": negative_prompt_embeds}
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    predictor.prompt_embeds = rollout_predictor.prompt_embeds = prompt_embeds
                    predictor.negative_prompt_embeds = rollout_predictor.negative_prompt_embeds = negative_prompt_embeds

                progress_bar.update()

        # Steps whose rewards or weights did not act as configured are logged once, here.
        self.warn_about_decisions(trace, config, plan)

        # 8. Decode, run the safety checker and post-process.
        if output_type != "latent":
            with torch.no_grad():
                image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False,
                                        generator=generator)[0]
            budget.vae_decodes += latents.shape[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image = latents
            has_nsfw_concept = None
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        self.maybe_free_model_hooks()
        budget.seconds = time.perf_counter() - call_start

        if not return_dict:
            return (image, has_nsfw_concept, trace, budget)
        return PowerSamplingPipelineOutput(
            images=image, nsfw_content_detected=has_nsfw_concept, trace=trace, budget=budget
        )
