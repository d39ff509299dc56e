"""Test configuration: every test runs offline, so no code path can reach a model hub."""

import os

# Set before any test module imports huggingface_hub, transformers or diffusers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
