"""Metrics and request ids: /metrics after a few jobs, X-Request-ID from HTTP into the worker."""

from __future__ import annotations

import re
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TINY_MODEL_ID
from tests.stack import Gateway, Proc, wait_for_job


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not found")


def _metric_or_zero(text: str, name: str, **labels: str) -> float:
    try:
        return _metric(text, name, **labels)
    except AssertionError:
        return 0.0


def test_metrics_show_queue_depth_durations_and_jobs_by_status(stack: Gateway) -> None:
    with stack.client() as client:
        before = client.get("/metrics").text
        ids = [
            client.post(
                "/v1/generations", json={"prompt": f"m{i}", "model": TINY_MODEL_ID, "steps": 2}
            ).json()["id"]
            for i in range(3)
        ]
        for job_id in ids:
            assert wait_for_job(client, job_id)["status"] == "succeeded"
        text = client.get("/metrics").text
    assert re.search(r'^imagegen_queue_depth\{model="tiny"\} \d', text, re.M)
    assert re.search(r'^imagegen_workers\{model="tiny"\} 1\.0$', text, re.M)
    done_before = (
        _metric(before, "imagegen_jobs_total", model="tiny", status="succeeded")
        if ('imagegen_jobs_total{model="tiny",status="succeeded"}' in before)
        else 0.0
    )
    done = _metric(text, "imagegen_jobs_total", model="tiny", status="succeeded")
    assert done - done_before >= 3
    assert _metric(text, "imagegen_job_run_seconds_count", model="tiny") >= 3
    assert 'imagegen_job_run_seconds_bucket{le="+Inf",model="tiny"}' in text
    assert re.search(
        r"^imagegen_http_requests_total\{.*route=\"/v1/generations\".*\} \d", text, re.M
    )


def test_request_id_is_echoed_and_follows_the_job_into_the_worker(
    stack: Gateway, tiny_worker: Proc
) -> None:
    rid = f"trace-{time.time_ns()}"
    with stack.client() as client:
        response = client.post(
            "/v1/generations",
            json={"prompt": "traced", "model": TINY_MODEL_ID, "steps": 2},
            headers={"X-Request-ID": rid},
        )
        assert response.headers["x-request-id"] == rid
        wait_for_job(client, response.json()["id"])
        generated = client.get("/healthz").headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
        bogus = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
        assert bogus.headers["x-request-id"] != "bad id\twith spaces"
    deadline = time.monotonic() + 30
    while True:  # the worker logs the job's end just after it wrote it
        worker_lines = [line for line in tiny_worker.log().splitlines() if rid in line]
        if any("succeeded" in line for line in worker_lines) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert any("succeeded" in line for line in worker_lines), worker_lines
    assert any(rid in line for line in stack.proc.log().splitlines())


def test_errors_carry_the_request_id_too(stack: Gateway) -> None:
    with httpx.Client(base_url=stack.base_url) as client:
        response = client.post("/v1/generations", json={"nope": 1}, headers={"X-Request-ID": "r1"})
    assert response.status_code == 422
    assert response.headers["x-request-id"] == "r1"
