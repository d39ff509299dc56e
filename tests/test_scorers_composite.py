"""CompositeScorer weighting and per-set standardisation, and build_scorer specs."""

import pytest
import torch

from psdiffusion.scorers import (
    AestheticScorer,
    CallableScorer,
    PickScoreScorer,
    CLIPScorer,
    CompositeScorer,
    build_scorer,
    standardize_sets,
)
from psdiffusion.scorers.testing import register_tiny_clip_config, save_tiny_clip_dir, save_tiny_hf_clip_dir


def mean_red(images, prompts):
    return images[:, 0].mean(dim=(1, 2))


def mean_green(images, prompts):
    return images[:, 1].mean(dim=(1, 2))


def random_images(batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, 8, 8, generator=generator)


def test_composite_is_weighted_sum():
    images = random_images(5)
    composite = CompositeScorer([CallableScorer(mean_red), CallableScorer(mean_green)], weights=[2.0, -0.5])

    expected = 2.0 * mean_red(images, None) - 0.5 * mean_green(images, None)

    torch.testing.assert_close(composite(images, "p"), expected)


def test_composite_standardisation_removes_reward_scale():
    images = random_images(8, seed=1)
    small = CompositeScorer(
        [CallableScorer(mean_red), CallableScorer(mean_green)], weights=[1.0, 0.1], standardize=True
    )
    scaled = CompositeScorer(
        [CallableScorer(lambda x, p: 100 * mean_red(x, p) + 7), CallableScorer(mean_green)],
        weights=[1.0, 0.1],
        standardize=True,
    )

    rewards = small(images, "p")

    torch.testing.assert_close(scaled(images, "p"), rewards, rtol=1e-5, atol=1e-5)
    red = mean_red(images, None)
    green = mean_green(images, None)
    expected = (red - red.mean()) / red.std(correction=0) + 0.1 * (green - green.mean()) / green.std(correction=0)
    torch.testing.assert_close(rewards, expected, rtol=1e-5, atol=1e-5)


def test_standardize_sets_uses_each_set_separately():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0, 300.0, 100.0, 300.0])

    standardized = standardize_sets(rewards, set_size=4)
    sets = standardized.view(2, 4)

    torch.testing.assert_close(sets.mean(dim=1), torch.zeros(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(sets.std(dim=1, correction=0), torch.ones(2), rtol=0, atol=1e-6)
    assert standardized[4:].tolist() == [-1.0, 1.0, -1.0, 1.0]


def test_standardize_sets_constant_or_single_set_gives_zeros():
    assert standardize_sets(torch.full((4,), 3.0)).tolist() == [0.0] * 4
    assert standardize_sets(torch.tensor([5.0, 6.0]), set_size=1).tolist() == [0.0, 0.0]


def test_standardize_sets_rejects_partial_set():
    with pytest.raises(ValueError, match="batch size 6 is not a multiple of set_size 4"):
        standardize_sets(torch.zeros(6), set_size=4)


def test_composite_scores_follow_images_within_set():
    images = random_images(6, seed=2)
    composite = CompositeScorer([CallableScorer(mean_red), CallableScorer(mean_green)], standardize=True)
    permutation = torch.randperm(6, generator=torch.Generator().manual_seed(4))

    whole = composite(images, "p")
    shuffled = composite(images[permutation], "p")

    assert whole.unique().numel() == 6
    torch.testing.assert_close(shuffled, whole[permutation], rtol=1e-6, atol=1e-6)


def test_composite_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one Scorer"):
        CompositeScorer([])
    with pytest.raises(ValueError, match="wrap a function with CallableScorer"):
        CompositeScorer([mean_red])
    with pytest.raises(ValueError, match="got 1 for 2 scorers"):
        CompositeScorer([CallableScorer(mean_red), CallableScorer(mean_green)], weights=[1.0])
    with pytest.raises(ValueError, match="weights\\[1\\] is 0, so CallableScorer would add nothing"):
        CompositeScorer([CallableScorer(mean_red), CallableScorer(mean_green)], weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="set max_batch_size on its component scorers"):
        CompositeScorer([CallableScorer(mean_red)]).max_batch_size = 4
    with pytest.raises(ValueError, match="set_size must be None or an int >= 1"):
        CompositeScorer([CallableScorer(mean_red)], set_size=0)


@pytest.fixture(scope="module")
def wide_clip_dir(tmp_path_factory):
    return save_tiny_clip_dir(tmp_path_factory.mktemp("spec_clip"), seed=3, embed_dim=768)


@pytest.fixture(scope="module")
def plus_named_head(tmp_path_factory):
    """A seeded head whose file name contains '+', like sac+logos+ava1-l14-linearMSE.pth."""
    generator = torch.Generator().manual_seed(5)
    shapes = {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }
    path = tmp_path_factory.mktemp("spec_heads") / "sac+logos+ava1-tiny.pth"
    torch.save({key: torch.randn(shape, generator=generator) * 0.05 for key, shape in shapes.items()}, path)
    return path


def test_build_scorer_local_dir_clip(wide_clip_dir):
    scorer = build_scorer(f"clip:local-dir:{wide_clip_dir}", max_batch_size=2)

    assert isinstance(scorer, CLIPScorer)
    assert scorer.max_batch_size == 2
    assert scorer(random_images(3), "a").shape == (3,)


def test_build_scorer_model_with_checkpoint_path(tmp_path, wide_clip_dir):
    name = register_tiny_clip_config(tmp_path, name="psd-tiny-clip-spec-test", embed_dim=768)
    checkpoint = wide_clip_dir / "open_clip_model.safetensors"
    images = random_images(2)

    from_path = build_scorer(f"clip:{name}/{checkpoint}")
    from_dir = build_scorer(f"clip:local-dir:{wide_clip_dir}")

    assert from_path.backbone.pretrained == str(checkpoint)
    torch.testing.assert_close(from_path(images, "x"), from_dir(images, "x"), rtol=0, atol=0)


def test_build_scorer_composite_shares_backbone(wide_clip_dir, plus_named_head):
    source = f"local-dir:{wide_clip_dir}"
    spec = f"clip:{source}+aesthetic:{plus_named_head}@0.1"

    scorer = build_scorer(spec, aesthetic_clip=source)

    assert isinstance(scorer, CompositeScorer)
    clip, aesthetic = scorer.scorers
    assert isinstance(clip, CLIPScorer)
    assert isinstance(aesthetic, AestheticScorer)
    assert scorer.weights == [1.0, 0.1]
    assert clip.backbone is aesthetic.backbone

    images = random_images(3)
    expected = clip(images, "a") + 0.1 * aesthetic(images, "a")
    torch.testing.assert_close(scorer(images, "a"), expected)


def test_build_scorer_ignores_spaces_around_plus_and_weight(wide_clip_dir, plus_named_head):
    source = f"local-dir:{wide_clip_dir}"

    scorer = build_scorer(f"clip:{source} + aesthetic:{plus_named_head} @ 0.1", aesthetic_clip=source)

    clip, aesthetic = scorer.scorers
    assert isinstance(clip, CLIPScorer)
    assert isinstance(aesthetic, AestheticScorer)
    assert scorer.weights == [1.0, 0.1]


def test_composite_with_only_aesthetic_accepts_none_prompts(wide_clip_dir, plus_named_head):
    source = f"local-dir:{wide_clip_dir}"
    scorer = build_scorer(f"aesthetic:{plus_named_head}", aesthetic_clip=source, standardize=True)
    images = random_images(3)

    torch.testing.assert_close(scorer(images, None), scorer(images, "a"), rtol=0, atol=0)


def test_build_scorer_standardize_wraps_single_component(wide_clip_dir):
    scorer = build_scorer(f"clip:local-dir:{wide_clip_dir}", standardize=True)

    rewards = scorer(random_images(4), "a")

    assert isinstance(scorer, CompositeScorer)
    assert abs(rewards.mean().item()) < 1e-5


def test_build_scorer_pickscore_with_clip(tmp_path, wide_clip_dir):
    pickscore_dir = save_tiny_hf_clip_dir(tmp_path / "pickscore", seed=6)

    scorer = build_scorer(
        f"pickscore:{pickscore_dir}@2+clip:local-dir:{wide_clip_dir}", pickscore_processor=str(pickscore_dir)
    )

    pickscore, clip = scorer.scorers
    assert isinstance(pickscore, PickScoreScorer)
    assert isinstance(clip, CLIPScorer)
    images = random_images(2)
    torch.testing.assert_close(scorer(images, "a"), 2 * pickscore(images, "a") + clip(images, "a"))


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("imagereward:ImageReward-v1.0", "unknown scorer kind"),
        ("ViT-B-32/openai", "unknown scorer kind"),
        ("clip:ViT-B-32", "needs a pretrained tag or checkpoint path"),
        ("clip:", "clip: needs an argument"),
        ("", "the spec is empty"),
        (None, "the scorer spec must be a string, got NoneType"),
        ("clip:local-dir:/tmp/x@0", "weight 0 in 'clip:local-dir:/tmp/x@0' would drop that scorer"),
    ],
)
def test_build_scorer_rejects_bad_spec_listing_forms(spec, reason):
    with pytest.raises(ValueError) as error:
        build_scorer(spec)

    message = str(error.value)
    assert reason in message
    assert "accepted scorer specs" in message
    assert "clip:local-dir:DIR" in message
