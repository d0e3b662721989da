"""Adapters and control through the real service: a worker serving the tiny model with two
LoRAs and a ControlNet, the gateway, HTTP. Listing, every limit (422 naming the field), scale 0,
the control image stored with the job and expired with it, and no leakage between jobs."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from imagegen.cli.redis_server import RedisServer
from imagegen.core.blobs import input_blob
from imagegen.core.contract import Keys
from tests.stack import (
    STORAGE,
    Gateway,
    Proc,
    start_worker,
    stored,
    wait_for_job,
    wait_for_worker,
)

MODEL = "tiny-adapters"


@pytest.fixture(scope="module")
def pose_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builtin_model.tiny import save_tiny_pose_model

    return save_tiny_pose_model(tmp_path_factory.mktemp("pose") / "vitpose")


@pytest.fixture(scope="module")
def adapter_worker(
    redis_server: RedisServer,
    redis_conn: redis.Redis,
    log_dir: Path,
    tiny_model_dir: Path,
    pose_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Proc]:
    from builtin_model.tiny import (
        save_kohya_lora,
        save_misfit_lora,
        save_other_family_lora,
        save_tiny_adapters,
    )

    root = tmp_path_factory.mktemp("adapters-http")
    broken_depth = root / "broken-depth"  # a checkpoint that does not load: depth not served
    broken_depth.mkdir()
    (broken_depth / "config.json").write_text("{not json")
    directory = root / "tiny"
    shutil.copytree(tiny_model_dir, directory)
    save_tiny_adapters(directory)
    save_misfit_lora(directory)  # one bad file: listed unavailable, the rest serve
    library = root / "library"
    save_kohya_lora(library / "civitai_style.safetensors", directory)
    save_other_family_lora(library / "sdxl_style.safetensors")
    env = {
        "IMAGEGEN_MODEL": str(directory),
        "IMAGEGEN_MODEL_ID": MODEL,
        "IMAGEGEN_LORA_DIR": str(library),
        "IMAGEGEN_POSE_MODEL": str(pose_model_dir),
        "IMAGEGEN_DEPTH_MODEL": str(broken_depth),
    }
    proc = start_worker(redis_server.url, log_dir, "adapters-1", env, forked=True)
    wait_for_worker(redis_conn, proc, "adapters-1")
    assert "preprocessor depth is unavailable and not served" in proc.log()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def service(gateway: Gateway, adapter_worker: Proc) -> Gateway:
    return gateway


def png_b64(
    size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] = (8, 8, 40, 40)
) -> str:
    image = Image.new("RGB", size, "black")
    image.paste((255, 255, 255), box)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BASE: dict[str, Any] = {"model": MODEL, "prompt": "a red cube", "steps": 3, "seed": 7}


def post(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/v1/generations", json={**BASE, **body})


def run(client: httpx.Client, **body: Any) -> bytes:
    response = post(client, **body)
    assert response.status_code == 202, response.text
    doc = wait_for_job(client, response.json()["id"])
    assert doc["status"] == "succeeded", doc
    return client.get(f"/v1/generations/{doc['id']}/images/0").content


def test_models_list_adapters_and_controls(service: Gateway) -> None:
    with service.client() as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    entry = models[MODEL]
    assert [(a["id"], a["kind"], a["format"]) for a in entry["adapters"]] == [
        ("civitai_style", "lora", "kohya"),
        ("dots", "lora", "diffusers"),
        ("lines", "lora", "diffusers"),
    ]
    assert [(c["id"], c["kind"]) for c in entry["controls"]] == [("edges", "controlnet")]
    assert entry["adapters"][2]["description"] == "test LoRA lines"
    (misfit,) = entry["unavailable_adapters"]
    assert misfit["id"] == "misfit" and "does not fit" in misfit["reason"]
    assert entry["available"] is True
    # pose from its ViTPose checkpoint; depth's checkpoint is broken: left out, not a failed job.
    assert entry["preprocessors"] == ["canny", "scribble", "pose"]


def test_an_unavailable_adapter_is_a_422_saying_why_and_a_library_lora_serves(
    service: Gateway,
) -> None:
    with service.client() as client:
        response = post(client, loras=[{"id": "lines"}, {"id": "misfit"}])
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["message"].startswith("loras[1].id"), error
        assert "unavailable" in error["message"] and "does not fit" in error["message"]
        plain = run(client)
        assert run(client, loras=[{"id": "civitai_style", "scale": 0.8}]) != plain


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("five loras", {"loras": [{"id": "lines", "scale": 0.1}] * 5}, "loras"),
    ("unknown lora", {"loras": [{"id": "lines"}, {"id": "nope"}]}, "loras[1].id"),
    ("lora listed twice", {"loras": [{"id": "lines"}, {"id": "lines"}]}, "loras[1].id"),
    ("lora scale > 2", {"loras": [{"id": "lines", "scale": 2.5}]}, "loras[0].scale"),
    ("lora scale < -2", {"loras": [{"id": "lines", "scale": -3}]}, "loras[0].scale"),
    ("unknown control", {"control": {"id": "nope", "image": png_b64()}}, "control.id"),
    ("control not an image", {"control": {"id": "edges", "image": "aGVsbG8="}}, "control.image"),
    ("control not base64", {"control": {"id": "edges", "image": "***"}}, "control.image"),
    (
        "control scale > 2",
        {"control": {"id": "edges", "image": png_b64(), "scale": 3}},
        "control.scale",
    ),
    (
        "control start = end",
        {"control": {"id": "edges", "image": png_b64(), "start": 0.5, "end": 0.5}},
        "control",
    ),
    (
        "control end > 1",
        {"control": {"id": "edges", "image": png_b64(), "end": 1.5}},
        "control.end",
    ),
    ("control without image", {"control": {"id": "edges"}}, "control.image"),
    ("four controls", {"controls": [{"id": "edges", "image": png_b64()}] * 4}, "controls"),
    (
        "control and controls",
        {
            "control": {"id": "edges", "image": png_b64()},
            "controls": [{"id": "edges", "image": png_b64()}],
        },
        "controls",
    ),
    (
        "unknown control in a list",
        {"controls": [{"id": "edges", "image": png_b64()}, {"id": "nope", "image": png_b64()}]},
        "controls[1].id",
    ),
    (
        "preprocessor not configured",
        {"controls": [{"id": "edges", "image": png_b64(), "preprocess": "depth"}]},
        "controls[0].preprocess",
    ),
    (
        "unknown preprocessor",
        {"controls": [{"id": "edges", "image": png_b64(), "preprocess": "hed"}]},
        "controls[0].preprocess",
    ),
    (
        "options for scribble",
        {
            "controls": [
                {
                    "id": "edges",
                    "image": png_b64(),
                    "preprocess": "scribble",
                    "options": {"low_threshold": 1},
                }
            ]
        },
        "controls[0].options",
    ),
    (
        "canny low not below high",
        {
            "controls": [
                {
                    "id": "edges",
                    "image": png_b64(),
                    "preprocess": "canny",
                    "options": {"low_threshold": 200, "high_threshold": 100},
                }
            ]
        },
        "controls[0].options",
    ),
    (
        "canny threshold over 255",
        {
            "controls": [
                {
                    "id": "edges",
                    "image": png_b64(),
                    "preprocess": "canny",
                    "options": {"high_threshold": 300},
                }
            ]
        },
        "controls[0].options.high_threshold",
    ),
    (
        "controls image not an image",
        {"controls": [{"id": "edges", "image": "aGVsbG8="}]},
        "controls[0].image",
    ),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD, ids=[c[0] for c in BAD])
def test_bad_adapters_are_a_422_naming_the_field(
    service: Gateway, case: str, body: dict[str, Any], field: str
) -> None:
    with service.client() as client:
        response = post(client, **body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(field), error
    assert "Traceback" not in response.text


def test_a_photo_through_canny_is_the_job_of_its_canny_map(service: Gateway) -> None:
    """`preprocess: canny` in the worker gives the image that sending OpenCV's edges of the
    photo as the map gives; the models list names the preprocessors."""
    import cv2
    import numpy as np

    photo = Image.new("RGB", (64, 64), (90, 110, 120))
    photo.paste((230, 40, 40), (10, 12, 40, 44))
    photo.paste((20, 30, 200), (36, 30, 60, 58))
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    edges = cv2.Canny(np.asarray(photo), 50, 150)
    mapped = io.BytesIO()
    Image.fromarray(edges).convert("RGB").save(mapped, format="PNG")
    canny = {
        "id": "edges",
        "image": base64.b64encode(buffer.getvalue()).decode(),
        "preprocess": "canny",
        "options": {"low_threshold": 50, "high_threshold": 150},
    }
    as_map = {"id": "edges", "image": base64.b64encode(mapped.getvalue()).decode()}
    with service.client() as client:
        entry = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == MODEL)
        assert entry["preprocessors"] == ["canny", "scribble", "pose"]
        response = post(client, controls=[canny])
        assert response.status_code == 202, response.text
        shown = response.json()["request"]["controls"][0]
        assert shown["preprocess"] == "canny" and shown["options"]["low_threshold"] == 50
        preprocessed = run(client, controls=[canny])
        given = run(client, control=as_map)
        plain = run(client)
    pixels = [np.asarray(Image.open(io.BytesIO(png))) for png in (preprocessed, given, plain)]
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_controls_combine_with_an_input_image_and_a_mask(service: Gateway) -> None:
    with service.client() as client:
        picture = png_b64(box=(0, 0, 64, 32))
        mask = png_b64(box=(0, 32, 64, 64))
        edges = {"id": "edges", "image": png_b64(box=(20, 20, 44, 44))}
        img2img = run(client, image=picture, strength=0.6)
        controlled = run(client, image=picture, strength=0.6, controls=[edges])
        inpainted = run(client, image=picture, mask=mask, controls=[edges])
    assert controlled != img2img
    kept = np.asarray(Image.open(io.BytesIO(inpainted)))[:32]
    assert np.array_equal(kept, np.asarray(Image.open(io.BytesIO(base64.b64decode(picture))))[:32])


def test_the_preview_is_the_map_a_job_uses(service: Gateway) -> None:
    """POST /v1/control/preprocess answers the map a worker makes, at the model's size."""
    import cv2
    import numpy as np

    photo = Image.new("RGB", (96, 80), (90, 110, 120))
    photo.paste((230, 40, 40), (10, 12, 50, 60))
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    sent = base64.b64encode(buffer.getvalue()).decode()
    resized = photo.resize((64, 64), Image.Resampling.LANCZOS)
    with service.client() as client:
        body = {"model": MODEL, "image": sent, "preprocess": "canny"}
        answer = client.post("/v1/control/preprocess", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "image/png"
        job = client.get(f"/v1/generations/{answer.headers['x-job-id']}").json()
        assert job["request"]["task"] == "preprocess" and job["status"] == "succeeded"
        edges = cv2.Canny(np.asarray(resized), 100, 200)
        got = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"))
        assert np.array_equal(got, np.stack([edges] * 3, axis=-1))
        plain = client.post("/v1/control/preprocess", json={**body, "preprocess": "none"})
        assert np.array_equal(
            np.asarray(Image.open(io.BytesIO(plain.content)).convert("RGB")), np.asarray(resized)
        )
        for bad, field in [
            ({"preprocess": "depth"}, "preprocess"),
            ({"preprocess": "scribble", "options": {"low_threshold": 1}}, "options"),
            ({"image": "aGVsbG8="}, "image"),
            ({"model": "nope"}, "model"),
            ({"width": 4096, "height": 4096}, "width"),
        ]:
            refused = client.post("/v1/control/preprocess", json={**body, **bad})
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["message"].startswith(field), refused.text


def test_the_pose_preview_is_the_vitpose_bodies_drawn_as_openpose(
    service: Gateway, pose_model_dir: Path
) -> None:
    import numpy as np

    from worker.preprocessors import Preprocessors

    photo = Image.new("RGB", (80, 96), (200, 190, 170))
    photo.paste((40, 60, 150), (30, 10, 50, 90))  # a standing figure, more or less
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    body = {"model": MODEL, "image": base64.b64encode(buffer.getvalue()).decode()}
    with service.client() as client:
        answer = client.post("/v1/control/preprocess", json={**body, "preprocess": "pose"})
        assert answer.status_code == 200, answer.text
        job = run(client, control={"id": "edges", "image": body["image"], "preprocess": "pose"})
    want = Preprocessors(pose_model=str(pose_model_dir)).run(
        "pose", photo.resize((64, 64), Image.Resampling.LANCZOS), {}
    )
    got = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"))
    assert np.array_equal(got, np.asarray(want)) and got.any()
    assert job.startswith(b"\x89PNG")


def test_a_lora_scale_that_is_not_finite_is_a_422(service: Gateway) -> None:
    raw = '{"model": "MODEL", "prompt": "x", "loras": [{"id": "lines", "scale": NaN}]}'
    raw = raw.replace("MODEL", MODEL)
    with service.client() as client:
        response = client.post(
            "/v1/generations", content=raw, headers={"content-type": "application/json"}
        )
    assert response.status_code == 422, response.text
    assert "Traceback" not in response.text


def test_the_control_image_is_resized_stored_with_the_job_and_expired_with_it(
    service: Gateway, redis_conn: redis.Redis
) -> None:
    with service.client() as client:
        response = post(client, control={"id": "edges", "image": png_b64((100, 80))})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        shown = response.json()["request"]["control"]
        # The job shows the file as sent (its digest and size); the worker gets it resized.
        assert shown["image"]["width"] == 100 and shown["image"]["height"] == 80
        assert len(shown["image"]["sha256"]) == 64 and "image" not in shown["image"]
        doc = wait_for_job(client, job_id)
    assert doc["status"] == "succeeded", doc
    kept = stored(redis_conn, input_blob(job_id, "control"))
    assert kept is not None and Image.open(io.BytesIO(kept)).size == (64, 64)
    if STORAGE == "redis":  # S3 objects go with the sweeper (test_object_storage)
        ttl = redis_conn.ttl(Keys.input(job_id, "control"))
        assert 0 < ttl <= redis_conn.ttl(Keys.job(job_id)) + 1


def test_scale_zero_is_the_request_without_the_adapter(service: Gateway) -> None:
    with service.client() as client:
        plain = run(client)
        assert run(client, loras=[{"id": "lines", "scale": 0}]) == plain
        assert run(client, control={"id": "edges", "image": png_b64(), "scale": 0}) == plain
        assert run(client, loras=[{"id": "lines", "scale": 1}]) != plain


def test_no_adapter_leaks_into_a_later_job(service: Gateway) -> None:
    """plain → `lines` → `lines` at 0.5 with control → plain again: the last image is the
    first's bytes; the same after a job with a LoRA canceled mid-loop."""
    with service.client() as client:
        first = run(client)
        with_lora = run(client, loras=[{"id": "lines"}])
        both = run(
            client,
            loras=[{"id": "lines", "scale": 0.5}],
            control={"id": "edges", "image": png_b64()},
        )
        assert len({first, with_lora, both}) == 3
        assert run(client) == first

        response = post(client, steps=150, loras=[{"id": "dots", "scale": 2}])
        job_id = response.json()["id"]
        wait_for_job(client, job_id, until=("running",))
        client.delete(f"/v1/generations/{job_id}")
        assert wait_for_job(client, job_id)["status"] == "canceled"
        assert run(client) == first


def test_sdk_cli_and_openai_endpoint_take_loras_and_control(
    service: Gateway, tmp_path: Path
) -> None:
    """The same request (LoRA `lines` at 0.8, control `edges`) through the Python SDK, the
    CLI and the official `openai` client (extra fields): the same image bytes as over HTTP."""
    import json
    import os
    import subprocess
    import sys

    from imagegen_client import Client
    from openai import OpenAI

    from tests.stack import ROOT

    control_png = base64.b64decode(png_b64())
    body = {
        "loras": [{"id": "lines", "scale": 0.8}],
        "control": {"id": "edges", "image": png_b64()},
    }
    with service.client() as client:
        want = run(client, **body)
    want_pixels = Image.open(io.BytesIO(want)).tobytes()

    with Client(base_url=service.base_url) as sdk:
        result = sdk.generate(
            "a red cube",
            model=MODEL,
            steps=3,
            seed=7,
            loras=[("lines", 0.8)],
            control={"id": "edges", "image": control_png},
        )
    assert result.images[0].data == want

    image_path = tmp_path / "shape.png"
    image_path.write_bytes(control_png)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "imagegen", "generate", "a red cube", "--model", MODEL),
            *("--steps", "3", "--seed", "7", "--lora", "lines:0.8"),
            *("--control", f"edges:{image_path}", "--output", str(tmp_path / "out.png")),
            *("--base-url", service.base_url),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.png").read_bytes() == want

    with OpenAI(base_url=service.base_url + "/v1", api_key="unused", max_retries=0) as openai:
        answer = openai.images.generate(
            prompt="a red cube",
            model=MODEL,
            extra_body={"steps": 3, "seed": 7, **body},
        )
    assert answer.data is not None and answer.data[0].b64_json is not None
    got = base64.b64decode(answer.data[0].b64_json)
    assert Image.open(io.BytesIO(got)).tobytes() == want_pixels
    params = json.loads(Image.open(io.BytesIO(got)).text["parameters"])
    assert params["loras"] == [{"id": "lines", "scale": 0.8}]
    assert params["controls"][0]["id"] == "edges"
