"""Redis memory in `/metrics`, and the gateway's high-water guard in front of submits."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from imagegen.cli.redis_server import RedisServer
from tests.stack import Gateway, announce_idle_model, start_gateway

MODEL = "guarded"
HIGH_WATER = 0.5


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, redis.Redis]]:
    directory = tmp_path_factory.mktemp("redis-memory")
    server = RedisServer(directory / "redis", appendonly=False).start()
    connection = redis.Redis.from_url(server.url)
    announce_idle_model(connection, MODEL)
    gateway = start_gateway(
        server.url, directory, {"IMAGEGEN_REDIS_HIGH_WATER": str(HIGH_WATER)}, name="guarded"
    )
    yield gateway, connection
    gateway.proc.stop()
    connection.close()
    server.stop()


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def _submit(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/generations", json={"prompt": "a red circle", "model": MODEL})


def _until(client: httpx.Client, status: int, timeout_s: float = 30) -> httpx.Response:
    """Submit until the answer has `status` (the guard reads Redis at most once a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = _submit(client)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_metrics_report_redis_memory(guarded: tuple[Gateway, redis.Redis]) -> None:
    gateway, connection = guarded
    with gateway.client() as client:
        connection.config_set("maxmemory", 64 * 2**20)
        try:
            assert _metric(client, "imagegen_redis_maxmemory_bytes") == 64 * 2**20
            used = _metric(client, "imagegen_redis_used_memory_bytes")
            assert 0 < used < 64 * 2**20
            assert _metric(client, "imagegen_redis_high_water_ratio") == HIGH_WATER
        finally:
            connection.config_set("maxmemory", 0)


def test_submits_get_503_past_the_high_water_mark_while_redis_still_takes_writes(
    guarded: tuple[Gateway, redis.Redis],
) -> None:
    gateway, connection = guarded
    with gateway.client() as client:
        assert _submit(client).status_code == 202
        used = int(connection.info("memory")["used_memory"])
        # Past the gateway's mark (0.5) with room to spare below Redis's own limit.
        connection.config_set("maxmemory", int(used / 0.65))
        try:
            refused = _until(client, 503)
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "unavailable"
            assert "IMAGEGEN_REDIS_HIGH_WATER" in error["message"]
            assert int(refused.headers["Retry-After"]) > 0
            openai = client.post(
                "/v1/images/generations", json={"prompt": "a red circle", "model": MODEL}
            )
            assert openai.status_code == 503, openai.text
            # Refused by the gateway, not by a full Redis: jobs already running can still
            # write their images and heartbeats.
            assert connection.set("imagegen-test:still-writable", b"x" * 1024)
        finally:
            connection.config_set("maxmemory", 0)
        assert _until(client, 202).status_code == 202
