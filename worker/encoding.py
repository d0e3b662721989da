"""A job's image files: PNG with the `parameters` text chunk of the API, or JPEG/WebP with the
same parameters in EXIF UserComment (imagegen.core.image_metadata) and in XMP."""

from __future__ import annotations

import io
import json
from typing import Any
from xml.sax.saxutils import quoteattr

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from imagegen import __version__
from imagegen.core.contract import JobSpec
from imagegen.core.image_metadata import EXIF_IFD, USER_COMMENT, user_comment

XMP_NAMESPACE = "https://github.com/imagegen/imagegen/ns/1.0/"


def encode_image(
    image: Image.Image, parameters: dict[str, Any], output_format: str, quality: int
) -> bytes:
    """`image` as `output_format` ("png", "jpeg" or "webp"; `quality` 0..100 for the lossy
    two) carrying `parameters`; nothing time-dependent, so one seed gives identical files."""
    if output_format == "png":
        return encode_png(image, parameters)
    text = json.dumps(parameters, sort_keys=True, ensure_ascii=False)
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(text)
    buffer = io.BytesIO()
    image.convert("RGB").save(
        buffer,
        format=output_format.upper(),
        quality=quality,
        exif=exif.tobytes(),
        xmp=xmp_packet(text),
    )
    return buffer.getvalue()


def xmp_packet(parameters_json: str) -> bytes:
    """An XMP packet holding the parameters as `imagegen:parameters`."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:imagegen="{XMP_NAMESPACE}" '
        f"imagegen:parameters={quoteattr(parameters_json)}/>"
        "</rdf:RDF></x:xmpmeta>"
        '<?xpacket end="r"?>'
    ).encode()


def encode_png(image: Image.Image, parameters: dict[str, Any]) -> bytes:
    """Encode `image` as PNG carrying `parameters` as JSON in a `parameters` tEXt/iTXt chunk.

    The chunk holds nothing time-dependent, so one seed gives byte-identical files.
    """
    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def image_parameters(spec: JobSpec, index: int) -> dict[str, Any]:
    """The parameters image `index` carries: enough to reproduce it with n=1 (with the
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
    if spec.controls:
        parameters["controls"] = [control.model_dump() for control in spec.controls]
    return parameters
