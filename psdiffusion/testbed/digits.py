"""The handwritten-digit data behind the test bed: splits, pixel attributes, captions, prompts.

The images are scikit-learn's ``load_digits`` (1797 greyscale 8x8 bitmaps, ink 0..16),
bilinearly upsampled to 32x32, repeated to three channels and scaled to [0, 1].
scikit-learn is imported only by :func:`load_split`, so the prompt helpers work without it.
"""

import re

import torch
import torch.nn.functional as F

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 32

# One fixed permutation of the 1797 images, cut into three disjoint parts. The
# "generative" part trains the VAE, the CLIP reward model and the UNet. The "judge"
# part trains only the digit judge. The "test" part trains nothing and measures both.
SPLIT_SEED = 0
SPLIT_SIZES = {"generative": 1000, "judge": 500, "test": 297}

# Attribute words: each pair names the bottom and top per-digit tertile of one pixel
# statistic on the generative split. The middle tertile gets no word.
ATTRIBUTE_WORDS = {
    "thickness": ("thin", "thick"),
    "size": ("small", "large"),
    "slant": ("upright", "slanted"),
}

# Caption phrasings; `{adj}` takes zero or more attribute words.
PHRASINGS = (
    "a {adj}handwritten digit {word}",
    "the {adj}number {digit}",
    "a {adj}{digit}",
    "the {adj}digit {word}",
    "a {adj}handwritten {digit}",
)


def load_split(split):
    """Return ``(images, labels)`` of one split: images ``(N, 3, 32, 32)`` in [0, 1], labels ``(N,)``."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)}, got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # N, 8, 8
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))

    start = 0
    for name, size in SPLIT_SIZES.items():
        if name == split:
            index = order[start : start + size]
            break
        start += size
    return upsample(pixels[index]), labels[index]


def upsample(pixels):
    """Map 8x8 bitmaps ``(N, 8, 8)`` in [0, 1] to RGB images ``(N, 3, 32, 32)``."""
    images = F.interpolate(pixels[:, None], size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return images.clamp(0, 1).repeat(1, 3, 1, 1)  # N, 3, H, W


def pixel_statistics(images):
    """Return per-image ``(thickness, size, slant)``, each ``(N,)``, measured on ``(N, 3, H, W)`` images.

    thickness: mean ink over the pixels that carry ink (> 0.1), so a bold stroke scores high;
    size: fraction of the frame covered by the ink's bounding box;
    slant: horizontal shear of the ink, ``cov(x, y) / var(y)`` with y pointing up, positive leaning right.
    """
    grey = images.mean(dim=1)  # N, H, W
    N, H, W = grey.shape
    inked = grey > 0.1
    thickness = (grey * inked).sum(dim=(1, 2)) / inked.sum(dim=(1, 2)).clamp(min=1)

    rows = inked.any(dim=2).float()  # N, H
    cols = inked.any(dim=1).float()  # N, W
    size = rows.sum(dim=1) * cols.sum(dim=1) / (H * W)

    y = -torch.arange(H, dtype=grey.dtype)[None, :, None]  # 1, H, 1
    x = torch.arange(W, dtype=grey.dtype)[None, None, :]  # 1, 1, W
    mass = grey.sum(dim=(1, 2)).clamp(min=1e-6)
    mean_x = (grey * x).sum(dim=(1, 2)) / mass
    mean_y = (grey * y).sum(dim=(1, 2)) / mass
    dx = x - mean_x[:, None, None]
    dy = y - mean_y[:, None, None]
    cov_xy = (grey * dx * dy).sum(dim=(1, 2)) / mass
    var_y = (grey * dy * dy).sum(dim=(1, 2)) / mass
    slant = cov_xy / var_y.clamp(min=1e-6)
    return thickness, size, slant


def attribute_thresholds(images, labels):
    """Return the per-digit tertile cut points ``{attribute: (10, 2) tensor}`` of the pixel statistics."""
    statistics = dict(zip(ATTRIBUTE_WORDS, pixel_statistics(images)))
    quantiles = torch.tensor([1 / 3, 2 / 3])
    thresholds = {}
    for name, values in statistics.items():
        thresholds[name] = torch.stack([torch.quantile(values[labels == d], quantiles) for d in range(10)])
    return thresholds


def attribute_words(images, labels, thresholds):
    """Return, per image, the list of attribute words its pixel statistics earn (bottom or top tertile)."""
    statistics = dict(zip(ATTRIBUTE_WORDS, pixel_statistics(images)))
    words = [[] for _ in range(len(labels))]
    for name, (low_word, high_word) in ATTRIBUTE_WORDS.items():
        cuts = thresholds[name][labels]  # N, 2
        for i, value in enumerate(statistics[name]):
            if value < cuts[i, 0]:
                words[i].append(low_word)
            elif value > cuts[i, 1]:
                words[i].append(high_word)
    return words


def make_caption(digit, adjectives=(), phrasing=0):
    """Write one caption for ``digit`` in phrasing number ``phrasing`` with the given attribute words."""
    if not 0 <= phrasing < len(PHRASINGS):
        raise ValueError(f"phrasing must be in [0, {len(PHRASINGS)}), got {phrasing}")
    adj = "".join(word + " " for word in adjectives)
    return PHRASINGS[phrasing].format(adj=adj, word=DIGIT_WORDS[digit], digit=digit)


def sample_captions(labels, words, generator, empty_probability=0.0):
    """Draw one training caption per image: a random phrasing and a random subset of its attribute words.

    With probability ``empty_probability`` the caption is "" (classifier-free guidance dropout).
    """
    captions = []
    for label, image_words in zip(labels.tolist(), words):
        if torch.rand((), generator=generator) < empty_probability:
            captions.append("")
            continue
        phrasing = int(torch.randint(len(PHRASINGS), (), generator=generator))
        keep = torch.rand(len(image_words), generator=generator) < 0.5
        adjectives = [word for word, kept in zip(image_words, keep) if kept]
        captions.append(make_caption(label, adjectives, phrasing))
    return captions


def build_prompts():
    """Return the fixed benchmark prompts: every digit in every phrasing, bare and with one attribute word."""
    prompts = []
    for digit in range(10):
        for phrasing in range(len(PHRASINGS)):
            prompts.append(make_caption(digit, (), phrasing))
        for low_word, high_word in ATTRIBUTE_WORDS.values():
            prompts.append(make_caption(digit, (low_word,), 0))
            prompts.append(make_caption(digit, (high_word,), 1))
    return tuple(prompts)


_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b")


def digit_of_prompt(prompt):
    """Return the digit (0-9) a prompt names, as a numeral or an English word.

    Raises ValueError when the prompt names no digit or names two different digits.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    found = set()
    for match in _DIGIT_PATTERN.findall(prompt.lower()):
        found.add(int(match) if match.isdigit() else DIGIT_WORDS.index(match))
    if not found:
        raise ValueError(f"prompt names no digit: {prompt!r}; name one as a numeral ('7') or a word ('seven')")
    if len(found) > 1:
        raise ValueError(f"prompt names several digits {sorted(found)}: {prompt!r}; name exactly one")
    return found.pop()
