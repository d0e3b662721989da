"""Images in, on the worker side: the job's stored inputs, the stock pipelines that take them
(sharing the warm weights), and the exact composite of the kept pixels.

The gateway stored each input once, normalized (RGB at the job's size; a mask binarized to
0 = keep, 255 = repaint; outpainting as the grown canvas and its mask), so nothing here decodes
untrusted files: a PNG that is not what the gateway wrote fails its job, never the worker.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from imagegen.core.blobs import BlobStore, input_blob
from imagegen.core.contract import JobSpec


class InputMissing(Exception):
    """A job's stored input is gone (it expired with a record that was taken back too late)."""


def load_inputs(blobs: BlobStore, job_id: str, spec: JobSpec) -> dict[str, Image.Image]:
    """The job's stored inputs by name, as the gateway stored them: "image" (RGB), "mask" (L),
    "control" (RGB), those its spec names."""
    images: dict[str, Image.Image] = {}
    for name in spec.input_names:
        data = blobs.get(input_blob(job_id, name))
        if data is None:
            raise InputMissing(f"input {name!r} of job {job_id} is no longer stored")
        with Image.open(io.BytesIO(data), formats=["PNG"]) as opened:
            opened.load()
            images[name] = opened.convert("L" if name == "mask" else "RGB")
        if images[name].size != (spec.width, spec.height):
            raise InputMissing(f"input {name!r} of job {job_id} is not {spec.width}x{spec.height}")
    return images


def composite(
    generated: list[Image.Image],
    image: Image.Image | None,
    mask: Image.Image | None,
    blur: int = 0,
) -> list[Image.Image]:
    """Put the kept pixels back, byte for byte: where the mask is 0 (black), the input's. With
    `blur` (A1111's `mask_blur`) the blend follows the mask blurred by that Gaussian radius
    (diffusers' `VaeImageProcessor.blur`), so the seam fades over about that many pixels."""
    if image is None or mask is None:
        return generated
    alpha = mask.point(lambda v: 255 if v >= 128 else 0)
    if blur:
        from diffusers.image_processor import VaeImageProcessor

        alpha = VaeImageProcessor.blur(alpha, blur)
    return [_marked_as(out, Image.composite(out.convert("RGB"), image, alpha)) for out in generated]


def _marked_as(generated: Image.Image, made: Image.Image) -> Image.Image:
    # The safety checker's mark travels in `info` (worker.decoding.mark_filtered); an image
    # made from a flagged one is flagged too, so it is never stored.
    made.info.update(generated.info)
    return made


class MaskCrop:
    """Inpainting of the masked area only (`padding_mask_crop`), as diffusers' inpainting
    pipelines do it: the box around the mask (grown by the padding, then to the output's
    aspect) is cut from the image and the mask and resized to the output size ("fill"); the
    result is resized back and pasted over the input, the mask deciding (`apply_overlay`).
    The same diffusers functions, so the loop's result equals the stock pipeline's."""

    def __init__(self, image: Image.Image, mask: Image.Image, padding: int) -> None:
        from diffusers.image_processor import VaeImageProcessor

        # Resizing uses only the processor's resample filter (Lanczos for the image and the
        # mask alike in the stock inpainting pipelines), never its scale factor.
        self.processor = VaeImageProcessor()
        self.image, self.mask = image, mask
        self.coords = self.processor.get_crop_region(mask, image.width, image.height, pad=padding)

    def cut(self, picture: Image.Image) -> Image.Image:
        width, height = self.image.size
        return self.processor.resize(picture.crop(self.coords), height, width, resize_mode="fill")  # type: ignore[no-any-return]

    def paste(self, generated: list[Image.Image]) -> list[Image.Image]:
        return [
            _marked_as(out, self.processor.apply_overlay(self.mask, self.image, out, self.coords))
            for out in generated
        ]


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
