"""PowerSamplingStableDiffusionXLPipeline on tiny seeded components (32x32 images, offline)."""

import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from psdiffusion.pipelines import PowerSamplingStableDiffusionXLPipeline
from test_pipeline_sd import brightness_scorer, write_tiny_tokenizer


def tiny_sdxl_components(tokenizer_folder):
    """Seeded SDXL components: UNet (32, 64) with text-and-time added conditioning, two 2-layer text encoders."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled text
        cross_attention_dim=64,
        norm_num_groups=16,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    text_config = CLIPTextConfig(
        bos_token_id=54, eos_token_id=55, pad_token_id=55, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=16,
        hidden_act="gelu", projection_dim=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    tokenizer = write_tiny_tokenizer(tokenizer_folder)
    scheduler = EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                beta_end=0.012, steps_offset=1)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": scheduler,
        "add_watermarker": False,
    }


def test_tiny_sdxl_runs_power_sampling_deterministically(tmp_path):
    pipe = PowerSamplingStableDiffusionXLPipeline(**tiny_sdxl_components(tmp_path / "tokenizer"),
                                                  scorer=brightness_scorer())
    pipe.set_progress_bar_config(disable=True)
    options = dict(num_inference_steps=2, guidance_scale=2.0, output_type="np", num_candidates=2,
                   num_rollouts=2, rollout_steps=1)

    first = pipe("a cat", generator=torch.Generator().manual_seed(0), **options)
    second = pipe("a cat", generator=torch.Generator().manual_seed(0), **options)

    assert first.images.shape == (1, 32, 32, 3)
    assert len(first.trace) == 1
    assert first.trace[0].rewards.shape == (1, 2, 1)
    assert first.budget.decisions == 1
    assert (first.images == second.images).all()
