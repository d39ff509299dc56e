"""PickScoreScorer and HFCLIPScorer on a tiny seeded transformers CLIPModel saved to a tmp folder."""

import pytest
import torch
from huggingface_hub.constants import is_offline_mode
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor

from psdiffusion.scorers.pickscore import HFCLIPScorer, PickScoreScorer
from psdiffusion.scorers.testing import save_tiny_hf_clip_dir


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    return save_tiny_hf_clip_dir(tmp_path_factory.mktemp("tiny_hf_clip"), seed=4)


def smooth_images(batch_size, seed=0, height=40, width=56):
    """Images on the uint8 grid without sharp edges, so PIL and tensor resizes agree closely."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, 5, 7, generator=generator)
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
    return (fine * 255).round() / 255


def test_pickscore_equals_logit_scale_times_cosine(hf_clip_dir):
    scorer = PickScoreScorer(hf_clip_dir, hf_clip_dir)
    images = smooth_images(3)
    prompts = ["a cat", "a dog", "snow"]

    rewards = scorer(images, prompts)

    tokens = scorer.tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = scorer.model(**tokens, pixel_values=scorer.preprocess(images)).logits_per_image  # (3, 3)
    assert rewards.shape == (3,)
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, logits.diagonal(), rtol=1e-5, atol=1e-4)


def test_pickscore_scores_follow_images_under_microbatching(hf_clip_dir):
    scorer = PickScoreScorer(hf_clip_dir, hf_clip_dir)
    images = torch.rand(7, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    prompts = [f"prompt {'abc'[i % 3]}" for i in range(7)]
    permutation = torch.randperm(7, generator=torch.Generator().manual_seed(2))

    whole = scorer(images, prompts)
    scorer.max_batch_size = 3
    shuffled = scorer(images[permutation], [prompts[i] for i in permutation])

    assert whole.unique().numel() == 7
    assert scorer.text_cache.misses == 3
    torch.testing.assert_close(shuffled, whole[permutation], rtol=0, atol=1e-4)


@pytest.mark.parametrize("shortest_edge", [32, 40])
def test_hf_clip_preprocessing_matches_image_processor(tmp_path, hf_clip_dir, shortest_edge):
    processor = CLIPImageProcessor.from_pretrained(hf_clip_dir)
    processor.size = {"shortest_edge": shortest_edge}
    processor.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(hf_clip_dir).save_pretrained(tmp_path)
    scorer = HFCLIPScorer(hf_clip_dir, tmp_path)
    images = smooth_images(2, seed=3)

    pil_images = [Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()) for image in images]
    expected = processor(images=pil_images, return_tensors="pt")["pixel_values"]
    actual = scorer.preprocess(images)

    assert actual.shape == expected.shape == (2, 3, 32, 32)
    # Compare in uint8 levels: PIL rounds to uint8 after each of its two resize passes.
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    level_error = (actual - expected).abs() * std * 255
    assert level_error.max() <= 1.5
    assert level_error.mean() <= 0.5


def test_hf_clip_scorer_without_logit_scale_uses_hundred(hf_clip_dir):
    images = smooth_images(2)
    scaled = HFCLIPScorer(hf_clip_dir)(images, "a")
    hundred = HFCLIPScorer(hf_clip_dir, use_logit_scale=False)(images, "a")

    logit_scale = 1 / 0.07  # reinitialize_ sets logit_scale to log(1 / 0.07)
    torch.testing.assert_close(hundred, scaled * 100 / logit_scale, rtol=1e-5, atol=1e-5)


def test_pickscore_offline_error_names_setting():
    if not is_offline_mode():
        pytest.skip("run with HF_HUB_OFFLINE=1: without it this would try to download")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("yuvalkirstain/PickScore_v1", "config.json"), str):
        pytest.skip("PickScore_v1 is in the local hub cache, so loading would succeed")

    with pytest.raises(FileNotFoundError) as error:
        PickScoreScorer()

    message = str(error.value)
    assert "HF_HUB_OFFLINE=1" in message
    assert "yuvalkirstain/PickScore_v1" in message
    assert "local save_pretrained folder" in message


def test_hf_clip_scorer_folder_without_tokenizer_names_folder(tmp_path, hf_clip_dir):
    with pytest.raises(FileNotFoundError, match="cannot load the tokenizer from .*save_pretrained"):
        HFCLIPScorer(hf_clip_dir, tmp_path)
