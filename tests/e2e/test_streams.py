"""Event streams are not an amplifier: one feed per job however many streams watch it, slow
readers lose progress (never a state change), and a cap on open streams per key."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from app.events import Frame, Listener, format_frame
from imagegen.cli.redis_server import RedisServer
from tests.stack import Gateway, announce_idle_model, parse_sse, start_gateway

MODEL = "idle-streams"


@pytest.fixture(scope="module")
def capped(redis_server: RedisServer, log_dir: Path) -> Iterator[Gateway]:
    gateway = start_gateway(
        redis_server.url, log_dir, {"IMAGEGEN_MAX_STREAMS_PER_KEY": "30"}, name="gateway-streams"
    )
    yield gateway
    gateway.proc.stop()


def _gauge(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _open_raw(gateway: Gateway, path: str) -> socket.socket:
    """A stream opened and never read (its client is slow, or gone quiet)."""
    host, port = gateway.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    return sock


def _until(check: object, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_many_streams_share_one_feed_and_the_cap_holds(
    capped: Gateway, redis_conn: redis.Redis
) -> None:
    announce_idle_model(redis_conn, MODEL)
    with capped.client() as client:
        job = client.post("/v1/generations", json={"prompt": "p", "model": MODEL}).json()["id"]
        path = f"/v1/generations/{job}/events"
        socks = [_open_raw(capped, path) for _ in range(30)]
        try:
            _until(lambda: _gauge(client, "imagegen_gateway_event_streams") == 30)
            assert _gauge(client, "imagegen_gateway_event_feeds") == 1
            refused = client.get(path)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_streams"
            assert "IMAGEGEN_MAX_STREAMS_PER_KEY" in refused.json()["error"]["message"]
            assert "Retry-After" in refused.headers
            socks.pop().close()
            _until(lambda: _gauge(client, "imagegen_gateway_event_streams") == 29)
            # One place free again: a stream opens, and ends with the job.
            with client.stream("GET", path) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = response.iter_lines()
                assert next(lines) == "event: queued"
                client.delete(f"/v1/generations/{job}")
                events = parse_sse([next(lines), *lines])
            assert [name for name, _ in events][-1] == "canceled"
        finally:
            for sock in socks:
                sock.close()
        _until(lambda: _gauge(client, "imagegen_gateway_event_streams") == 0)
        assert _gauge(client, "imagegen_gateway_event_feeds") == 0


def test_previews_takes_true_or_false_only(capped: Gateway, redis_conn: redis.Redis) -> None:
    announce_idle_model(redis_conn, MODEL)
    with capped.client() as client:
        job = client.post("/v1/generations", json={"prompt": "p", "model": MODEL}).json()["id"]
        client.delete(f"/v1/generations/{job}")
        for bad in ("yes", "1", "TRUE", ""):
            answer = client.get(f"/v1/generations/{job}/events", params={"previews": bad})
            assert answer.status_code == 422, bad
            assert answer.json()["error"]["details"][0]["field"] == "previews"
        with client.stream("GET", f"/v1/generations/{job}/events?previews=true") as response:
            assert [n for n, _ in parse_sse(list(response.iter_lines()))] == ["canceled"]


def _frame(seq: int, name: str) -> Frame:
    return format_frame(seq, name, "{}")


def test_a_listener_that_does_not_read_loses_progress_never_a_state_change() -> None:
    listener = Listener("k", previews=False, capacity=4)
    listener.offer(_frame(1, "running"))
    for seq in range(2, 50):
        listener.offer(_frame(seq, "progress"))
    listener.offer(_frame(50, "preview"))  # not asked for: never offered
    listener.offer(_frame(51, "succeeded"))
    listener.offer(_frame(40, "progress"))  # older than what it has: ignored
    got = []
    while (frame := asyncio.run(listener.next(0.01))) is not None:
        got.append((frame.seq, frame.name))
    assert got[0] == (1, "running") and got[-1] == (51, "succeeded")
    assert len(got) == 4 and listener.dropped == 46
