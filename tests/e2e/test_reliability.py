"""Fault injection with real processes: every accepted job ends in exactly one terminal state.

Each scenario gets its own redis-server (AOF on, as in compose), gateway and workers, so
killing things never disturbs the rest of the suite. Bounds are shortened through settings
(heartbeat TTL 4 s, sweeps every 0.5 s) so the suite runs in minutes; defaults are 30 s / 5 s.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from imagegen.core.blobs import image_blob
from imagegen.core.contract import Keys
from tests.stack import (
    FAST_RECOVERY,
    STORAGE,
    TinyService,
    rss_mib,
    run_store,
    stored,
    wait_for_job,
    wait_for_worker,
)

MODEL = "tiny"
FAST = FAST_RECOVERY
# Detecting a dead worker takes at most the heartbeat TTL plus one sweep.
DETECT_S = 4 + 0.5


@pytest.fixture
def cluster_factory(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Callable[..., TinyService]]:
    made: list[TinyService] = []

    def make(**gateway_env: str) -> TinyService:
        cluster = TinyService(tmp_path, tiny_model_dir, gateway_env)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()


def _wait_running(client: httpx.Client, job_id: str, min_step: int = 1) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        doc: dict[str, object] = client.get(f"/v1/generations/{job_id}").json()
        if doc["status"] == "running" and doc["progress"]["step"] >= min_step:  # type: ignore[index]
            return doc
        assert doc["status"] in ("queued", "running"), doc
        time.sleep(0.02)
    raise TimeoutError(job_id)


def test_kill_9_mid_job_is_finished_by_another_worker(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory()
    first = cluster.worker("a")
    with cluster.client() as client:
        job = cluster.submit(client, "long job", steps=300)
        _wait_running(client, job)
        cluster.worker("b")  # the survivor, started once the job is surely on "a"
        first.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        done = wait_for_job(client, job, timeout_s=120)
    assert done["status"] == "succeeded", done
    record = cluster.conn.hgetall(Keys.job(job))
    assert record[b"worker"] == b"b" and record[b"attempts"] == b"2"
    print(f"kill -9: job finished by worker b {time.monotonic() - killed:.1f}s after the kill")


def test_sigterm_mid_job_finishes_the_job_and_exits_0(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory()
    worker = cluster.worker("a")
    with cluster.client() as client:
        job = cluster.submit(client, "finish me", steps=150)
        queued_after = cluster.submit(client, "must wait for another worker", steps=2)
        _wait_running(client, job)
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=120) == 0
        assert client.get(f"/v1/generations/{job}").json()["status"] == "succeeded"
        # It took nothing new on its way out.
        assert client.get(f"/v1/generations/{queued_after}").json()["status"] == "queued"


def test_redis_restart_with_20_jobs_queued(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory()
    cluster.worker("a")
    with cluster.client() as client:
        # Compose runs `appendfsync everysec`, which may lose the last second on a crash;
        # here every accepted write is on disk before the kill, so all 20 must survive.
        cluster.conn.config_set("appendfsync", "always")
        jobs = [cluster.submit(client, f"survive {i}", steps=15) for i in range(20)]
        cluster.redis.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        cluster.redis.process.wait()  # type: ignore[union-attr]
        # While Redis is down the gateway answers 503 + Retry-After, quickly, never 500.
        for request in (
            lambda: client.post("/v1/generations", json={"prompt": "during outage"}),
            lambda: client.get(f"/v1/generations/{jobs[0]}"),
            lambda: client.get("/v1/models"),
        ):
            response = request()  # answered, not hung: the client's timeout would raise
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "unavailable"
            assert "retry-after" in response.headers
        assert client.get("/readyz").status_code == 503
        cluster.redis.start()
        results = [wait_for_job(client, job, timeout_s=180) for job in jobs]
    assert [r["status"] for r in results] == ["succeeded"] * 20


def test_injected_oom_fails_that_job_and_the_worker_goes_on(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory()
    worker = cluster.worker("a")
    with cluster.client() as client:
        bad = cluster.submit(client, "__fault__:oom", steps=5)
        good = cluster.submit(client, "after the oom", steps=5)
        bad_doc = wait_for_job(client, bad)
        good_doc = wait_for_job(client, good)
    assert bad_doc["status"] == "failed"
    assert bad_doc["error"]["code"] == "out_of_memory"  # type: ignore[index]
    assert "memory" in bad_doc["error"]["message"]  # type: ignore[index]
    assert good_doc["status"] == "succeeded"
    assert worker.process.poll() is None


def test_poison_job_is_retried_a_bounded_number_of_times(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory()
    first, second = cluster.supervised("p"), cluster.supervised("q")
    with cluster.client() as client:
        poison = cluster.submit(client, "__fault__:crash", steps=5)
        others = [cluster.submit(client, f"innocent {i}", steps=3) for i in range(6)]
        poison_doc = wait_for_job(client, poison, timeout_s=3 * (DETECT_S + 20))
        other_docs = [wait_for_job(client, job, timeout_s=120) for job in others]
    assert poison_doc["status"] == "failed", poison_doc
    assert poison_doc["error"]["code"] == "worker_lost"  # type: ignore[index]
    assert "3 time(s)" in poison_doc["error"]["message"]  # type: ignore[index]
    assert [d["status"] for d in other_docs] == ["succeeded"] * 6
    crashes = first.exit_codes + second.exit_codes
    assert crashes.count(-signal.SIGKILL) == 3, crashes


def test_hung_step_times_out_and_the_worker_serves_again(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    # A 3-second time limit for this gateway's jobs; the hang is in native code, where the
    # worker's SIGALRM cannot reach, so the heartbeat thread's watchdog has to act.
    cluster = cluster_factory(
        IMAGEGEN_JOB_TIMEOUT_BASE_S="3", IMAGEGEN_JOB_TIMEOUT_S_PER_MEGAPIXEL_STEP="0.1"
    )
    supervisor = cluster.supervised("h")
    with cluster.client() as client:
        hung = cluster.submit(client, "__fault__:hang", steps=5)
        doc = wait_for_job(client, hung, timeout_s=60)
        assert doc["status"] == "failed", doc
        assert doc["error"]["code"] == "timeout"  # type: ignore[index]
        deadline = time.monotonic() + 30
        while supervisor.generation < 1:
            assert time.monotonic() < deadline, "the supervisor never restarted the worker"
            time.sleep(0.1)
        wait_for_worker(cluster.conn, supervisor.proc, "h-g1")
        after = cluster.submit(client, "after the hang", steps=3)
        assert wait_for_job(client, after, timeout_s=60)["status"] == "succeeded"
    assert supervisor.exit_codes == [75]


def test_a_job_past_its_time_limit_fails_alone_and_the_worker_goes_on(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(
        IMAGEGEN_JOB_TIMEOUT_BASE_S="2", IMAGEGEN_JOB_TIMEOUT_S_PER_MEGAPIXEL_STEP="0.1"
    )
    worker = cluster.worker("t")
    with cluster.client() as client:
        slow = cluster.submit(client, "too slow", steps=5000)
        doc = wait_for_job(client, slow, timeout_s=60)
        after = cluster.submit(client, "next", steps=2)
        assert wait_for_job(client, after)["status"] == "succeeded"
    assert doc["status"] == "failed" and doc["error"]["code"] == "timeout", doc  # type: ignore[index]
    assert worker.process.poll() is None  # checked at a step boundary: no restart needed


def test_full_redis_refuses_submits_without_half_written_jobs(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    # The gateway's memory guard off: this is about what Redis itself refuses.
    cluster = cluster_factory(IMAGEGEN_REDIS_HIGH_WATER="1")
    cluster.worker("a")
    # A limit below what Redis already holds: every write is refused (noeviction), as when
    # Redis fills up, and no expiring key can make room again mid-test.
    cluster.conn.config_set("maxmemory", 1)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        cluster.conn.set("probe", b"x")
    jobs_before = len(cluster.conn.keys(Keys.job("*")))
    queue_before = cluster.conn.zcard(Keys.queue(MODEL))
    with cluster.client() as client:
        response = client.post("/v1/generations", json={"prompt": "no room", "steps": 2})
    assert response.status_code in (429, 503), response.text
    assert response.json()["error"]["code"] in ("unavailable", "queue_full")
    assert "retry-after" in response.headers
    assert len(cluster.conn.keys(Keys.job("*"))) == jobs_before
    assert cluster.conn.zcard(Keys.queue(MODEL)) == queue_before
    cluster.conn.config_set("maxmemory", 0)


def test_expired_image_says_it_expired(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory()
    # Redis expires the image after 1 s; S3's sweeper deletes it at its next pass (5 s).
    cluster.worker("a", IMAGEGEN_RESULT_TTL_S="1", IMAGEGEN_STORAGE_SWEEP_INTERVAL_S="5")
    with cluster.client() as client:
        job = cluster.submit(client, "short lived", steps=2)
        assert wait_for_job(client, job)["status"] == "succeeded"
        deadline = time.monotonic() + 20
        while stored(cluster.conn, image_blob(job, 0)) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        response = client.get(f"/v1/generations/{job}/images/0")
    assert response.status_code == 404
    assert "expired" in response.json()["error"]["message"]


def test_load_200_jobs_50_clients_2_workers(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory()
    workers = [cluster.worker("a"), cluster.worker("b")]
    gateway_pid = cluster.gateway.proc.process.pid
    rss_before = {"gateway": rss_mib(gateway_pid)} | {
        f"worker {n}": rss_mib(p.process.pid) for n, p in zip("ab", workers, strict=True)
    }

    def client_session(c: int) -> list[str]:
        with cluster.client() as client:
            return [
                cluster.submit(client, f"load {c}-{k}", steps=1, seed=c * 10 + k) for k in range(4)
            ]

    started = time.monotonic()
    with ThreadPoolExecutor(50) as pool:
        job_ids = [j for batch in pool.map(client_session, range(50)) for j in batch]
    with cluster.client() as client:
        docs = [wait_for_job(client, job, timeout_s=300) for job in job_ids]
    elapsed = time.monotonic() - started
    rss_after = {"gateway": rss_mib(gateway_pid)} | {
        f"worker {n}": rss_mib(p.process.pid) for n, p in zip("ab", workers, strict=True)
    }
    assert len(set(job_ids)) == 200
    assert [d["status"] for d in docs].count("succeeded") == 200
    attempts = [int(cluster.conn.hget(Keys.job(j), "attempts") or 0) for j in job_ids]
    assert attempts == [1] * 200  # nothing ran twice
    if STORAGE == "s3":
        images = [p.path for p in run_store().listing("jobs/") if "/images/" in p.path]
        images = [p for p in images if p.split("/")[1] in set(job_ids)]
    else:
        images = cluster.conn.keys(Keys.image("*", 0).replace(":0", ":*"))
    assert len(images) == 200  # one image per job, none extra
    by_worker = [cluster.conn.hget(Keys.job(j), "worker") for j in job_ids]
    print(
        f"\nload: 200 jobs in {elapsed:.1f}s; per worker "
        f"{ {w.decode(): by_worker.count(w) for w in set(by_worker) if w} }; "
        f"median run {statistics.median(float(d['timings']['run_s']) for d in docs):.3f}s"
    )
    for name in rss_before:
        print(f"RSS {name}: {rss_before[name]:.0f} MiB before, {rss_after[name]:.0f} MiB after")


def test_no_running_entry_is_left_after_a_crash(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory()
    first = cluster.worker("a")
    with cluster.client() as client:
        job = cluster.submit(client, "long", steps=300)
        _wait_running(client, job)
        assert cluster.conn.zrange(Keys.running(MODEL), 0, -1) == [job.encode()]
        cluster.worker("b")
        os.kill(first.process.pid, signal.SIGKILL)
        assert wait_for_job(client, job, timeout_s=120)["status"] == "succeeded"
    assert cluster.conn.zcard(Keys.running(MODEL)) == 0
    assert cluster.conn.zcard(Keys.queue(MODEL)) == 0
