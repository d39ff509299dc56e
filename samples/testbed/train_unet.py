"""Train the test bed's text-conditioned UNet and text encoder and finish the digits-sd folder.

Needs the VAE (train_vae.py) and the tokenizer (build_tokenizer.py) in the assets folder
first. The UNet denoises 8x8x4 VAE latents under the DDPM noise schedule with epsilon
prediction; the tiny CLIPTextModel trains along with it. Captions are replaced by ""
with probability ``--uncond-probability`` so that classifier-free guidance works.
Every ``--eval-every`` steps the script generates 5 images per digit, logs the
share the judge names correctly and saves a checkpoint. The shipped model is the
step-1600 checkpoint, exported with ``--export`` (see samples/testbed/README.md).

Run from the repository root: ``PYTHONPATH=. python samples/testbed/train_unet.py``.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from common import Timer, batches, cosine_lr, logger, make_parser, setup
from evaluate_base import judged_accuracy
from psdiffusion import testbed
from psdiffusion.testbed.digits import attribute_thresholds, attribute_words, load_split, sample_captions

NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def build_text_encoder(tokenizer):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(text_width):
    """Two resolutions (8x8 and 4x4) with cross-attention to the text tokens at both.

    An attention-pooled text embedding is also added to the timestep embedding
    (``addition_embed_type="text"``), which reaches every ResNet block. With cross-attention
    alone, the judged accuracy at guidance 7.5 was still 18% after 600 steps.
    """
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=text_width,
        attention_head_dim=4,
        norm_num_groups=16,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def build_pipeline(vae, text_encoder, tokenizer, unet):
    scheduler = DDIMScheduler(**NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_posteriors(vae, images):
    """Return the VAE posterior mean and std ``(N, 4, 8, 8)`` of every image, in scaled latent units."""
    posterior = vae.encode(images * 2 - 1).latent_dist
    scale = vae.config.scaling_factor
    return posterior.mean * scale, posterior.std * scale


def tokenize(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def evaluate(pipe, judge, step, timer):
    """Log the judged accuracy at two guidance scales; 5 images per digit, seeds 0-4."""
    pipe.unet.eval()
    pipe.text_encoder.eval()
    scores = []
    for scale in (testbed.DEFAULTS["guidance_scale"], 7.5):
        accuracy, _, _ = judged_accuracy(pipe, judge, 5, scale, testbed.DEFAULTS["num_inference_steps"])
        scores.append(f"guidance {scale}: {accuracy:.2f}")
    logger.info("step %d  judged accuracy %s  %.0fs", step, ", ".join(scores), timer())
    pipe.unet.train()
    pipe.text_encoder.train()


def main():
    parser = make_parser(__doc__, steps=2400, batch_size=64, lr=1e-3)
    parser.add_argument("--uncond-probability", type=float, default=0.15, help="share of captions replaced by ''")
    parser.add_argument("--eval-every", type=int, default=800,
                        help="steps between judged-accuracy logs and checkpoints (0: never)")
    parser.add_argument("--checkpoints", type=Path, default=Path("outputs/testbed-checkpoints"),
                        help="folder for the intermediate pipelines (not shipped)")
    parser.add_argument("--export", type=Path,
                        help="skip training and ship the UNet and text encoder of this checkpoint folder")
    args = parser.parse_args()
    generator = setup(args)
    sd_dir = args.out / "digits-sd"
    vae = AutoencoderKL.from_pretrained(sd_dir / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    if args.export:
        unet = UNet2DConditionModel.from_pretrained(args.export / "unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(args.export / "text_encoder", dtype=torch.float32)
        save(build_pipeline(vae, text_encoder, tokenizer, unet), sd_dir)
        return
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet(text_encoder.config.hidden_size)
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    judge = testbed.load_judge()
    logger.info("UNet parameters: %d, text encoder parameters: %d",
                sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text_encoder.parameters()))

    images, labels = load_split("generative")
    words = attribute_words(images, labels, attribute_thresholds(images, labels))
    latent_mean, latent_std = encode_posteriors(vae, images)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    timer = Timer()

    for step, index in zip(range(args.steps), batches(len(images), args.batch_size, generator)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=100)
        noise_like = torch.randn(latent_mean[index].shape, generator=generator)
        latents = latent_mean[index] + latent_std[index] * noise_like  # B, 4, 8, 8
        captions = sample_captions(labels[index], [words[i] for i in index], generator, args.uncond_probability)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)

        text_states = text_encoder(tokenize(tokenizer, captions))[0]  # B, T, D
        noise_pred = unet(noisy, timesteps, encoder_hidden_states=text_states).sample
        loss = F.mse_loss(noise_pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

        if step % 100 == 0:
            logger.info("step %d  loss %.4f  %.0fs", step, loss.item(), timer())
        if args.eval_every and (step + 1) % args.eval_every == 0:
            evaluate(pipe, judge, step + 1, timer)
            pipe.save_pretrained(args.checkpoints / f"step-{step + 1}")

    unet.eval()
    text_encoder.eval()
    logger.info("trained %d steps in %.0fs", args.steps, timer())
    save(pipe, sd_dir)


def save(pipe, sd_dir):
    """Write unet/, text_encoder/ and scheduler/ with fp16 weights, and a model_index.json without safety checker."""
    pipe.unet.to(torch.float16).save_pretrained(sd_dir / "unet")
    pipe.text_encoder.to(torch.float16).save_pretrained(sd_dir / "text_encoder")
    # transformers 5 builds a model in the dtype its config names, while diffusers builds fp32
    # unless a torch_dtype is passed. Naming float32 here keeps a plain from_pretrained in one dtype.
    config_path = sd_dir / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    pipe.scheduler.save_pretrained(sd_dir / "scheduler")
    pipe.save_config(sd_dir)

if __name__ == "__main__":
    main()
