"""app.png_text: a PNG's `parameters` chunk replaced at the chunk level, pixels untouched."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from app.a1111 import parse_infotext
from app.png_text import chunks, with_text


def _png(text: str | None) -> bytes:
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    info.add_text("other", "kept")
    buffer = io.BytesIO()
    picture = Image.fromarray(np.arange(48 * 40 * 3, dtype=np.uint8).reshape(40, 48, 3))
    picture.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.mark.parametrize("original", ['{"seed": 1}', "ünïcode ✓ JSON", None])
@pytest.mark.parametrize("text", ["a cat\nSteps: 4, Seed: 9", "ünïcode ✓\nSteps: 4"])
def test_the_chunk_is_replaced_and_the_pixels_are_not_touched(
    original: str | None, text: str
) -> None:
    before = _png(original)
    after = with_text(before, "parameters", text)
    with Image.open(io.BytesIO(before)) as a, Image.open(io.BytesIO(after)) as b:
        assert b.info["parameters"] == text and b.info["other"] == "kept"
        assert np.array_equal(np.asarray(a), np.asarray(b))
    keys = [data.split(b"\0")[0] for kind, data in chunks(after) if kind in (b"tEXt", b"iTXt")]
    assert keys.count(b"parameters") == 1


def test_what_is_not_a_png_is_refused() -> None:
    with pytest.raises(ValueError):
        with_text(b"GIF89a", "parameters", "x")
    with pytest.raises(ValueError):
        with_text(_png(None)[:-5], "parameters", "x")


def test_an_infotext_parses_as_a1111_s_png_info_does() -> None:
    fields = parse_infotext(
        "a red\ncircle\nNegative prompt: blue\nSteps: 4, Sampler: Euler a, CFG scale: 7.0, "
        'Seed: 9, Size: 64x48, Model: shapes-64, Lora hashes: "a: 1, b: 2"'
    )
    assert fields["Prompt"] == "a red\ncircle" and fields["Negative prompt"] == "blue"
    assert fields["Sampler"] == "Euler a" and fields["CFG scale"] == "7.0"
    assert (fields["Size-1"], fields["Size-2"]) == ("64", "48")
    assert fields["Lora hashes"] == '"a: 1, b: 2"'
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}
