"""A private service (redis-server, gateway, workers) for the benchmarks, in real processes."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.cli.redis_server import RedisServer
from tests.stack import Gateway, ready_timeout_s, start_gateway, start_worker, wait_for_worker

__all__ = ["Gateway", "generate", "median", "now", "service", "throughput"]


@contextmanager
def service(
    workers: int = 1,
    worker_env: dict[str, str] | None = None,
    threads: str = "2",
    gateway_env: dict[str, str] | None = None,
) -> Iterator[Gateway]:
    """Redis, a gateway and `workers` workers (built-in model unless `worker_env` says else)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = RedisServer(root / "redis", appendonly=False).start()
        connection = redis.Redis.from_url(server.url)
        procs = []
        try:
            for i in range(workers):
                env = {"OMP_NUM_THREADS": threads, **(worker_env or {})}
                proc = start_worker(server.url, root, f"bench-{i}", env)
                wait_for_worker(connection, proc, f"bench-{i}", ready_timeout_s(env))
                procs.append(proc)
            gateway = start_gateway(
                server.url, root, {"IMAGEGEN_MAX_QUEUE_DEPTH": "100000", **(gateway_env or {})}
            )
            procs.append(gateway.proc)
            yield gateway
        finally:
            for proc in procs:
                proc.stop()
            server.stop()


def generate(client: httpx.Client, body: dict[str, object]) -> bytes:
    """Submit, follow the job's event stream to its end, download image 0."""
    job = client.post("/v1/generations", json=body).json()["id"]
    with client.stream("GET", f"/v1/generations/{job}/events") as stream:
        last = ""
        for line in stream.iter_lines():
            if line.startswith("event:"):
                last = line[6:].strip()
    if last != "succeeded":
        doc = client.get(f"/v1/generations/{job}").json()
        raise RuntimeError(f"job {job} ended {last}: {json.dumps(doc.get('error'))}")
    return client.get(f"/v1/generations/{job}/images/0").content


def throughput(
    gateway: Gateway, clients: int, seconds: float, body: Callable[[int, int], dict[str, object]]
) -> tuple[float, int]:
    """Jobs per second (and jobs done) when `clients` threads each generate back to back for
    `seconds`; `body(client, k)` is the k-th request of a client."""
    done = 0
    lock = threading.Lock()
    stop_at = now() + seconds

    def loop(c: int) -> None:
        nonlocal done
        with gateway.client() as client:
            k = 0
            while now() < stop_at:
                generate(client, body(c, k))
                k += 1
                with lock:
                    done += 1

    started = now()
    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done / (now() - started), done


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def now() -> float:
    return time.perf_counter()
