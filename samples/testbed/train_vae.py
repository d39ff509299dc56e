"""Train the test bed's tiny AutoencoderKL (32x32x3 images to 8x8x4 latents) and save it as digits-sd/vae.

Run from the repository root: ``PYTHONPATH=. python samples/testbed/train_vae.py``.
"""

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from common import Timer, batches, cosine_lr, logger, make_parser, setup
from psdiffusion.testbed.digits import load_split

KL_WEIGHT = 1e-4


def build_vae():
    """Three encoder blocks (two downsamplings): 32x32x3 to 8x8x4."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


@torch.no_grad()
def latent_std(vae, images):
    """Standard deviation of posterior samples, whose inverse becomes the config's scaling_factor."""
    generator = torch.Generator().manual_seed(1)
    latents = vae.encode(images * 2 - 1).latent_dist.sample(generator)
    return latents.std().item()


def main():
    args = make_parser(__doc__, steps=600, batch_size=64, lr=2e-3).parse_args()
    generator = setup(args)
    images, _ = load_split("generative")
    vae = build_vae()
    logger.info("VAE parameters: %d", sum(p.numel() for p in vae.parameters()))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    timer = Timer()

    for step, index in zip(range(args.steps), batches(len(images), args.batch_size, generator)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr)
        x = images[index] * 2 - 1  # diffusers VAEs take [-1, 1]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(reconstruction, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            # MSE on [-1, 1] is four times the MSE on [0, 1]; the log reports the latter.
            logger.info("step %d  mse[0,1] %.5f  kl %.3f  %.0fs", step, mse.item() / 4, kl.item(), timer())

    vae.eval()
    vae.register_to_config(scaling_factor=1.0 / latent_std(vae, images))
    with torch.no_grad():
        x = images[:256] * 2 - 1
        mse = F.mse_loss(vae(x).sample, x).item() / 4
    logger.info("final reconstruction mse[0,1] %.5f, scaling_factor %.4f, %.0fs",
                mse, vae.config.scaling_factor, timer())
    vae.to(torch.float16).save_pretrained(args.out / "digits-sd" / "vae")


if __name__ == "__main__":
    main()
