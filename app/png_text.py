"""A PNG's text chunks rewritten without touching its pixels: the A1111 surface answers with
the worker's PNG whose `parameters` chunk holds A1111's infotext instead of this service's JSON,
so "PNG Info" in A1111 clients reads it. Chunk work only (no decoding), so it costs a copy."""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = {b"tEXt", b"iTXt", b"zTXt"}


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk; ValueError on what is not a well-formed PNG."""
    if not png.startswith(SIGNATURE):
        raise ValueError("not a PNG")
    out = []
    at = len(SIGNATURE)
    while at < len(png):
        if at + 12 > len(png):
            raise ValueError("truncated PNG chunk")
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind = png[at + 4 : at + 8]
        data = png[at + 8 : at + 8 + length]
        if len(data) != length:
            raise ValueError("truncated PNG chunk")
        out.append((kind, data))
        at += 12 + length
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _keyword(kind: bytes, data: bytes) -> bytes | None:
    return data.split(b"\x00", 1)[0] if kind in TEXT_CHUNKS else None


def with_text(png: bytes, key: str, text: str) -> bytes:
    """`png` with its `key` text chunk(s) replaced by one holding `text` (tEXt when Latin-1,
    else uncompressed UTF-8 iTXt, as Pillow writes them), placed before the image data."""
    keyword = key.encode("latin-1")
    try:
        new = _chunk(b"tEXt", keyword + b"\x00" + text.encode("latin-1"))
    except UnicodeEncodeError:
        new = _chunk(b"iTXt", keyword + b"\x00\x00\x00\x00\x00" + text.encode("utf-8"))
    out = [SIGNATURE]
    for kind, data in chunks(png):
        if _keyword(kind, data) == keyword:
            continue
        if kind == b"IDAT" and new:
            out.append(new)
            new = b""
        out.append(_chunk(kind, data))
    return b"".join(out)
