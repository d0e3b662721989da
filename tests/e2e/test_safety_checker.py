"""A model that ships a safety checker (as Stable Diffusion 1.x/2.x do): a flagged image is
withheld, never a silent black PNG. The tiny pipelines here carry a tiny CLIP safety checker
whose thresholds flag every image, or none; the flags are diffusers' own pipeline's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from diffusers import StableDiffusionPipeline
from imagegen_client import Client
from openai import OpenAI

from builtin_model.tiny import save_tiny_pipeline_with_safety_checker
from imagegen.cli.redis_server import RedisServer
from imagegen.core.contract import FILTERED_MARK
from imagegen.core.settings import Settings
from tests.stack import (
    Gateway,
    Proc,
    batch_job,
    start_worker,
    submit,
    wait_for_job,
    wait_for_worker,
)
from worker.batch_loop import BatchItem, run_batch
from worker.pipeline import load_model

MODEL = "tiny-checked"


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("safety")
    return {
        flags: save_tiny_pipeline_with_safety_checker(root / str(flags), flags_everything=flags)
        for flags in (True, False)
    }


@pytest.mark.parametrize("flags", [True, False])
def test_the_batch_loop_flags_what_diffusers_pipeline_flags(
    checked: dict[bool, Path], flags: bool
) -> None:
    spec = batch_job(n=2, steps=2)
    model = load_model(Settings(model=str(checked[flags]), device="cpu"))
    (ours,) = run_batch(model, [BatchItem(spec)], invariant=True)
    assert isinstance(ours, list)
    stock = StableDiffusionPipeline.from_pretrained(checked[flags])
    stock.set_progress_bar_config(disable=True)
    result = stock(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        height=spec.height,
        width=spec.width,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(spec.image_seed(i)) for i in range(2)],
    )
    assert [bool(image.info.get(FILTERED_MARK)) for image in ours] == [flags, flags]
    assert result.nsfw_content_detected == [flags, flags]
    if not flags:
        assert np.asarray(ours[0]).max() > 0


def test_off_runs_no_checker(checked: dict[bool, Path]) -> None:
    settings = Settings(model=str(checked[True]), device="cpu", safety_checker="off")
    (images,) = run_batch(load_model(settings), [BatchItem(batch_job(steps=2))], invariant=True)
    assert isinstance(images, list) and not images[0].info.get(FILTERED_MARK)
    assert np.asarray(images[0]).max() > 0


@pytest.fixture(scope="module")
def checked_worker(
    redis_server: RedisServer, redis_conn: redis.Redis, log_dir: Path, checked: dict[bool, Path]
) -> Iterator[Proc]:
    env = {"IMAGEGEN_MODEL": str(checked[True]), "IMAGEGEN_MODEL_ID": MODEL}
    proc = start_worker(redis_server.url, log_dir, "checked-1", env, forked=True)
    wait_for_worker(redis_conn, proc, "checked-1")
    yield proc
    proc.stop()


def test_a_flagged_image_is_withheld_on_every_route(gateway: Gateway, checked_worker: Proc) -> None:
    with gateway.client() as client:
        job_id = submit(client, model=MODEL, prompt="a red cube", steps=2, n=2)
        doc = wait_for_job(client, job_id)
        assert doc["status"] == "succeeded", doc
        assert [image["filtered"] for image in doc["images"]] == [True, True]  # type: ignore[index]
        png = client.get(f"/v1/generations/{job_id}/images/0")
        assert png.status_code == 404
        assert png.json()["error"]["code"] == "content_filtered"
    with Client(base_url=gateway.base_url) as sdk:
        generation = sdk.generate("a red cube", model=MODEL, steps=2, n=2)
    assert generation.images == [] and all(ref.filtered for ref in generation.job.images)
    openai = OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)
    raw = openai.images.with_raw_response.generate(
        model=MODEL, prompt="a red cube", n=2, size="64x64", response_format="b64_json"
    )
    assert raw.headers["x-imagegen-filtered"] == "2"
    assert raw.parse().data == []
