"""Decoding an image input at the edge (Pillow only): base64 or a `data:image/...;base64,` URI,
format by content, encoded and pixel sizes checked before any pixel is decoded, one frame,
EXIF orientation applied, alpha composited on white, any mode converted to RGB.

Kept small and apart so that every image input (the control image here; `image`/`mask` of the
images-in work) goes through one helper.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import InvalidRequest

FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class InputImage:
    """An input image as the worker receives it: a PNG of the output size, and its digest."""

    png: bytes
    sha256: str
    width: int
    height: int


def decode_image(value: str, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """The image in `value` as an RGB PIL image, or a 422 naming `field` and the limit."""
    text = _DATA_URI.sub("", value.strip(), count=1)
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise InvalidRequest.for_field(field, f"the encoded image exceeds {max_bytes} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest.for_field(
            field, "must be a PNG, JPEG or WebP as base64 or a data:image/...;base64, URI"
        ) from None
    if len(raw) > max_bytes:
        raise InvalidRequest.for_field(field, f"the encoded image exceeds {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=FORMATS)  # reads the header only
            if image.width * image.height > max_pixels:
                raise InvalidRequest.for_field(
                    field,
                    f"{image.width}x{image.height} exceeds the pixel cap of {max_pixels}",
                )
            if getattr(image, "n_frames", 1) > 1:
                raise InvalidRequest.for_field(field, "animated images are not accepted")
            image.load()
            upright = ImageOps.exif_transpose(image)
    except InvalidRequest:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Warning) as exc:
        kind = (
            "not a PNG, JPEG or WebP image"
            if isinstance(exc, UnidentifiedImageError)
            else ("truncated or corrupt image")
        )
        raise InvalidRequest.for_field(field, kind) from None
    except Image.DecompressionBombError:
        raise InvalidRequest.for_field(field, "decompression bomb refused") from None
    return to_rgb(upright)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode as RGB; transparency composited on white; 16-bit scaled to 8."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def control_input(
    value: str, width: int, height: int, field: str, max_bytes: int, max_pixels: int
) -> InputImage:
    """The control image, resized to the output size (Lanczos), as a PNG for the worker."""
    image = decode_image(value, field, max_bytes, max_pixels)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = buffer.getvalue()
    return InputImage(png, hashlib.sha256(png).hexdigest(), width, height)
