"""The whole way, with real processes: HTTP -> gateway -> Redis -> worker -> PNG -> HTTP."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import redis
from PIL import Image

from imagegen.core.contract import Keys, WorkerHeartbeat
from imagegen.core.image_metadata import carried_parameters
from tests.conftest import TINY_MODEL_ID
from tests.stack import Gateway, announce_idle_model, wait_for_job


def test_submit_poll_download(stack: Gateway) -> None:
    with stack.client() as client:
        response = client.post(
            "/v1/generations",
            json={"prompt": "a red circle", "model": TINY_MODEL_ID, "seed": 7, "n": 2, "steps": 3},
        )
        assert response.status_code == 202, response.text
        doc = response.json()
        assert response.headers["location"] == f"/v1/generations/{doc['id']}"
        assert doc["status"] in ("queued", "running", "succeeded")
        assert doc["request"]["scheduler"] == "euler"  # the tiny model's own default
        done = wait_for_job(client, doc["id"])
        assert done["status"] == "succeeded", done
        assert done["queue_position"] is None
        assert done["progress"] == {"step": 3, "total_steps": 3, "eta_s": None}
        assert [i["seed"] for i in done["images"]] == [7, 8]  # type: ignore[index]
        assert done["timings"]["run_s"] > 0  # type: ignore[index]
        for image in done["images"]:  # type: ignore[attr-defined]
            png = client.get(image["url"])
            assert png.status_code == 200
            assert png.headers["content-type"] == "image/png"
            picture = Image.open(io.BytesIO(png.content))
            assert picture.size == (64, 64)
            params = json.loads(picture.text["parameters"])  # type: ignore[attr-defined]
            assert params["seed"] == image["seed"]
            assert params["prompt"] == "a red circle"
            assert params["model"] == TINY_MODEL_ID
            assert {
                "negative_prompt",
                "steps",
                "guidance_scale",
                "width",
                "height",
                "scheduler",
                "version",
            } <= set(params)
        missing = client.get(f"/v1/generations/{doc['id']}/images/2")
        assert missing.status_code == 404


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_jpeg_and_webp_carry_the_parameters_in_exif_and_xmp(
    stack: Gateway, output_format: str, pil_format: str
) -> None:
    body = {"prompt": "a red circle", "model": TINY_MODEL_ID, "seed": 7, "steps": 2}
    with stack.client() as client:
        files = {}
        for compression in (90, 10):
            doc = client.post(
                "/v1/generations",
                json={**body, "output_format": output_format, "output_compression": compression},
            ).json()
            done = wait_for_job(client, doc["id"])
            assert done["request"]["output_format"] == output_format, done
            assert done["request"]["output_compression"] == compression
            image = client.get(done["images"][0]["url"])  # type: ignore[index]
            assert image.headers["content-type"] == f"image/{output_format}"
            assert f".{output_format}" in image.headers["content-disposition"]
            files[compression] = image.content
        png_doc = client.post("/v1/generations", json=body).json()
        png_done = wait_for_job(client, png_doc["id"])
        png = client.get(png_done["images"][0]["url"]).content  # type: ignore[index]
    picture = Image.open(io.BytesIO(files[90]))
    assert picture.format == pil_format
    exif_parameters = json.loads(carried_parameters(files[90]) or "")
    assert exif_parameters == json.loads(Image.open(io.BytesIO(png)).text["parameters"])  # type: ignore[attr-defined]
    assert b"imagegen:parameters=" in picture.info["xmp"]
    # The compression is the encoder's quality: lower quality, fewer bytes, further from the PNG.
    assert len(files[10]) < len(files[90])
    reference = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)

    def error(data: bytes) -> float:
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
        return float(np.abs(reference - decoded).mean())

    assert error(files[90]) < error(files[10])


def test_same_seed_gives_identical_png_bytes(stack: Gateway) -> None:
    body = {"prompt": "a blue square", "model": TINY_MODEL_ID, "seed": 1234, "steps": 4}
    with stack.client() as client:
        ids = [client.post("/v1/generations", json=body).json()["id"] for _ in range(2)]
        other = client.post("/v1/generations", json={**body, "seed": 1235}).json()["id"]
        pngs = []
        for job_id in [*ids, other]:
            assert wait_for_job(client, job_id)["status"] == "succeeded"
            pngs.append(client.get(f"/v1/generations/{job_id}/images/0").content)
    assert pngs[0] == pngs[1]
    assert pngs[0] != pngs[2]


def test_image_i_of_a_job_is_reproduced_by_n1_with_seed_plus_i(stack: Gateway) -> None:
    body = {"prompt": "a green triangle", "model": TINY_MODEL_ID, "steps": 3}
    with stack.client() as client:
        multi = client.post("/v1/generations", json={**body, "seed": 50, "n": 3}).json()["id"]
        single = client.post("/v1/generations", json={**body, "seed": 52}).json()["id"]
        for job_id in (multi, single):
            assert wait_for_job(client, job_id)["status"] == "succeeded"
        third = client.get(f"/v1/generations/{multi}/images/2").content
        alone = client.get(f"/v1/generations/{single}/images/0").content
    assert Image.open(io.BytesIO(third)).tobytes() == Image.open(io.BytesIO(alone)).tobytes()


def test_many_jobs_load_the_pipeline_once(stack: Gateway, redis_conn: redis.Redis) -> None:
    with stack.client() as client:
        ids = [
            client.post(
                "/v1/generations", json={"prompt": f"job {i}", "model": TINY_MODEL_ID, "steps": 1}
            ).json()["id"]
            for i in range(6)
        ]
        for job_id in ids:
            assert wait_for_job(client, job_id)["status"] == "succeeded"
    deadline = time.monotonic() + 30
    while True:  # the next heartbeat after the last job counts it
        raw = redis_conn.get(Keys.worker("tiny-1"))
        beat = WorkerHeartbeat.model_validate_json(raw)  # type: ignore[arg-type]
        if beat.jobs_done >= 6 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert beat.pipelines_loaded == 1
    assert beat.jobs_done >= 6


def test_unknown_job_is_404(stack: Gateway) -> None:
    with stack.client() as client:
        response = client.get("/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_models_lists_the_default_and_the_tiny_model(stack: Gateway) -> None:
    with stack.client() as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["shapes-64"]["default"] is True
    assert models["shapes-64"]["width"] == models["shapes-64"]["height"] == 64
    assert models["shapes-64"]["workers"] == 1
    assert models[TINY_MODEL_ID]["default"] is False
    assert "dpmpp_2m_karras" in models[TINY_MODEL_ID]["schedulers"]


def test_readyz_and_healthz(stack: Gateway) -> None:
    with stack.client() as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text


def test_default_request_uses_the_builtin_model(stack: Gateway) -> None:
    with stack.client() as client:
        doc = client.post("/v1/generations", json={"prompt": "a red circle"}).json()
        assert doc["request"]["model"] == "shapes-64"
        done = wait_for_job(client, doc["id"])
    assert done["status"] == "succeeded", done


def test_the_default_worker_serves_the_fast_built_in_model_too(stack: Gateway) -> None:
    from builtin_model import data, score

    scene = data.Scene("circle", "red", "blue", "large", "center")
    with stack.client() as client:
        fast = next(
            m for m in client.get("/v1/models").json()["data"] if m["id"] == "shapes-64-fast"
        )
        assert fast["workers"] == 1 and fast["default"] is False
        doc = client.post(
            "/v1/generations", json={"prompt": scene.prompt(), "model": "shapes-64-fast", "seed": 1}
        ).json()
        done = wait_for_job(client, doc["id"])
        assert done["status"] == "succeeded", done
        assert done["request"]["steps"] == 4 and done["request"]["scheduler"] == "ddim"
        picture = Image.open(io.BytesIO(client.get(done["images"][0]["url"]).content))  # type: ignore[index]
    assert json.loads(picture.text["parameters"])["model"] == "shapes-64-fast"  # type: ignore[attr-defined]
    reading = score.read_image(picture)
    assert (reading.background, reading.color) == ("blue", "red"), reading


def test_cancel_queued_job_never_runs(stack: Gateway, redis_conn: redis.Redis) -> None:
    # A model that a worker once announced but that has no live worker: its jobs stay queued.
    announce_idle_model(redis_conn, "idle-model")
    try:
        with stack.client() as client:
            first = client.post("/v1/generations", json={"prompt": "a", "model": "idle-model"})
            second = client.post("/v1/generations", json={"prompt": "b", "model": "idle-model"})
            first_id, second_id = first.json()["id"], second.json()["id"]
            assert client.get(f"/v1/generations/{first_id}").json()["queue_position"] == 0
            assert client.get(f"/v1/generations/{second_id}").json()["queue_position"] == 1
            canceled = client.delete(f"/v1/generations/{first_id}")
            assert canceled.status_code == 200
            assert canceled.json()["status"] == "canceled"
            # The next job moves up; the canceled one is out of the queue.
            assert client.get(f"/v1/generations/{second_id}").json()["queue_position"] == 0
            again = client.delete(f"/v1/generations/{first_id}")
            assert again.json()["status"] == "canceled"
            client.delete(f"/v1/generations/{second_id}")
    finally:
        redis_conn.delete(Keys.model("idle-model"))
        redis_conn.srem(Keys.MODELS, "idle-model")
