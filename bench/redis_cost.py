"""What a job costs Redis, and how many jobs per second one Redis carries.

Part `commands`: a real gateway and worker (built-in model, 20 steps) against a private
redis-server; every command Redis runs is read with MONITOR while N jobs go from submit to
their last image stored, one after another (the bench waits on each job's events channel, no
polling). Commands run inside our Lua scripts are counted apart from round trips (commands a
client sent). Idle traffic (heartbeats, sweeps, idle workers' bell waits) is measured over an
idle window of the same length and subtracted.

Part `ceiling`: N simulated workers (processes running the real work loop and job runner
with a null pipeline that returns an 8x8 image at once) and submitter processes (the
gateway's submit script) against one Redis; prints jobs/s as N grows and the Redis server's
own CPU time per job, which gives the jobs/s one Redis core can carry.

Part `stores`: the same null pipeline, with a 512x512 PNG per job, once with blobs in Redis and
once in S3-compatible storage (moto's server on 127.0.0.1): Redis memory per finished job, Redis
commands and Redis CPU per job, so what one Redis carries with each store.

    python bench/redis_cost.py commands [--jobs 20]
    python bench/redis_cost.py ceiling [--workers 1,2,4,8] [--seconds 10]
    python bench/redis_cost.py stores [--jobs 200]
"""

from __future__ import annotations

import argparse
import multiprocessing
import secrets
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.cli.redis_server import RedisServer
from imagegen.core.blobs import image_blob
from imagegen.core.contract import JobRecord, JobSpec, JobStatus, Keys
from imagegen.core.lifecycle import Lifecycle
from imagegen.core.store import JobStore

MODEL = "null"
TERMINAL = (b"succeeded", b"failed", b"canceled")


# -- commands per job ----------------------------------------------------------------------------
def _monitor(url: str, sink: list[dict[str, Any]], stop: threading.Event) -> None:
    connection = redis.Redis.from_url(url)
    with connection.monitor() as monitor:  # type: ignore[no-untyped-call]
        for command in monitor.listen():
            if stop.is_set():
                return
            sink.append(command)


def _tally(commands: list[dict[str, Any]]) -> tuple[Counter[str], Counter[str]]:
    """(round trips by command, commands inside scripts by command)."""
    trips: Counter[str] = Counter()
    inner: Counter[str] = Counter()
    for entry in commands:
        name = entry["command"].split(" ", 1)[0].strip('"').upper()
        if name in ("MONITOR", "PSUBSCRIBE", "PING"):
            continue  # this bench's own connections, and connection health checks
        (inner if entry.get("client_type") == "lua" else trips)[name] += 1
    return trips, inner


def commands(jobs: int) -> None:
    import httpx
    from _service import service

    with service(workers=1) as gateway:
        url = gateway.env["IMAGEGEN_REDIS_URL"]
        connection = redis.Redis.from_url(url)
        body = {"prompt": "a small red circle at the top left on a white background", "steps": 20}

        # One pattern subscription for the whole run: the bench adds no command per job.
        pubsub = connection.pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe(Keys.events("*"))

        def run_one(client: httpx.Client) -> None:
            job = client.post("/v1/generations", json=body).json()["id"]
            channel = Keys.events(job).encode()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                message = pubsub.get_message(timeout=1.0)
                if (
                    message is not None
                    and message["channel"] == channel
                    and message["data"] in TERMINAL
                ):
                    if message["data"] != b"succeeded":
                        raise RuntimeError(f"job {job} ended {message['data']!r}")
                    return
            raise RuntimeError(f"job {job} did not end within 60 s")

        with httpx.Client(base_url=gateway.base_url, timeout=60) as client:
            run_one(client)  # warm
            windows: dict[str, tuple[list[dict[str, Any]], float]] = {}
            for phase in ("jobs", "idle"):
                sink: list[dict[str, Any]] = []
                stop = threading.Event()
                thread = threading.Thread(target=_monitor, args=(url, sink, stop), daemon=True)
                thread.start()
                time.sleep(0.5)  # MONITOR attached
                sink.clear()
                started = time.monotonic()
                if phase == "jobs":
                    for _ in range(jobs):
                        run_one(client)
                    elapsed = time.monotonic() - started
                else:
                    time.sleep(windows["jobs"][1])
                    elapsed = time.monotonic() - started
                stop.set()
                connection.ping()  # one more command, so the monitor loop sees the stop
                thread.join(timeout=5)
                windows[phase] = (list(sink), elapsed)
    job_trips, job_inner = _tally(windows["jobs"][0])
    idle_trips, idle_inner = _tally(windows["idle"][0])
    names = sorted(set(job_trips) | set(job_inner))
    print(f"{jobs} jobs of 20 steps, one at a time, in {windows['jobs'][1]:.1f}s")
    print(f"{'command':<12} {'round trips/job':>16} {'inside scripts/job':>19}")
    total_trips = total_inner = 0.0
    for name in names:
        trips = (job_trips[name] - idle_trips[name]) / jobs
        inner = (job_inner[name] - idle_inner[name]) / jobs
        total_trips += trips
        total_inner += inner
        if abs(trips) >= 0.05 or abs(inner) >= 0.05:
            print(f"{name:<12} {trips:>16.1f} {inner:>19.1f}")
    print(f"{'total':<12} {total_trips:>16.1f} {total_inner:>19.1f}")
    print(
        f"idle traffic (subtracted): {sum(idle_trips.values()) / windows['idle'][1]:.1f} "
        "round trips/s for one worker and one gateway"
    )


# -- ceiling -------------------------------------------------------------------------------------
class NullInference:
    """Stands in for the model: every step at once, an 8x8 image per image asked for (or
    `picture`)."""

    batching = False
    previews = None
    # What the runner reads of a loaded model: no tokenizer to check prompts with.
    model = types.SimpleNamespace(prompts=None)

    def __init__(self, picture: Any = None) -> None:
        self.picture = picture

    def run(self, items: list[Any], on_loop_step: Any = None) -> list[Any]:
        from PIL import Image

        results: list[Any] = []
        for item in items:
            try:
                for step in range(1, item.spec.steps + 1):
                    if item.on_step is not None:
                        item.on_step(step, item.spec.steps)
                picture = self.picture or Image.new("RGB", (8, 8))
                results.append([picture.copy() for _ in range(item.spec.n)])
            except Exception as exc:
                results.append(exc)
        return results

    def free_memory(self) -> None:
        pass


def _null_worker(url: str, name: str, stop: Any) -> None:
    import torch

    from imagegen.core.settings import Settings
    from worker.loop import WorkLoop
    from worker.metrics import WorkerMetrics
    from worker.runner import JobRunner
    from worker.state import WorkerState

    connection = redis.Redis.from_url(url)
    lifecycle = Lifecycle(connection)
    state = WorkerState()
    settings = Settings()
    runner = JobRunner(
        NullInference(),  # type: ignore[arg-type]
        lifecycle,
        settings,
        state,
        WorkerMetrics(MODEL, torch.device("cpu")),
    )
    loop = WorkLoop(connection, lifecycle, runner, state, MODEL, name, max_images=1)
    while not stop.is_set():
        batch = loop.claim()
        if batch:
            runner.run(batch)
        else:
            connection.blpop([Keys.bell(MODEL)], timeout=1)


def _submitter(url: str, stop: Any) -> None:
    connection = redis.Redis.from_url(url)
    lifecycle = Lifecycle(connection)
    spec = JobSpec(
        prompt="null",
        negative_prompt="",
        width=8,
        height=8,
        steps=20,
        guidance_scale=1.0,
        seed=1,
        n=1,
        scheduler="euler",
        model=MODEL,
    )
    while not stop.is_set():
        if connection.zcard(Keys.queue(MODEL)) > 200:
            time.sleep(0.005)
            continue
        record = JobRecord(
            id=secrets.token_hex(11),
            status=JobStatus.QUEUED,
            spec=spec,
            created_at=time.time(),
            timeout_s=60,
        )
        lifecycle.submit(record, max_depth=10**6)


def _redis_cpu(connection: redis.Redis) -> float:
    info = connection.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def ceiling(worker_counts: list[int], seconds: float) -> None:
    context = multiprocessing.get_context("spawn")
    print(f"null pipeline, 20 steps, 8x8 PNG; {seconds:.0f}s per point")
    print(f"{'workers':>7} {'jobs/s':>8} {'redis CPU ms/job':>17} {'redis CPU share':>16}")
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp), appendonly=False) as server:
        connection = redis.Redis.from_url(server.url)
        for count in worker_counts:
            connection.flushdb()
            stop = context.Event()
            procs = [
                context.Process(target=_null_worker, args=(server.url, f"n{i}", stop))
                for i in range(count)
            ] + [context.Process(target=_submitter, args=(server.url, stop)) for _ in range(2)]
            for proc in procs:
                proc.start()
            time.sleep(8)  # imports, first claims
            done_before = JobStore(connection).job_stats().get((MODEL, "succeeded"), 0)
            cpu_before, started = _redis_cpu(connection), time.monotonic()
            time.sleep(seconds)
            done = JobStore(connection).job_stats().get((MODEL, "succeeded"), 0) - done_before
            cpu = _redis_cpu(connection) - cpu_before
            elapsed = time.monotonic() - started
            stop.set()
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
            rate = done / elapsed
            per_job_ms = 1000 * cpu / max(done, 1)
            print(f"{count:>7} {rate:>8.1f} {per_job_ms:>17.3f} {cpu / elapsed:>15.0%}")
    print(
        "one Redis core at 100% carries about 1000 / (redis CPU ms/job) jobs/s; divide by "
        "10 images/s per GPU for GPUs per Redis"
    )


# -- stores --------------------------------------------------------------------------------------
def _picture(size: int) -> Any:
    """A picture that PNG compresses about as much as a generated one (~1.5 bytes/pixel):
    smooth shading with a little noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1)
    noise = rng.integers(0, 6, size=(size, size, 3))
    return Image.fromarray((base + noise).clip(0, 255).astype("uint8"))


def _commands(connection: redis.Redis) -> int:
    stats = connection.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def _store_run(store_name: str, jobs: int, size: int) -> dict[str, float]:
    import os

    import torch

    from imagegen.core.blobs import open_blob_store
    from imagegen.core.settings import Settings
    from worker.loop import WorkLoop
    from worker.metrics import WorkerMetrics
    from worker.runner import JobRunner
    from worker.state import WorkerState

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp), appendonly=False) as server:
        connection = redis.Redis.from_url(server.url)
        if store_name == "s3":
            from tests.stack import s3_server

            s3 = s3_server()
            os.environ.update(s3.env(f"bench-{time.time_ns()}"))
        else:
            os.environ.pop("IMAGEGEN_STORAGE_URL", None)
        settings = Settings()
        lifecycle = Lifecycle(connection)
        state = WorkerState()
        runner = JobRunner(
            NullInference(_picture(size)),  # type: ignore[arg-type]
            lifecycle,
            settings,
            state,
            WorkerMetrics(MODEL, torch.device("cpu")),
            blobs=open_blob_store(settings, connection),
        )
        loop = WorkLoop(connection, lifecycle, runner, state, MODEL, "bench", max_images=1)
        spec = JobSpec(
            prompt="null", negative_prompt="", width=size, height=size, steps=20,
            guidance_scale=1.0, seed=1, n=1, scheduler="euler", model=MODEL,
        )  # fmt: skip
        memory_before = int(connection.info("memory")["used_memory"])
        commands_before, cpu_before = _commands(connection), _redis_cpu(connection)
        for _ in range(jobs):
            record = JobRecord(
                id="gen_" + secrets.token_urlsafe(16),
                status=JobStatus.QUEUED,
                spec=spec,
                created_at=time.time(),
                timeout_s=60,
            )
            lifecycle.submit(record, max_depth=10**6)
        started, ran = time.monotonic(), 0
        while ran < jobs:
            batch = loop.claim()
            outcomes = runner.run(batch) if batch else []
            ran += len(outcomes)
            if any(o.status != "succeeded" for o in outcomes):
                raise RuntimeError(f"a job did not succeed: {outcomes}")
        elapsed = time.monotonic() - started
        commands = _commands(connection) - commands_before - 1  # less this INFO
        cpu = _redis_cpu(connection) - cpu_before
        memory = int(connection.info("memory")["used_memory"]) - memory_before
        png = len(runner.blobs.get(image_blob(record.id, 0)) or b"")
        connection.close()
    return {
        "bytes_per_job": memory / jobs,
        "commands_per_job": commands / jobs,
        "cpu_ms_per_job": 1000 * cpu / jobs,
        "jobs_per_s": jobs / elapsed,
        "png_bytes": png,
    }


def stores(jobs: int, size: int) -> None:
    print(f"null pipeline, {jobs} jobs of one {size}x{size} PNG each, submitted then run")
    print(
        f"{'store':<6} {'PNG bytes':>10} {'redis bytes/job':>16} {'commands/job':>13} "
        f"{'redis CPU ms/job':>17} {'jobs/s here':>12}"
    )
    for name in ("redis", "s3"):
        run = _store_run(name, jobs, size)
        print(
            f"{name:<6} {run['png_bytes']:>10.0f} {run['bytes_per_job']:>16.0f} "
            f"{run['commands_per_job']:>13.1f} {run['cpu_ms_per_job']:>17.3f} "
            f"{run['jobs_per_s']:>12.1f}"
        )
    print(
        "redis bytes/job: used_memory after the jobs finished less before, per job (records, "
        "books, and with Redis the images); jobs/s here: one null worker in this process"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["commands", "ceiling", "stores"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.part == "commands":
        commands(args.jobs)
    elif args.part == "stores":
        stores(args.jobs, args.size)
    else:
        ceiling([int(n) for n in args.workers.split(",")], args.seconds)


if __name__ == "__main__":
    main()
