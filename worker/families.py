"""Which pipelines the batch loop runs: exactly the stock SD 1.x/2.x and SDXL pipelines (the
loop reproduces their `__call__`); every other pipeline runs job by job through its own."""

from __future__ import annotations

from typing import Any

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline


def supports_batching(pipe: Any) -> bool:
    """Whether `run_batch` can run this pipeline; other pipelines run job by job."""
    # Exactly the SD 1.x/2.x or SDXL pipeline: a subclass may change __call__, and a
    # guidance-distilled UNet (time_cond_proj_dim) takes guidance as an embedding instead of
    # a second half.
    if pipe.unet.config.time_cond_proj_dim is not None:
        return False
    if type(pipe) is StableDiffusionXLPipeline:
        return bool(pipe.unet.config.addition_embed_type == "text_time")
    return type(pipe) is StableDiffusionPipeline
