"""The attack run's findings, one test per row (issue: gateway memory before the pixel cap,
500s on bad input, webhook address forms, the stream-cap race, tenant data on /metrics, slow
clients, failed authentications, error texts), against a real gateway over real HTTP.

The webhook tests make no connection to any address but 127.0.0.1: destinations are judged
through a resolver that fails the test if it is asked, and deliveries through an httpx
transport that fails the test if a request reaches it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from app.delivery import Deliverer
from imagegen.cli.redis_server import RedisServer, free_port
from imagegen.core.destinations import AllowList, IPAddress, Refused, check_destination
from imagegen.core.lifecycle import WebhookTask
from imagegen.core.settings import Settings
from imagegen.core.webhooks import Secrets
from tests.stack import Gateway, announce_idle_model, start_gateway

KEY, OTHER = "ig_hardening_key_0123456789", "ig_hardening_other_987654321"
METRICS_TOKEN = "operator-token-0123456789"
MODEL = "hardening-idle"  # announced, no worker: its jobs stay queued
STREAM_CAP = 3
AUTH_FAILURES = 5
TIMEOUT_S = 1.0


def _entry(name: str, key: str) -> str:
    return f"{name}:{hashlib.sha256(key.encode()).hexdigest()}"


@pytest.fixture(scope="module")
def hardened(redis_server: RedisServer, log_dir: Path) -> Iterator[Gateway]:
    gateway = start_gateway(
        redis_server.url,
        log_dir,
        {
            "IMAGEGEN_API_KEYS": f"{_entry('tenant-a', KEY)},{_entry('tenant-b', OTHER)}",
            "IMAGEGEN_DEFAULT_MODEL": MODEL,
            "IMAGEGEN_METRICS_TOKEN": METRICS_TOKEN,
            "IMAGEGEN_MAX_STREAMS_PER_KEY": str(STREAM_CAP),
            "IMAGEGEN_AUTH_FAILURES_PER_MINUTE": str(AUTH_FAILURES),
            "IMAGEGEN_HEADER_READ_TIMEOUT_S": str(TIMEOUT_S),
            "IMAGEGEN_BODY_READ_TIMEOUT_S": str(TIMEOUT_S),
            "IMAGEGEN_MAX_HEADER_BYTES": "16384",
        },
        name="gateway-hardened",
    )
    yield gateway
    gateway.proc.stop()


@pytest.fixture
def model(redis_conn: redis.Redis) -> str:
    announce_idle_model(redis_conn, MODEL, prompt_weighting=True)
    return MODEL


def _client(gateway: Gateway, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=gateway.base_url, headers=headers, timeout=30)


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG_B64 = base64.b64encode(_png()).decode()


def _field(answer: httpx.Response) -> str:
    assert answer.status_code == 422, answer.text
    field: str = answer.json()["error"]["details"][0]["field"]
    return field


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


# -- 1. every size and cap check before any pixel work ------------------------------------------
def test_a_refused_huge_size_costs_no_more_memory_than_a_small_one(
    hardened: Gateway, model: str
) -> None:
    pid = hardened.proc.process.pid
    with _client(hardened) as client:
        small = {"prompt": "x", "model": model, "image": PNG_B64, "width": 64, "height": 64}
        for _ in range(5):  # refused after the inputs were prepared: steps past the cap
            assert _field(client.post("/v1/generations", json={**small, "steps": 10**6})) == (
                "steps"
            )
        before = _peak_rss_kb(pid)
        huge = {**small, "width": 40000, "height": 40000}
        assert _field(client.post("/v1/generations", json=huge)) == "width"
        grown = {**small, "outpaint": {"right": 8000, "bottom": 8000}}
        del grown["width"], grown["height"]
        assert _field(client.post("/v1/generations", json=grown)) == "outpaint"
        openai = client.post(
            "/v1/images/edits",
            files={"image": ("a.png", _png(), "image/png")},
            data={"prompt": "x", "model": model, "size": "12000x12000"},
        )
        assert _field(openai) in ("size", "width")
        after = _peak_rss_kb(pid)
    # The 40000x40000 canvas alone would be 4.8 GB; before the fix, 12000² cost +500 MB.
    assert after - before < 8 * 1024, f"peak RSS grew by {after - before} kB"


# -- 2. integers past any size: a 422 naming the field, never an overflow -------------------------
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"width": 2**31, "height": 64}, "width"),
        ({"width": 2**40}, "width"),
        ({"width": 2**63, "height": 2**63}, "width"),
        ({"height": 2**63}, "height"),
        ({"outpaint": {"left": 2**63}}, "outpaint"),
        ({"outpaint": {"left": 2**63, "top": 2**63}, "strength": 1.0}, "outpaint"),
    ],
)
def test_huge_integers_with_an_image_are_a_422_naming_the_field(
    hardened: Gateway, model: str, changes: dict[str, Any], field: str
) -> None:
    body = {"prompt": "x", "model": model, "image": PNG_B64, **changes}
    with _client(hardened) as client:
        assert _field(client.post("/v1/generations", json=body)) == field


# -- 3. the edits form's JSON field: size and depth bounded before parsing ---------------------
@pytest.mark.parametrize(
    "outpaint", ["[" * 50000, "[" * 2000 + "]" * 2000, '{"right": 8}' + " " * 500]
)
def test_an_outpaint_form_field_of_any_size_or_depth_is_a_422(
    hardened: Gateway, model: str, outpaint: str
) -> None:
    with _client(hardened) as client:
        answer = client.post(
            "/v1/images/edits",
            files={"image": ("a.png", _png(), "image/png")},
            data={"prompt": "x", "model": model, "outpaint": outpaint},
        )
    assert _field(answer) == "outpaint"
    assert "200 characters" in answer.json()["error"]["message"]


# -- 4 and 8. IPv6 forms that embed an IPv4 address, and trailing dots -------------------------
REFUSED_DESTINATIONS = [
    "https://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "https://[64:ff9b:1::7f00:1]/",  # local-use NAT64 of 127.0.0.1
    "https://[2002:a9fe:a9fe::]/",  # 6to4 of 169.254.169.254
    "https://[::127.0.0.1]/",  # IPv4-compatible
    "https://[::ffff:10.0.0.1]/",  # IPv4-mapped
    "https://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",  # Teredo, client 127.0.0.1
    "https://[fe80::1]/",
    "https://[fd00::1]/",
    "https://127.0.0.1./",
    "https://127.0.0.1../",
    "https://[::1]./",
]


def _no_resolving(host: str, port: int) -> list[IPAddress]:
    raise AssertionError(f"a resolver was asked for {host}:{port}")


@pytest.mark.parametrize("url", REFUSED_DESTINATIONS)
def test_embedded_and_dotted_addresses_are_refused_without_a_lookup(url: str) -> None:
    try:
        check_destination(url, AllowList(), resolver=_no_resolving)
    except Refused as exc:
        assert "address" in str(exc) or "host" in str(exc)
    else:
        raise AssertionError(f"{url} was let through")


@pytest.mark.parametrize("url", REFUSED_DESTINATIONS)
def test_embedded_and_dotted_addresses_are_a_422_at_submit(
    hardened: Gateway, model: str, url: str
) -> None:
    body = {"prompt": "x", "model": model, "webhook": {"url": url}}
    with _client(hardened) as client:
        assert _field(client.post("/v1/generations", json=body)) == "webhook.url"


def test_public_addresses_inside_ipv6_forms_are_judged_by_the_ipv4() -> None:
    def literal(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address(host.strip("[]"))]

    for url in ("https://[64:ff9b::808:808]/", "https://[2002:808:808::]/", "https://8.8.8.8./"):
        destination, addresses = check_destination(url, AllowList(), resolver=literal)
        assert destination.scheme == "https" and addresses


def _task(url: str) -> WebhookTask:
    return WebhookTask("msg_1", "gen_x", "succeeded", url, "", time.time(), 1, {})


def _deliverer(handler: Any, allowed: str | None = None) -> Deliverer:
    settings = Settings(webhook_allowed_hosts=allowed)
    connection = redis.Redis(port=free_port())  # never connected to: nothing is sent
    deliverer = Deliverer(
        connection, settings, Secrets(connection, settings, {"": "whsec_" + "A" * 43 + "="})
    )
    deliverer.http = httpx.Client(transport=httpx.MockTransport(handler))
    deliverer.body = lambda task: b"{}"  # type: ignore[method-assign]
    return deliverer


def _no_requests(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"a delivery was attempted to {request.url}")


@pytest.mark.parametrize("url", REFUSED_DESTINATIONS)
def test_embedded_and_dotted_addresses_are_refused_again_at_delivery(url: str) -> None:
    status, error, final = _deliverer(_no_requests).send(_task(url))
    assert (status, error, final) == (None, "destination_refused", True)


# -- 5. the per-key stream cap under concurrency --------------------------------------------------
def test_the_stream_cap_holds_under_concurrent_opens(hardened: Gateway, model: str) -> None:
    with _client(hardened) as client:
        job = client.post("/v1/generations", json={"prompt": "x", "model": model}).json()["id"]
    attempts = 24
    start = threading.Barrier(attempts)
    answered = threading.Condition()
    statuses: list[int] = []
    release = threading.Event()

    def open_stream() -> None:
        with _client(hardened) as client:
            client.get("/healthz")  # connected before the barrier: the opens arrive together
            start.wait(10)
            with client.stream("GET", f"/v1/generations/{job}/events") as answer:
                with answered:
                    statuses.append(answer.status_code)
                    answered.notify_all()
                if answer.status_code == 200:
                    release.wait(30)  # held open until every attempt was answered

    threads = [threading.Thread(target=open_stream) for _ in range(attempts)]
    for thread in threads:
        thread.start()
    with answered:
        answered.wait_for(lambda: len(statuses) == attempts, timeout=30)
    release.set()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [200] * STREAM_CAP + [429] * (attempts - STREAM_CAP), statuses
    # Every place was given back when the streams closed: new ones open.
    with _client(hardened) as client:
        for _ in range(STREAM_CAP):
            with client.stream("GET", f"/v1/generations/{job}/events") as answer:
                assert answer.status_code == 200
        client.delete(f"/v1/generations/{job}")


# -- 6. no tenant on the public /metrics --------------------------------------------------------
def test_metrics_list_tenants_only_to_the_operator(hardened: Gateway, model: str) -> None:
    with _client(hardened) as client:
        client.post("/v1/generations", json={"prompt": "x", "model": model})
        public = httpx.get(f"{hardened.base_url}/metrics").text
        as_tenant = client.get("/metrics").text
        operator = httpx.get(
            f"{hardened.base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
        ).text
    for text in (public, as_tenant):
        assert "tenant-a" not in text and "tenant-b" not in text and "imagegen_key_" not in text
        assert "imagegen_queue_depth" in text
    assert 'imagegen_key_active_jobs{key="tenant-a"} 1.0' in operator
    assert 'key="tenant-b"' in operator


# -- 7. prompt weights bounded --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("(red:1e308) circle", "within -10..10"),
        ("(red:" + "9" * 400 + ") circle", "within -10..10"),
        ("(" * 995 + "red circle", "995 deep"),
        ("(" * 995 + "red" + ")" * 995, "995 deep"),
        ("((((red:10):10))) circle", "within -10..10"),
        ("(red:-11)", "within -10..10"),
    ],
)
def test_weights_and_nesting_past_the_bounds_are_a_422_naming_prompt(
    hardened: Gateway, model: str, prompt: str, says: str
) -> None:
    with _client(hardened) as client:
        for field in ("prompt", "negative_prompt"):
            body = {"prompt": "a circle", "model": model, field: prompt}
            answer = client.post("/v1/generations", json=body)
            assert _field(answer) == field
            assert says in answer.json()["error"]["message"]
        fine = client.post("/v1/generations", json={"prompt": "((red:1.5)) [blue]", "model": model})
        assert fine.status_code == 202, fine.text
        client.delete(f"/v1/generations/{fine.json()['id']}")


# -- 9. allow-list ports, coarse delivery errors -------------------------------------------------
def test_allow_list_entries_may_name_a_port() -> None:
    allow = AllowList.parse(
        ["127.0.0.1:8080", "hooks.internal:8443", "10.0.0.0/8:443", "[::1]:9000", "fd00::/8"]
    )
    assert allow.names("127.0.0.1", 8080) and not allow.names("127.0.0.1", 6379)
    assert allow.names("hooks.internal.", 8443) and not allow.names("hooks.internal", 443)
    assert allow.names("10.2.3.4", 443) and not allow.names("10.2.3.4", 80)
    assert allow.names("[::1]", 9000) and not allow.names("::1", 9001)
    assert allow.names("fd00::5", 1)  # no port: any
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        AllowList.parse(["127.0.0.1:99999"])
    with pytest.raises(Refused):
        check_destination("http://127.0.0.1:6379/", allow, resolver=_no_resolving)


def test_a_port_the_allow_list_does_not_name_is_a_422(
    redis_server: RedisServer, log_dir: Path
) -> None:
    listed = free_port()
    gateway = start_gateway(
        redis_server.url,
        log_dir,
        {"IMAGEGEN_WEBHOOK_ALLOWED_HOSTS": f"127.0.0.1:{listed}"},
        name="gateway-allow-port",
    )
    try:
        with gateway.client() as client:
            redis_port = redis_server.url.rsplit(":", 1)[1].split("/")[0]
            body = {"prompt": "x", "webhook": {"url": f"http://127.0.0.1:{redis_port}/"}}
            assert _field(client.post("/v1/generations", json=body)) == "webhook.url"
    finally:
        gateway.proc.stop()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (httpx.ConnectError("[SSL] record layer failure (_ssl.c:1006)"), "unreachable"),
        (httpx.ConnectError("Connection refused"), "unreachable"),
        (httpx.ReadTimeout("timed out"), "timeout"),
        (httpx.Response(503), "http_503"),
        (httpx.Response(302, headers={"Location": "http://10.0.0.1/"}), "http_302"),
    ],
)
def test_delivery_errors_shown_to_the_tenant_are_coarse(answer: Any, error: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "127.0.0.1"
        if isinstance(answer, Exception):
            raise answer
        return answer

    deliverer = _deliverer(handler, allowed="127.0.0.1:9")
    _, shown, final = deliverer.send(_task("http://127.0.0.1:9/hook"))
    assert shown == error and not final
    assert "_ssl" not in shown and "refused" not in shown


# -- 10. slow and oversized clients ----------------------------------------------------------------
def _raw(gateway: Gateway, data: bytes, then: bytes | None = None) -> bytes:
    """Send `data` on a fresh connection (and never the rest), read until the server closes."""
    port = int(gateway.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        with contextlib.suppress(OSError):  # the server may close mid-send of a huge head
            sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received


def test_a_slow_head_gets_408_and_the_connection_closed(hardened: Gateway) -> None:
    answer = _raw(hardened, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer


def test_a_slow_body_gets_408_and_the_connection_closed(hardened: Gateway) -> None:
    head = (
        b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n"
    )
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: _raw(hardened, head + b'{"prompt"'), range(5)))
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_a_head_past_the_cap_gets_431(hardened: Gateway) -> None:
    answer = _raw(hardened, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20))
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    # A request within the limits is served as before, keep-alive included.
    with httpx.Client(base_url=hardened.base_url) as client:
        assert client.get("/healthz", headers={"X-Fine": "a" * 8000}).status_code == 200
        assert client.get("/healthz").status_code == 200


# -- 11. failed authentications rate-limited per address ----------------------------------------
def test_failed_authentications_are_rate_limited_per_address(hardened: Gateway) -> None:
    with _client(hardened, "wrong-key") as wrong:
        statuses = [wrong.get("/v1/models").status_code for _ in range(AUTH_FAILURES + 5)]
        last = wrong.get("/v1/models")
    assert statuses == [401] * AUTH_FAILURES + [429] * 5
    assert last.status_code == 429 and int(last.headers["Retry-After"]) >= 1
    assert "without a valid API key" in last.json()["error"]["message"]
    with _client(hardened) as right:  # a valid key is not slowed by others' failures
        assert right.get("/v1/models").status_code == 200


# -- 12. messages in our own words ---------------------------------------------------------------
def _bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_a_bomb_is_refused_in_our_words(hardened: Gateway, model: str) -> None:
    bomb = base64.b64encode(_bomb_png(30000, 30000)).decode()
    with _client(hardened) as client:
        answer = client.post("/v1/generations", json={"prompt": "x", "model": model, "image": bomb})
    assert _field(answer) == "image"
    message = answer.json()["error"]["message"]
    assert "pixel cap" in message and "DOS" not in message and "attack" not in message


def test_readiness_without_redis_says_so_in_our_words(log_dir: Path) -> None:
    gateway = start_gateway(f"redis://127.0.0.1:{free_port()}/0", log_dir, name="gateway-no-redis")
    try:
        answer = httpx.get(f"{gateway.base_url}/readyz", timeout=30)
    finally:
        gateway.proc.stop()
    assert answer.status_code == 503
    assert answer.json()["detail"] == "redis is unavailable"
