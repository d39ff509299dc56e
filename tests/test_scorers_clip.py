"""CLIPScorer on tiny seeded open_clip models saved to tmp folders; no download happens."""

import numpy as np
import open_clip
import pytest
import torch
from huggingface_hub.constants import is_offline_mode
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from psdiffusion.scorers import (
    CLIPScorer,
    ImagePreprocessConfig,
    OpenCLIPBackbone,
    build_scorer,
    preprocess_images,
)
from psdiffusion.scorers.testing import register_tiny_clip_config, reinitialize_, save_tiny_clip_dir


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture()
def scorer(tiny_clip_dir):
    return CLIPScorer(f"local-dir:{tiny_clip_dir}")


def random_images(batch_size, seed=0, height=40, width=56):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, height, width, generator=generator)


def test_clip_scorer_local_dir_returns_float32(scorer):
    rewards = scorer(random_images(4), ["a red cube", "a dog", "a red cube", "snow"])

    assert rewards.shape == (4,)
    assert rewards.dtype == torch.float32
    assert rewards.device == torch.device("cpu")
    assert torch.isfinite(rewards).all()
    assert rewards.abs().max() <= 100.0


def test_clip_scorer_equals_hundred_times_cosine(scorer):
    images = random_images(3)
    prompts = ["a", "b", "c"]

    with torch.no_grad():
        model = scorer.backbone.model
        image_features = model.encode_image(scorer.backbone.preprocess(images))
        text_features = model.encode_text(scorer.backbone.tokenizer(prompts))
        expected = 100 * torch.nn.functional.cosine_similarity(image_features, text_features)

    torch.testing.assert_close(scorer(images, prompts), expected, rtol=1e-5, atol=1e-4)


def test_clip_scorer_is_deterministic_across_calls_and_loads(tiny_clip_dir, scorer):
    images = random_images(5, seed=3)

    first = scorer(images, "a house")
    second = scorer(images, "a house")
    reloaded = CLIPScorer(f"local-dir:{tiny_clip_dir}")(images, "a house")

    assert torch.equal(first, second)
    assert torch.equal(first, reloaded)


def test_clip_scorer_scores_follow_images_under_microbatching(scorer):
    images = random_images(9, seed=4)
    prompts = [f"prompt {i % 3}" for i in range(9)]
    permutation = torch.randperm(9, generator=torch.Generator().manual_seed(5))

    whole = scorer(images, prompts)
    scorer.max_batch_size = 2
    shuffled = scorer(images[permutation], [prompts[i] for i in permutation])

    # Distinct rewards, and a spread much larger than the tolerance, so a swap shows.
    assert whole.unique().numel() == 9
    assert (whole.max() - whole.min()) > 1.0
    torch.testing.assert_close(shuffled, whole[permutation], rtol=0, atol=1e-4)


def test_clip_scorer_prompt_order_invariant(tiny_clip_dir):
    images = random_images(2, seed=6)
    forward = CLIPScorer(f"local-dir:{tiny_clip_dir}")
    backward = CLIPScorer(f"local-dir:{tiny_clip_dir}")
    backward(images, ["second", "first"])  # fills the cache in the other order

    assert torch.equal(forward(images, ["first", "second"]), backward(images, ["first", "second"]))


def test_clip_scorer_caches_text_embeddings_per_prompt(scorer):
    backbone = scorer.backbone
    images = random_images(6)

    scorer(images, ["a", "b", "a", "a", "b", "c"])
    assert backbone.text_cache.misses == 3
    assert backbone.text_cache.hits == 3

    scorer(images, "a")
    assert backbone.text_cache.misses == 3
    assert backbone.text_cache.hits == 9


def test_clip_scorer_text_cache_evicts_least_recent_prompt(tiny_clip_dir):
    scorer = CLIPScorer(f"local-dir:{tiny_clip_dir}", text_cache_size=2)
    images = random_images(1)

    for prompt in ["a", "b", "a", "c", "a", "b"]:
        scorer(images, prompt)

    # "b" was evicted when "c" arrived ("a" had been used more recently).
    assert list(scorer.backbone.text_cache.entries) == ["a", "b"]
    assert scorer.backbone.text_cache.misses == 4


def test_clip_scorer_moves_to_dtype_and_clears_cache(scorer):
    images = random_images(3)
    reference = scorer(images, "a tree")

    scorer.to(torch.float64)
    rewards = scorer(images, "a tree")

    assert scorer.backbone.dtype == torch.float64
    assert rewards.dtype == torch.float32
    assert scorer.backbone.text_cache.misses == 2  # the cache was cleared by .to()
    torch.testing.assert_close(rewards, reference, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "pure_fp16", "pure_bf16"])
def test_clip_scorer_runs_in_reduced_precision(tiny_clip_dir, scorer, precision):
    # Mixed fp16 / bf16 keep the first parameter in float32 while the patch
    # convolution is half, so the input must follow the convolution. CPU torch
    # runs both half types for these layers.
    images = random_images(3)
    reference = scorer(images, ["a tree", "a dog", "snow"])

    reduced = CLIPScorer(f"local-dir:{tiny_clip_dir}", precision=precision)
    rewards = reduced(images, ["a tree", "a dog", "snow"])

    assert reduced.backbone.image_dtype in (torch.float16, torch.bfloat16)
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, reference, rtol=0, atol=1.0)


def test_build_scorer_loads_clip_in_fp16(tiny_clip_dir, scorer):
    images = random_images(2)

    rewards = build_scorer(f"clip:local-dir:{tiny_clip_dir}", precision="fp16")(images, "a tree")

    torch.testing.assert_close(rewards, scorer(images, "a tree"), rtol=0, atol=1.0)


def test_clip_scorer_rejects_unknown_precision(tiny_clip_dir):
    with pytest.raises(ValueError, match="precision must be one of .*'bf16'.*got 'fp8'"):
        CLIPScorer(f"local-dir:{tiny_clip_dir}", precision="fp8")


def test_clip_scorer_without_model_name_says_it_is_missing():
    with pytest.raises(ValueError, match="model_name is missing: pass an open_clip model name"):
        CLIPScorer()


def test_clip_scorer_clip_negative_clamps_at_zero(tiny_clip_dir):
    images = random_images(8, seed=7)
    raw = CLIPScorer(f"local-dir:{tiny_clip_dir}")(images, "x")
    clipped = CLIPScorer(f"local-dir:{tiny_clip_dir}", clip_negative=True)(images, "x")

    assert (raw < 0).any()  # the random tiny model gives negative cosines
    torch.testing.assert_close(clipped, raw.clamp_min(0.0))


def test_clip_scorer_loads_checkpoint_path_as_pretrained(tmp_path, tiny_clip_dir):
    name = register_tiny_clip_config(tmp_path, name="psd-tiny-clip-checkpoint-test")
    checkpoint = tiny_clip_dir / "open_clip_model.safetensors"
    images = random_images(3)

    from_path = CLIPScorer(name, pretrained=str(checkpoint))(images, "a boat")
    from_dir = CLIPScorer(f"local-dir:{tiny_clip_dir}")(images, "a boat")

    torch.testing.assert_close(from_path, from_dir, rtol=0, atol=0)


def test_backbone_reinitialize_gives_seeded_weights(tmp_path):
    name = register_tiny_clip_config(tmp_path, name="psd-tiny-clip-seed-test")
    first = reinitialize_(OpenCLIPBackbone(name).model, seed=11)
    second = reinitialize_(OpenCLIPBackbone(name).model, seed=11)

    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), key


def test_tensor_preprocessing_matches_open_clip_pil_transform(scorer):
    # Smooth images on the uint8 grid: the PIL path loses nothing in conversion,
    # and bicubic overshoot (which PIL clips between its two passes) stays small.
    generator = torch.Generator().manual_seed(8)
    coarse = torch.rand(2, 3, 6, 10, generator=generator)
    pixels = (torch.nn.functional.interpolate(coarse, size=(48, 80), mode="bilinear") * 255).round().to(torch.uint8)
    images = pixels.float() / 255
    transform = image_transform_v2(
        PreprocessCfg(**open_clip.get_model_preprocess_cfg(scorer.backbone.model)), is_train=False
    )

    expected = torch.stack([transform(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels])
    actual = scorer.backbone.preprocess(images)

    assert actual.shape == expected.shape == (2, 3, 32, 32)
    # Compare in uint8 levels: PIL rounds to uint8 after each of its two passes.
    std = torch.tensor(scorer.backbone.preprocess_config.std).view(1, 3, 1, 1)
    level_error = (actual - expected).abs() * std * 255
    assert level_error.max() <= 1.5
    assert level_error.mean() <= 0.5


@pytest.mark.parametrize("resize_mode, expected_shape", [("longest", (1, 3, 24, 24)), ("squash", (1, 3, 24, 24))])
def test_tensor_preprocessing_other_resize_modes(resize_mode, expected_shape):
    config = ImagePreprocessConfig(size=(24, 24), mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode=resize_mode)
    images = torch.ones(1, 3, 12, 48)

    pixels = preprocess_images(images, config)

    assert pixels.shape == expected_shape
    if resize_mode == "longest":
        # 12x48 -> 6x24, padded with 0 (normalised to -1) above and below
        assert torch.all(pixels[:, :, :9] == -1.0)
        assert torch.allclose(pixels[:, :, 9:15], torch.ones(1, 3, 6, 24))
    else:
        assert torch.allclose(pixels, torch.ones(expected_shape))


def test_tensor_preprocessing_leaves_input_unchanged(scorer):
    images = random_images(2, height=32, width=32)
    original = images.clone()

    scorer.backbone.preprocess(images)
    scorer(images, "a")

    assert torch.equal(images, original)


def test_clip_scorer_offline_tag_error():
    if not is_offline_mode():
        pytest.skip("run with HF_HUB_OFFLINE=1: without it this would try to download")
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"), str):
            pytest.skip("ViT-B-32/openai is in the local hub cache, so loading would succeed")
    except ImportError:
        pass

    with pytest.raises(FileNotFoundError) as error:
        CLIPScorer("ViT-B-32", pretrained="openai")

    message = str(error.value)
    assert "HF_HUB_OFFLINE=1" in message
    assert "pretrained='/path/to/" in message
    assert "local-dir:" in message


def test_clip_scorer_offline_hub_model_error():
    if not is_offline_mode():
        pytest.skip("run with HF_HUB_OFFLINE=1: without it this would try to download")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_config.json"), str):
        pytest.skip("the model is in the local hub cache, so loading would succeed")

    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1.*local-dir:"):
        CLIPScorer("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")


def test_clip_scorer_rejects_unknown_tag_and_name(tiny_clip_dir):
    with pytest.raises(ValueError, match="known tags: .*openai"):
        CLIPScorer("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="unknown open_clip model name 'ViT-Q-99'"):
        CLIPScorer("ViT-Q-99", pretrained="openai")
    with pytest.raises(ValueError, match="pretrained must be None for 'local-dir:"):
        CLIPScorer(f"local-dir:{tiny_clip_dir}", pretrained="openai")
    with pytest.raises(ValueError, match="either model_name .* not both"):
        CLIPScorer(f"local-dir:{tiny_clip_dir}", backbone=OpenCLIPBackbone(f"local-dir:{tiny_clip_dir}"))


def test_clip_scorer_local_dir_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        CLIPScorer(f"local-dir:{tmp_path}")


def test_clip_scorers_share_one_backbone(tiny_clip_dir):
    backbone = OpenCLIPBackbone(f"local-dir:{tiny_clip_dir}")
    first = CLIPScorer(backbone=backbone)
    second = CLIPScorer(backbone=backbone, clip_negative=True)
    images = random_images(2)

    first(images, "shared")
    second(images, "shared")

    assert first.backbone is second.backbone
    assert backbone.text_cache.misses == 1
