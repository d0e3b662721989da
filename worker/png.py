"""PNG encoding with the `parameters` text chunk of the API."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from imagegen import __version__
from imagegen.core.contract import JobSpec


def encode_png(image: Image.Image, parameters: dict[str, Any]) -> bytes:
    """Encode `image` as PNG carrying `parameters` as JSON in a `parameters` tEXt/iTXt chunk.

    The chunk holds nothing time-dependent, so one seed gives byte-identical files.
    """
    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_parameters(spec: JobSpec, index: int) -> dict[str, Any]:
    """The `parameters` chunk of image `index`: enough to reproduce it with n=1 (with the
    same input images, named by sha256 and size)."""
    parameters: dict[str, Any] = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "seed": spec.image_seed(index),
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "width": spec.width,
        "height": spec.height,
        "scheduler": spec.scheduler,
        "model": spec.model,
        "version": __version__,
    }
    if spec.task != "text":
        parameters.update(
            task=spec.task,
            image=spec.image.model_dump() if spec.image else None,
            mask=spec.mask.model_dump() if spec.mask else None,
            strength=spec.strength,
            outpaint=spec.outpaint.model_dump() if spec.outpaint else None,
        )
    if spec.loras:
        parameters["loras"] = [{"id": lora.id, "scale": lora.scale} for lora in spec.loras]
    if spec.control is not None:
        parameters["control"] = spec.control.model_dump()
    return parameters
