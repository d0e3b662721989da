"""Images in from the Python SDK (bytes, a path or a PIL image) and `imagegen edit`, run as a
real process with its options, against the real stack."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from imagegen_client import AsyncClient, Client
from PIL import Image

from imagegen.cli.edit import parse_outpaint
from tests.conftest import TINY_MODEL_ID
from tests.stack import ROOT, Gateway

TINY = {"model": TINY_MODEL_ID, "steps": 2, "seed": 5}


def scene() -> Image.Image:
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    image.paste((200, 20, 20), (8, 8, 30, 30))
    return image


def a_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))  # white = repaint
    return mask


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["bytes", "path", "pil"])
def test_the_sdk_takes_bytes_a_path_or_a_pil_image(
    stack: Gateway, tmp_path: Path, kind: str
) -> None:
    (tmp_path / "in.png").write_bytes(png(scene()))
    (tmp_path / "mask.png").write_bytes(png(a_mask()))
    image: Any = {"bytes": png(scene()), "path": tmp_path / "in.png", "pil": scene()}[kind]
    mask: Any = {"bytes": png(a_mask()), "path": str(tmp_path / "mask.png"), "pil": a_mask()}[kind]
    with Client(base_url=stack.base_url) as client:
        result = client.generate("a blue circle", image=image, mask=mask, **TINY)
    assert result.job.request.task == "inpaint"
    assert result.job.request.image is not None and result.job.request.image["width"] == 64
    out = np.asarray(result.images[0].pil.convert("RGB"))
    keep = np.asarray(a_mask()) < 128
    assert np.array_equal(out[keep], np.asarray(scene())[keep])


def test_the_async_sdk_does_image_to_image_and_outpainting(stack: Gateway) -> None:
    import anyio

    async def main() -> tuple[Any, Any]:
        async with AsyncClient(base_url=stack.base_url) as client:
            i2i = await client.generate("x", image=png(scene()), strength=0.5, **TINY)
            grown = await client.generate("x", image=scene(), outpaint={"right": 32}, **TINY)
            return i2i, grown

    i2i, grown = anyio.run(main)
    assert i2i.job.request.task == "img2img" and i2i.job.request.strength == 0.5
    assert grown.job.request.outpaint == {"left": 0, "right": 32, "top": 0, "bottom": 0}
    assert grown.images[0].pil.size == (96, 64)


def _edit(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    return subprocess.run(
        [sys.executable, "-m", "imagegen", "edit", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_imagegen_edit_inpaints_and_outpaints(stack: Gateway, tmp_path: Path) -> None:
    (tmp_path / "in.png").write_bytes(png(scene()))
    (tmp_path / "mask.png").write_bytes(png(a_mask()))
    common = ["--model", TINY_MODEL_ID, "--steps", "2", "--seed", "3", "--base-url", stack.base_url]
    out = tmp_path / "out.png"
    result = _edit(
        str(tmp_path / "in.png"), "a blue circle", "--mask", str(tmp_path / "mask.png"),
        "--strength", "0.9", "-o", str(out), *common,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        parameters = json.loads(image.info["parameters"])
    assert parameters["task"] == "inpaint" and parameters["strength"] == 0.9
    wide = tmp_path / "wide.png"
    result = _edit(
        str(tmp_path / "in.png"), "white", "--outpaint", "right=32", "-o", str(wide), *common
    )
    assert result.returncode == 0, result.stderr
    with Image.open(wide) as image:
        assert image.size == (96, 64)
    bad = _edit(str(tmp_path / "in.png"), "x", "--outpaint", "right=30", *common)
    assert bad.returncode == 1 and "outpaint.right" in bad.stderr, bad.stderr


def test_outpaint_option_parsing() -> None:
    assert parse_outpaint(["right=32"]) == {"right": 32}
    assert parse_outpaint(["left=16,top=8", "bottom=8"]) == {"left": 16, "top": 8, "bottom": 8}
    assert parse_outpaint([]) is None
    with pytest.raises(typer.BadParameter):
        parse_outpaint(["up=8"])
