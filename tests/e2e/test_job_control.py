"""Live job control: events, exact queue position, cancel while running, idempotent submit."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import redis

from tests.conftest import TINY_MODEL_ID
from tests.stack import Gateway, parse_sse, read_events, submit, wait_for_job


def _submit(client: httpx.Client, **body: object) -> str:
    return submit(client, model=TINY_MODEL_ID, **body)


def test_events_go_queued_running_progress_succeeded(stack: Gateway) -> None:
    with stack.client() as client:
        blocker = _submit(client, prompt="blocker", steps=60)  # keeps the worker busy
        job = _submit(client, prompt="watched", steps=40)
        events = read_events(client, job)
        wait_for_job(client, blocker)
    names = [name for name, _ in events]
    assert names[0] == "queued", names
    assert names[1] == "running", names
    assert names[-1] == "succeeded", names
    progress = [data for name, data in events if name == "progress"]
    assert len(progress) >= 3, names
    steps = [p["progress"]["step"] for p in progress]  # type: ignore[index]
    assert steps == sorted(set(steps)), steps
    assert names.count("queued") == names.count("running") == names.count("succeeded") == 1
    assert events[-1][1]["images"]


def test_late_subscriber_gets_the_terminal_event_at_once(stack: Gateway) -> None:
    with stack.client() as client:
        job = _submit(client, prompt="done already", steps=2)
        wait_for_job(client, job)
        # The stream ends after its first event: read to its end, it holds just that one.
        events = read_events(client, job)
    assert [name for name, _ in events] == ["succeeded"]


def test_events_of_an_unknown_job_are_a_404(stack: Gateway) -> None:
    with stack.client() as client:
        response = client.get("/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def _gauge(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _redis_clients(connection: redis.Redis) -> tuple[int, int]:
    """(connections, subscriptions) the gateway holds in Redis."""
    mine = [c for c in connection.client_list() if c["name"] == "imagegen-gateway"]
    return len(mine), sum(int(c["sub"]) + int(c["psub"]) for c in mine)


async def _hundred_streams(base_url: str, job_ids: list[str]) -> list[list[str]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:

        async def one(job_id: str) -> list[str]:
            async with client.stream("GET", f"/v1/generations/{job_id}/events") as response:
                lines = [line async for line in response.aiter_lines()]
                assert response.status_code == 200, lines
            return [name for name, _ in parse_sse(lines)]

        return await asyncio.gather(*(one(job_ids[i % len(job_ids)]) for i in range(100)))


def _settled_tasks(client: httpx.Client, timeout_s: float = 15) -> float:
    """The gateway's asyncio task count once no stream is open and two reads in a row agree
    (closed connections' tasks end asynchronously; an idle keep-alive one within 5 s)."""
    deadline = time.monotonic() + timeout_s
    last = -1.0
    while time.monotonic() < deadline:
        tasks = _gauge(client, "imagegen_gateway_asyncio_tasks")
        if tasks == last and _gauge(client, "imagegen_gateway_event_streams") == 0:
            return tasks
        last = tasks
        time.sleep(0.5)
    raise TimeoutError("the gateway's tasks did not settle")


def test_hundred_concurrent_streams_complete_and_leave_nothing_behind(
    stack: Gateway, redis_conn: redis.Redis
) -> None:
    with stack.client() as client:
        # Two identical rounds first let the connection pools grow to what this load needs
        # (pools keep idle connections by design), so the measured round shows leaks only.
        for _ in range(2):
            warm = [_submit(client, prompt=f"warm {i}", steps=3) for i in range(10)]
            asyncio.run(_hundred_streams(stack.base_url, warm))
        tasks_before = _settled_tasks(client)  # the warm-up's connections have wound down
        redis_before = _redis_clients(redis_conn)
        jobs = [_submit(client, prompt=f"stream {i}", steps=3) for i in range(10)]
        results = asyncio.run(_hundred_streams(stack.base_url, jobs))
        assert all(names[-1] == "succeeded" for names in results), results
        # Closing streams unwind asynchronously, and uvicorn ends an idle keep-alive
        # connection's task after its 5 s keep-alive timeout: allow for both, then insist.
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            settled = (
                _gauge(client, "imagegen_gateway_event_streams") == 0
                and _gauge(client, "imagegen_gateway_asyncio_tasks") <= tasks_before
            )
            if settled:
                break
            time.sleep(0.2)
        assert _gauge(client, "imagegen_gateway_event_streams") == 0
        assert _gauge(client, "imagegen_gateway_asyncio_tasks") <= tasks_before
    connections, subscriptions = _redis_clients(redis_conn)
    # A stream holds no Redis connection or subscription of its own: the hub's two pattern
    # subscriptions (events, previews) on one connection are all there are, before and
    # after. Pooled connections stay open for reuse by design, within the two pools' bound
    # (sync and async, 64 each by default).
    assert subscriptions == redis_before[1] == 2
    assert connections <= 2 * 64 + 1, (redis_before, connections)


def test_cancel_running_job_stops_it_and_the_worker_goes_on(stack: Gateway) -> None:
    with stack.client() as client:
        job = _submit(client, prompt="long", steps=150, n=2)
        doc = wait_for_job(client, job, until=("running",))
        assert doc["status"] == "running"
        deadline = time.monotonic() + 30
        while client.get(f"/v1/generations/{job}").json()["progress"]["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        canceled = client.delete(f"/v1/generations/{job}")
        assert canceled.status_code == 200
        assert canceled.json()["status"] == "canceled"  # in the answer itself, not later
        final = client.get(f"/v1/generations/{job}").json()
        assert final["status"] == "canceled"
        assert final["error"]["code"] == "canceled"
        assert final["progress"]["step"] < 150
        assert client.get(f"/v1/generations/{job}/images/0").status_code == 404
        # The worker stops at its next step and serves the next job.
        after = _submit(client, prompt="next", steps=2)
        assert wait_for_job(client, after, timeout_s=30)["status"] == "succeeded"
        assert client.get(f"/v1/generations/{job}").json()["images"] == []


def test_running_job_reports_an_eta(stack: Gateway) -> None:
    with stack.client() as client:
        job = _submit(client, prompt="eta", steps=100)
        deadline = time.monotonic() + 30
        while True:
            doc = client.get(f"/v1/generations/{job}").json()
            if doc["progress"]["eta_s"] is not None or doc["status"] != "queued":
                if doc["progress"]["eta_s"] is not None:
                    break
                if doc["status"] == "succeeded":
                    raise AssertionError("finished before an eta was seen")
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert doc["progress"]["eta_s"] >= 0
        client.delete(f"/v1/generations/{job}")


def test_concurrent_submits_with_one_idempotency_key_create_one_job(stack: Gateway) -> None:
    body = {"prompt": "idempotent", "model": TINY_MODEL_ID, "steps": 2}
    headers = {"Idempotency-Key": f"key-{time.time_ns()}"}

    def submit(_: int) -> httpx.Response:
        with stack.client() as client:
            return client.post("/v1/generations", json=body, headers=headers)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(submit, range(20)))
    assert sorted(r.status_code for r in responses) == [200] * 19 + [202]
    assert len({r.json()["id"] for r in responses}) == 1
    with stack.client() as client:
        conflict = client.post(
            "/v1/generations", json={**body, "prompt": "different"}, headers=headers
        )
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "conflict"


def test_idempotency_key_longer_than_255_is_rejected(stack: Gateway) -> None:
    with stack.client() as client:
        response = client.post(
            "/v1/generations",
            json={"prompt": "x", "model": TINY_MODEL_ID},
            headers={"Idempotency-Key": "k" * 256},
        )
    assert response.status_code == 422
    assert response.json()["error"]["message"].lower().startswith("idempotency-key")
