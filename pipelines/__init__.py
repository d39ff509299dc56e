"""Diffusers pipelines with power sampling, loadable with ``custom_pipeline=``."""
