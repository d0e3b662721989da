"""LiteLLM's `image_generation` (its OpenAI provider, as a LiteLLM proxy in front of this service
calls it) against the live service: the images come back as OpenAI's answer, readable as
LiteLLM reads it."""

from __future__ import annotations

import base64
import io
import os

import httpx
from PIL import Image

from tests.stack import Gateway

# LiteLLM fetches its model price list at import unless told to use the copy it ships.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import litellm  # imported after the variable above


def test_litellm_image_generation(stack: Gateway) -> None:
    # LiteLLM sends OpenAI's body for a model it does not know (no `response_format`: it
    # refuses that parameter for such a model), and reads `b64_json` or `url`.
    response = litellm.image_generation(
        prompt="a large red circle on a white background",
        model="openai/shapes-64",
        api_base=stack.base_url + "/v1",
        api_key="unused",
        size="64x64",
        n=2,
        quality="low",
    )
    assert len(response.data) == 2
    for image in response.data:
        data = base64.b64decode(image.b64_json) if image.b64_json else httpx.get(image.url).content
        assert Image.open(io.BytesIO(data)).size == (64, 64)
