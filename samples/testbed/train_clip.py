"""Train the test bed's tiny open_clip CLIP (the reward model) and save it as assets/digits-clip.

Contrastive training on (image, caption) pairs of the "generative" split, with a fresh
random caption per image per step. The folder uses open_clip's ``local-dir:`` layout.

Run from the repository root: ``PYTHONPATH=. python samples/testbed/train_clip.py``.
"""

import json

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from common import Timer, augment, batches, cosine_lr, logger, make_parser, setup
from psdiffusion.testbed.digits import (
    attribute_thresholds,
    attribute_words,
    load_split,
    make_caption,
    sample_captions,
)

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 3, "width": 64, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
# Images enter as [0, 1] RGB, and this normalisation maps them to [-1, 1].
PREPROCESS_CFG = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                  "interpolation": "bilinear", "resize_mode": "shortest"}


def build_clip():
    model = open_clip.CLIP(**MODEL_CFG)
    tokenizer = open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    return model, tokenizer


def normalize(images):
    mean = torch.tensor(PREPROCESS_CFG["mean"])[None, :, None, None]  # 1, 3, 1, 1
    std = torch.tensor(PREPROCESS_CFG["std"])[None, :, None, None]  # 1, 3, 1, 1
    return (images - mean) / std


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images, labels):
    """Classify ``images`` by the nearest "a handwritten digit <word>" caption; return the accuracy."""
    was_training = model.training
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([make_caption(d) for d in range(10)])), dim=-1)  # 10, D
    image = F.normalize(model.encode_image(normalize(images)), dim=-1)  # N, D
    predicted = (image @ text.T).argmax(dim=1)
    model.train(was_training)
    return (predicted == labels).float().mean().item()


def save(model, folder):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = {name: tensor.to(torch.float16).contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, folder / "open_clip_model.safetensors")


def main():
    args = make_parser(__doc__, steps=1500, batch_size=128, lr=1e-3).parse_args()
    generator = setup(args)
    images, labels = load_split("generative")
    words = attribute_words(images, labels, attribute_thresholds(images, labels))
    test_images, test_labels = load_split("test")
    model, tokenizer = build_clip()
    logger.info("CLIP parameters: %d", sum(p.numel() for p in model.parameters()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    timer = Timer()

    for step, index in zip(range(args.steps), batches(len(images), args.batch_size, generator)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr)
        captions = sample_captions(labels[index], [words[i] for i in index], generator)
        image_features = F.normalize(model.encode_image(normalize(augment(images[index], generator, 0.5))), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T  # B, B
        targets = torch.arange(len(index))
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # keeps the logit scale at most 100 = exp(4.6052)
        if step % 100 == 0 or step == args.steps - 1:
            logger.info("step %d  loss %.4f  zero-shot test accuracy %.4f  %.0fs", step, loss.item(),
                        zero_shot_accuracy(model, tokenizer, test_images, test_labels), timer())

    model.eval()
    logger.info("final zero-shot accuracy %.4f on %d held-out images, %.0fs",
                zero_shot_accuracy(model, tokenizer, test_images, test_labels), len(test_labels), timer())
    save(model, args.out / "digits-clip")


if __name__ == "__main__":
    main()
