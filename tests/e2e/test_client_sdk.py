"""The Python SDK (client/, `imagegen_client`) driven against the real gateway and workers.

Every method of `Client` and `AsyncClient` runs against the running stack, and so do the 503
retry (a gateway whose default model has no worker) and connection-refused retries. Fakes only
where the server cannot produce the case: a 429 (no rate limit yet) and a failed job (a job
cannot be made to fail on purpose) are answered by httpx's MockTransport with real job
documents, and a proxy that breaks the event stream is a transport wrapped around the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import imagegen_client
import pytest
from imagegen_client import (
    AsyncClient,
    Client,
    Conflict,
    ImagegenError,
    InvalidRequest,
    Job,
    JobCanceled,
    JobFailed,
    NetworkError,
    NotFound,
    QueueFull,
    RateLimited,
    RetryPolicy,
    Unavailable,
    WaitTimeout,
)

from imagegen.cli.redis_server import RedisServer, free_port
from tests.conftest import TINY_MODEL_ID
from tests.stack import Gateway, start_gateway

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UNKNOWN_JOB = "gen_AAAAAAAAAAAAAAAAAAAAAA"
# Enough steps of the tiny model to keep its one worker busy while a test looks at the queue.
BLOCKER_STEPS = 150


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGEN_API_KEY", raising=False)
    monkeypatch.delenv("IMAGEGEN_BASE_URL", raising=False)


@pytest.fixture
def client(stack: Gateway) -> Iterator[Client]:
    with Client(base_url=stack.base_url) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def no_worker_gateway(redis_server: RedisServer, log_dir: Path) -> Iterator[Gateway]:
    """A gateway whose default model has no worker: a submit naming no model is a real 503."""
    gateway = start_gateway(
        redis_server.url, log_dir, {"IMAGEGEN_DEFAULT_MODEL": "absent"}, name="sdk-no-worker"
    )
    yield gateway
    gateway.proc.stop()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the SDK's waits (sync and async) instead of waiting."""
    recorded: list[float] = []

    async def async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(imagegen_client._client, "_sleep", recorded.append)
    monkeypatch.setattr(imagegen_client._async_client, "_sleep", async_sleep)
    return recorded


def _png_parameters(data: bytes) -> dict[str, Any]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        parameters: dict[str, Any] = json.loads(image.info["parameters"])
    return parameters


# -- sync client ----------------------------------------------------------------------------------
def test_generate_returns_png_bytes_and_pil_images(client: Client, tmp_path: Path) -> None:
    result = client.generate("a red circle", model=TINY_MODEL_ID, steps=2, n=2, seed=41)
    assert result.job.status == "succeeded"
    assert result.job.request.steps == 2 and result.job.request.model == TINY_MODEL_ID
    assert [image.seed for image in result.images] == [41, 42]
    for image in result.images:
        assert image.data.startswith(PNG_SIGNATURE)
        assert image.pil.size == (image.width, image.height)
        assert _png_parameters(image.data)["seed"] == image.seed
    saved = result.images[1].save(tmp_path / "one.png")
    assert saved.read_bytes() == result.images[1].data


def test_generate_passes_the_output_format(client: Client) -> None:
    result = client.generate(
        "a red circle", model=TINY_MODEL_ID, steps=2, output_format="webp", output_compression=50
    )
    assert result.job.request.output_format == "webp"
    assert result.images[0].pil.format == "WEBP"


def test_generate_takes_controls_with_a_preprocessor(client: Client, stack: Gateway) -> None:
    from PIL import Image

    picture = Image.new("RGB", (64, 64), (250, 250, 250))
    picture.paste((200, 30, 30), (8, 8, 40, 40))  # a PIL image, encoded by the SDK
    control = {"id": "sketch", "image": picture, "preprocess": "canny"}
    common = {"model": "shapes-64", "steps": 4, "seed": 3}
    result = client.generate(
        "a large blue square on a yellow background", controls=[control], **common
    )
    plain = client.generate("a large blue square on a yellow background", **common)
    doc = httpx.get(f"{stack.base_url}/v1/generations/{result.job.id}").json()
    assert doc["request"]["controls"][0]["preprocess"] == "canny"
    assert result.images[0].data != plain.images[0].data


def test_submit_get_stream_wait_download(client: Client) -> None:
    job = client.submit("a blue square", model=TINY_MODEL_ID, steps=3, seed=7, negative_prompt="")
    assert job.status in ("queued", "running", "succeeded")
    assert job.request.seed == 7

    events = list(client.stream(job))
    names = [event.name for event in events]
    assert names[-1] == "succeeded", names
    assert all(not event.job.is_terminal for event in events[:-1]), names
    assert all(event.job.id == job.id for event in events)

    fetched = client.get(job.id)
    assert fetched.status == "succeeded" and fetched.images == events[-1].job.images
    assert client.wait(job, timeout=30).status == "succeeded"
    assert client.wait(job, timeout=0).status == "succeeded"  # finished: no time needed

    png = client.download(job.id, 0)
    assert png.startswith(PNG_SIGNATURE)
    assert png == client.download(fetched, fetched.images[0].index)
    assert client.cancel(job).status == "succeeded"  # finished: a no-op


def test_cancel_wait_timeout_and_generate_timeout(client: Client) -> None:
    blocker = client.submit("blocker", model=TINY_MODEL_ID, steps=BLOCKER_STEPS)
    try:
        queued = client.submit("behind the blocker", model=TINY_MODEL_ID, steps=2)
        with pytest.raises(WaitTimeout) as timed_out:
            client.wait(queued, timeout=0.3)
        assert timed_out.value.job.id == queued.id and not timed_out.value.job.is_terminal

        assert client.cancel(queued).status == "canceled"
        with pytest.raises(JobCanceled) as canceled:
            client.wait(queued, timeout=30)
        assert canceled.value.job.id == queued.id

        # generate() gives up on its own job when its wait times out.
        with pytest.raises(WaitTimeout) as gave_up:
            client.generate("never waited for", model=TINY_MODEL_ID, steps=2, timeout=0.3)
        assert client.get(gave_up.value.job).status == "canceled"
    finally:
        client.cancel(blocker)
    with pytest.raises(JobCanceled):
        client.wait(blocker, timeout=60)  # a running job stops at its next step


def test_api_errors_are_typed_and_carry_the_envelope(client: Client) -> None:
    with pytest.raises(NotFound) as not_found:
        client.get(UNKNOWN_JOB)
    error = not_found.value
    assert (error.status_code, error.code) == (404, "not_found")
    assert UNKNOWN_JOB in error.message and "not_found" in str(error)
    with pytest.raises(NotFound):
        next(client.stream(UNKNOWN_JOB))

    with pytest.raises(InvalidRequest) as invalid:
        client.submit("odd width", model=TINY_MODEL_ID, width=65)
    assert invalid.value.status_code == 422
    assert [detail["field"] for detail in invalid.value.details] == ["width"]

    with pytest.raises(NotFound):
        client.download(UNKNOWN_JOB, 0)


def test_request_id_comes_from_the_x_request_id_header(stack: Gateway) -> None:
    with Client(base_url=stack.base_url) as client, pytest.raises(NotFound) as info:
        client.get(UNKNOWN_JOB)
    # The gateway makes one per request and echoes it; the error carries it.
    assert info.value.request_id is not None
    assert re.fullmatch(r"[0-9a-f]{32}", info.value.request_id)


def test_idempotency_key_replays_and_conflicts(client: Client) -> None:
    key = f"sdk-{uuid.uuid4()}"
    first = client.submit("same", model=TINY_MODEL_ID, steps=2, idempotency_key=key)
    again = client.submit("same", model=TINY_MODEL_ID, steps=2, idempotency_key=key)
    assert again.id == first.id
    with pytest.raises(Conflict) as conflict:
        client.submit("different", model=TINY_MODEL_ID, steps=2, idempotency_key=key)
    assert conflict.value.status_code == 409
    client.wait(first, timeout=60)


def test_settings_come_from_the_environment(
    stack: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEGEN_BASE_URL", stack.base_url + "/")
    monkeypatch.setenv("IMAGEGEN_API_KEY", "sk-from-env")
    with Client() as client:
        assert client.base_url == stack.base_url
        assert client._http.headers["Authorization"] == "Bearer sk-from-env"
        models = {model.id: model for model in client.models()}  # an open server ignores it
    assert TINY_MODEL_ID in models and models[TINY_MODEL_ID].workers >= 1
    with Client(api_key="sk-arg", base_url="http://example.invalid") as client:
        assert client._http.headers["Authorization"] == "Bearer sk-arg"
    with pytest.raises(ValueError, match="not both"):
        Client(max_retries=1, retry_policy=RetryPolicy())


def test_unavailable_is_retried_after_its_retry_after(
    no_worker_gateway: Gateway, sleeps: list[float]
) -> None:
    client = Client(base_url=no_worker_gateway.base_url, max_retries=2)
    with client, pytest.raises(Unavailable) as info:
        client.submit("no worker for the default model")
    assert info.value.status_code == 503 and info.value.retry_after == 5
    assert sleeps == [5.0, 5.0]


def test_connection_errors_are_retried_with_backoff(sleeps: list[float]) -> None:
    policy = RetryPolicy(max_retries=3, backoff_s=0.5, max_backoff_s=1.0)
    client = Client(base_url=f"http://127.0.0.1:{free_port()}", retry_policy=policy)
    with client, pytest.raises(NetworkError) as info:
        client.get(UNKNOWN_JOB)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(sleeps) == 3
    for wait, ceiling in zip(sleeps, [0.5, 1.0, 1.0], strict=True):
        assert ceiling / 2 <= wait <= ceiling


def test_wait_polls_when_the_event_stream_is_unavailable(stack: Gateway) -> None:
    """A proxy that buffers or blocks text/event-stream must not break wait()."""
    inner = httpx.HTTPTransport()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(200, html="<html>buffered by a proxy</html>")
        return inner.handle_request(request)

    with Client(base_url=stack.base_url, transport=httpx.MockTransport(handler)) as client:
        job = client.submit("polled", model=TINY_MODEL_ID, steps=2)
        assert client.wait(job, timeout=60).status == "succeeded"


def test_rate_limited_submit_is_retried_with_the_same_idempotency_key(
    stack: Gateway, sleeps: list[float]
) -> None:
    inner = httpx.HTTPTransport()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            body = {"error": {"code": "rate_limited", "message": "slow down"}}
            return httpx.Response(429, json=body, headers={"Retry-After": "3"})
        return inner.handle_request(request)

    with Client(base_url=stack.base_url, transport=httpx.MockTransport(handler)) as client:
        job = client.submit("retried", model=TINY_MODEL_ID, steps=2)
        client.wait(job, timeout=60)
    assert sleeps[0] == 3.0
    keys = {request.headers["Idempotency-Key"] for request in seen if request.method == "POST"}
    assert len(keys) == 1


def test_rate_limited_error_carries_retry_after_and_request_id(sleeps: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "rate_limited", "message": "60 requests per minute"}}
        headers = {"Retry-After": "120", "X-Request-ID": "req-123"}
        return httpx.Response(429, json=body, headers=headers)

    transport = httpx.MockTransport(handler)
    client = Client(base_url="http://sdk.test", transport=transport)
    with client, pytest.raises(RateLimited) as info:
        client.get(UNKNOWN_JOB)  # Retry-After above the policy's cap: not waited for
    assert sleeps == []
    error = info.value
    assert (error.code, error.retry_after, error.request_id) == ("rate_limited", 120, "req-123")
    assert "req-123" in str(error)

    policy = RetryPolicy()
    post = httpx.Request("POST", "http://sdk.test/v1/generations")
    assert policy.delay(post, 0, error=error) is None  # a POST without a key is never repeated


def test_retry_after_may_be_an_http_date(sleeps: list[float]) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)

    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "queue_full", "message": "queue of model tiny is full"}}
        return httpx.Response(429, json=body, headers={"Retry-After": when})

    transport = httpx.MockTransport(handler)
    client = Client(base_url="http://sdk.test", max_retries=1, transport=transport)
    with client, pytest.raises(QueueFull) as info:
        client.submit("queued out")
    assert info.value.retry_after is not None and 25 <= info.value.retry_after <= 30
    assert len(sleeps) == 1 and 25 <= sleeps[0] <= 30


def test_failed_job_raises_job_failed(client: Client, stack: Gateway) -> None:
    document = dict(client.generate("template", model=TINY_MODEL_ID, steps=2).job.raw)
    document.update(
        status="failed", images=[], error={"code": "out_of_memory", "message": "CUDA OOM"}
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            text = f"event: failed\ndata: {json.dumps(document)}\n\n"
            return httpx.Response(200, text=text, headers={"Content-Type": "text/event-stream"})
        return httpx.Response(200, json=document)

    failing = Client(base_url=stack.base_url, transport=httpx.MockTransport(handler))
    with failing, pytest.raises(JobFailed) as info:
        failing.wait(document["id"])
    assert info.value.code == "out_of_memory" and info.value.job.error is not None
    assert info.value.job.error.message == "CUDA OOM"
    assert isinstance(info.value, ImagegenError)


# -- async client ---------------------------------------------------------------------------------
def test_async_client_drives_every_method(stack: Gateway) -> None:
    async def scenario() -> None:
        async with AsyncClient(base_url=stack.base_url) as client:
            models = await client.models()
            assert TINY_MODEL_ID in {model.id for model in models}

            result = await client.generate("async circle", model=TINY_MODEL_ID, steps=2, seed=3)
            assert [image.seed for image in result.images] == [3]
            assert result.images[0].pil.size == (result.images[0].width, result.images[0].height)

            job = await client.submit("async square", model=TINY_MODEL_ID, steps=3)
            events = [event async for event in client.stream(job)]
            assert events[-1].name == "succeeded", [event.name for event in events]
            done = await client.wait(job.id, timeout=30)
            assert (await client.wait(job.id, timeout=0)).id == done.id
            assert (await client.get(job)).images == done.images
            assert (await client.download(done, 0)).startswith(PNG_SIGNATURE)

            blocker = await client.submit("async blocker", model=TINY_MODEL_ID, steps=150)
            queued = await client.submit("async queued", model=TINY_MODEL_ID, steps=2)
            with pytest.raises(WaitTimeout):
                await client.wait(queued, timeout=0.3)
            assert (await client.cancel(queued)).status == "canceled"
            assert (await client.cancel(blocker)).id == blocker.id
            with pytest.raises(JobCanceled):
                await client.wait(blocker, timeout=60)

            with pytest.raises(NotFound) as info:
                await client.get(UNKNOWN_JOB)
            assert info.value.status_code == 404
            with pytest.raises(InvalidRequest):
                await client.submit("bad", model=TINY_MODEL_ID, steps=0)

    asyncio.run(scenario())


def test_async_client_honours_retry_after(no_worker_gateway: Gateway, sleeps: list[float]) -> None:
    async def scenario() -> None:
        async with AsyncClient(base_url=no_worker_gateway.base_url, max_retries=1) as client:
            with pytest.raises(Unavailable) as info:
                await client.submit("no worker")
        assert info.value.retry_after == 5

    asyncio.run(scenario())
    assert sleeps == [5.0]


def test_async_wait_polls_when_the_server_has_no_event_stream(stack: Gateway) -> None:
    inner = httpx.AsyncHTTPTransport()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):  # an older server, or a proxy in the way
            return httpx.Response(404, html="<html>Not Found</html>")
        return await inner.handle_async_request(request)

    async def scenario() -> Job:
        transport = httpx.MockTransport(handler)
        async with AsyncClient(base_url=stack.base_url, transport=transport) as client:
            job = await client.submit("polled", model=TINY_MODEL_ID, steps=2)
            return await client.wait(job, timeout=60)

    assert asyncio.run(scenario()).status == "succeeded"


def test_async_stream_can_be_left_early(stack: Gateway) -> None:
    async def scenario() -> Job:
        async with AsyncClient(base_url=stack.base_url) as client:
            job = await client.submit("left early", model=TINY_MODEL_ID, steps=2)
            async with contextlib.aclosing(client.stream(job)) as events:
                async for event in events:
                    assert event.job.id == job.id
                    break
            return await client.wait(job, timeout=60)

    assert asyncio.run(scenario()).status == "succeeded"


def test_wait_ends_at_its_deadline_on_a_quiet_stream(
    client: Client, stack: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued job's stream is silent but for a ping every 15 s; with reads allowed to block
    that long, the wait must still end at its own deadline (sync: the socket is shut; async: a
    cancel scope)."""
    monkeypatch.setattr(
        imagegen_client._base.ClientConfig, "stream_timeout", lambda self, deadline: self.timeout
    )
    blocker = client.submit("quiet blocker", model=TINY_MODEL_ID, steps=BLOCKER_STEPS)
    queued = client.submit("quiet", model=TINY_MODEL_ID, steps=2)
    try:
        with pytest.raises(WaitTimeout):  # the job stays queued: only the timeout ends it
            client.wait(queued, timeout=1.0)

        async def scenario() -> None:
            async with AsyncClient(base_url=stack.base_url) as aclient:
                with pytest.raises(WaitTimeout):
                    await aclient.wait(queued, timeout=1.0)

        asyncio.run(scenario())
    finally:
        client.cancel(queued)
        client.cancel(blocker)
