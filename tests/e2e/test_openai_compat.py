"""`POST /v1/images/generations` driven by the official `openai` package against the real stack.

The client is OpenAI's own, pointed at the gateway with `base_url`, exactly as a user of the
OpenAI API would switch over. `max_retries=0` everywhere: the openai package retries 5xx and
timeouts by itself, which would hide the status under test and double the jobs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from openai import AsyncOpenAI, OpenAI
from PIL import Image

from app.schemas import ErrorInfo, GenerationParams, JobDocument, Progress, Timings
from app.waiting import job_failure
from imagegen.cli.redis_server import RedisServer
from imagegen.core.contract import JOB_ID_RE, JobRecord, Keys
from imagegen.core.store import JobStore
from tests.conftest import TINY_MODEL_ID
from tests.stack import Gateway, start_gateway, wait_for_job

# The tiny random model, a few steps: each request takes well under a second on a CPU.
TINY = {"model": TINY_MODEL_ID, "steps": 2}
# Enough work to keep the tiny model's one worker busy while a test's job waits behind it.
BLOCKER = {"model": TINY_MODEL_ID, "steps": 150, "n": 8, "width": 64, "height": 64}


@pytest.fixture
def client(stack: Gateway) -> Iterator[OpenAI]:
    with OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def _png(b64: str | None) -> Image.Image:
    assert b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _parameters(image: Image.Image) -> dict[str, Any]:
    parameters: dict[str, Any] = json.loads(image.info["parameters"])
    return parameters


@pytest.fixture
def busy_tiny_worker(stack: Gateway) -> Iterator[str]:
    """The tiny model's worker, busy with a long job (canceled afterwards); yields its id."""
    with stack.client() as http:
        response = http.post("/v1/generations", json={"prompt": "blocker", **BLOCKER})
        assert response.status_code == 202, response.text
        blocker: str = response.json()["id"]
        wait_for_job(http, blocker, until=("running",))
        yield blocker
        http.delete(f"/v1/generations/{blocker}")


def _jobs_with_prompt(connection: redis.Redis, prompt: str) -> list[JobRecord]:
    """Jobs are not listed by the API; find the ones a request made in Redis."""
    store = JobStore(connection)
    found = []
    for key in connection.scan_iter(match=Keys.job("gen_*"), count=1000):
        job_id = key.decode().removeprefix(Keys.job(""))
        if JOB_ID_RE.fullmatch(job_id):
            record = store.get(job_id)
            if record is not None and record.spec.prompt == prompt:
                found.append(record)
    return found


def _eventually_canceled(connection: redis.Redis, prompt: str) -> JobRecord:
    deadline = time.monotonic() + 10
    while True:
        jobs = _jobs_with_prompt(connection, prompt)
        if len(jobs) == 1 and jobs[0].status == "canceled":
            return jobs[0]
        assert time.monotonic() < deadline, jobs
        time.sleep(0.1)


# -- answers --------------------------------------------------------------------------------------
def test_b64_json_is_the_default_and_an_openai_model_name_means_the_default_model(
    client: OpenAI,
) -> None:
    # Written exactly as for OpenAI, harmless OpenAI-only fields included; steps keeps it quick.
    result = client.images.generate(
        prompt="a red circle on a blue background",
        model="dall-e-2",
        size="64x64",
        quality="standard",
        style="vivid",
        user="user-1234",
        extra_body={"steps": 2},
    )
    assert abs(result.created - time.time()) < 60
    assert result.data is not None and len(result.data) == 1
    assert result.data[0].url is None
    image = _png(result.data[0].b64_json)
    assert image.format == "PNG" and image.size == (64, 64)
    parameters = _parameters(image)
    assert parameters["prompt"] == "a red circle on a blue background"
    assert parameters["model"] == "shapes-64"  # the server's default model
    assert parameters["steps"] == 2


def test_url_format_links_to_the_image_download(client: OpenAI, stack: Gateway) -> None:
    result = client.images.generate(
        prompt="a green square", response_format="url", size="64x64", extra_body=TINY
    )
    assert result.data is not None and len(result.data) == 1
    url = result.data[0].url
    assert url is not None and result.data[0].b64_json is None
    assert url.startswith(stack.base_url + "/v1/generations/gen_"), url
    assert url.endswith("/images/0"), url
    download = httpx.get(url, timeout=30)
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(download.content)).size == (64, 64)


def test_n_images_use_consecutive_seeds(client: OpenAI) -> None:
    result = client.images.generate(
        prompt="two triangles", n=2, size="64x64", extra_body={**TINY, "seed": 7}
    )
    assert result.data is not None and len(result.data) == 2
    seeds = [_parameters(_png(image.b64_json))["seed"] for image in result.data]
    assert seeds == [7, 8]


def test_this_apis_fields_pass_through_extra_body(client: OpenAI) -> None:
    result = client.images.generate(
        prompt="a yellow cross",
        extra_body={
            "seed": 1,
            "steps": 3,
            "model": TINY_MODEL_ID,
            "negative_prompt": "blurry",
            "guidance_scale": 5,
        },
    )
    assert result.data is not None
    parameters = _parameters(_png(result.data[0].b64_json))
    assert parameters["seed"] == 1
    assert parameters["steps"] == 3
    assert parameters["model"] == TINY_MODEL_ID
    assert parameters["negative_prompt"] == "blurry"
    assert parameters["guidance_scale"] == 5.0


def test_async_client_runs_requests_concurrently(stack: Gateway) -> None:
    async def main() -> list[int]:
        async with AsyncOpenAI(
            base_url=stack.base_url + "/v1", api_key="unused", max_retries=0
        ) as sdk:
            results = await asyncio.gather(
                *(
                    sdk.images.generate(
                        prompt=f"circle {seed}", size="64x64", extra_body={**TINY, "seed": seed}
                    )
                    for seed in (11, 12)
                )
            )
        return [_parameters(_png(r.data[0].b64_json))["seed"] for r in results if r.data]

    assert asyncio.run(main()) == [11, 12]


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        ("64by64", "WIDTHxHEIGHT"),
        ("65x64", "multiple of 8"),
        ("64x32", "greater than or equal to 64"),
        ("4096x4096", "pixel cap"),
    ],
)
def test_a_bad_size_is_a_422_naming_size(client: OpenAI, size: str, fragment: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(prompt="x", size=size, extra_body=TINY)
    error = caught.value.body
    assert isinstance(error, dict)  # the openai package hands over the envelope's "error"
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("size: "), error
    assert fragment in error["message"], error
    assert error["details"][0]["field"] == "size"


def test_unknown_and_unsupported_fields_are_rejected(client: OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(prompt="x", extra_body={**TINY, "width": 64})
    assert caught.value.body["details"][0]["field"] == "width"  # type: ignore[index]
    # A transparent background asked for is refused rather than answered opaque.
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(prompt="x", background="transparent", extra_body=TINY)
    assert caught.value.body["details"][0]["field"] == "background"  # type: ignore[index]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(
            prompt="x", output_format="jpeg", output_compression=101, extra_body=TINY
        )
    assert caught.value.body["details"][0]["field"] == "output_compression"  # type: ignore[index]


@pytest.mark.parametrize(("output_format", "magic"), [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_the_images_come_in_the_format_asked_for(
    client: OpenAI, output_format: str, magic: bytes
) -> None:
    result = client.images.generate(
        prompt="a red circle",
        size="64x64",
        output_format=output_format,  # type: ignore[arg-type]
        output_compression=60,
        background="opaque",
        moderation="low",
        extra_body=TINY,
    )
    assert result.data is not None and result.output_format == output_format
    data = base64.b64decode(result.data[0].b64_json or "")
    assert data.startswith(magic) and Image.open(io.BytesIO(data)).size == (64, 64)
    assert result.size == "64x64"


def test_quality_scales_the_model_s_default_steps(client: OpenAI, redis_conn: Any) -> None:
    steps = {}
    for quality in ("low", "medium", "high"):
        client.images.generate(
            prompt=f"quality {quality}", quality=quality,  # type: ignore[arg-type]
            size="64x64", extra_body={"model": TINY_MODEL_ID},
        )  # fmt: skip
        (record,) = _jobs_with_prompt(redis_conn, f"quality {quality}")
        steps[quality] = record.spec.steps
    assert steps["low"] < steps["medium"] < steps["high"]


def test_an_unknown_model_is_named(client: OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(prompt="x", model="sdxl-imaginary")
    assert caught.value.body["details"][0]["field"] == "model"  # type: ignore[index]
    assert "sdxl-imaginary" in caught.value.body["message"]  # type: ignore[index]


def test_failed_jobs_map_to_the_envelope() -> None:
    def ended(status: str, code: str | None) -> JobDocument:
        params = GenerationParams(
            prompt="p", negative_prompt="", width=64, height=64, steps=2, guidance_scale=7.5,
            seed=1, n=1, scheduler="euler", model=TINY_MODEL_ID,
        )  # fmt: skip
        return JobDocument(
            id="gen_AAAAAAAAAAAAAAAAAAAAAA", status=status, created_at="", started_at=None,
            finished_at=None, queue_position=None, progress=Progress(step=0, total_steps=2),
            request=params, images=[], timings=Timings(),
            error=ErrorInfo(code=code, message="why") if code else None,
        )  # fmt: skip

    for code in ("out_of_memory", "worker_lost", "timeout"):
        error = job_failure(ended("failed", code))
        assert (error.status_code, error.code) == (503, "unavailable"), code
        assert "Retry-After" in error.headers
        assert code in error.message and "gen_AAAAAAAAAAAAAAAAAAAAAA" in error.message
    assert (job_failure(ended("failed", "internal")).status_code, "internal") == (500, "internal")
    assert job_failure(ended("canceled", "canceled")).status_code == 409


# -- waiting --------------------------------------------------------------------------------------
def test_a_client_that_leaves_cancels_its_job(
    client: OpenAI, redis_conn: redis.Redis, busy_tiny_worker: str
) -> None:
    prompt = f"abandoned {uuid.uuid4()}"
    with pytest.raises(openai.APITimeoutError):
        client.images.generate(prompt=prompt, extra_body=TINY, timeout=1.0)
    record = _eventually_canceled(redis_conn, prompt)
    assert record.started_at is None  # it never ran: the worker was busy with the blocker


@pytest.fixture(scope="module")
def short_wait_gateway(redis_server: RedisServer, log_dir: Path) -> Iterator[Gateway]:
    """A gateway whose jobs may take about one second, queueing included."""
    gateway = start_gateway(
        redis_server.url,
        log_dir,
        {
            "IMAGEGEN_JOB_TIMEOUT_BASE_S": "1",
            "IMAGEGEN_JOB_TIMEOUT_S_PER_MEGAPIXEL_STEP": "0.001",
        },
        name="openai-short-wait",
    )
    yield gateway
    gateway.proc.stop()


def test_past_the_wait_limit_the_job_is_canceled_and_the_answer_is_503(
    short_wait_gateway: Gateway, redis_conn: redis.Redis, busy_tiny_worker: str
) -> None:
    prompt = f"too slow {uuid.uuid4()}"
    with (
        OpenAI(base_url=short_wait_gateway.base_url + "/v1", api_key="k", max_retries=0) as sdk,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        sdk.images.generate(prompt=prompt, extra_body=TINY, timeout=30)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["Retry-After"]
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "unavailable"
    assert "did not finish within 1 s" in error["message"], error
    _eventually_canceled(redis_conn, prompt)


def test_usage_counts_the_prompt_tokens_as_openai_reports_them(client: OpenAI) -> None:
    # The built-in model's tokenizer is word-level: five words, five tokens.
    result = client.images.generate(
        prompt="a large red circle", extra_body={"negative_prompt": "blue", "steps": 2}
    )
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens) == (5, 0)
    assert result.usage.total_tokens == 5
    assert result.usage.input_tokens_details.text_tokens == 5
    assert result.usage.input_tokens_details.image_tokens == 0


def test_a_streamed_answer_sends_partial_images_then_the_images(client: OpenAI) -> None:
    """`stream=True, partial_images=2` through the official client: previews of the running
    job as `image_generation.partial_image`, then one `image_generation.completed` per image
    (the built-in model, 2 x 40 steps: longer than a preview interval, so previews come)."""
    events = list(
        client.images.generate(
            prompt="a large red circle on a white background",
            stream=True,
            partial_images=2,
            n=2,
            output_format="webp",
            extra_body={"steps": 40, "seed": 5},
        )
    )
    kinds = [event.type for event in events]
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    done = [e for e in events if e.type == "image_generation.completed"]
    assert 1 <= len(partial) <= 2 and len(done) == 2, kinds
    assert kinds.index("image_generation.completed") > kinds.index("image_generation.partial_image")
    assert [e.partial_image_index for e in partial] == list(range(len(partial)))
    for event in done:
        assert base64.b64decode(event.b64_json).startswith(b"RIFF")
        assert event.output_format == "webp" and event.size == "64x64"
        assert event.usage.input_tokens == 8  # "a large red circle on a white background"
