"""Tiny seeded transformers models and a character tokenizer for the language-model tests."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

EOS_ID = 2
VOCAB_SIZE = 32


class TopBLlama(LlamaForCausalLM):
    """A tiny llama whose next-token distribution is restricted to its top-b non-EOS tokens plus EOS.

    The restriction keeps the number of sequences small, so the power target is computable by enumeration.
    """

    top_b = 2

    def forward(self, input_ids=None, cache=None, **kwargs):
        output = super().forward(input_ids=input_ids, cache=cache, **kwargs)
        logits = output.logits  # (B, T, V)
        without_eos = logits.clone()
        without_eos[..., EOS_ID] = -math.inf
        keep = without_eos.topk(self.top_b, dim=-1).indices  # (B, T, b)
        allowed = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, keep, True)
        allowed[..., EOS_ID] = True
        output.logits = logits.masked_fill(~allowed, -math.inf)
        return output


def tiny_llama_config(vocab_size: int = VOCAB_SIZE) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS_ID, bos_token_id=1, pad_token_id=0,
    )


def tiny_llama(seed: int = 0, restricted: bool = False, logit_scale: float = 1.0):
    """A seeded tiny llama; ``logit_scale`` sharpens its output so distributions are far from uniform."""
    torch.manual_seed(seed)
    cls = TopBLlama if restricted else LlamaForCausalLM
    model = cls(tiny_llama_config()).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


class CharTokenizer:
    """Maps characters to ids 3..V-1 (0 pad, 1 BOS, 2 EOS); enough for power_generate on a tiny model."""

    pad_token_id = 0
    eos_token_id = EOS_ID
    chat_template = None

    def __init__(self, vocab_size: int = VOCAB_SIZE):
        self.vocab_size = vocab_size

    def __call__(self, text, return_tensors=None):
        ids = [1] + [3 + ord(c) % (self.vocab_size - 3) for c in text]
        return {"input_ids": torch.tensor([ids], dtype=torch.long)}

    def decode(self, ids, skip_special_tokens=False):
        specials = {0, 1, EOS_ID} if skip_special_tokens else set()
        return "".join(chr(ord("a") + (int(i) - 3) % 26) if int(i) >= 3 else f"<{int(i)}>"
                       for i in ids if int(i) not in specials)
