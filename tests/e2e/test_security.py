"""API keys, per-key isolation, limits and hardening, against real gateways over HTTP."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from imagegen.cli.redis_server import RedisServer
from imagegen.core.contract import Keys
from tests.conftest import TINY_MODEL_ID
from tests.stack import Gateway, Proc, announce_idle_model, start_gateway, wait_for_job

KEY_A, KEY_B = "ig_test_key_alpha_0123456789", "ig_test_key_bravo_9876543210"


def _entry(name: str, key: str) -> str:
    return f"{name}:{hashlib.sha256(key.encode()).hexdigest()}"


@pytest.fixture(scope="module")
def secured(redis_server: RedisServer, tiny_worker: Proc, log_dir: Path) -> Iterator[Gateway]:
    gateway = start_gateway(
        redis_server.url,
        log_dir,
        {
            "IMAGEGEN_API_KEYS": f"{_entry('alpha', KEY_A)},{_entry('bravo', KEY_B)}",
            "IMAGEGEN_DEFAULT_MODEL": TINY_MODEL_ID,
            "IMAGEGEN_RATE_LIMIT_PER_MINUTE": "100000",
        },
        name="gateway-secured",
    )
    yield gateway
    gateway.proc.stop()


def _client(gateway: Gateway, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=gateway.base_url, headers=headers, timeout=30)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"bearer {KEY_A}x"},
    ],
)
def test_v1_routes_need_a_valid_key(secured: Gateway, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=secured.base_url, headers=headers) as client:
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", "/v1/generations"),
            ("GET", "/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA"),
            ("GET", "/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA/events"),
        ]:
            response = client.request(method, path, json={"prompt": "x"})
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"


def test_probes_need_no_key(secured: Gateway) -> None:
    with httpx.Client(base_url=secured.base_url) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code in (200, 503)


def test_a_job_is_visible_only_to_the_key_that_made_it(secured: Gateway) -> None:
    with _client(secured, KEY_A) as alpha, _client(secured, KEY_B) as bravo:
        job = alpha.post("/v1/generations", json={"prompt": "mine", "steps": 2}).json()["id"]
        assert wait_for_job(alpha, job)["status"] == "succeeded"
        assert alpha.get(f"/v1/generations/{job}/images/0").status_code == 200
        for method, path in [
            ("GET", f"/v1/generations/{job}"),
            ("GET", f"/v1/generations/{job}/images/0"),
            ("GET", f"/v1/generations/{job}/events"),
            ("DELETE", f"/v1/generations/{job}"),
        ]:
            response = bravo.request(method, path)
            assert response.status_code == 404, (method, path)
            assert response.json()["error"]["code"] == "not_found"
        # Alpha's job is untouched by bravo's DELETE.
        assert alpha.get(f"/v1/generations/{job}").json()["status"] == "succeeded"


def test_idempotency_keys_are_per_api_key(secured: Gateway) -> None:
    headers = {"Idempotency-Key": f"same-{time.time_ns()}"}
    body = {"prompt": "idem", "steps": 2}
    with _client(secured, KEY_A) as alpha, _client(secured, KEY_B) as bravo:
        first = alpha.post("/v1/generations", json=body, headers=headers)
        other = bravo.post("/v1/generations", json=body, headers=headers)
    assert first.status_code == other.status_code == 202
    assert first.json()["id"] != other.json()["id"]


def test_keys_never_reach_the_log(secured: Gateway) -> None:
    with _client(secured, KEY_A) as client:
        client.get("/v1/models")
    with _client(secured, "ig_a_wrong_key_that_must_not_be_logged") as client:
        client.get("/v1/models")
    log = secured.proc.log()
    assert KEY_A not in log and "ig_a_wrong_key_that_must_not_be_logged" not in log
    assert "API keys required" in log


def test_open_service_says_so_at_start(stack: Gateway) -> None:
    assert "the service is OPEN" in stack.proc.log()


def test_a_malformed_key_entry_is_refused_without_echoing_it(
    redis_server: RedisServer, log_dir: Path
) -> None:
    with pytest.raises(RuntimeError) as failure:
        start_gateway(
            redis_server.url,
            log_dir,
            {"IMAGEGEN_API_KEYS": "plain-secret-key"},
            name="gateway-badkeys",
        )
    assert "name:sha256-hex" in str(failure.value)
    assert "plain-secret-key" not in str(failure.value)


# -- limits ------------------------------------------------------------------------------------


def test_body_over_the_limit_is_413_with_content_length(stack: Gateway) -> None:
    big = json.dumps({"prompt": "x" * 1_000_000, "model": TINY_MODEL_ID})
    with stack.client() as client:
        response = client.post(
            "/v1/generations", content=big, headers={"content-type": "application/json"}
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert "65536" in response.json()["error"]["message"]


def test_chunked_body_over_the_limit_is_413(stack: Gateway) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(200):
            yield b"x" * 1000
        yield b'"}'

    with stack.client() as client:
        response = client.post(
            "/v1/generations", content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "payload_too_large"


def test_hundred_megabyte_body_is_refused_with_413(stack: Gateway) -> None:
    with stack.client() as client:
        try:
            response = client.post(
                "/v1/generations",
                content=b"x" * 100_000_000,
                headers={"content-type": "application/json"},
            )
        except httpx.TransportError:
            pytest.fail("the server should answer 413, not drop the connection")
    assert response.status_code == 413


def test_rate_limit_is_per_key_and_shared_by_replicas(
    redis_server: RedisServer, tiny_worker: Proc, log_dir: Path
) -> None:
    # Key names of their own: budgets are per key name, and other tests spend alpha's.
    suffix = str(time.time_ns())
    env = {
        "IMAGEGEN_API_KEYS": f"{_entry('c' + suffix, KEY_A)},{_entry('d' + suffix, KEY_B)}",
        "IMAGEGEN_RATE_LIMIT_PER_MINUTE": "10",
        "IMAGEGEN_DEFAULT_MODEL": TINY_MODEL_ID,
    }
    # Start at the top of a fresh minute window, so all 11 requests share one window.
    time.sleep(max(0.0, 60 - time.time() % 60 + 0.1) if time.time() % 60 > 50 else 0)
    one = start_gateway(redis_server.url, log_dir, env, name="gateway-rl-1")
    two = start_gateway(redis_server.url, log_dir, env, name="gateway-rl-2")
    try:
        with _client(one, KEY_A) as a1, _client(two, KEY_A) as a2, _client(one, KEY_B) as b1:
            answers = [(a1 if i % 2 else a2).get("/v1/models").status_code for i in range(10)]
            assert answers == [200] * 10
            limited = a2.get("/v1/models")
            assert limited.status_code == 429
            assert limited.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(limited.headers["retry-after"]) <= 61
            assert b1.get("/v1/models").status_code == 200  # another key has its own budget
    finally:
        one.proc.stop()
        two.proc.stop()


def test_queue_depth_limit_is_429_queue_full(
    redis_server: RedisServer, redis_conn: redis.Redis, log_dir: Path
) -> None:
    announce_idle_model(redis_conn, "deep-model")
    gateway = start_gateway(
        redis_server.url, log_dir, {"IMAGEGEN_MAX_QUEUE_DEPTH": "2"}, name="gateway-qd"
    )
    try:
        with gateway.client() as client:
            body = {"prompt": "wait", "model": "deep-model"}
            ids = [client.post("/v1/generations", json=body).json()["id"] for _ in range(2)]
            full = client.post("/v1/generations", json=body)
            assert full.status_code == 429
            assert full.json()["error"]["code"] == "queue_full"
            assert "retry-after" in full.headers
            for job_id in ids:
                client.delete(f"/v1/generations/{job_id}")
            assert client.post("/v1/generations", json=body).status_code == 202
    finally:
        gateway.proc.stop()
        redis_conn.delete(Keys.model("deep-model"), Keys.queue("deep-model"))
        redis_conn.srem(Keys.MODELS, "deep-model")


def test_queue_depth_holds_exactly_under_concurrent_submits(
    redis_server: RedisServer, redis_conn: redis.Redis, log_dir: Path
) -> None:
    """The depth check and the push are one atomic step: 40 concurrent submits into a queue
    of depth 5 admit exactly 5; a replay of an admitted Idempotency-Key still answers 200."""
    announce_idle_model(redis_conn, "race-model")
    gateway = start_gateway(
        redis_server.url, log_dir, {"IMAGEGEN_MAX_QUEUE_DEPTH": "5"}, name="gateway-race"
    )
    body = {"prompt": "wait", "model": "race-model"}
    try:
        with gateway.client() as client, ThreadPoolExecutor(max_workers=40) as pool:
            answers = list(
                pool.map(
                    lambda i: client.post(
                        "/v1/generations", json=body, headers={"Idempotency-Key": f"race-{i}"}
                    ),
                    range(40),
                )
            )
            codes = sorted(a.status_code for a in answers)
            assert codes == [202] * 5 + [429] * 35, codes
            refused = [a.json()["error"]["code"] for a in answers if a.status_code == 429]
            assert set(refused) == {"queue_full"}
            assert redis_conn.zcard(Keys.queue("race-model")) == 5
            admitted = next(i for i, a in enumerate(answers) if a.status_code == 202)
            replay = client.post(
                "/v1/generations", json=body, headers={"Idempotency-Key": f"race-{admitted}"}
            )
            assert replay.status_code == 200
            assert replay.json()["id"] == answers[admitted].json()["id"]
    finally:
        gateway.proc.stop()
        jobs = redis_conn.zrange(Keys.queue("race-model"), 0, -1)
        claims = [
            Keys.idempotency(hashlib.sha256(f"\nrace-{i}".encode()).hexdigest()) for i in range(40)
        ]
        redis_conn.delete(
            Keys.model("race-model"),
            Keys.queue("race-model"),
            *claims,
            *(Keys.job(j.decode()) for j in jobs),
        )
        redis_conn.srem(Keys.MODELS, "race-model")


def test_cors_is_off_by_default_and_allow_listed_when_set(
    stack: Gateway, redis_server: RedisServer, log_dir: Path
) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with stack.client() as client:
        response = client.options("/v1/generations", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    gateway = start_gateway(
        redis_server.url,
        log_dir,
        {"IMAGEGEN_CORS_ORIGINS": "https://app.example"},
        name="gateway-cors",
    )
    try:
        with gateway.client() as client:
            allowed = client.options("/v1/generations", headers=preflight)
            denied = client.options(
                "/v1/generations", headers={**preflight, "Origin": "https://evil.example"}
            )
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in denied.headers
    finally:
        gateway.proc.stop()


@pytest.mark.parametrize(
    "model", ["*", "imagegen:*", "a b", "../etc", "x" * 200, "tiny\n", ":tiny"]
)
def test_model_ids_are_checked_before_any_lookup(stack: Gateway, model: str) -> None:
    with stack.client() as client:
        response = client.post("/v1/generations", json={"prompt": "x", "model": model})
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("model")
