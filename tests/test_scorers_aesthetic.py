"""AestheticScorer on a tiny 768-wide CLIP and seeded heads saved in the LAION checkpoint layout."""

import pytest
import torch
from safetensors.torch import save_file

from psdiffusion.scorers import AestheticHead, AestheticScorer, CLIPScorer, OpenCLIPBackbone, load_aesthetic_head
from psdiffusion.scorers.testing import save_tiny_clip_dir


@pytest.fixture(scope="module")
def wide_clip_dir(tmp_path_factory):
    """Tiny CLIP whose embeddings are 768 wide, like ViT-L/14."""
    return save_tiny_clip_dir(tmp_path_factory.mktemp("wide_clip"), seed=1, embed_dim=768)


@pytest.fixture(scope="module")
def narrow_clip_dir(tmp_path_factory):
    return save_tiny_clip_dir(tmp_path_factory.mktemp("narrow_clip"), seed=2, embed_dim=32)


def laion_layout_head(seed=0):
    """The original training module: Linear layers with Dropout between, and no activations."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Sequential(
        torch.nn.Linear(768, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return head.eval()


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "sac+logos+ava1-tiny-linearMSE.pth"
    state_dict = {f"layers.{key}": value for key, value in laion_layout_head().state_dict().items()}
    torch.save(state_dict, path)
    return path


def random_images(batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, 36, 44, generator=generator)


def test_aesthetic_head_keys_match_laion_checkpoint_layout():
    keys = set(AestheticHead().state_dict())
    expected = {f"layers.{i}.{kind}" for i in (0, 2, 4, 6, 7) for kind in ("weight", "bias")}
    assert keys == expected


def test_aesthetic_scorer_equals_head_on_normalised_embeddings(wide_clip_dir, head_file):
    scorer = AestheticScorer(head_file, backbone=OpenCLIPBackbone(f"local-dir:{wide_clip_dir}"))
    images = random_images(4)

    rewards = scorer(images, "ignored prompt")

    with torch.no_grad():
        features = scorer.backbone.model.encode_image(scorer.backbone.preprocess(images))
        expected = laion_layout_head()(torch.nn.functional.normalize(features, dim=-1))[:, 0]
    assert rewards.shape == (4,)
    assert rewards.dtype == torch.float32
    assert rewards.unique().numel() == 4
    torch.testing.assert_close(rewards, expected, rtol=1e-5, atol=1e-5)


def test_aesthetic_scorer_accepts_none_prompts(wide_clip_dir, head_file):
    scorer = AestheticScorer(head_file, backbone=OpenCLIPBackbone(f"local-dir:{wide_clip_dir}"))
    images = random_images(3)

    torch.testing.assert_close(scorer(images, None), scorer(images, "ignored prompt"), rtol=0, atol=0)


def test_aesthetic_scorer_scores_follow_images_under_microbatching(wide_clip_dir, head_file):
    scorer = AestheticScorer(head_file, backbone=OpenCLIPBackbone(f"local-dir:{wide_clip_dir}"))
    images = random_images(7, seed=1)
    permutation = torch.randperm(7, generator=torch.Generator().manual_seed(3))

    whole = scorer(images, "p")
    scorer.max_batch_size = 3
    shuffled = scorer(images[permutation], "p")

    assert whole.unique().numel() == 7
    torch.testing.assert_close(shuffled, whole[permutation], rtol=0, atol=1e-5)


def test_aesthetic_head_loads_safetensors(tmp_path, head_file):
    path = tmp_path / "head.safetensors"
    save_file(torch.load(head_file, weights_only=True), str(path))

    from_pth = load_aesthetic_head(head_file)
    from_safetensors = load_aesthetic_head(path)

    for key, value in from_pth.state_dict().items():
        assert torch.equal(value, from_safetensors.state_dict()[key]), key


def test_aesthetic_and_clip_share_one_model(wide_clip_dir, head_file):
    clip = CLIPScorer(f"local-dir:{wide_clip_dir}")
    aesthetic = AestheticScorer(head_file, backbone=clip)

    assert aesthetic.backbone is clip.backbone
    assert aesthetic.backbone.model is clip.backbone.model


def test_aesthetic_rejects_linear_head_variant(tmp_path, wide_clip_dir):
    path = tmp_path / "sa_0_4_vit_l_14_linear.pth"
    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, path)

    with pytest.raises(ValueError) as error:
        AestheticScorer(path, backbone=OpenCLIPBackbone(f"local-dir:{wide_clip_dir}"))

    message = str(error.value)
    assert "not the LAION improved aesthetic head" in message
    assert "missing keys ['layers.0.bias'" in message
    assert "unexpected keys ['bias', 'weight']" in message
    assert "single linear layer 768 -> 1" in message


def test_aesthetic_rejects_head_for_other_clip_width(tmp_path):
    path = tmp_path / "vit_b_32_head.pth"
    state_dict = {key: torch.zeros(shape) for key, shape in {
        "layers.0.weight": (1024, 512), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }.items()}
    torch.save(state_dict, path)

    with pytest.raises(ValueError) as error:
        load_aesthetic_head(path)

    message = str(error.value)
    assert "layers.0.weight: expected (1024, 768), got (1024, 512)" in message
    assert "512-wide CLIP embeddings" in message


def test_aesthetic_rejects_clip_of_other_width(narrow_clip_dir, head_file):
    with pytest.raises(ValueError, match="takes 768-wide CLIP embeddings, but .* gives 32-wide ones"):
        AestheticScorer(head_file, backbone=OpenCLIPBackbone(f"local-dir:{narrow_clip_dir}"))


def test_aesthetic_missing_head_file_names_path(tmp_path, wide_clip_dir):
    with pytest.raises(FileNotFoundError, match="no-such-head.pth not found"):
        AestheticScorer(tmp_path / "no-such-head.pth", backbone=OpenCLIPBackbone(f"local-dir:{wide_clip_dir}"))


def test_aesthetic_rejects_backbone_with_clip_model(wide_clip_dir, head_file):
    with pytest.raises(ValueError, match="not both"):
        AestheticScorer(head_file, "ViT-L-14", backbone=OpenCLIPBackbone(f"local-dir:{wide_clip_dir}"))
