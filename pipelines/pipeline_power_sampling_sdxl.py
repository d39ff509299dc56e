"""Power sampling for Stable Diffusion XL: reward-tilted denoising with lookahead rollouts.

Load it like any diffusers community pipeline::

    pipe = DiffusionPipeline.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0",
        custom_pipeline="/path/to/psdiffusion/pipelines/pipeline_power_sampling_sdxl.py",
        trust_remote_code=True,
        scorer=my_scorer,
    )

or import ``psdiffusion.pipelines.PowerSamplingStableDiffusionXLPipeline``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Union

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from psdiffusion.core import PowerSamplingConfig
from psdiffusion.pipelines.power_sampling_utils import (
    NoisePredictor,
    PipelineBudget,
    PowerSamplingMixin,
    PowerSamplingPipelineOutput,
    RolloutPlan,
    main_alpha_bars,
    resolve_diffusion_config,
    resolve_guided_steps,
    resolve_rollout_sampler,
    timed,
)

logger = logging.get_logger(__name__)


class PowerSamplingStableDiffusionXLPipeline(PowerSamplingMixin, StableDiffusionXLPipeline):
    r"""
    Text-to-image Stable Diffusion XL with power sampling (inference-time lookahead).

    Guided steps work as in `PowerSamplingStableDiffusionPipeline`: K candidates, M rollouts each
    with a few-step sampler, decoded and scored, and a reward-tilted choice of the next latent.
    Rollouts carry the pooled text embeddings and size conditioning of their image.

    The pipeline keeps a `scorer` (any `scorer(images, prompts) -> rewards (B,)` callable) as a plain
    attribute, passed to `__init__`, `from_pretrained(..., scorer=...)`, `from_pipe(..., scorer=...)`
    or to each call; `pipe.to()` does not move it.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: Optional[CLIPVisionModelWithProjection] = None,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: Optional[bool] = None,
        scorer: Optional[Callable] = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.scorer = scorer

    def decode_to_unit_images(self, latents: torch.Tensor, budget: PipelineBudget) -> torch.Tensor:
        """Decode clean latents (n, C, h, w) into float images (n, 3, H, W) in [0, 1], undoing SDXL's latent scaling."""
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        with timed(budget, "vae_seconds", latents.device):
            images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        budget.vae_decodes += latents.shape[0]
        images = self.image_processor.postprocess(images, output_type="pt", do_denormalize=[True] * len(images))
        return images.float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str]] = None,
        prompt_2: Optional[Union[str, list[str]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[list[int]] = None,
        sigmas: Optional[list[float]] = None,
        guidance_scale: float = 5.0,
        negative_prompt: Optional[Union[str, list[str]]] = None,
        negative_prompt_2: Optional[Union[str, list[str]]] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        original_size: Optional[tuple[int, int]] = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: Optional[tuple[int, int]] = None,
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

        The arguments are those of [`StableDiffusionXLPipeline.__call__`] that are listed here, plus the
        power-sampling arguments, which mean exactly what they mean in
        [`PowerSamplingStableDiffusionPipeline.__call__`]: `power_sampling_config`, `num_candidates`,
        `num_rollouts`, `scorer`, `scorer_prompt`, `guided_steps`, `candidate_mode`, `perturbation_scale`,
        `rollout_steps`, `rollout_scheduler`, `rollout_eta`, `rollout_unet`, `rollout_guidance_scale` and
        `max_batch_size`. A `rollout_unet` must accept SDXL's added conditioning (`text_embeds`, `time_ids`).

        Args:
            original_size (`tuple[int, int]`, *optional*, defaults to `(height, width)`):
                SDXL size conditioning: the original image size.
            crops_coords_top_left (`tuple[int, int]`, *optional*, defaults to `(0, 0)`):
                SDXL crop conditioning.
            target_size (`tuple[int, int]`, *optional*, defaults to `(height, width)`):
                SDXL size conditioning: the target image size.

        Returns:
            [`PowerSamplingPipelineOutput`] or `tuple`:
                With `return_dict=True`, the images, `nsfw_content_detected` (always `None`: SDXL has no
                safety checker), the per-step `trace` and the `budget`. Otherwise the tuple
                `(images, None, trace, budget)`.
        """
        call_start = time.perf_counter()
        budget = PipelineBudget()

        # 0. Default height and width to the UNet's sample size.
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs.
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            None,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            None,
            None,
            callback_on_step_end_tensor_inputs,
        )
        config = resolve_diffusion_config(power_sampling_config, num_candidates, num_rollouts, max_batch_size)
        if rollout_steps is not None:
            config = config.replace(rollout_length=rollout_steps)
        scorer = scorer if scorer is not None else self.scorer
        rollout_sampler = resolve_rollout_sampler(rollout_scheduler)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = None
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

        # 3. Encode the prompt with both text encoders, once for the main chain and the rollouts.
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=self.do_classifier_free_guidance or rollout_uses_cfg,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=self.clip_skip,
            )
        )

        # 4. Prepare timesteps and the guided step indices.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps,
                                                            sigmas)
        guided = set(resolve_guided_steps(guided_steps, len(timesteps), candidate_mode))

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

        # 6. Prepare the added conditioning, the noise predictors and the rollout plan.
        step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        if self.text_encoder_2 is None:
            projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(original_size, crops_coords_top_left, target_size,
                                              dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim)
        add_time_ids = add_time_ids.to(device).repeat(num_images, 1)  # (B, 6)
        added_cond = {"text_embeds": pooled_prompt_embeds, "time_ids": add_time_ids}
        negative_added_cond = None
        if negative_pooled_prompt_embeds is not None:
            negative_added_cond = {"text_embeds": negative_pooled_prompt_embeds, "time_ids": add_time_ids}

        def make_predictor(unet, scale):
            return NoisePredictor(
                unet, scale, guidance_rescale, prompt_embeds, negative_prompt_embeds, config.max_batch_size, budget,
                added_cond=added_cond, negative_added_cond=negative_added_cond,
                timestep_cond=self.guidance_embedding(unet, scale, device, latents.dtype),
                cross_attention_kwargs=cross_attention_kwargs,
            )

        predictor = make_predictor(self.unet, guidance_scale)
        rollout_predictor = make_predictor(rollout_unet, rollout_guidance_scale)
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

        # The SDXL VAE overflows in float16 unless its config allows it; rollouts decode too, so upcast for the call.
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.vae.to(dtype=torch.float32)

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
                                 "add_text_embeds": pooled_prompt_embeds, "add_time_ids": add_time_ids}
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)

                progress_bar.update()

        # Steps whose rewards or weights did not act as configured are logged once, here.
        self.warn_about_decisions(trace, config, plan)

        # 8. Decode, watermark and post-process.
        if output_type != "latent":
            image = self.decode_to_unit_images(latents, budget) * 2 - 1  # back to the VAE's [-1, 1]
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
            image = self.image_processor.postprocess(image, output_type=output_type)
        else:
            image = latents
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)

        self.maybe_free_model_hooks()
        budget.seconds = time.perf_counter() - call_start

        if not return_dict:
            return (image, None, trace, budget)
        return PowerSamplingPipelineOutput(images=image, nsfw_content_detected=None, trace=trace, budget=budget)
