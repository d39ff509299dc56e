"""Train the digit judge on the "judge" split only and save it as assets/judge.

The judge sees none of the images the VAE, CLIP or UNet were trained on; its accuracy
is measured on the "test" split, which no model trains on. Random shifts, scalings,
rotations, blur and contrast changes make it tolerant of generated digits.

Run from the repository root: ``PYTHONPATH=. python samples/testbed/train_judge.py``.
"""

import torch
import torch.nn.functional as F

from common import Timer, augment, batches, cosine_lr, logger, make_parser, setup
from psdiffusion.testbed.digits import load_split
from psdiffusion.testbed.judge import DigitJudge


@torch.no_grad()
def accuracy(judge, images, labels):
    judge.eval()
    predicted = judge(images).argmax(dim=1)
    judge.train()
    return (predicted == labels).float().mean().item()


def main():
    args = make_parser(__doc__, steps=1200, batch_size=64, lr=3e-3).parse_args()
    generator = setup(args)
    images, labels = load_split("judge")
    test_images, test_labels = load_split("test")
    judge = DigitJudge()
    logger.info("judge parameters: %d", sum(p.numel() for p in judge.parameters()))
    optimizer = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=1e-4)
    timer = Timer()

    for step, index in zip(range(args.steps), batches(len(images), args.batch_size, generator)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr)
        loss = F.cross_entropy(judge(augment(images[index], generator)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == args.steps - 1:
            logger.info("step %d  loss %.4f  test accuracy %.4f  %.0fs",
                        step, loss.item(), accuracy(judge, test_images, test_labels), timer())

    judge.eval()
    logger.info("final test accuracy %.4f on %d held-out images, %.0fs",
                accuracy(judge, test_images, test_labels), len(test_labels), timer())
    judge.save_pretrained(args.out / "judge")


if __name__ == "__main__":
    main()
