"""Input images at the edge (`image`, `mask`, `outpaint`): decoded, checked and normalized with
Pillow before a job exists, so no input can reach (let alone crash) a worker.

The order of the checks is what keeps a hostile file cheap: the encoded size first, then the
format by content, then the size the header claims (Image.open reads only the header) against
the pixel cap, and only then are pixels decoded. What comes out is what the worker runs on: an
RGB image (a mask: grayscale, binarized) at the job's output size, as PNG bytes, and a reference
(sha256 of what was sent, its width and height) for the job document and the PNG chunk.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass

from fastapi import Request
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import InvalidRequest, PayloadTooLarge
from app.middleware import BODY_BYTES
from imagegen.core.contract import InputRef, Task

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)
# Pillow refuses files past 2x this outright (DecompressionBombError); our own cap, checked on
# the header before any pixel is decoded, is far lower, so this is a second line only.
Image.MAX_IMAGE_PIXELS = 64 * 1024 * 1024
_B64_CHARS = re.compile(rb"^[A-Za-z0-9+/\r\n]*={0,2}[\r\n]*$")


@dataclass(frozen=True)
class Decoded:
    """An accepted input: pixels as sent (EXIF applied, RGB) and its reference."""

    image: Image.Image
    ref: InputRef


@dataclass(frozen=True)
class PreparedInputs:
    """What a job with images in carries: normalized PNGs by name and their references."""

    task: Task  # "img2img" | "inpaint" | "outpaint"
    width: int
    height: int
    blobs: dict[str, bytes]  # "image", "mask": normalized PNGs at the output size
    refs: dict[str, InputRef]  # as sent: sha256, width, height


def decode_base64(value: str, field: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string or `data:image/...;base64,` URI, within `max_bytes`."""
    text = _DATA_URI.sub("", value.strip(), count=1)
    # 4 base64 characters carry 3 bytes: a string this long cannot fit the cap, so it is
    # refused before it is decoded.
    if len(text) > (max_bytes + 2) // 3 * 4 + len(text) // 60 + 4:
        raise InvalidRequest.for_field(
            field, f"the encoded image exceeds the limit of {max_bytes} bytes"
        )
    raw = text.encode("ascii", "replace")
    if not _B64_CHARS.match(raw):
        raise InvalidRequest.for_field(
            field, "is not base64 (nor a data:image/...;base64, URI) of a PNG, JPEG or WebP"
        )
    try:
        data = base64.b64decode(raw.replace(b"\r", b"").replace(b"\n", b""), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest.for_field(field, f"is not valid base64 ({exc})") from exc
    return data


def load_image(
    data: bytes, field: str, max_bytes: int, max_pixels: int, *, keep_alpha: bool = False
) -> Decoded:
    """Decode an image file sent as `field`; any problem is a 422 naming the field.
    `keep_alpha`: RGBA/LA stay as they are (OpenAI's masks are read from their alpha)."""
    if len(data) > max_bytes:
        raise InvalidRequest.for_field(
            field, f"the image is {len(data)} bytes, over the limit of {max_bytes} bytes"
        )
    if not data:
        raise InvalidRequest.for_field(field, "is empty")
    if data[:6] in (b"GIF87a", b"GIF89a"):
        raise InvalidRequest.for_field(
            field, "is a GIF; send a PNG, JPEG or WebP (animations are not accepted)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except UnidentifiedImageError as exc:
        raise InvalidRequest.for_field(
            field, "is not a PNG, JPEG or WebP image (the format is read from the content)"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # In our words, with the size the header claims (Pillow's message holds the count).
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        said = f" ({claimed.group(1)} pixels)" if claimed else ""
        raise InvalidRequest.for_field(
            field, f"claims more pixels{said} than the pixel cap of {max_pixels}"
        ) from exc
    except Exception as exc:
        raise InvalidRequest.for_field(field, "is corrupt (its header cannot be read)") from exc
    image: Image.Image = opened
    width, height = image.size
    # The header's claim, before a single pixel is decoded.
    if width * height > max_pixels:
        raise InvalidRequest.for_field(
            field,
            f"is {width}x{height} = {width * height} pixels, over the pixel cap of {max_pixels}",
        )
    if width < 1 or height < 1:
        raise InvalidRequest.for_field(field, "has no pixels")
    if getattr(image, "n_frames", 1) > 1 or getattr(image, "is_animated", False):
        raise InvalidRequest.for_field(field, "is animated; send a single still image")
    try:
        if image.format == "PNG":
            # Chunk by chunk to IEND, CRCs checked, nothing decompressed: a PNG cut short
            # (even of only its end) is refused, where decoding alone may not notice.
            with Image.open(io.BytesIO(data), formats=["PNG"]) as check:
                check.verify()
        image.load()
    except Exception as exc:
        raise InvalidRequest.for_field(field, "is truncated or corrupt") from exc
    try:
        image = ImageOps.exif_transpose(image) or image
        if keep_alpha and image.mode in ("RGBA", "LA", "PA", "P"):
            image = image.convert("RGBA")
        else:
            image = _to_rgb(image)
    except Exception as exc:
        raise InvalidRequest.for_field(field, "has pixels that cannot be converted") from exc
    ref = InputRef(sha256=hashlib.sha256(data).hexdigest(), width=image.width, height=image.height)
    return Decoded(image, ref)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels: 16-bit scaled to 8, palette and CMYK converted, alpha composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale: Pillow's plain conversion would clip at 255, not scale.
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if image.mode == "F":
        image = image.convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def output_size(
    ref: InputRef, width: int | None, height: int | None, grow: tuple[int, int, int, int]
) -> tuple[int, int]:
    """The job's size: the explicit one, else the input's (a multiple of 8, at least 64) plus
    any outpaint margins (left, right, top, bottom)."""
    left, right, top, bottom = grow
    w = width if width is not None else _fit8(ref.width) + left + right
    h = height if height is not None else _fit8(ref.height) + top + bottom
    return w, h


def _fit8(size: int) -> int:
    return max(64, size // 8 * 8)


def to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def binarize_mask(image: Image.Image) -> Image.Image:
    """Luminance >= 128 (white) = repaint -> 255; < 128 (black) = keep -> 0."""
    return image.convert("L").point(lambda v: 255 if v >= 128 else 0)


def prepare(
    *,
    image: Decoded,
    mask: Decoded | None,
    outpaint: tuple[int, int, int, int] | None,
    width: int | None,
    height: int | None,
    max_pixels: int,
) -> PreparedInputs:
    """The normalized inputs of a job: resized to the output size (Lanczos for images, nearest
    for masks); for outpainting the grown canvas, the input in place, and its mask.

    Every size is checked before a pixel is touched: a refused request costs the same
    whatever size it asked for (an unchecked 40000x40000 would be gigabytes of canvas)."""
    grow = outpaint or (0, 0, 0, 0)
    w, h = output_size(image.ref, width, height, grow)
    if w * h > max_pixels:
        named = "width" if width is not None else "height" if height is not None else None
        raise InvalidRequest.for_field(
            named or ("outpaint" if outpaint is not None else "image"),
            f"width*height = {w * h} exceeds the pixel cap of {max_pixels}",
        )
    refs = {"image": image.ref}
    if outpaint is not None:
        left, right, top, bottom = grow
        inner_w, inner_h = w - left - right, h - top - bottom
        if inner_w < 8 or inner_h < 8:
            raise InvalidRequest.for_field(
                "outpaint", f"leaves no room for the input in a {w}x{h} output"
            )
        inner = _resized(image.image, inner_w, inner_h, Image.Resampling.LANCZOS)
        # The new area starts as the input's edge pixels stretched outwards (it is re-noised
        # completely at strength 1; a lower strength starts from those colors).
        canvas = ImageOps.expand(inner, border=(left, top, right, bottom), fill=(255, 255, 255))
        canvas = _edge_fill(canvas, inner, left, top)
        mask_img = Image.new("L", (w, h), 255)
        mask_img.paste(0, (left, top, left + inner_w, top + inner_h))
        return PreparedInputs(
            "outpaint", w, h, {"image": to_png(canvas), "mask": to_png(mask_img)}, refs
        )
    if mask is not None and (mask.ref.width, mask.ref.height) != (
        image.ref.width,
        image.ref.height,
    ):
        raise InvalidRequest.for_field(
            "mask",
            f"is {mask.ref.width}x{mask.ref.height}; it must have the image's size, "
            f"{image.ref.width}x{image.ref.height}",
        )
    normalized = _resized(image.image, w, h, Image.Resampling.LANCZOS)
    blobs = {"image": to_png(normalized)}
    task: Task = "img2img"
    if mask is not None:
        refs["mask"] = mask.ref
        m = _resized(mask.image.convert("L"), w, h, Image.Resampling.NEAREST)
        blobs["mask"] = to_png(binarize_mask(m))
        task = "inpaint"
    return PreparedInputs(task, w, h, blobs, refs)


def control_input(
    value: str, width: int, height: int, field: str, max_bytes: int, max_pixels: int
) -> tuple[bytes, InputRef]:
    """A control image, resized to the output size (Lanczos): the PNG the worker reads and the
    reference the job shows."""
    decoded = load_image(decode_base64(value, field, max_bytes), field, max_bytes, max_pixels)
    return to_png(_resized(decoded.image, width, height, Image.Resampling.LANCZOS)), decoded.ref


def _resized(image: Image.Image, w: int, h: int, method: Image.Resampling) -> Image.Image:
    if image.size == (w, h):
        return image
    return image.resize((w, h), method)


def _edge_fill(canvas: Image.Image, inner: Image.Image, left: int, top: int) -> Image.Image:
    """Fill the margins of `canvas` by repeating the input's border rows and columns."""
    w, h = canvas.size
    iw, ih = inner.size
    if left:
        canvas.paste(inner.crop((0, 0, 1, ih)).resize((left, ih)), (0, top))
    right = w - left - iw
    if right:
        canvas.paste(inner.crop((iw - 1, 0, iw, ih)).resize((right, ih)), (left + iw, top))
    if top:
        row = canvas.crop((0, top, w, top + 1))
        canvas.paste(row.resize((w, top)), (0, 0))
    bottom = h - top - ih
    if bottom:
        row = canvas.crop((0, top + ih - 1, w, top + ih))
        canvas.paste(row.resize((w, bottom)), (0, top + ih))
    return canvas


async def limit_body_without_images(request: Request) -> None:
    """A route dependency (it runs before the body is validated): a body past the plain limit
    is allowed only when it carries `image`, `mask` or control images (the middleware let it
    through on an image route, up to the image limit)."""
    received = request.scope.get("state", {}).get(BODY_BYTES, 0)
    max_bytes: int = request.app.state.settings.max_body_bytes
    if received <= max_bytes:
        return
    carries = False
    try:
        body = await request.json()  # parsed already, and cached
        carries = isinstance(body, dict) and any(
            body.get(k) is not None for k in ("image", "mask", "control", "controls")
        )
    except Exception:
        carries = False
    if not carries:
        raise PayloadTooLarge(
            f"the request body exceeds the limit of {max_bytes} bytes (larger bodies are "
            "accepted only with `image`, `mask` or `controls`)"
        )
