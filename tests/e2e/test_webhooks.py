"""Webhooks: written to the outbox with the job's transition, delivered by a real
`imagegen webhooks` process to a real HTTP receiver on 127.0.0.1 (allow-listed), signed as
Standard Webhooks says (checked with the independent `standardwebhooks` package), retried,
given up, and delivered after the delivery process is killed mid-send."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import standardwebhooks
from imagegen_client import WebhookVerificationError, verify_webhook

from imagegen.cli.redis_server import RedisServer, free_port
from imagegen.core.contract import Keys
from tests.conftest import TINY_MODEL_ID
from tests.stack import (
    Gateway,
    Proc,
    announce_idle_model,
    service_env,
    start_gateway,
    start_process,
    wait_for_job,
)

IDLE = "idle-hooks"
ALLOWED = {"IMAGEGEN_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
# Fast retries for the tests (defaults: 5 s doubling to 10 min, for 3 h).
FAST = {
    **ALLOWED,
    "IMAGEGEN_WEBHOOK_TIMEOUT_S": "1",
    "IMAGEGEN_WEBHOOK_RETRY_FIRST_S": "0.2",
    "IMAGEGEN_WEBHOOK_RETRY_MAX_S": "0.4",
    "IMAGEGEN_WEBHOOK_RETRY_FOR_S": "60",
}


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers `status`; with `hold`,
    the first request waits for it before answering."""

    def __init__(self, port: int = 0, status: int = 200, hold: threading.Event | None = None):
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append((dict(self.headers.items()), body))
                if hold is not None and len(receiver.requests) == 1:
                    hold.wait(30)
                with contextlib.suppress(OSError):
                    self.send_response(receiver.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/imagegen?app=test"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hooks(redis_server: RedisServer, log_dir: Path) -> Iterator[Gateway]:
    gateway = start_gateway(
        redis_server.url,
        log_dir,
        {**ALLOWED, "IMAGEGEN_DEFAULT_MODEL": TINY_MODEL_ID},
        name="gateway-hooks",
    )
    yield gateway
    gateway.proc.stop()


@pytest.fixture
def deliverers(redis_server: RedisServer, log_dir: Path) -> Iterator[Callable[..., Proc]]:
    """Starts `imagegen webhooks` processes (settings: FAST and `changes`); stops them after."""
    started: list[Proc] = []

    def start(**changes: str) -> Proc:
        env = service_env(redis_server.url, {**FAST, **changes})
        name = f"webhooks-{len(started)}-{time.monotonic_ns()}"
        proc = start_process([sys.executable, "-m", "imagegen", "webhooks"], env, log_dir / name)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _until(check: Callable[[], Any], timeout_s: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s}s for {what or check}")
        time.sleep(0.02)


def _canceled_job(client: httpx.Client, connection: redis.Redis, url: str) -> str:
    """A job of a model no worker serves, canceled at once: its `canceled` webhook."""
    announce_idle_model(connection, IDLE)
    answer = client.post(
        "/v1/generations",
        json={"prompt": "p", "model": IDLE, "webhook": {"url": url, "events": ["canceled"]}},
    )
    assert answer.status_code == 202, answer.text
    job: str = answer.json()["id"]
    client.delete(f"/v1/generations/{job}")
    return job


def _deliveries(client: httpx.Client, job: str) -> list[dict[str, Any]]:
    deliveries: list[dict[str, Any]] = client.get(f"/v1/generations/{job}").json()["webhook"][
        "deliveries"
    ]
    return deliveries


def test_deliveries_are_signed_and_verify_with_standard_webhooks(
    hooks: Gateway, tiny_worker: Proc, deliverers: Callable[..., Proc]
) -> None:
    receiver = Receiver()
    deliverers()
    try:
        with hooks.client() as client:
            secret = client.get("/v1/webhook-secret").json()["secret"]
            assert secret.startswith("whsec_")
            answer = client.post(
                "/v1/generations",
                json={
                    "prompt": "a red circle",
                    "steps": 2,
                    "webhook": {"url": receiver.url, "events": ["running", "succeeded"]},
                },
            )
            assert answer.json()["webhook"] == {
                "url": receiver.url,
                "events": ["running", "succeeded"],
                "deliveries": [],
            }
            job = answer.json()["id"]
            assert wait_for_job(client, job)["status"] == "succeeded"
            _until(lambda: len(receiver.requests) == 2, what="two deliveries")
            deliveries = _until(
                lambda: len(d := _deliveries(client, job)) == 2 and d, what="two records"
            )
    finally:
        receiver.stop()
    payloads = []
    for headers, body in receiver.requests:
        # The independent implementation (PyPI `standardwebhooks`) and the SDK's agree.
        verified = standardwebhooks.Webhook(secret).verify(body, headers)
        assert verify_webhook(headers, body, secret) == verified
        assert headers["Content-Type"] == "application/json"
        assert headers["Host"] == f"127.0.0.1:{receiver.port}"
        payloads.append(verified)
    # Deliveries are independent: two of one job may arrive in either order.
    payloads.sort(key=lambda p: p["type"] != "generation.running")
    assert [p["type"] for p in payloads] == ["generation.running", "generation.succeeded"]
    assert [p["data"]["status"] for p in payloads] == ["running", "succeeded"]
    done = payloads[1]["data"]
    assert done["id"] == job and done["images"][0]["url"] == f"/v1/generations/{job}/images/0"
    assert [d["outcome"] for d in deliveries] == ["delivered", "delivered"]
    assert [d["status_code"] for d in deliveries] == [200, 200]
    assert {d["webhook_id"] for d in deliveries} == {h["webhook-id"] for h, _ in receiver.requests}
    # A tampered body, another secret, an old timestamp: refused.
    headers, body = next(r for r in receiver.requests if b"generation.succeeded" in r[1])
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, body.replace(b"succeeded", b"failed"), secret)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, body, "whsec_" + "A" * 43 + "=")
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, body, secret, now=time.time() + 3600)


def test_a_receiver_down_for_a_while_gets_the_delivery_once_it_is_up(
    hooks: Gateway, redis_conn: redis.Redis, deliverers: Callable[..., Proc]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    deliverers()
    with hooks.client() as client:
        job = _canceled_job(client, redis_conn, url)
        failed = _until(
            lambda: len(d := _deliveries(client, job)) >= 2 and d, what="two failed attempts"
        )
        assert all(d["outcome"] == "retrying" and d["status_code"] is None for d in failed)
        assert failed[0]["error"] == "unreachable"  # coarse: nothing about the host's ports
        receiver = Receiver(port)
        try:
            deliveries = _until(
                lambda: (d := _deliveries(client, job))[-1]["outcome"] == "delivered" and d,
                what="the delivery",
            )
        finally:
            receiver.stop()
    assert len(receiver.requests) == 1
    assert [d["attempt"] for d in deliveries] == list(range(1, len(deliveries) + 1))
    assert len({d["webhook_id"] for d in deliveries}) == 1
    assert payload_of(receiver)["data"]["status"] == "canceled"
    assert redis_conn.zcard(Keys.WEBHOOKS_DUE) == 0
    assert not list(redis_conn.scan_iter(match=Keys.webhook("*")))


def payload_of(receiver: Receiver, index: int = 0) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(receiver.requests[index][1])
    return data


def test_a_receiver_answering_500_is_given_up_with_a_final_failed_record(
    hooks: Gateway, redis_conn: redis.Redis, deliverers: Callable[..., Proc]
) -> None:
    receiver = Receiver(status=500)
    deliverers(IMAGEGEN_WEBHOOK_RETRY_FOR_S="1.5")
    try:
        with hooks.client() as client:
            job = _canceled_job(client, redis_conn, receiver.url)
            deliveries = _until(
                lambda: (d := _deliveries(client, job)) and d[-1]["outcome"] == "failed" and d,
                what="the delivery to be given up",
            )
    finally:
        receiver.stop()
    assert len(deliveries) >= 3 and len(receiver.requests) == len(deliveries)
    assert all(d["status_code"] == 500 for d in deliveries)
    assert all(d["outcome"] == "retrying" for d in deliveries[:-1])
    assert [d["error"] for d in deliveries] == ["http_500"] * len(deliveries)
    assert redis_conn.zcard(Keys.WEBHOOKS_DUE) == 0
    with hooks.client() as client:
        metrics = client.get("/metrics").text
    assert 'imagegen_key_webhook_deliveries_total{key="(open)",outcome="failed"} 1.0' in metrics
    retried = len(deliveries) - 1
    assert f'{{key="(open)",outcome="retrying"}} {retried}.0' in metrics


def test_a_delivery_process_killed_mid_send_delivers_after_restart(
    hooks: Gateway, redis_conn: redis.Redis, deliverers: Callable[..., Proc]
) -> None:
    release = threading.Event()
    receiver = Receiver(hold=release)
    first = deliverers()
    try:
        with hooks.client() as client:
            job = _canceled_job(client, redis_conn, receiver.url)
            _until(lambda: receiver.requests, what="the first send")
            first.process.kill()  # mid-send: the receiver has not answered
            first.process.wait()
            release.set()
            deliverers()
            deliveries = _until(
                lambda: (d := _deliveries(client, job)) and d[-1]["outcome"] == "delivered" and d,
                what="the delivery after the restart",
            )
    finally:
        release.set()
        receiver.stop()
    # Sent again under the same id, so the receiver can tell it is the same delivery.
    assert len(receiver.requests) == 2
    assert receiver.requests[0][0]["webhook-id"] == receiver.requests[1][0]["webhook-id"]
    assert [(d["attempt"], d["outcome"]) for d in deliveries] == [(2, "delivered")]


def test_a_destination_refused_at_delivery_gets_a_failed_record(
    hooks: Gateway, redis_conn: redis.Redis, deliverers: Callable[..., Proc]
) -> None:
    # The gateway allowed 127.0.0.1; this delivery process does not: checked again, refused.
    receiver = Receiver()
    deliverers(IMAGEGEN_WEBHOOK_ALLOWED_HOSTS="192.0.2.1")
    try:
        with hooks.client() as client:
            job = _canceled_job(client, redis_conn, receiver.url)
            (delivery,) = _until(lambda: _deliveries(client, job), what="the refusal")
    finally:
        receiver.stop()
    assert delivery["outcome"] == "failed"
    assert delivery["error"] == "destination_refused"
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("webhook", "field", "says"),
    [
        ({"url": "http://example.com/hook"}, "webhook.url", "https"),
        ({"url": "https://user:pw@example.com/hook"}, "webhook.url", "credentials"),
        ({"url": "https://127.0.0.1/hook"}, "webhook.url", "loopback"),
        ({"url": "https://[::1]:8443/hook"}, "webhook.url", "loopback"),
        ({"url": "https://10.0.0.1/hook"}, "webhook.url", "private"),
        ({"url": "https://169.254.169.254/latest/meta-data"}, "webhook.url", "link-local"),
        ({"url": "https://[::ffff:169.254.169.254]/"}, "webhook.url", "link-local"),
        ({"url": "https://localhost:9/hook"}, "webhook.url", "localhost resolves to"),
        ({"url": "https://example.com/" + "a" * 2048}, "webhook.url", "2000 characters"),
        ({"url": "ftp://example.com/hook"}, "webhook.url", "https"),
        ({"url": "https:///hook"}, "webhook.url", "host"),
        ({"url": "https://example.com/hook", "events": ["done"]}, "webhook.events[0]", "running"),
        ({"url": "https://example.com/hook", "events": []}, "webhook.events", "at least 1"),
        ({"url": "https://example.com/hook", "events": ["canceled"] * 2}, "webhook.events", "once"),
        ({"url": "https://example.com/hook", "secret": "x"}, "webhook.secret", "unknown field"),
    ],
)
def test_bad_webhooks_are_a_422_naming_the_field(
    gateway: Gateway, webhook: dict[str, Any], field: str, says: str
) -> None:
    # The default gateway: no allow-list. Checked before any model lookup or job.
    with gateway.client() as client:
        answer = client.post("/v1/generations", json={"prompt": "p", "webhook": webhook})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["details"][0]["field"] == field
    assert says in error["message"], error["message"]


def test_each_key_has_its_own_secret(redis_server: RedisServer, log_dir: Path) -> None:
    keys = {name: f"ig_hooks_{name}_0123456789" for name in ("one", "two")}
    entries = ",".join(f"{n}:{hashlib.sha256(k.encode()).hexdigest()}" for n, k in keys.items())
    gateway = start_gateway(
        redis_server.url,
        log_dir,
        {"IMAGEGEN_API_KEYS": entries, "IMAGEGEN_WEBHOOK_SECRET": "s3cret-master"},
        name="gateway-hook-keys",
    )
    try:
        seen = {}
        for name, key in keys.items():
            with gateway.client(headers={"Authorization": f"Bearer {key}"}) as client:
                seen[name] = client.get("/v1/webhook-secret").json()["secret"]
        with gateway.client() as client:
            assert client.get("/v1/webhook-secret").status_code == 401
    finally:
        gateway.proc.stop()
    assert seen["one"] != seen["two"]
    assert all(len(standardwebhooks.Webhook(s)._whsecret) == 32 for s in seen.values())


def test_a_training_s_events_are_delivered_as_training_events(
    hooks: Gateway, redis_conn: redis.Redis, deliverers: Callable[..., Proc]
) -> None:
    """A training's webhook goes through the same outbox and delivery process: its events are
    `training.<event>`, carrying the training's document."""
    import io
    import zipfile

    announce_idle_model(redis_conn, "idle-train", training={"steps": 10})
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as pictures:
        picture = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (64, 64), (200, 30, 30)).save(picture, format="PNG")
        pictures.writestr("0.png", picture.getvalue())
    receiver = Receiver()
    deliverers()
    try:
        with hooks.client() as client:
            secret = client.get("/v1/webhook-secret").json()["secret"]
            hook = json.dumps({"url": receiver.url, "events": ["canceled"]})
            answer = client.post(
                "/v1/trainings",
                data={"model": "idle-train", "trigger_word": "zxq", "webhook": hook},
                files={"images": ("p.zip", archive.getvalue(), "application/zip")},
            )
            assert answer.status_code == 202, answer.text
            training = answer.json()["id"]
            assert client.delete(f"/v1/trainings/{training}").json()["status"] == "canceled"
            _until(lambda: receiver.requests, what="the training's delivery")
            records = _until(
                lambda: client.get(f"/v1/trainings/{training}").json()["webhook"]["deliveries"],
                what="its delivery record",
            )
    finally:
        receiver.stop()
    [(headers, body)] = receiver.requests
    payload = standardwebhooks.Webhook(secret).verify(body, headers)
    assert payload["type"] == "training.canceled"
    assert payload["data"]["id"] == training and payload["data"]["object"] == "training"
    assert [r["outcome"] for r in records] == ["delivered"]
