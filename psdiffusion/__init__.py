"""psdiffusion: power sampling, an inference-time lookahead sampler for diffusion and language models."""

from .core import Budget, DecisionTrace, PowerSamplingConfig, PRESETS, resolve_config

__version__ = "0.1.0"

__all__ = ["Budget", "DecisionTrace", "PowerSamplingConfig", "PRESETS", "resolve_config", "__version__"]
