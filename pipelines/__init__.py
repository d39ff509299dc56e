"""Diffusers pipelines with power sampling, loadable with ``custom_pipeline=``."""

from .pipeline_power_sampling_sd import PowerSamplingStableDiffusionPipeline
from .pipeline_power_sampling_sdxl import PowerSamplingStableDiffusionXLPipeline
from .power_sampling_utils import PipelineBudget, PowerSamplingPipelineOutput

__all__ = [
    "PipelineBudget",
    "PowerSamplingPipelineOutput",
    "PowerSamplingStableDiffusionPipeline",
    "PowerSamplingStableDiffusionXLPipeline",
]
