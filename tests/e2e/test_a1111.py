"""AUTOMATIC1111's API (`/sdapi/v1`) driven by its own Python client, `webuiapi`, against the
live service: txt2img, img2img with a mask, a `<lora:…>` tag, the per-key checkpoint
(`util_set_model`), progress and interrupt; what would change the image and is not served is a
422 naming the field."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from app.auth import _key_of
from tests.conftest import TINY_MODEL_ID
from tests.stack import Gateway, wait_for_job


def _silhouette_map() -> Image.Image:
    picture = Image.new("RGB", (64, 64), (0, 0, 0))
    picture.paste((255, 255, 255), (16, 16, 48, 48))
    return picture


def _b64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


SILHOUETTE_UNIT = webuiapi.ControlNetUnit(
    image=_silhouette_map(), model="silhouette [0123abcd]", weight=0.8, guidance_end=0.75
).to_dict()
POSE_UNIT = {**SILHOUETTE_UNIT, "module": "openpose"}
CANNY_UNIT = {**SILHOUETTE_UNIT, "module": "canny"}  # webuiapi's thresholds: 64 and 64


@pytest.fixture()
def api(stack: Gateway) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=stack.base_url + "/sdapi/v1", sampler="Euler a", steps=4)


def test_txt2img_answers_as_a1111_does(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(prompt="a large red circle", width=64, height=64, seed=3, batch_size=2)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [3, 4] and result.info["sampler_name"] == "Euler a"
    assert result.info["infotexts"][0].startswith("a large red circle\n")
    assert "Seed: 3, Size: 64x64" in result.info["infotexts"][0]
    # The PNG carries A1111's infotext, which "PNG Info" in A1111 clients reads.
    assert [image.info["parameters"] for image in result.images] == result.info["infotexts"]
    again = api.txt2img(prompt="a large red circle", width=64, height=64, seed=3)
    assert np.array_equal(np.asarray(again.image), np.asarray(result.images[0]))


def test_a_lora_tag_in_the_prompt_applies_the_lora(api: webuiapi.WebUIApi) -> None:
    plain = api.txt2img(prompt="a large red circle", width=64, height=64, seed=5)
    tagged = api.txt2img(prompt="<lora:outline:1> a large red circle", width=64, height=64, seed=5)
    assert tagged.info["prompt"] == "a large red circle"
    assert not np.array_equal(np.asarray(plain.image), np.asarray(tagged.image))


def test_img2img_with_a_mask_keeps_the_unmasked_pixels(api: webuiapi.WebUIApi) -> None:
    picture = Image.new("RGB", (64, 64), (20, 120, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    common = {"images": [picture], "mask_image": mask, "prompt": "a red square", "seed": 1}
    # webuiapi's defaults: mask_blur 4, inpaint_full_res (only masked), inpainting_fill 0
    # ("fill") at denoising_strength 0.75 -- the fill cannot map there, and says so.
    with pytest.raises(RuntimeError, match="inpainting_fill"):
        api.img2img(**common, width=64, height=64)
    result = api.img2img(**common, width=64, height=64, inpainting_fill=1)
    out = np.asarray(result.image)
    # The blur (4 px) fades the seam; beyond its reach every kept pixel is the input's.
    assert np.array_equal(out[:, 48:], np.asarray(picture)[:, 48:])
    params = result.parameters
    assert params["mask_blur"] == 4 and params["inpaint_full_res"] is True
    hard = api.img2img(
        **common, width=64, height=64, inpainting_fill=1, mask_blur=0, inpaint_full_res=False
    )
    assert np.array_equal(np.asarray(hard.image)[:, 32:], np.asarray(picture)[:, 32:])
    assert not np.array_equal(np.asarray(hard.image), out)
    # At denoising_strength 1 the masked area starts from noise: "fill" maps there.
    full = api.img2img(**common, width=64, height=64, denoising_strength=1.0)
    assert np.array_equal(np.asarray(full.image)[:, 48:], np.asarray(picture)[:, 48:])


def test_a_controlnet_unit_is_the_native_control(api: webuiapi.WebUIApi, stack: Gateway) -> None:
    unit = webuiapi.ControlNetUnit(
        image=_silhouette_map(), model="silhouette [0123abcd]", weight=0.8, guidance_end=0.75
    )
    common = {"prompt": "a red circle", "width": 64, "height": 64, "seed": 12}
    # A fresh `alwayson_scripts` each call: webuiapi's default dict keeps what it was given.
    result = api.txt2img(**common, controlnet_units=[unit], alwayson_scripts={})
    plain = api.txt2img(**common, alwayson_scripts={})
    assert not np.array_equal(np.asarray(result.image), np.asarray(plain.image))
    native = {
        "prompt": "a red circle", "model": "shapes-64", "seed": 12, "steps": 4,
        "scheduler": "euler_a", "width": 64, "height": 64, "guidance_scale": 7.0,
        "control": {"id": "silhouette", "image": _b64(_silhouette_map()), "scale": 0.8,
                    "end": 0.75},
    }  # fmt: skip
    with stack.client() as client:
        job = client.post("/v1/generations", json=native).json()
        done = wait_for_job(client, job["id"])
        png = client.get(done["images"][0]["url"]).content  # type: ignore[index]
    assert np.array_equal(np.asarray(result.image), np.asarray(Image.open(io.BytesIO(png))))
    # webuiapi sends `{"ControlNet": {"args": []}}` once it has seen the extension: no unit.
    api.has_controlnet = True
    again = api.txt2img(**common, alwayson_scripts={})
    assert np.array_equal(np.asarray(again.image), np.asarray(plain.image))


def test_the_checkpoint_is_per_key_and_progress_and_interrupt_answer(
    api: webuiapi.WebUIApi,
) -> None:
    models = [m["model_name"] for m in api.get_sd_models()]
    assert TINY_MODEL_ID in models and "shapes-64" in models
    api.util_set_model(TINY_MODEL_ID)
    assert api.util_get_current_model() == TINY_MODEL_ID
    result = api.txt2img(prompt="x", width=64, height=64, seed=1)
    assert result.info["sd_model_name"] == TINY_MODEL_ID
    api.util_set_model("shapes-64")
    assert api.get_progress()["state"]["job_count"] == 0
    api.interrupt()
    assert [s["name"] for s in api.get_samplers()][:2] == ["Euler a", "Euler"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("enable_hr", True),
        ("restore_faces", True),
        ("alwayson_scripts.x", {"x": {"args": [1]}}),
        ("alwayson_scripts.ControlNet.args[0].module", {"ControlNet": {"args": [POSE_UNIT]}}),
        (
            "alwayson_scripts.ControlNet.args[1].threshold_a",
            {"ControlNet": {"args": [SILHOUETTE_UNIT, CANNY_UNIT]}},
        ),
        ("alwayson_scripts.ControlNet.args", {"ControlNet": {"args": [SILHOUETTE_UNIT] * 4}}),
        (
            "alwayson_scripts.ControlNet.args[0].weight",
            {"ControlNet": {"args": [{**SILHOUETTE_UNIT, "weight": 5}]}},
        ),
    ],
)
def test_what_is_not_served_is_a_422_naming_the_field(
    stack: Gateway, field: str, value: object
) -> None:
    with httpx.Client(base_url=stack.base_url) as client:
        name = field.split(".")[0]
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", name: value})
    assert response.status_code == 422, response.text
    error = response.json()  # A1111's shape, which its clients read
    assert error["error"] == "invalid_request" and error["detail"].startswith(field)
    assert error["errors"][0]["field"] == field


def test_infinite_canny_thresholds_are_a_422_naming_them(stack: Gateway) -> None:
    # Python's JSON parser takes the literals Infinity and -Infinity; they are not thresholds.
    unit = json.dumps({**CANNY_UNIT, "threshold_a": 0, "threshold_b": 0})
    unit = unit.replace('"threshold_a": 0', '"threshold_a": -Infinity')
    unit = unit.replace('"threshold_b": 0', '"threshold_b": Infinity')
    body = '{"prompt": "x", "alwayson_scripts": {"ControlNet": {"args": [' + unit + "]}}}"
    with httpx.Client(base_url=stack.base_url) as client:
        response = client.post(
            "/sdapi/v1/txt2img", content=body, headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 422, response.text
    assert (
        response.json()["errors"][0]["field"] == "alwayson_scripts.ControlNet.args[0].threshold_a"
    )


def test_http_basic_carries_the_key_as_its_password() -> None:
    token = base64.b64encode(b"anyone:ig_secret").decode()
    assert _key_of(f"Basic {token}") == "ig_secret"
    assert _key_of("Bearer ig_secret") == "ig_secret"
    assert _key_of("Basic !!!") == "" and _key_of("") == ""


def test_png_info_reads_the_parameters_a_png_carries(stack: Gateway) -> None:
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        made = client.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "a small blue square", "negative_prompt": "red", "steps": 4,
                  "width": 64, "height": 64, "seed": 9, "sampler_name": "Euler a"},
        )  # fmt: skip
        assert made.status_code == 200, made.text
        read = client.post("/sdapi/v1/png-info", json={"image": made.json()["images"][0]})
        assert read.status_code == 200, read.text
        info = read.json()["info"]
        assert info.startswith("a small blue square\nNegative prompt: red\nSteps: 4, ")
        assert "Sampler: Euler a" in info and "Seed: 9, Size: 64x64" in info
        fields = read.json()["parameters"]
        assert fields["Prompt"] == "a small blue square" and fields["Negative prompt"] == "red"
        assert (fields["Steps"], fields["Seed"], fields["Size-1"]) == ("4", "9", "64")
        # A native job's PNG carries this service's JSON; png-info reads it the same way.
        native = client.post(
            "/v1/generations",
            json={"prompt": "a small blue square", "negative_prompt": "red", "steps": 4,
                  "width": 64, "height": 64, "seed": 9, "scheduler": "euler_a"},
        ).json()  # fmt: skip
        done = wait_for_job(client, native["id"])
        png = client.get(done["images"][0]["url"]).content  # type: ignore[index]
        again = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(png).decode()})
        assert again.json()["parameters"] == {
            **fields,
            "Model": again.json()["parameters"]["Model"],
        }
        bad = client.post("/sdapi/v1/png-info", json={"image": "bm90IGEgcG5n"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "image"
