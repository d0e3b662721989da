"""The job lifecycle has one owner (imagegen/core/lifecycle.py): crash a worker at every named point
of a job's life, and every job still ends succeeded exactly once, with the bytes of a run that
did not crash, and nothing is left behind.

Real processes throughout: one redis-server and gateway for the module (the database is
flushed before each test), workers started and killed per scenario.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from imagegen_client import Client, JobFailed, QueueFull
from PIL import Image

from imagegen.cli.redis_server import RedisServer
from imagegen.core.contract import ImageInfo, JobRecord, JobSpec, JobStatus, Keys
from imagegen.core.lifecycle import Claimed, Lifecycle
from imagegen.core.settings import Settings
from imagegen.core.store import JobStore
from imagegen.core.trainings import training_lane
from tests.stack import (
    FAST_RECOVERY,
    STORAGE,
    Gateway,
    Proc,
    Supervisor,
    TinyService,
    job_spec,
    parse_sse,
    start_gateway,
    start_worker,
    wait_for_job,
    wait_for_worker,
)
from worker.faults import CRASH_POINTS, CrashPoint
from worker.inference import Inference
from worker.metrics import WorkerMetrics
from worker.pipeline import load_model
from worker.runner import JobRunner
from worker.state import WorkerState

MODEL = "tiny"
FAST = {**FAST_RECOVERY, "IMAGEGEN_WORKER_STALE_S": "3", "IMAGEGEN_WARMUP": "false"}
# Keys that hold no job's data: structure shared by all jobs, kept without a TTL.
STRUCTURAL = (
    Keys.MODELS,
    Keys.RUNNING_MODELS,
    Keys.QUEUE_SEQ,
    Keys.JOB_STATS,
    Keys.KEY_STATS,
    Keys.WEBHOOK_MASTER,
)
STRUCTURAL_PREFIXES = (
    Keys.queue(""),
    Keys.running(""),
    Keys.run_seconds(""),
    f"{Keys.PREFIX}:model:",
    f"{Keys.PREFIX}:rate:",
    # The round each model's fair order serves (one short value per model).
    f"{Keys.PREFIX}:fair:",
)
REQUESTS = [
    {"prompt": "crash me", "seed": 3, "steps": 6, "n": 2},
    {"prompt": "and me", "seed": 9, "steps": 6, "negative_prompt": "blue"},
]


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[TinyService]:
    made = TinyService(tmp_path_factory.mktemp("lifecycle"), tiny_model_dir)
    made.worker().stop()  # learn the model's record, announced again after each flush
    yield made
    made.close()


@pytest.fixture(scope="module")
def reference(cluster: TinyService) -> list[list[bytes]]:
    """The PNGs of REQUESTS from a worker that never crashed."""
    cluster.clean()
    worker = cluster.worker()
    with cluster.gateway.client() as client:
        jobs = [cluster.submit(client, body) for body in REQUESTS]
        docs = [wait_for_job(client, job) for job in jobs]
        pngs = [[client.get(i["url"]).content for i in d["images"]] for d in docs]  # type: ignore[attr-defined]
    worker.stop()
    return pngs


def keys_without_ttl(connection: redis.Redis) -> list[str]:
    """Keys of a job's own (record, images, idempotency, bell, ...) that would never expire."""
    found = []
    for raw in connection.scan_iter(match=f"{Keys.PREFIX}:*", count=1000):
        key = raw.decode()
        if key in STRUCTURAL or key.startswith(STRUCTURAL_PREFIXES):
            continue
        if connection.ttl(key) == -1:
            found.append(key)
    return found


def assert_settled(connection: redis.Redis) -> None:
    """Nothing queued, nothing running, nothing that never expires."""
    assert connection.zcard(Keys.queue(MODEL)) == 0
    assert connection.zcard(Keys.running(MODEL)) == 0
    assert keys_without_ttl(connection) == []


# Every crash point with a batch of two; a job alone only where its outcome differs (rerun, or
# not) — each case starts two workers, and the whole matrix is a tenth of the suite's CI time.
# `after_store` exists only where images are stored before the step that records them (S3).
POINTS = [p for p in CRASH_POINTS if p != "after_store" or STORAGE == "s3"]
CRASH_CASES = [(point, 2) for point in POINTS] + [("mid_loop", 1), ("after_finish", 1)]


@pytest.mark.parametrize(
    ("point", "jobs"),
    CRASH_CASES,
    ids=[f"{point}-{'alone' if jobs == 1 else 'batch-of-2'}" for point, jobs in CRASH_CASES],
)
def test_a_worker_dying_at_any_point_loses_nothing_and_runs_nothing_twice(
    cluster: TinyService, reference: list[list[bytes]], point: str, jobs: int
) -> None:
    cluster.clean()
    with cluster.gateway.client() as client:
        # Queued before any worker runs, so the first claim takes them all in one batch.
        ids = [cluster.submit(client, body) for body in REQUESTS[:jobs]]
        _, crasher = cluster.start_worker(
            IMAGEGEN_FAULT_CRASH_AT=point, IMAGEGEN_BATCH_MAX_IMAGES="4"
        )
        assert crasher.process.wait(timeout=120) == 70, crasher.log()[-3000:]
        rescuer = cluster.worker()
        try:
            docs = [wait_for_job(client, job, timeout_s=60) for job in ids]
            pngs = [[client.get(i["url"]).content for i in d["images"]] for d in docs]  # type: ignore[attr-defined]
        finally:
            rescuer.stop()
    finished_before_crash = point in ("after_finish", "before_next_claim")
    assert [d["status"] for d in docs] == ["succeeded"] * jobs
    attempts = [int(cluster.conn.hget(Keys.job(j), "attempts") or 0) for j in ids]
    assert attempts == [1 if finished_before_crash else 2] * jobs
    assert pngs == reference[:jobs]  # byte for byte, all images present
    stats = JobStore(cluster.conn).job_stats()
    assert stats == {(MODEL, "succeeded"): jobs}  # each succeeded exactly once
    assert_settled(cluster.conn)


def test_jobs_of_a_model_without_live_workers_are_taken_back(cluster: TinyService) -> None:
    cluster.clean()
    with cluster.gateway.client() as client:
        job = cluster.submit(client, {"prompt": "orphan", "steps": 6})
        _, crasher = cluster.start_worker(IMAGEGEN_FAULT_CRASH_AT="mid_loop")
        assert crasher.process.wait(timeout=120) == 70
        assert cluster.conn.zrange(Keys.running(MODEL), 0, -1) == [job.encode()]
        # A worker of another model sweeps every model's running set.
        other = cluster.worker(IMAGEGEN_MODEL_ID="another-model")
        try:
            deadline = time.monotonic() + 30
            while cluster.conn.zcard(Keys.queue(MODEL)) == 0:
                assert time.monotonic() < deadline, "the orphaned job was never taken back"
                time.sleep(0.05)
        finally:
            other.stop()
        doc = client.get(f"/v1/generations/{job}").json()
    assert doc["status"] == "queued" and doc["queue_position"] == 0
    assert cluster.conn.zcard(Keys.running(MODEL)) == 0


def test_the_event_stream_follows_a_take_back(cluster: TinyService) -> None:
    cluster.clean()
    events: list[tuple[str, dict[str, object]]] = []
    with cluster.gateway.client() as client:
        job = cluster.submit(client, {"prompt": "followed", "steps": 6})

        def follow() -> None:
            with client.stream("GET", f"/v1/generations/{job}/events") as response:
                events.extend(parse_sse(list(response.iter_lines())))

        reader = threading.Thread(target=follow)
        reader.start()
        _, crasher = cluster.start_worker(IMAGEGEN_FAULT_CRASH_AT="mid_loop")
        assert crasher.process.wait(timeout=120) == 70
        rescuer = cluster.worker()
        try:
            reader.join(timeout=60)
        finally:
            rescuer.stop()
    names = [name for name, _ in events]
    assert names[0] == "queued" and names[-1] == "succeeded", names
    first_run = names.index("running")
    again = names.index("queued", first_run)  # the take-back is announced...
    assert "running" in names[again:]  # ...and the rerun too
    rerun = names.index("running", again)
    steps = [doc["progress"]["step"] for name, doc in events[rerun:] if name == "progress"]  # type: ignore[index]
    assert steps and steps[0] <= 6 and steps == sorted(steps)


def test_cancel_of_a_queued_job_leaves_no_key_without_a_ttl(cluster: TinyService) -> None:
    cluster.clean()
    with cluster.gateway.client() as client:
        job = cluster.submit(client, {"prompt": "never mind", "steps": 6})
        assert client.delete(f"/v1/generations/{job}").json()["status"] == "canceled"
    assert_settled(cluster.conn)
    assert cluster.conn.ttl(Keys.job(job)) > 0


def _claimed_jobs(connection: redis.Redis, model: str, specs: list[JobSpec]) -> list[Claimed]:
    lifecycle = Lifecycle(connection)
    for i, spec in enumerate(specs):
        record = JobRecord(
            id=f"job-{model}-{i}",
            status=JobStatus.QUEUED,
            spec=spec,
            created_at=time.time(),
            timeout_s=600,
        )
        assert lifecycle.submit(record, max_depth=100).outcome == "created"
    batch, _ = lifecycle.claim(model, "w", budget=100)
    return batch


def _runner(
    connection: redis.Redis, settings: Settings, fault_injection: bool = False
) -> JobRunner:
    """A job runner on the settings' model, as a worker builds it."""
    model = load_model(settings)
    return JobRunner(
        Inference(model),
        Lifecycle(connection),
        settings,
        WorkerState(),
        WorkerMetrics(settings.model_id or "", model.device),
        CrashPoint(None),
        fault_injection=fault_injection,
    )


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A Redis of these tests' own: they hold jobs running under a worker name with no
    heartbeat, which any live worker's reaper would rightly take back."""
    server = RedisServer(tmp_path_factory.mktemp("private-redis"), appendonly=False).start()
    connection = redis.Redis.from_url(server.url)
    yield connection
    connection.close()
    server.stop()


@pytest.fixture
def redis_conn(private_redis: redis.Redis) -> redis.Redis:
    private_redis.flushdb()
    return private_redis


def test_a_stale_run_cannot_finish_a_job_that_was_taken_back(redis_conn: redis.Redis) -> None:
    lifecycle = Lifecycle(redis_conn)
    (first,) = _claimed_jobs(redis_conn, "stale", [job_spec(model="stale")])
    assert lifecycle.requeue(first.record)  # its worker was presumed dead
    (second,), _ = lifecycle.claim("stale", "w2", budget=1)
    assert second.owner == "w2#2" and first.owner == "w#1"
    info = [ImageInfo(index=0, seed=1, width=64, height=64)]
    # The slow first run finishes late: nothing of it lands, images included.
    assert not lifecycle.succeed(first, [b"stale"], info, 60, 60, 1.0)
    assert redis_conn.get(Keys.image(first.id, 0)) is None
    assert lifecycle.succeed(second, [b"fresh"], info, 60, 60, 1.0)
    assert redis_conn.get(Keys.image(first.id, 0)) == b"fresh"
    assert not lifecycle.succeed(first, [b"stale"], info, 60, 60, 1.0)
    assert redis_conn.get(Keys.image(first.id, 0)) == b"fresh"
    assert redis_conn.zcard(Keys.running("stale")) == 0


def test_a_batched_job_keeps_its_own_time_limit(
    redis_conn: redis.Redis, tiny_model_dir: Path
) -> None:
    settings = Settings(model=str(tiny_model_dir), model_id="deadline", device="cpu")
    overdue, on_time = _claimed_jobs(
        redis_conn,
        "deadline",
        [job_spec(model="deadline", seed=1), job_spec(model="deadline", seed=2, n=2)],
    )
    # The first is past its own deadline; the second (same batch) has ten minutes left.
    overdue = Claimed(overdue.record.model_copy(update={"deadline": time.time() - 1}))
    outcomes = _runner(redis_conn, settings).run([overdue, on_time])
    assert [(o.status, o.detail) for o in outcomes] == [("failed", "timeout"), ("succeeded", "")]
    store = JobStore(redis_conn)
    failed = store.get(overdue.id)
    assert failed is not None and failed.error is not None and failed.error.code == "timeout"
    assert redis_conn.zcard(Keys.running("deadline")) == 0


def test_an_out_of_memory_batch_is_split_and_only_what_fails_alone_fails(
    redis_conn: redis.Redis, tiny_model_dir: Path
) -> None:
    settings = Settings(model=str(tiny_model_dir), model_id="oom", device="cpu")
    # The middle job makes any loop step of more than one image run out of memory; it holds
    # two images itself, so it cannot run even alone.
    batch = _claimed_jobs(
        redis_conn,
        "oom",
        [
            job_spec(model="oom", prompt="a"),
            job_spec(model="oom", prompt="__fault__:oom_over:1", n=2),
            job_spec(model="oom", prompt="c"),
        ],
    )
    outcomes = _runner(redis_conn, settings, fault_injection=True).run(batch)
    assert [(o.status, o.detail) for o in outcomes] == [
        ("succeeded", ""),
        ("failed", "out_of_memory"),
        ("succeeded", ""),
    ]


def _wait_through_outages(
    gateway: Gateway, job_id: str, route: str = "/v1/generations"
) -> dict[str, object]:
    """The job's (or, on `/v1/trainings`, the training's) final document, polling through a
    Redis restart (503) and dropped connections; a 404 (the job is gone: lost) ends the wait
    too."""
    deadline = time.monotonic() + 300
    with gateway.client() as client:
        while time.monotonic() < deadline:
            try:
                response = client.get(f"{route}/{job_id}")
            except httpx.TransportError:
                continue
            if response.status_code == 404:
                return {"status": "lost"}
            if response.status_code == 200:
                doc: dict[str, object] = response.json()
                if doc["status"] in ("succeeded", "failed", "canceled"):
                    return doc
            time.sleep(0.05)
    return {"status": "stuck"}


def _submit_training(gateway: Gateway) -> str:
    """A small training of the tiny model, submitted through outages like the jobs."""
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        picture = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(picture, format="PNG")
        archive.writestr("0.png", picture.getvalue())
    with gateway.client() as client:
        for _ in range(200):
            try:
                response = client.post(
                    "/v1/trainings",
                    data={"model": MODEL, "trigger_word": "zxq", "steps": "20", "rank": "4"},
                    files={"images": ("p.zip", zipped.getvalue(), "application/zip")},
                    headers={"Idempotency-Key": "soak-training"},
                )
            except httpx.TransportError:
                continue
            if response.status_code in (200, 202):
                training: str = response.json()["id"]
                return training
            assert response.status_code == 503, response.text
            time.sleep(0.1)
    raise AssertionError("the training was never accepted")


# Enough jobs that workers die and Redis restarts while many are queued and running (96 at
# 16 clients, down from 300 and then 160, keeps the whole suite within its CI time).
SOAK_JOBS = 96


def test_soak_96_jobs_16_clients_workers_killed_and_redis_restarted(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """0 lost, 0 run twice to success, 0 stuck, while workers die every few seconds and
    Redis restarts once; a training in the mix (on the worker of slot 0, between its jobs)
    succeeds once too, through the same deaths and restart."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    connection = redis.Redis.from_url(server.url)
    connection.config_set("appendfsync", "always")  # a restart must lose no accepted write
    env = {**FAST, "IMAGEGEN_MODEL": str(tiny_model_dir), "IMAGEGEN_MODEL_ID": MODEL}
    trains = {"IMAGEGEN_WORKER_TASKS": "generate,train", "IMAGEGEN_TRAINING_CHECKPOINT_STEPS": "5"}
    gateway = start_gateway(server.url, tmp_path, FAST)

    def start(generation: int, slot: int) -> Proc:
        name, extra = f"s{slot}-g{generation}", trains if slot == 0 else {}
        return start_worker(server.url, tmp_path, name, {**env, **extra}, forked=True)

    supervisors = [Supervisor(lambda g, slot=slot: start(g, slot)) for slot in range(3)]
    for slot, supervisor in enumerate(supervisors):
        wait_for_worker(connection, supervisor.proc, f"s{slot}-g0")
    stop = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        chooser = random.Random(7)
        restarted = False
        while not stop.wait(2.5):
            victim = chooser.choice(supervisors).proc.process
            if victim.poll() is None:
                os.kill(victim.pid, signal.SIGKILL)
                kills += 1
            if kills == 3 and not restarted:
                restarted = True
                server.stop()
                server.start()

    def submit_all(client_no: int) -> list[str]:
        ids = []
        with gateway.client() as client:
            for k in range(SOAK_JOBS // 16 + (1 if client_no < SOAK_JOBS % 16 else 0)):
                body = {"prompt": f"soak {client_no}-{k}", "steps": 3, "seed": k}
                headers = {"Idempotency-Key": f"soak-{client_no}-{k}"}
                for _ in range(200):  # retried through the Redis restart, never twice queued
                    try:
                        response = client.post("/v1/generations", json=body, headers=headers)
                    except httpx.TransportError:
                        continue
                    if response.status_code in (200, 202):
                        ids.append(response.json()["id"])
                        break
                    assert response.status_code == 503, response.text
                    time.sleep(0.1)
        return ids

    kill_thread = threading.Thread(target=killer)
    kill_thread.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            ids = [j for batch in pool.map(submit_all, range(16)) for j in batch]
        training = _submit_training(gateway)
        docs = [_wait_through_outages(gateway, job) for job in ids]
        trained = _wait_through_outages(gateway, training, "/v1/trainings")
    finally:
        stop.set()
        kill_thread.join()
        for supervisor in supervisors:
            supervisor.stop()
        gateway.proc.stop()
    statuses = [d["status"] for d in docs]
    succeeded_writes = JobStore(connection).job_stats().get((MODEL, "succeeded"), 0)
    attempts = [int(connection.hget(Keys.job(j), "attempts") or 0) for j in ids]
    print(
        f"\nsoak: {len(ids)} jobs, {kills} workers killed, 1 Redis restart; "
        f"succeeded {statuses.count('succeeded')}, "
        f"lost {SOAK_JOBS - len(ids) + statuses.count('lost')}, "
        f"stuck {statuses.count('stuck')}, "
        f"success writes {succeeded_writes}, rerun {sum(a > 1 for a in attempts)}"
    )
    try:
        assert len(ids) == len(set(ids)) == SOAK_JOBS
        assert statuses == ["succeeded"] * SOAK_JOBS
        assert succeeded_writes == SOAK_JOBS  # each job succeeded exactly once
        assert kills >= 3
        assert connection.zcard(Keys.running(MODEL)) == 0
        assert connection.zcard(Keys.queue(MODEL)) == 0
        assert trained["status"] == "succeeded", trained
        stats = JobStore(connection).job_stats()
        assert stats.get((training_lane(MODEL), "succeeded"), 0) == 1  # exactly once
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [("app.main", ("torch", "diffusers")), ("worker.main", ("fastapi", "starlette"))],
)
def test_the_gateway_never_imports_torch_and_the_worker_never_fastapi(
    module: str, forbidden: tuple[str, ...]
) -> None:
    # lint-imports (make test) holds the project's own imports to the parts table; this
    # checks what is imported at run time, through other packages too.
    code = f"import {module}; {module}.create_app()" if module == "app.main" else f"import {module}"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()}
    assert imported & set(forbidden) == set()
    assert "redis" in imported  # the check reads what was imported


def test_the_sdk_meets_a_real_failed_job_and_a_real_full_queue(
    cluster: TinyService, tmp_path: Path
) -> None:
    cluster.clean()
    worker = cluster.worker()
    try:
        with (
            Client(base_url=cluster.gateway.base_url) as client,
            pytest.raises(JobFailed) as failed,
        ):
            client.generate("__fault__:error", steps=3)
    finally:
        worker.stop()
    assert failed.value.code == "internal"
    assert failed.value.job.error is not None and "RuntimeError" in failed.value.job.error.message
    cluster.clean()  # no worker from here on: what is queued stays queued
    gateway = start_gateway(
        cluster.redis.url, tmp_path, {**FAST, "IMAGEGEN_MAX_QUEUE_DEPTH": "1"}, name="depth-1"
    )
    try:
        with Client(base_url=gateway.base_url, max_retries=0) as client:
            client.submit("first", steps=3)
            with pytest.raises(QueueFull) as full:
                client.submit("second", steps=3)
    finally:
        gateway.proc.stop()
    assert full.value.status_code == 429 and full.value.code == "queue_full"
    assert full.value.retry_after is not None
