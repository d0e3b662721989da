"""The requests other apps send, replayed byte for byte against the live service, each recorded
from the app's own source (file and commit named at each test). What the app reads from the
answer is read the same way here.

Open WebUI: backend/open_webui/routers/images.py (open-webui/open-webui @ 02530d50):
  - engine "automatic1111": `GET {base}/sdapi/v1/sd-models` and `POST {base}/sdapi/v1/txt2img`
    with `{"prompt", "batch_size": n, "width", "height"[, "steps"][, "negative_prompt"]}` and the
    header `authorization: Basic base64(AUTOMATIC1111_API_AUTH)`; it reads `title` and
    `model_name` of each model, then `res["images"]` (base64 without a data: prefix, taken as
    image/png) and `res["info"]`.
  - engine "openai": `POST {base}/images/generations` with `{"model", "prompt", "n", "size"}`
    and `"response_format": "b64_json"` unless the model is a URL-answering one (DALL·E); it
    reads `data[i].url` (fetched with the same Authorization header) or `data[i].b64_json`.
  - image edits, engine "openai": multipart `POST {base}/images/edits`, form fields `model`,
    `prompt`, `n`, `size`, `response_format` as text and the file as `image`.
LibreChat: api/app/clients/tools/structured/StableDiffusion.js (danny-avila/LibreChat @
  00b3bc32): `POST {SD_WEBUI_URL}/sdapi/v1/txt2img` with `{"prompt", "negative_prompt",
  "cfg_scale": 4.5, "steps": 22, "width": 1024, "height": 1024}` and no auth; it reads
  `images[0]` and `JSON.parse(info)`: `height`, `width`, `seed`, `infotexts[0]`'s last line.
  Older versions of that tool posted the image on to `/sdapi/v1/png-info` as
  `data:image/png;base64,...` and read `info`; that is replayed too.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imagegen.cli.redis_server import RedisServer
from tests.conftest import TINY_MODEL_ID
from tests.stack import Gateway, Proc, start_gateway

KEY = "ig_open_webui_key_0123456789"
# Open WebUI's AUTOMATIC1111_API_AUTH is "user:password"; get_automatic1111_api_auth base64s it.
BASIC = "Basic " + base64.b64encode(f"openwebui:{KEY}".encode()).decode()


@pytest.fixture(scope="module")
def keyed(redis_server: RedisServer, tiny_worker: Proc, log_dir: Path) -> Iterator[Gateway]:
    entry = f"openwebui:{hashlib.sha256(KEY.encode()).hexdigest()}"
    gateway = start_gateway(
        redis_server.url,
        log_dir,
        {"IMAGEGEN_API_KEYS": entry, "IMAGEGEN_DEFAULT_MODEL": TINY_MODEL_ID},
        name="gateway-apps",
    )
    yield gateway
    gateway.proc.stop()


def _png(b64: str) -> Image.Image:
    # Open WebUI's get_image_data: no "," in the string -> base64 of an image/png.
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert picture.format == "PNG"
    return picture


def test_open_webui_automatic1111_engine(keyed: Gateway) -> None:
    with httpx.Client(base_url=keyed.base_url, timeout=120) as client:
        models = client.get("/sdapi/v1/sd-models", headers={"authorization": BASIC}).json()
        listed = [{"id": m["title"], "name": m["model_name"]} for m in models]
        assert {"id": TINY_MODEL_ID, "name": TINY_MODEL_ID} in listed
        data = {"prompt": "a red circle", "batch_size": 2, "width": 64, "height": 64}
        data |= {"steps": 2, "negative_prompt": "blue"}
        res = client.post("/sdapi/v1/txt2img", json=data, headers={"authorization": BASIC})
        assert res.status_code == 200, res.text
        body = res.json()
        assert [_png(image).size for image in body["images"]] == [(64, 64), (64, 64)]
        assert json.loads(body["info"])["negative_prompt"] == "blue"
        # Without the key the answer is a 401 the app shows, not a stack trace.
        refused = client.post("/sdapi/v1/txt2img", json=data)
        assert refused.status_code == 401 and "Traceback" not in refused.text


@pytest.mark.parametrize("model", [TINY_MODEL_ID, "dall-e-3"])
def test_open_webui_openai_engine(keyed: Gateway, model: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data: dict[str, object] = {"model": model, "prompt": "a red circle", "n": 1, "size": "64x64"}
    if not model.startswith("dall-e"):
        data["response_format"] = "b64_json"
    with httpx.Client(base_url=keyed.base_url + "/v1", timeout=120) as client:
        res = client.post("/images/generations", json=data, headers=headers)
        assert res.status_code == 200, res.text
        for image in res.json()["data"]:
            if image.get("url"):
                fetched = client.get(image["url"], headers={"Authorization": f"Bearer {KEY}"})
                fetched.raise_for_status()
                assert fetched.headers["content-type"].split("/")[0] == "image"
                picture = Image.open(io.BytesIO(fetched.content))
            else:
                picture = _png(image["b64_json"])
            assert picture.size == (64, 64)


def test_open_webui_openai_image_edit(keyed: Gateway) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 120, 200)).save(buffer, format="PNG")
    form = {"model": TINY_MODEL_ID, "prompt": "a red circle", "n": "1", "size": "64x64"}
    form["response_format"] = "b64_json"
    with httpx.Client(base_url=keyed.base_url + "/v1", timeout=120) as client:
        res = client.post(
            "/images/edits",
            data=form,
            files={"image": ("image.png", buffer.getvalue(), "image/png")},
            headers={"Authorization": f"Bearer {KEY}"},
        )
    assert res.status_code == 200, res.text
    assert [_png(image["b64_json"]).size for image in res.json()["data"]] == [(64, 64)]


def test_librechat_stable_diffusion_tool(stack: Gateway) -> None:
    # LibreChat's payload, with one change: 1024x1024 at 22 steps is minutes per image for the
    # test model on a CPU, so the size is 64x64 and the steps 2.
    payload = {
        "prompt": "a red circle, centered, flat colours, simple, clean, bold, vivid",
        "negative_prompt": "blurry, noisy, dark, text, watermark, frame, border",
        "cfg_scale": 4.5,
        "steps": 2,
        "width": 64,
        "height": 64,
    }
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        response = client.post("/sdapi/v1/txt2img", json=payload)
        assert response.status_code == 200, response.text
        data = response.json()
        image = data["images"][0]
        buffer = base64.b64decode(image.split(",", 1)[0])  # as the tool slices it
        assert Image.open(io.BytesIO(buffer)).size == (64, 64)
        info = json.loads(data["info"])
        assert (info["height"], info["width"]) == (64, 64) and isinstance(info["seed"], int)
        generation_info = info["infotexts"][0].split("\n").pop()
        assert generation_info.startswith("Steps: 2, ") and "CFG scale: 4.5" in generation_info
        png_info = client.post(
            "/sdapi/v1/png-info", json={"image": f"data:image/png;base64,{image}"}
        )
        assert png_info.json()["info"] == info["infotexts"][0]
