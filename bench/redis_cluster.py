"""Does the job lifecycle run on a Redis Cluster? Starts a 3-node cluster (redis-server
`--cluster-enabled yes` x3, `redis-cli --cluster create`), then takes one job through every
lifecycle step with redis-py's `RedisCluster`, twice: with the service's key names, and with
every key under one hash tag (`{imagegen}`). Prints, per step, `ok` or the error the cluster
client answered.

    python -m bench.redis_cluster

Not a speed figure: the answer to "which command does a cluster refuse, and why" that
docs/lifecycle.md records.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

from imagegen.cli.redis_server import find_redis_server, free_port
from imagegen.core.contract import ImageInfo, JobRecord, JobStatus, Keys
from imagegen.core.lifecycle import Lifecycle
from tests.stack import job_spec


@contextmanager
def cluster(directory: Path) -> Iterator[list[int]]:
    server = find_redis_server()
    ports = _cluster_ports(3)
    procs = []
    for port in ports:
        node = directory / str(port)
        node.mkdir()
        procs.append(
            subprocess.Popen(
                [server, "--port", str(port), "--cluster-enabled", "yes", "--save", ""],
                cwd=node,
                stdout=subprocess.DEVNULL,
            )
        )
    try:
        for port in ports:
            _until(redis.Redis(port=port).ping)
        cli = str(Path(server).with_name("redis-cli"))
        addresses = [f"127.0.0.1:{port}" for port in ports]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
        )
        _until(lambda: _cluster_state(ports[0]) == "ok")
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 10000 < 65536 and _is_free(port + 10000) and port not in ports:
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_state(port: int) -> str:
    with redis.Redis(port=port) as node:
        return str(node.execute_command("CLUSTER INFO").get("cluster_state"))


def _until(check: Callable[[], object], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except redis.exceptions.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster did not come up")
        time.sleep(0.1)


@contextmanager
def prefix(name: str) -> Iterator[None]:
    """Every key name under `name` (the class constants too, which were built at import)."""
    old = Keys.PREFIX
    constants = {k: v for k, v in vars(Keys).items() if isinstance(v, str) and k.isupper()}
    Keys.PREFIX = name
    for key, value in constants.items():
        if key != "PREFIX":
            setattr(Keys, key, value.replace(old + ":", name + ":", 1))
    try:
        yield
    finally:
        for key, value in constants.items():
            setattr(Keys, key, value)


def steps(connection: RedisCluster) -> list[tuple[str, str]]:
    """Each lifecycle step of one job, and what the cluster answered."""
    lifecycle = Lifecycle(connection)  # type: ignore[arg-type]
    outcomes = []

    def step(name: str, run: Callable[[], object]) -> object:
        try:
            value = run()
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            outcomes.append((name, f"refused: {exc}"))
            return None
        outcomes.append((name, "ok"))
        return value

    def record(job_id: str) -> JobRecord:
        return JobRecord(
            id=job_id,
            status=JobStatus.QUEUED,
            spec=job_spec(model="m"),
            created_at=time.time(),
            api_key="alice",
        )

    step("submit", lambda: lifecycle.submit(record("gen_a"), 100))
    step("queue heads", lambda: lifecycle.queue_heads(["m"]))
    claimed = step("claim", lambda: lifecycle.claim("m", "w1"))
    jobs = claimed[0] if isinstance(claimed, tuple) else []
    if jobs:
        job = jobs[0]
        step("progress", lambda: lifecycle.progress(job.id, 1, job.owner))
        info = ImageInfo(index=0, seed=1, width=64, height=64)
        step("succeed", lambda: lifecycle.succeed(job, [b"png"], [info], 60, 60, 0.1))
    step("submit (2)", lambda: lifecycle.submit(record("gen_b"), 100))
    step("cancel", lambda: lifecycle.cancel(record("gen_b"), 60))
    return outcomes


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, cluster(Path(tmp)) as ports:
        for name in ("imagegen", "{imagegen}"):
            connection = RedisCluster(
                startup_nodes=[ClusterNode("127.0.0.1", ports[0])]  # type: ignore[no-untyped-call]
            )
            connection.flushall()
            with prefix(name):
                print(f"key prefix {name}:")
                for step_name, outcome in steps(connection):
                    print(f"  {step_name:12} {outcome}")
            connection.close()


if __name__ == "__main__":
    main()
