"""Test configuration: every test runs offline, so no code path can reach a model hub."""

import os

# Set before any test module imports huggingface_hub, transformers or diffusers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """Run a module on one thread: tiny models gain nothing from more, and a shared CPU makes torch threads spin-wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
