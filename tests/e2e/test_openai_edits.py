"""`POST /v1/images/edits` driven by the official `openai` package's `images.edit` against the
real stack: OpenAI's mask convention (alpha 0 = repaint), b64_json and url answers."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from tests.conftest import TINY_MODEL_ID
from tests.stack import Gateway

EXTRA = {"model": TINY_MODEL_ID, "steps": 2, "seed": 7}


@pytest.fixture
def client(stack: Gateway) -> Iterator[OpenAI]:
    with OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def scene() -> Image.Image:
    image = Image.new("RGB", (64, 64), (230, 230, 230))
    image.paste((20, 20, 200), (8, 8, 30, 30))
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def openai_mask() -> Image.Image:
    """OpenAI's convention: transparent (alpha 0) = repaint; here the right half."""
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 0, 64, 64))
    return mask


def test_images_edit_b64_keeps_the_opaque_mask_pixels(client: OpenAI) -> None:
    result = client.images.edit(
        image=("in.png", png(scene()), "image/png"),
        mask=("mask.png", png(openai_mask()), "image/png"),
        prompt="a red circle",
        n=1,
        size="64x64",
        response_format="b64_json",
        extra_body=EXTRA,
    )
    assert result.data is not None and len(result.data) == 1
    b64 = result.data[0].b64_json
    assert b64 is not None
    out = Image.open(io.BytesIO(base64.b64decode(b64)))
    parameters = json.loads(out.info["parameters"])
    assert parameters["task"] == "inpaint" and parameters["mask"]["width"] == 64
    got = np.asarray(out.convert("RGB"))
    kept = np.asarray(scene())
    assert np.array_equal(got[:, :32], kept[:, :32])  # opaque mask pixels: kept exactly
    assert not np.array_equal(got[:, 32:], kept[:, 32:])  # transparent ones: repainted


def test_images_edit_url_without_mask_is_image_to_image(client: OpenAI, stack: Gateway) -> None:
    result = client.images.edit(
        image=("in.png", png(scene()), "image/png"),
        prompt="a red circle",
        response_format="url",
        extra_body={**EXTRA, "strength": 0.5},
    )
    assert result.data is not None
    url = result.data[0].url
    assert url is not None and url.startswith(stack.base_url)
    out = Image.open(io.BytesIO(httpx.get(url).content))
    assert json.loads(out.info["parameters"])["task"] == "img2img"


def test_a_mask_without_alpha_is_refused_naming_the_convention(client: OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.images.edit(
            image=("in.png", png(scene()), "image/png"),
            mask=("mask.png", png(Image.new("L", (64, 64), 255)), "image/png"),
            prompt="x",
            extra_body=EXTRA,
        )
    assert "alpha" in str(refused.value) and "mask" in str(refused.value)


def test_bad_image_file_is_a_422_naming_image(stack: Gateway) -> None:
    with stack.client() as http:
        response = http.post(
            "/v1/images/edits",
            data={"prompt": "x", "model": TINY_MODEL_ID},
            files={"image": ("in.png", b"not an image", "image/png")},
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("image")
