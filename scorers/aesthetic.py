"""LAION improved aesthetic predictor: an MLP head on L2-normalised CLIP ViT-L/14 image embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .base import Scorer
from .clip import HF_HUB_PREFIX, CLIPScorer, OpenCLIPBackbone, _offline_hint

# Layer widths of the improved predictor (sac+logos+ava1-l14-linearMSE.pth and
# its siblings). The original model has no activations between its Linear
# layers, and Dropout at indices 1, 3 and 5, so the checkpoint keys are
# layers.{0,2,4,6,7}.{weight,bias}.
AESTHETIC_WIDTHS = (768, 1024, 128, 64, 16, 1)
AESTHETIC_LINEAR_INDICES = (0, 2, 4, 6, 7)
DEFAULT_AESTHETIC_CLIP = ("ViT-L-14", "openai")


def expected_head_shapes(in_features: int = AESTHETIC_WIDTHS[0]) -> dict[str, tuple[int, ...]]:
    """Return the state-dict key -> shape map of the improved aesthetic head."""
    widths = (in_features,) + AESTHETIC_WIDTHS[1:]
    shapes = {}
    for index, fan_in, fan_out in zip(AESTHETIC_LINEAR_INDICES, widths[:-1], widths[1:]):
        shapes[f"layers.{index}.weight"] = (fan_out, fan_in)
        shapes[f"layers.{index}.bias"] = (fan_out,)
    return shapes


class AestheticHead(nn.Module):
    """Linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with no activations, as LAION trained it.

    Identity modules stand where the original has Dropout, so the checkpoint
    keys match and no call is random.
    """

    def __init__(self, in_features: int = AESTHETIC_WIDTHS[0]):
        super().__init__()
        widths = (in_features,) + AESTHETIC_WIDTHS[1:]
        modules: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            while len(modules) not in AESTHETIC_LINEAR_INDICES:
                modules.append(nn.Identity())
            modules.append(nn.Linear(fan_in, fan_out))
        self.layers = nn.Sequential(*modules)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)[:, 0]  # (B, 1) -> (B,)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        checkpoint = load_file(str(path))
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # PyTorch Lightning checkpoints
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} must contain a state dict, got {type(checkpoint).__name__}")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def resolve_head_path(head: Union[str, Path]) -> Path:
    """Return a local file for `head`: a path, or `hf-hub:org/repo/filename` looked up in the hub cache or downloaded."""
    head = str(head)
    if not head.startswith(HF_HUB_PREFIX):
        path = Path(head).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"aesthetic head {path} not found; pass the path of a .pth or .safetensors file "
                f"(for example sac+logos+ava1-l14-linearMSE.pth) or 'hf-hub:org/repo/filename'"
            )
        return path

    repo_and_file = head[len(HF_HUB_PREFIX):]
    repo_id, _, filename = repo_and_file.rpartition("/")
    if repo_id.count("/") != 1 or not filename:
        raise ValueError(f"hub aesthetic head must be 'hf-hub:org/repo/filename', got {head!r}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as error:  # huggingface_hub raises several types for a missing file
        raise FileNotFoundError(
            f"cannot load aesthetic head {head}: {_offline_hint()} ({error}); "
            f"download it once and pass the local file path instead"
        ) from error


def check_head_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError, naming missing, unexpected and misshaped keys, unless this is the improved aesthetic head."""
    expected = expected_head_shapes()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{key}: expected {expected[key]}, got {tuple(state_dict[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[key].shape) != expected[key]
    ]
    if not (missing or unexpected or misshaped):
        return

    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshaped:
        problems.append(f"wrong shapes {misshaped}")
    hint = ""
    weight = state_dict.get("weight")
    if weight is not None and weight.ndim == 2 and weight.shape[0] == 1:
        hint = f" It looks like a single linear layer {weight.shape[1]} -> 1 (the first LAION aesthetic predictor)."
    elif "layers.0.weight" in state_dict and state_dict["layers.0.weight"].ndim == 2:
        width = state_dict["layers.0.weight"].shape[1]
        if width != AESTHETIC_WIDTHS[0]:
            hint = f" It was trained on {width}-wide CLIP embeddings, not ViT-L/14's 768."
    raise ValueError(
        f"{source} is not the LAION improved aesthetic head (linear layers "
        f"{' -> '.join(map(str, AESTHETIC_WIDTHS))}): {'; '.join(problems)}.{hint}"
    )


def load_aesthetic_head(head: Union[str, Path]) -> AestheticHead:
    """Load and check the improved aesthetic head from a local file or `hf-hub:org/repo/filename`."""
    path = resolve_head_path(head)
    state_dict = _read_state_dict(path)
    check_head_state_dict(state_dict, str(path))
    module = AestheticHead()
    module.load_state_dict({key: value.float() for key, value in state_dict.items()})
    return module.eval()


class AestheticScorer(Scorer):
    """LAION improved aesthetic score (about 1 to 10) of each image; prompts are ignored and may be None.

    The head maps the L2-normalised image embedding of OpenAI CLIP ViT-L/14
    (width 768) to a score. The head's input width is checked against the
    CLIP model's embedding width, but another 768-wide model passes the check
    and gives meaningless scores, so load ViT-L-14 with the openai weights.

    Args:
        head: a `.pth`/`.safetensors` file or `hf-hub:org/repo/filename`, or an
            AestheticHead already loaded.
        clip_model, clip_pretrained: the CLIP model to load, ViT-L-14/openai when
            neither these nor `backbone` are given. `clip_pretrained` may be a
            local checkpoint path, and then `clip_model` must be
            "ViT-L-14-quickgelu" because the OpenAI weights use QuickGELU.
        backbone: an OpenCLIPBackbone or a CLIPScorer whose model to share,
            so CLIP and aesthetic scoring load one model.
        device, precision: passed to OpenCLIPBackbone.
        max_batch_size: see Scorer.
    """

    uses_prompts = False

    def __init__(
        self,
        head: Union[str, Path, AestheticHead],
        clip_model: Optional[str] = None,
        clip_pretrained: Optional[str] = None,
        *,
        backbone: Optional[Union[OpenCLIPBackbone, CLIPScorer]] = None,
        device: Union[str, torch.device] = "cpu",
        precision: str = "fp32",
        max_batch_size: Optional[int] = None,
    ):
        super().__init__(max_batch_size=max_batch_size)
        if backbone is not None and (clip_model is not None or clip_pretrained is not None):
            raise ValueError("pass either clip_model/clip_pretrained or backbone, not both")
        if isinstance(backbone, CLIPScorer):
            backbone = backbone.backbone
        if backbone is None:
            if clip_model is None:
                clip_model, default_pretrained = DEFAULT_AESTHETIC_CLIP
                clip_pretrained = default_pretrained if clip_pretrained is None else clip_pretrained
            backbone = OpenCLIPBackbone(clip_model, clip_pretrained, device, precision)

        head_module = head if isinstance(head, AestheticHead) else load_aesthetic_head(head)
        in_features = head_module.layers[0].in_features
        if backbone.embed_dim != in_features:
            raise ValueError(
                f"the aesthetic head takes {in_features}-wide CLIP embeddings, but {backbone.model_name} "
                f"gives {backbone.embed_dim}-wide ones; use CLIP ViT-L-14 with pretrained='openai' "
                f"(or its local checkpoint)"
            )
        self.backbone = backbone
        self.head = head_module.to(device=backbone.device)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_embeds = self.backbone.encode_images(images)  # (b, D), L2-normalised float32
        head_parameter = next(self.head.parameters())
        return self.head(image_embeds.to(device=head_parameter.device, dtype=head_parameter.dtype))  # (b,)
