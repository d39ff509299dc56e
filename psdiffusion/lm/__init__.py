"""Power-sampling decoding for transformers causal language models.

``power_generate(model, tokenizer, prompt, config, max_new_tokens, seed=...)``
decodes with one power-sampling decision per token (or per block), and
``power_sampling_generate`` is the same thing as a callable for
``model.generate(custom_generate=...)``. ``load_model()`` loads the embedded
default model, SmolLM2-135M-Instruct.
"""

from .adapter import CausalLMAdapter, LMState
from .generate import PowerGenerateOutput, build_adapter, power_generate, power_sampling_generate
from .rewards import SelfConsistencyReward, VerifierReward
from .smollm2 import load_model, smollm2_gguf_path

__all__ = [
    "CausalLMAdapter",
    "LMState",
    "PowerGenerateOutput",
    "SelfConsistencyReward",
    "VerifierReward",
    "build_adapter",
    "load_model",
    "power_generate",
    "power_sampling_generate",
    "smollm2_gguf_path",
]
