"""Dynamic batching through the real service: claimed jobs share one denoising loop, keep their
own seeds, prompts and guidance, go through RQ's registries, and can be canceled alone."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from rq import Queue
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from app.service import JOB_FUNCTION
from imagegen.contract import JobRecord, JobSpec, JobStatus, Keys
from imagegen.redis_server import RedisServer
from imagegen.store import JobStore
from tests.stack import Gateway, Proc, start_gateway, start_worker, wait_for_job, wait_for_worker
from worker.batching import Batcher

MODEL = "tiny"


@pytest.fixture(scope="module")
def batching(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[Gateway, Proc, redis.Redis]]:
    root = tmp_path_factory.mktemp("batching")
    server = RedisServer(root / "redis", appendonly=False).start()
    connection = redis.Redis.from_url(server.url)
    env = {"IMAGEGEN_MODEL": str(tiny_model_dir), "IMAGEGEN_MODEL_ID": MODEL}
    worker = start_worker(server.url, root, "b", {**env, "IMAGEGEN_BATCH_MAX_IMAGES": "8"})
    wait_for_worker(connection, worker, "b")
    gateway = start_gateway(
        server.url, root, {"IMAGEGEN_DEFAULT_MODEL": MODEL, "IMAGEGEN_MAX_STEPS": "1000"}
    )
    yield gateway, worker, connection
    gateway.proc.stop()
    worker.stop()
    server.stop()


def _submit(client: httpx.Client, **body: object) -> str:
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def _busy(client: httpx.Client, steps: int = 1000) -> str:
    """A job that keeps the worker busy while the test fills the queue behind it; cancel it
    to let the worker take what queued up, all at once."""
    blocker = _submit(client, prompt="blocker", steps=steps, scheduler="ddim")
    deadline = time.monotonic() + 30
    while client.get(f"/v1/generations/{blocker}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return blocker


JOBS = [
    {"prompt": "a red circle", "seed": 11, "n": 2, "guidance_scale": 7.5},
    {"prompt": "a blue square", "negative_prompt": "red", "seed": 12, "guidance_scale": 1.0},
    {"prompt": "a green triangle", "seed": 13, "n": 2, "guidance_scale": 0.0},
    {"prompt": "a pink cross", "seed": 14, "guidance_scale": 3.0},
]


def test_compatible_jobs_share_a_loop_and_match_their_solo_runs(
    batching: tuple[Gateway, Proc, redis.Redis],
) -> None:
    gateway, worker, connection = batching
    shape = {"steps": 8, "scheduler": "euler_a", "width": 64, "height": 64}
    with gateway.client() as client:
        blocker = _busy(client)
        batched = [_submit(client, **job, **shape) for job in JOBS]
        other_shape = _submit(client, prompt="other", steps=9, scheduler="euler_a")
        client.delete(f"/v1/generations/{blocker}")
        docs = [wait_for_job(client, job) for job in [*batched, other_shape]]
        assert all(d["status"] == "succeeded" for d in docs), docs
        batched_pngs = [
            [client.get(i["url"]).content for i in doc["images"]]  # type: ignore[attr-defined]
            for doc in docs[:4]
        ]
        # The same jobs alone, one at a time (nothing else queued): byte-identical images.
        solo_pngs = []
        for job in JOBS:
            doc = wait_for_job(client, _submit(client, **job, **shape))
            solo_pngs.append([client.get(i["url"]).content for i in doc["images"]])  # type: ignore[attr-defined]
    assert batched_pngs == solo_pngs
    starts = [float(connection.hget(Keys.job(j), "started_at") or 0) for j in batched]
    assert max(starts) - min(starts) < 0.5  # claimed together...
    other_start = float(connection.hget(Keys.job(other_shape), "started_at") or 0)
    assert other_start > max(starts)  # ...and the other shape waited for its own loop
    assert "batched 3 queued job(s)" in worker.log()
    finished = FinishedJobRegistry(f"imagegen:{MODEL}", connection=connection)
    assert set(batched) <= set(finished.get_job_ids())  # followers went through RQ too


def test_a_job_canceled_mid_batch_leaves_the_others_alone(
    batching: tuple[Gateway, Proc, redis.Redis],
) -> None:
    gateway, _, _ = batching
    shape = {"steps": 300, "scheduler": "dpmpp_2m", "width": 64, "height": 64}
    with gateway.client() as client:
        blocker = _busy(client)
        jobs = [_submit(client, prompt=f"long {i}", seed=i, **shape) for i in range(3)]
        client.delete(f"/v1/generations/{blocker}")
        deadline = time.monotonic() + 60
        while client.get(f"/v1/generations/{jobs[1]}").json()["progress"]["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.delete(f"/v1/generations/{jobs[1]}").json()["status"] == "canceled"
        docs = [wait_for_job(client, job, timeout_s=120) for job in jobs]
    assert [d["status"] for d in docs] == ["succeeded", "canceled", "succeeded"]
    assert docs[1]["images"] == []


def _spec(**changes: object) -> JobSpec:
    """A 64x64, 4-step euler job of the tiny model, with `changes`."""
    fields: dict[str, object] = {
        "prompt": "p",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 4.0,
        "seed": 1,
        "n": 1,
        "scheduler": "euler",
        "model": MODEL,
    }
    return JobSpec.model_validate({**fields, **changes})


def _queue_job(connection: redis.Redis, queue: Queue, **changes: object) -> str:
    """A queued job written as the gateway writes one: its record, then RQ's enqueue."""
    record = JobRecord(
        id=secrets.token_hex(8),
        status=JobStatus.QUEUED,
        spec=_spec(**changes),
        created_at=time.time(),
    )
    with connection.pipeline() as pipe:
        JobStore(connection).create(record, pipe)
        pipe.execute()
    queue.enqueue_call(JOB_FUNCTION, args=(record.id,), job_id=record.id)
    return record.id


def _leader() -> JobSpec:
    return _spec(prompt="leader", seed=0)


def test_max_wait_fills_a_batch_with_jobs_that_arrive_meanwhile(redis_conn: redis.Redis) -> None:
    name = f"imagegen:wait-{secrets.token_hex(4)}"
    queue = Queue(name, connection=redis_conn, serializer=JSONSerializer)
    late: list[str] = []

    def submit_later(delay_s: float, **changes: object) -> threading.Thread:
        def run() -> None:
            time.sleep(delay_s)
            late.append(_queue_job(redis_conn, queue, **changes))

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    # Default: no wait; a job queued 0.2 s later is not taken.
    waiting_now = _queue_job(redis_conn, queue)
    thread = submit_later(0.2)
    claimed = Batcher(redis_conn, name, max_images=4).claim(_leader(), "w")
    thread.join()
    assert [c.record.id for c in claimed] == [waiting_now]
    assert redis_conn.lrange(queue.key, 0, -1) == [late[0].encode()]
    redis_conn.delete(queue.key)
    late.clear()

    # A max wait of 2 s takes what arrives meanwhile and stops waiting as soon as the image
    # budget is full, not at the deadline; each claimed job is announced as it is claimed.
    waiting_now = _queue_job(redis_conn, queue)
    threads = [submit_later(0.2, n=2), submit_later(0.4)]
    announced: list[str] = []
    started = time.monotonic()
    claimed = Batcher(redis_conn, name, max_images=4, max_wait_s=2.0).claim(
        _leader(), "w", announced.append
    )
    elapsed = time.monotonic() - started
    for thread in threads:
        thread.join()
    fits, after_full = late
    assert [c.record.id for c in claimed] == announced == [waiting_now, fits]
    assert all(c.record.status == JobStatus.RUNNING for c in claimed)
    assert redis_conn.lrange(queue.key, 0, -1) == [after_full.encode()]
    assert 0.2 <= elapsed < 0.4
    redis_conn.delete(queue.key)
    late.clear()

    # A job of another shape waiting in the queue ends the wait: it is better served next.
    thread = submit_later(0.2, steps=5)
    started = time.monotonic()
    assert Batcher(redis_conn, name, max_images=4, max_wait_s=2.0).claim(_leader(), "w") == []
    assert 0.2 <= time.monotonic() - started < 1.0
    thread.join()
    redis_conn.delete(queue.key)

    # With room left and nothing else waiting, it gives up at the deadline.
    started = time.monotonic()
    assert Batcher(redis_conn, name, max_images=4, max_wait_s=0.3).claim(_leader(), "w") == []
    assert 0.3 <= time.monotonic() - started < 1.0
