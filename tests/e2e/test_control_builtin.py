"""The whole photo → map → image path offline, on the built-in model: a picture of a shape goes
through the `canny` preprocessor (in the worker) into the `sketch` ControlNet under a prompt
naming other colours and another place; the drawn shape is the picture's, in the prompt's
colours. Read from the pixels with the evaluator's reader."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from builtin_model import data, score
from tests.stack import Gateway, wait_for_job


def _photo(scene: data.Scene, seed: int) -> str:
    batch = data.scenes_from_list([scene], torch.Generator().manual_seed(seed))
    pixels = data.to_uint8(data.render(batch))[0].astype(np.int16)
    noisy = np.clip(pixels + np.random.default_rng(seed).normal(0, 6, pixels.shape), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_photo_through_canny_into_sketch_keeps_its_shape_in_new_colours(stack: Gateway) -> None:
    scene = data.Scene("triangle", "red", "white", "large", "top left")
    prompt = "a large blue triangle at the bottom right on a yellow background"
    readings = []
    with stack.client() as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert "sketch" in [c["id"] for c in models["shapes-64"]["controls"]]
        assert "canny" in models["shapes-64"]["preprocessors"]
        for seed in range(4):
            control = {"id": "sketch", "image": _photo(scene, seed), "preprocess": "canny"}
            body = {"model": "shapes-64", "prompt": prompt, "seed": seed, "controls": [control]}
            job = client.post("/v1/generations", json=body)
            assert job.status_code == 202, job.text
            done = wait_for_job(client, job.json()["id"])
            assert done["status"] == "succeeded", done
            png = client.get(done["images"][0]["url"]).content  # type: ignore[index]
            readings.append(score.read_image(Image.open(io.BytesIO(png))))
    shape_kept = [r.kind == "triangle" and r.position == "top left" for r in readings]
    recoloured = [(r.color, r.background) == ("blue", "yellow") for r in readings]
    assert sum(shape_kept) >= 3 and sum(recoloured) >= 3, readings
