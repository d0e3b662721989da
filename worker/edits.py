"""Images in, on the worker side: the job's stored inputs, the stock pipelines that take them
(sharing the warm weights), and the exact composite of the kept pixels.

The gateway stored each input once, normalized (RGB at the job's size; a mask binarized to
0 = keep, 255 = repaint; outpainting as the grown canvas and its mask), so nothing here decodes
untrusted files: a PNG that is not what the gateway wrote fails its job, never the worker.
"""

from __future__ import annotations

import io
from typing import Any

import redis
from PIL import Image

from imagegen.core.contract import JobSpec, Keys


class InputMissing(Exception):
    """A job's stored input is gone (it expired with a record that was taken back too late)."""


def load_inputs(connection: redis.Redis, job_id: str, spec: JobSpec) -> dict[str, Image.Image]:
    """The job's stored inputs by name, as the gateway stored them: "image" (RGB), "mask" (L),
    "control" (RGB), those its spec names."""
    images: dict[str, Image.Image] = {}
    for name in spec.input_names:
        data: bytes | None = connection.get(Keys.input(job_id, name))  # type: ignore[assignment]
        if data is None:
            raise InputMissing(f"input {name!r} of job {job_id} is no longer stored")
        with Image.open(io.BytesIO(data), formats=["PNG"]) as opened:
            opened.load()
            images[name] = opened.convert("L" if name == "mask" else "RGB")
        if images[name].size != (spec.width, spec.height):
            raise InputMissing(f"input {name!r} of job {job_id} is not {spec.width}x{spec.height}")
    return images


def composite(
    generated: list[Image.Image], image: Image.Image | None, mask: Image.Image | None
) -> list[Image.Image]:
    """Put the kept pixels back, byte for byte: where the mask is 0 (black), the input's."""
    if image is None or mask is None:
        return generated
    binary = mask.point(lambda v: 255 if v >= 128 else 0)
    return [Image.composite(out.convert("RGB"), image, binary) for out in generated]


def stock_pipeline(base: Any, task: str, cache: dict[str, Any]) -> Any:
    """diffusers' own pipeline for `task` over the warm components (no second copy)."""
    if task == "text":
        return base
    kind = "img2img" if task == "img2img" else "inpaint"
    if kind not in cache:
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        auto = AutoPipelineForImage2Image if kind == "img2img" else AutoPipelineForInpainting
        cache[kind] = auto.from_pipe(base)
    return cache[kind]
