"""Power-sampling decoding for transformers causal language models."""
