"""Fair use between API keys: limits per key, daily quotas, refunds, `GET /v1/usage`, and the
fair order of a model's queue. A real gateway with keys over HTTP, a model with no worker (its
jobs stay queued), and the lifecycle's claim script standing in for a worker."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from imagegen_client import Client, QuotaExceeded

from imagegen.cli.redis_server import RedisServer
from imagegen.core.api_keys import parse_entries
from imagegen.core.contract import Keys, ModelInfo, WorkerHeartbeat, utc_day
from imagegen.core.lifecycle import Lifecycle
from tests.stack import ROOT, Gateway, announce_idle_model, start_gateway

MODEL = "idle"
WORKER = "fair-test-worker"
KEYS = {
    name: f"ig_fair_{name}_0123456789abcdef"
    for name in ("alpha", "bravo", "capped", "small", "broke")
}
# 64x64, 2 steps, n=1: 0.008192 megapixel-steps a job.
JOB = {"prompt": "p", "model": MODEL, "width": 64, "height": 64, "steps": 2}
COST = 64 * 64 / 1e6 * 2


METRICS_TOKEN = "operator-" + "m" * 24


def _digest(name: str) -> str:
    return hashlib.sha256(KEYS[name].encode()).hexdigest()


@pytest.fixture(scope="module")
def fair(
    redis_server: RedisServer, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(
        "# per-key overrides of the global limits\n"
        f"capped:{_digest('capped')} max_active_jobs=2\n"
        f"small:{_digest('small')} daily_quota_megapixel_steps=0.02  # two jobs\n"
        f"broke:{_digest('broke')} daily_quota_megapixel_steps=0\n"
        f"alpha:{_digest('alpha')} max_active_jobs=unlimited\n"
    )
    gateway = start_gateway(
        redis_server.url,
        log_dir,
        {
            "IMAGEGEN_API_KEYS": f"bravo:{_digest('bravo')}",
            "IMAGEGEN_API_KEYS_FILE": str(key_file),
            # Global defaults: alpha lifts the first in its entry; 0 = unlimited.
            "IMAGEGEN_MAX_ACTIVE_JOBS": "50",
            "IMAGEGEN_DAILY_QUOTA_MEGAPIXEL_STEPS": "0",
            "IMAGEGEN_METRICS_TOKEN": METRICS_TOKEN,
        },
        name="gateway-fair",
    )
    yield gateway
    gateway.proc.stop()


@pytest.fixture(autouse=True)
def idle_model(redis_conn: redis.Redis) -> None:
    announce_idle_model(redis_conn, MODEL)


def _client(gateway: Gateway, name: str) -> httpx.Client:
    return gateway.client(headers={"Authorization": f"Bearer {KEYS[name]}"})


def _submit(client: httpx.Client, **changes: object) -> httpx.Response:
    return client.post("/v1/generations", json={**JOB, **changes})


def test_one_keys_flood_does_not_delay_another_keys_job(
    fair: Gateway, redis_conn: redis.Redis
) -> None:
    with _client(fair, "alpha") as alpha, _client(fair, "bravo") as bravo:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: _submit(alpha), range(200)))
        assert all(a.status_code == 202 for a in answers)
        flood = {a.json()["id"] for a in answers}
        single = _submit(bravo)
        assert single.status_code == 202
        # Exact: behind at most the one alpha job of the round being served.
        assert single.json()["queue_position"] <= 1
        job_id = single.json()["id"]
        positions = {job_id: bravo.get(f"/v1/generations/{job_id}").json()["queue_position"]}
        for other in list(flood)[:20]:
            positions[other] = alpha.get(f"/v1/generations/{other}").json()["queue_position"]
        # A worker's claims, one job at a time, follow the positions the documents showed.
        order = _claim_all(redis_conn)
        assert len(order) == 201
        assert order.index(job_id) <= 1
        assert all(order.index(job) == position for job, position in positions.items())
        # Then bravo submits again while alpha still has nothing left to run: it goes first,
        # and a new flood of alpha's joins the round being served, one job a round.
        assert _submit(alpha).status_code == 202
        again = _submit(bravo).json()
        assert again["queue_position"] <= 1


def _claim_all(connection: redis.Redis) -> list[str]:
    """Claim the model's jobs one at a time, as a worker with a batch of one does, under a
    heartbeat that live workers' reapers respect (an old one that lists nothing: not lost);
    returns the ids in claim order."""
    beat = WorkerHeartbeat(
        name=WORKER,
        model=ModelInfo.model_validate(json.loads(connection.get(Keys.model(MODEL)) or b"{}")),
        device="cpu",
        dtype="float32",
        version="test",
        host="test",
        pid=0,
        started_at=0,
        sent_at=0,
        state="busy",
    )
    connection.set(Keys.worker(WORKER), beat.model_dump_json(), ex=60)
    lifecycle = Lifecycle(connection)
    order = []
    try:
        while True:
            claimed, _ = lifecycle.claim(MODEL, WORKER, budget=1)
            if not claimed:
                return order
            order += [job.id for job in claimed]
            lifecycle.fail(claimed[0], "internal", "claimed by the test", 60)
    finally:
        # The per-test flush waits for every worker key to come back: this one never would.
        connection.delete(Keys.worker(WORKER))


def test_rounds_take_each_key_in_turn(fair: Gateway) -> None:
    with _client(fair, "alpha") as alpha, _client(fair, "bravo") as bravo:
        a = [_submit(alpha).json()["id"] for _ in range(3)]
        b = [_submit(bravo).json()["id"] for _ in range(3)]
        position = {
            job: client.get(f"/v1/generations/{job}").json()["queue_position"]
            for client, jobs in ((alpha, a), (bravo, b))
            for job in jobs
        }
    assert sorted(position, key=position.__getitem__) == [a[0], b[0], a[1], b[1], a[2], b[2]]


def test_max_active_jobs_refuses_past_the_limit_until_one_ends(fair: Gateway) -> None:
    with _client(fair, "capped") as client:
        jobs = [_submit(client).json()["id"] for _ in range(2)]
        refused = _submit(client)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "too_many_jobs" and "max_active_jobs = 2" in error["message"]
        assert int(refused.headers["Retry-After"]) > 0
        usage = client.get("/v1/usage").json()
        assert usage["active_jobs"] == 2 and usage["max_active_jobs"] == 2
        assert client.delete(f"/v1/generations/{jobs[0]}").json()["status"] == "canceled"
        assert _submit(client).status_code == 202
        usage = client.get("/v1/usage").json()
        assert usage["active_jobs"] == 2 and usage["jobs"]["canceled"] == 1


def test_global_max_active_jobs_applies_to_keys_without_their_own(fair: Gateway) -> None:
    with _client(fair, "bravo") as client:
        for _ in range(50):
            assert _submit(client).status_code == 202
        assert _submit(client).json()["error"]["code"] == "too_many_jobs"
        assert client.get("/v1/usage").json()["max_active_jobs"] == 50


def test_daily_quota_counts_megapixel_steps_and_refunds_cancels_of_queued_jobs(
    fair: Gateway,
) -> None:
    with _client(fair, "small") as client:
        first = _submit(client).json()["id"]
        assert _submit(client).status_code == 202
        refused = _submit(client)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "quota_exceeded"
        assert "0.008192 megapixel-steps" in refused.json()["error"]["message"]
        retry_after = int(refused.headers["Retry-After"])
        assert 0 < retry_after <= 86400
        assert retry_after == pytest.approx(86400 - time.time() % 86400, abs=60)
        usage = client.get("/v1/usage").json()
        assert usage["day"] == utc_day(time.time())
        assert usage["megapixel_steps"] == pytest.approx(2 * COST)
        assert usage["quota"] == 0.02
        # Canceled before it ran: refunded, so one more job fits.
        client.delete(f"/v1/generations/{first}")
        assert client.get("/v1/usage").json()["megapixel_steps"] == pytest.approx(COST)
        third = _submit(client).json()["id"]
        client.delete(f"/v1/generations/{third}")
        # An Idempotency-Key replay is the same job, charged once.
        replay = {"Idempotency-Key": "same"}
        assert client.post("/v1/generations", json=JOB, headers=replay).status_code == 202
        assert client.post("/v1/generations", json=JOB, headers=replay).status_code == 200
        assert client.get("/v1/usage").json()["megapixel_steps"] == pytest.approx(2 * COST)


def test_a_quota_of_zero_refuses_every_submit(fair: Gateway) -> None:
    with _client(fair, "broke") as client:
        for changes in ({}, {"steps": 1}, {"width": 64, "height": 64, "n": 1}):
            refused = _submit(client, **changes)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "quota_exceeded"
            assert "Retry-After" in refused.headers
        usage = client.get("/v1/usage").json()
        assert usage["quota"] == 0 and usage["megapixel_steps"] == 0
    # The SDK: a typed error (not retried: the wait runs to midnight) and the usage view.
    with Client(api_key=KEYS["broke"], base_url=fair.base_url) as sdk:
        with pytest.raises(QuotaExceeded) as failure:
            sdk.submit("p", model=MODEL, steps=2)
        assert failure.value.retry_after is not None and failure.value.retry_after > 0
        assert sdk.usage().quota == 0


def test_usage_is_the_callers_own_and_nothing_is_left_behind(
    fair: Gateway, redis_conn: redis.Redis
) -> None:
    with _client(fair, "alpha") as alpha, _client(fair, "bravo") as bravo:
        job = _submit(alpha).json()["id"]
        assert alpha.get("/v1/usage").json()["active_jobs"] == 1
        fresh = bravo.get("/v1/usage").json()
        assert fresh["active_jobs"] == 0 and fresh["megapixel_steps"] == 0
        assert fresh["max_active_jobs"] == 50 and fresh["quota"] is None
        alpha.delete(f"/v1/generations/{job}")
    # The key's books close with its last job: no active count, no per-key queue left.
    assert not redis_conn.exists(Keys.active("alpha"))
    assert not redis_conn.exists(Keys.key_queue(MODEL, "alpha"))
    assert redis_conn.zcard(Keys.queue(MODEL)) == 0


def test_key_entries_take_options_and_refuse_bad_ones() -> None:
    digest = "0" * 64
    (entry,) = parse_entries(
        [f"k:{digest}", "max_active_jobs=3", "daily_quota_megapixel_steps=unlimited"]
    )
    assert entry.max_active_jobs == 3 and entry.unlimited_quota
    for bad in (
        ["max_active_jobs=3"],
        [f"k:{digest}", "colour=blue"],
        [f"k:{digest}", "max_active_jobs=-1"],
    ):
        with pytest.raises(ValueError) as failure:
            parse_entries(bad)
        assert "-1" not in str(failure.value)


def test_metrics_and_the_usage_table_name_keys_never_secrets(fair: Gateway) -> None:
    with _client(fair, "small") as small, _client(fair, "capped") as capped:
        for client in (small, capped):
            job = _submit(client).json()["id"]
            client.delete(f"/v1/generations/{job}")
        kept = _submit(capped).json()["id"]
        operator = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        metrics = fair.client().get("/metrics", headers=operator).text
        public = fair.client().get("/metrics").text
        as_tenant = small.get("/metrics").text  # a tenant's own key is not the operator's
    # The public port lists no tenant: no per-key series, no key's name.
    for text in (public, as_tenant):
        assert "imagegen_key_" not in text and "imagegen_queue_depth" in text
        assert not any(f'key="{name}"' in text for name in KEYS)
    assert 'imagegen_key_jobs_total{key="small",status="canceled"} 1.0' in metrics
    assert 'imagegen_key_jobs_total{key="capped",status="canceled"} 1.0' in metrics
    assert 'imagegen_key_active_jobs{key="capped"} 1.0' in metrics
    assert 'imagegen_key_megapixel_steps_total{key="small"} 0.0' in metrics  # refunded
    assert 'imagegen_key_webhook_deliveries_total{key="bravo",outcome="delivered"} 0.0' in metrics
    for name in KEYS:
        assert KEYS[name] not in metrics and _digest(name) not in metrics
    env = {k: v for k, v in fair.env.items() if k != "IMAGEGEN_PORT"}
    result = subprocess.run(
        [sys.executable, "-m", "imagegen", "usage"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"usage on {utc_day(time.time())} (UTC)"
    assert lines[1].split()[:3] == ["key", "active", "max"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == set(KEYS)
    assert rows["capped"][1:3] == ["1", "2"] and rows["capped"][7] == "1"
    assert rows["broke"][4] == "0" and rows["alpha"][2] == "unlimited"
    assert rows["small"][3] == "0" and rows["small"][4] == "0.02"
    assert _digest("capped") not in result.stdout
    assert kept
