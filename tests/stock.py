"""diffusers' own pipelines, called as the worker's batch-invariant mode calls them: what the
served images are compared with."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imagegen.core.contract import JobSpec


def stock_image(pipe: Any, spec: JobSpec, index: int = 0, **inputs: Any) -> np.ndarray:
    """Image `index` of `spec` from `pipe` as it stands (its own scheduler, adapters and
    components), one call, seeded seed + index; an empty negative prompt is passed as None
    (SDXL then uses zeros), as the worker passes it. `inputs`: the pipeline's other arguments
    (a ControlNet's `image` and conditioning scales, say)."""
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        image = pipe(
            prompt=[spec.prompt],
            negative_prompt=[spec.negative_prompt] if spec.negative_prompt else None,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            height=spec.height,
            width=spec.width,
            generator=[torch.Generator().manual_seed(spec.image_seed(index))],
            **inputs,
        ).images[0]
    return np.asarray(image)
