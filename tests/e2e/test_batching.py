"""Dynamic batching through the real service: claimed jobs share one denoising loop, keep their
own seeds, prompts and guidance, and can be canceled alone."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest
import redis

from imagegen.cli.redis_server import RedisServer
from imagegen.core.contract import JobRecord, JobStatus, Keys
from imagegen.core.lifecycle import Lifecycle
from tests.stack import (
    Gateway,
    Proc,
    job_spec,
    start_gateway,
    start_worker,
    submit,
    wait_for_job,
    wait_for_worker,
)
from worker.loop import WorkLoop
from worker.runner import JobRunner
from worker.state import WorkerState

MODEL = "tiny"


@pytest.fixture(scope="module")
def batching(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[Gateway, Proc, redis.Redis]]:
    root = tmp_path_factory.mktemp("batching")
    server = RedisServer(root / "redis", appendonly=False).start()
    connection = redis.Redis.from_url(server.url)
    env = {"IMAGEGEN_MODEL": str(tiny_model_dir), "IMAGEGEN_MODEL_ID": MODEL}
    extra = {**env, "IMAGEGEN_BATCH_MAX_IMAGES": "8"}
    worker = start_worker(server.url, root, "b", extra, forked=True)
    wait_for_worker(connection, worker, "b")
    gateway = start_gateway(
        server.url, root, {"IMAGEGEN_DEFAULT_MODEL": MODEL, "IMAGEGEN_MAX_STEPS": "1000"}
    )
    yield gateway, worker, connection
    gateway.proc.stop()
    worker.stop()
    server.stop()


def _busy(client: httpx.Client, steps: int = 1000) -> str:
    """A job that keeps the worker busy while the test fills the queue behind it; cancel it
    to let the worker take what queued up, all at once."""
    blocker = submit(client, prompt="blocker", steps=steps, scheduler="ddim")
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
        batched = [submit(client, **job, **shape) for job in JOBS]
        other_shape = submit(client, prompt="other", steps=9, scheduler="euler_a")
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
            doc = wait_for_job(client, submit(client, **job, **shape))
            solo_pngs.append([client.get(i["url"]).content for i in doc["images"]])  # type: ignore[attr-defined]
    assert batched_pngs == solo_pngs
    starts = [float(connection.hget(Keys.job(j), "started_at") or 0) for j in batched]
    assert len(set(starts)) == 1  # claimed together, by one claim (one start time)...
    other_start = float(connection.hget(Keys.job(other_shape), "started_at") or 0)
    assert other_start > max(starts)  # ...and the other shape waited for its own loop
    assert "batched 3 queued job(s)" in worker.log()
    assert connection.zcard(Keys.running(MODEL)) == 0  # every job left the running set
    assert all(connection.ttl(Keys.job(j)) > 0 for j in batched)


def test_a_job_canceled_mid_batch_leaves_the_others_alone(
    batching: tuple[Gateway, Proc, redis.Redis],
) -> None:
    gateway, _, _ = batching
    shape = {"steps": 60, "scheduler": "dpmpp_2m", "width": 64, "height": 64}
    with gateway.client() as client:
        blocker = _busy(client)
        jobs = [submit(client, prompt=f"long {i}", seed=i, **shape) for i in range(3)]
        client.delete(f"/v1/generations/{blocker}")
        deadline = time.monotonic() + 60
        while client.get(f"/v1/generations/{jobs[1]}").json()["progress"]["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.delete(f"/v1/generations/{jobs[1]}").json()["status"] == "canceled"
        docs = [wait_for_job(client, job, timeout_s=120) for job in jobs]
    assert [d["status"] for d in docs] == ["succeeded", "canceled", "succeeded"]
    assert docs[1]["images"] == []


def _queue_job(connection: redis.Redis, model: str, **changes: object) -> str:
    """A queued job written as the gateway writes one (the lifecycle's submit script)."""
    record = JobRecord(
        id=secrets.token_hex(8),
        status=JobStatus.QUEUED,
        spec=job_spec(model=model, **changes),
        created_at=time.time(),
    )
    assert Lifecycle(connection).submit(record, max_depth=100).outcome == "created"
    return record.id


class _FakeTime:
    """The claim loop's clock and sleep: each poll advances the clock by `step_s` and runs
    whatever the test scheduled for that poll, so nothing depends on real time."""

    def __init__(self, step_s: float = 0.005) -> None:
        self.now = 0.0
        self.step_s = step_s
        self.polls = 0
        self.on_poll: dict[int, Callable[[], object]] = {}

    def clock(self) -> float:
        return self.now

    def sleep(self, _seconds: float) -> None:
        self.polls += 1
        self.now += self.step_s
        action = self.on_poll.get(self.polls)
        if action is not None:
            action()


def _loop(connection: redis.Redis, model: str, max_wait_s: float, fake: _FakeTime) -> WorkLoop:
    state = WorkerState()
    return WorkLoop(
        connection,
        Lifecycle(connection),
        cast(JobRunner, None),  # claiming only
        state,
        model,
        "w",
        max_images=4,
        max_wait_s=max_wait_s,
        clock=fake.clock,
        sleep=fake.sleep,
    )


def _queued(connection: redis.Redis, model: str) -> list[str]:
    return [i.decode() for i in connection.zrange(Keys.queue(model), 0, -1)]


def test_max_wait_fills_a_batch_with_jobs_that_arrive_meanwhile(redis_conn: redis.Redis) -> None:
    model = f"wait-{secrets.token_hex(4)}"

    # Default: no wait. The leader and what is queued now, nothing that comes later.
    leader, waiting_now = _queue_job(redis_conn, model), _queue_job(redis_conn, model)
    fake = _FakeTime()
    batch = _loop(redis_conn, model, 0.0, fake).claim()
    assert [job.id for job in batch] == [leader, waiting_now] and fake.polls == 0
    assert all(job.record.status == JobStatus.RUNNING for job in batch)

    # A max wait takes what arrives meanwhile, and stops as soon as the image budget (4) is
    # full: the job queued at poll 1 (n=2) fills it, so there is no poll 2.
    leader, waiting_now = _queue_job(redis_conn, model), _queue_job(redis_conn, model)
    fake = _FakeTime()
    late: list[str] = []
    fake.on_poll[1] = lambda: late.append(_queue_job(redis_conn, model, n=2))
    fake.on_poll[2] = lambda: late.append(_queue_job(redis_conn, model))
    loop = _loop(redis_conn, model, 2.0, fake)
    batch = loop.claim()
    assert [job.id for job in batch] == [leader, waiting_now, late[0]] and fake.polls == 1
    assert loop.state.job_ids() == [job.id for job in batch]  # each listed as claimed
    assert _queued(redis_conn, model) == []

    # A job of another shape waiting in the queue ends the wait: it is better served next.
    leader = _queue_job(redis_conn, model)
    fake = _FakeTime()
    fake.on_poll[3] = lambda: late.append(_queue_job(redis_conn, model, steps=5))
    batch = _loop(redis_conn, model, 2.0, fake).claim()
    assert [job.id for job in batch] == [leader] and fake.polls == 3
    assert _queued(redis_conn, model) == [late[-1]]
    redis_conn.delete(Keys.queue(model))

    # With room left and nothing else waiting, it gives up at the deadline (0.3 s of polls).
    leader = _queue_job(redis_conn, model)
    fake = _FakeTime(step_s=0.1)
    batch = _loop(redis_conn, model, 0.3, fake).claim()
    assert [job.id for job in batch] == [leader] and fake.polls == 3
