"""Live previews through the real stack: made only while someone watches, small JPEGs of the
current estimate, shown by the SDK and written by the CLI, and never changing the images."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import redis
import torch
from imagegen_client import Client
from PIL import Image

from imagegen.core.contract import Keys
from imagegen.core.settings import Settings
from tests.stack import ROOT, Gateway, parse_sse, wait_for_job
from worker.pipeline import load_model
from worker.previews import LatentProjection, estimate_x0, scale_latents
from worker.schedulers import build_scheduler

# The built-in model: 64x64, 15 to 25 ms a step here; 2 x 60 steps run for 2 to 3 s, several
# preview intervals (0.5 s).
JOB = {"prompt": "a large red circle on a white background", "seed": 5, "steps": 60, "n": 2}


def _jpeg(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    image.load()
    return image


def _published(connection: redis.Redis, job_ids: list[str], stop: threading.Event) -> list[str]:
    """Every preview message published for `job_ids` until `stop` (a subscriber of ours)."""
    seen: list[str] = []
    pubsub = connection.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(*(Keys.previews(j) for j in job_ids))

    def listen() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.1)
            if message is not None:
                seen.append(message["channel"].decode())
        pubsub.close()

    threading.Thread(target=listen, daemon=True).start()
    return seen


def test_previews_come_only_to_those_who_ask_and_change_no_byte(
    stack: Gateway, redis_conn: redis.Redis
) -> None:
    with stack.client() as client:
        watched = client.post("/v1/generations", json=JOB).json()["id"]
        unwatched = client.post("/v1/generations", json=JOB).json()["id"]
        stop = threading.Event()
        published = _published(redis_conn, [watched, unwatched], stop)
        with client.stream("GET", f"/v1/generations/{watched}/events?previews=true") as stream:
            events = parse_sse(list(stream.iter_lines()))
        with client.stream("GET", f"/v1/generations/{unwatched}/events") as stream:
            plain = parse_sse(list(stream.iter_lines()))
        wait_for_job(client, unwatched)
        stop.set()
        images = [
            client.get(f"/v1/generations/{job}/images/{i}").content
            for job in (watched, unwatched)
            for i in range(2)
        ]
    previews = [data for name, data in events if name == "preview"]
    assert len(previews) >= 2, [name for name, _ in events]
    assert events[-1][0] == "succeeded"
    steps = [p["step"] for p in previews]
    assert steps == sorted(steps) and 0 < steps[0] <= steps[-1] <= 60
    picture = _jpeg(str(previews[-1]["image"]))
    assert picture.size == (64, 64) and picture.mode == "RGB"
    assert "preview" not in [name for name, _ in plain]
    # Nothing was made for the job nobody watched, and watching changed no byte.
    assert Keys.previews(unwatched) not in published
    assert published.count(Keys.previews(watched)) == len(previews)
    assert images[:2] == images[2:]


def test_the_sdk_streams_previews_and_the_cli_writes_them(stack: Gateway, tmp_path: Path) -> None:
    with Client(base_url=stack.base_url) as sdk:
        job = sdk.submit(**JOB)  # type: ignore[arg-type]
        events = list(sdk.stream(job, previews=True))
    shown = [e for e in events if e.preview is not None]
    assert shown and all(e.name == "preview" and e.job.id == job.id for e in shown)
    assert Image.open(io.BytesIO(shown[0].preview.jpeg)).format == "JPEG"  # type: ignore[union-attr]
    assert events[-1].name == "succeeded"

    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    out = tmp_path / "out.png"
    result = subprocess.run(
        [sys.executable, "-m", "imagegen", "generate", JOB["prompt"], "-o", str(out),
         "--seed", "5", "--steps", "60", "--previews", str(tmp_path / "previews"),
         "--base-url", stack.base_url],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = sorted((tmp_path / "previews").glob("gen_*-step-*.jpg"))
    assert written and all(Image.open(p).format == "JPEG" for p in written)
    assert f"preview {written[0]}" in result.stderr
    assert out.exists()


def test_the_projection_is_fitted_deterministically_and_reads_colors() -> None:
    model = load_model(Settings())
    first, second = LatentProjection.fit(model.pipe), LatentProjection.fit(model.pipe)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    # A red picture, encoded, projects to something red; and with no noise predicted at the
    # last timestep, the clean estimate is the latents themselves.
    pixels = torch.zeros(1, 3, 64, 64)
    pixels[:, 0] = 1
    with torch.inference_mode():
        encoded = model.pipe.vae.encode(pixels * 2 - 1).latent_dist.mean
    latents = scale_latents(encoded, model.pipe.vae.config)
    red = first.picture(latents[0], 64, 64).getpixel((32, 32))
    assert isinstance(red, tuple) and red[0] > max(red[1], red[2]) + 50, red
    scheduler = build_scheduler("ddim", model.scheduler_config)
    scheduler.set_timesteps(20)
    x0 = estimate_x0(scheduler, latents, torch.zeros_like(latents), scheduler.timesteps[-1])
    assert torch.allclose(x0, latents / scheduler.alphas_cumprod[scheduler.timesteps[-1]].sqrt())
