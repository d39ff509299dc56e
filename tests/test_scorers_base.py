"""Scorer protocol: input validation, CallableScorer micro-batching and TextScorer."""

import pytest
import torch

from psdiffusion.scorers import CallableScorer, Scorer, TextScorer


def mean_red(images, prompts):
    """Reward that depends only on image content: mean of the red channel."""
    return images[:, 0].mean(dim=(1, 2))


def random_images(batch_size, seed=0, height=16, width=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, height, width, generator=generator)


@pytest.mark.parametrize(
    "images, message",
    [
        ([[0.0]], "must be a torch.Tensor"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "images.float\\(\\) / 255"),
        (torch.zeros(3, 8, 8), "unsqueeze\\(0\\)"),
        (torch.zeros(2, 8, 8, 3), "permute\\(0, 3, 1, 2\\)"),
        (torch.zeros(2, 1, 8, 8), "3 RGB channels"),
        (torch.zeros(2, 3, 8), "3 RGB channels"),
        (torch.full((2, 3, 8, 8), -0.5), "\\(images \\+ 1\\) / 2"),
        (torch.full((2, 3, 8, 8), 128.0), "images / 255"),
        (torch.full((2, 3, 8, 8), 1.0001), "values in \\[1, 1\\]; pass images.clamp\\(0, 1\\)$"),
        (torch.full((2, 3, 8, 8), -300.0), "VaeImageProcessor.postprocess"),
        (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
    ],
)
def test_scorer_rejects_bad_images_with_fix(images, message):
    scorer = CallableScorer(mean_red)
    with pytest.raises(ValueError, match=message):
        scorer(images, "a prompt")


def test_scorer_rejects_prompt_count_mismatch():
    scorer = CallableScorer(mean_red)
    with pytest.raises(ValueError, match="got 2 prompts for 3 images"):
        scorer(random_images(3), ["a", "b"])
    with pytest.raises(ValueError, match="prompts\\[1\\] must be a string"):
        scorer(random_images(2), ["a", 7])


def test_scorer_accepts_boundary_values_and_empty_batch():
    scorer = CallableScorer(mean_red)
    images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])

    rewards = scorer(images, "a prompt")
    assert rewards.tolist() == [0.0, 1.0]

    empty = scorer(torch.zeros(0, 3, 4, 4), [])
    assert empty.shape == (0,)
    assert empty.dtype == torch.float32


def test_callable_scorer_returns_float32_per_image():
    scorer = CallableScorer(lambda images, prompts: [float(len(p)) for p in prompts])
    images = random_images(3).to(torch.float64)

    rewards = scorer(images, ["a", "bb", "ccc"])

    assert isinstance(scorer, Scorer)
    assert isinstance(scorer, torch.nn.Module)
    assert rewards.dtype == torch.float32
    assert rewards.shape == (3,)
    assert rewards.tolist() == [1.0, 2.0, 3.0]


def test_callable_scorer_scores_follow_images_under_microbatching():
    calls = []

    def recording_mean_red(images, prompts):
        calls.append(images.shape[0])
        return mean_red(images, prompts)

    images = random_images(10, seed=1)
    permutation = torch.randperm(10, generator=torch.Generator().manual_seed(2))
    full = CallableScorer(mean_red)(images, "p")
    split = CallableScorer(recording_mean_red, max_batch_size=3)(images[permutation], "p")

    assert calls == [3, 3, 3, 1]
    assert full.unique().numel() == 10  # distinct rewards, so a swapped image would show
    torch.testing.assert_close(split, full[permutation], rtol=0, atol=0)


def test_callable_scorer_passes_matching_prompts_to_each_microbatch():
    scorer = CallableScorer(lambda images, prompts: [float(p) for p in prompts], max_batch_size=2)
    prompts = [str(i) for i in range(5)]

    rewards = scorer(random_images(5), prompts)

    assert rewards.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    "output, message",
    [
        (lambda images, prompts: torch.zeros(images.shape[0] + 1), "shape \\(4,\\)"),
        (lambda images, prompts: torch.zeros(images.shape[0], 2), "shape \\(4,\\)"),
        (lambda images, prompts: torch.full((images.shape[0],), float("nan")), "NaN rewards at rows"),
    ],
)
def test_callable_scorer_rejects_bad_outputs(output, message):
    scorer = CallableScorer(output)
    with pytest.raises(ValueError, match=message):
        scorer(random_images(4), "p")


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_scorer_rejects_invalid_max_batch_size(value):
    with pytest.raises(ValueError, match="max_batch_size must be None or an int >= 1"):
        CallableScorer(mean_red, max_batch_size=value)


def test_scorer_stays_in_eval_mode():
    scorer = CallableScorer(mean_red)
    scorer.dropout = torch.nn.Dropout(0.5)

    scorer.train()

    assert not scorer.training
    assert not scorer.dropout.training


def test_text_scorer_reads_arity_from_signature():
    by_length = TextScorer(lambda texts: [float(len(t)) for t in texts])
    by_match = TextScorer(lambda texts, prompts: torch.tensor([float(t == p) for t, p in zip(texts, prompts)]))

    lengths = by_length(["a", "abc"])
    matches = by_match(["x", "y"], ["x", "z"])

    assert not by_length.takes_prompts
    assert by_match.takes_prompts
    assert lengths.dtype == torch.float32
    assert lengths.tolist() == [1.0, 3.0]
    assert matches.tolist() == [1.0, 0.0]


def test_text_scorer_repeats_single_prompt():
    scorer = TextScorer(lambda texts, prompts: [float(p == "q") for p in prompts])
    assert scorer(["a", "b", "c"], "q").tolist() == [1.0, 1.0, 1.0]


def test_text_scorer_rejects_bad_inputs_and_outputs():
    with pytest.raises(ValueError, match="pass \\[text\\]"):
        TextScorer(lambda texts: [0.0])("one string")
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        TextScorer(lambda texts: [0.0])(["a", "b"])
    with pytest.raises(ValueError, match="prompts is None"):
        TextScorer(lambda texts, prompts: [0.0], takes_prompts=True)(["a"])
    with pytest.raises(ValueError, match="must be callable"):
        TextScorer("not a function")


def test_scorer_accepts_vae_image_processor_output():
    from diffusers.image_processor import VaeImageProcessor

    generator = torch.Generator().manual_seed(3)
    decoded = 1.5 * torch.randn(2, 3, 16, 16, generator=generator)  # VAE output, partly outside [-1, 1]
    images = VaeImageProcessor().postprocess(decoded, output_type="pt")

    rewards = CallableScorer(mean_red)(images, "a prompt")

    assert rewards.shape == (2,)
    assert rewards.min() >= 0.0
    assert rewards.max() <= 1.0
