"""Where a job's image files carry their generation parameters, written by the worker and read
by the gateway (A1111's `png-info`) and by clients: a PNG's `parameters` text chunk; for JPEG
and WebP, EXIF UserComment (where AUTOMATIC1111 puts its infotext and most viewers look)."""

from __future__ import annotations

import io

from PIL import Image

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
# EXIF's character-code prefix for UTF-16 text (piexif's "unicode" encoding, which A1111 reads).
UNICODE_PREFIX = b"UNICODE\x00"
FORMATS = ["PNG", "JPEG", "WEBP"]


def user_comment(text: str) -> bytes:
    """An EXIF UserComment value holding `text`."""
    return UNICODE_PREFIX + text.encode("utf-16-be")


def carried_parameters(data: bytes) -> str | None:
    """The parameters text an image file carries, reading only its headers and text chunks
    (never the pixels); None when it carries none. Raises what Pillow raises on a file that is
    not a PNG, JPEG or WebP."""
    with Image.open(io.BytesIO(data), formats=FORMATS) as opened:
        if opened.format == "PNG":
            value = opened.info.get("parameters")
            return str(value) if value is not None else None
        comment = opened.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(UNICODE_PREFIX):
        return comment[len(UNICODE_PREFIX) :].decode("utf-16-be", errors="replace")
    return None
