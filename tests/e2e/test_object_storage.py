"""Blobs in S3-compatible object storage (IMAGEGEN_STORAGE_URL=s3://...), against moto's S3
server on 127.0.0.1: images, inputs and control maps are objects, Redis holds only state; a
job succeeds only once its images are stored; presigned URLs for the owner only; a lost object
and a store that is down answer clearly; the sweeper deletes what outlived its job."""

from __future__ import annotations

import base64
import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from imagegen.core.blobs import Sweeper, control_map_blob, image_blob, input_blob
from imagegen.core.blobs.s3_store import S3BlobStore
from imagegen.core.contract import Keys
from imagegen.core.settings import WorkerSettings
from imagegen.core.store import JobStore
from tests.stack import (
    Gateway,
    S3Server,
    TinyService,
    s3_server,
    start_gateway,
    wait_for_job,
)

KEYS = {"alice": "ig_alice_object_storage_key", "bob": "ig_bob_object_storage_key"}
PREFIX = "storage-e2e"
SCENE = Image.new("RGB", (64, 64), (240, 240, 240))
SCENE.paste((200, 20, 20), (8, 8, 32, 32))


def _b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _keys_env() -> dict[str, str]:
    entries = [f"{name}:{hashlib.sha256(k.encode()).hexdigest()}" for name, k in KEYS.items()]
    return {"IMAGEGEN_API_KEYS": ",".join(entries)}


def _auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def s3() -> S3Server:
    return s3_server()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, s3: S3Server
) -> Iterator[TinyService]:
    made = TinyService(
        tmp_path_factory.mktemp("storage"), tiny_model_dir, {**s3.env(PREFIX), **_keys_env()}
    )
    made.model_env.update(s3.env(PREFIX))
    made.worker().stop()  # learn the model's record
    yield made
    made.close()


def _object(s3: S3Server, path: str) -> bytes | None:
    try:
        body = s3.client().get_object(Bucket=s3.bucket, Key=f"{PREFIX}/{path}")["Body"]
    except Exception as exc:
        if "NoSuchKey" in str(exc):
            return None
        raise
    data: bytes = body.read()
    return data


def _blob_keys_in_redis(connection: redis.Redis) -> list[bytes]:
    return [
        key
        for pattern in (f"{Keys.PREFIX}:job:*:image:*", f"{Keys.PREFIX}:job:*:input:*")
        for key in connection.scan_iter(match=pattern)
    ]


def test_a_worker_killed_between_storing_and_recording_loses_nothing(
    service: TinyService, s3: S3Server
) -> None:
    service.clean()
    with service.client() as client:
        client.headers.update(_auth("alice"))
        job = service.submit(client, "a crash after storing", steps=3, seed=5)
        _, crasher = service.start_worker(IMAGEGEN_FAULT_CRASH_AT="after_store")
        assert crasher.process.wait(timeout=120) == 70, crasher.log()[-3000:]
        # Its images are objects now, yet the job is not succeeded: they name no job's result.
        assert _object(s3, f"jobs/{job}/images/0") is not None
        assert service.conn.hget(Keys.job(job), "status") == b"running"
        rescuer = service.worker()
        try:
            doc = wait_for_job(client, job, timeout_s=60)
            png = client.get(f"/v1/generations/{job}/images/0").content
        finally:
            rescuer.stop()
    assert doc["status"] == "succeeded"
    assert int(service.conn.hget(Keys.job(job), "attempts") or 0) == 2  # ran again, once
    assert png == _object(s3, f"jobs/{job}/images/0")  # the rerun's image, one object
    assert JobStore(service.conn).job_stats() == {("tiny", "succeeded"): 1}


@pytest.fixture(scope="module")
def served(service: TinyService) -> Iterator[TinyService]:
    worker = service.worker()
    yield service
    worker.stop()


def test_images_and_inputs_are_objects_and_redis_keeps_only_state(
    served: TinyService, s3: S3Server
) -> None:
    served.clean()
    with served.client() as client:
        client.headers.update(_auth("alice"))
        text = served.submit(client, "two of them", steps=2, n=2)
        edit = served.submit(client, "an edit", steps=2, image=_b64_png(SCENE), strength=0.5)
        docs = [wait_for_job(client, job) for job in (text, edit)]
        assert [d["status"] for d in docs] == ["succeeded", "succeeded"]
        for job, doc in zip((text, edit), docs, strict=True):
            for link in doc["images"]:  # type: ignore[attr-defined]
                answer = client.get(link["url"])
                assert answer.status_code == 200
                assert answer.headers["content-type"] == "image/png"
                assert answer.content == _object(s3, f"jobs/{job}/images/{link['index']}")
    stored_input = _object(s3, f"jobs/{edit}/inputs/image")
    assert stored_input is not None and stored_input.startswith(b"\x89PNG")
    assert _blob_keys_in_redis(served.conn) == []  # no image, no input in Redis
    record_bytes = served.conn.memory_usage(Keys.job(text))
    assert record_bytes is not None and record_bytes < 2048


def test_presigned_urls_are_minted_for_the_owner_only(served: TinyService, s3: S3Server) -> None:
    served.clean()
    presigning: Gateway = start_gateway(
        served.redis.url,
        served.root,
        {
            **s3.env(PREFIX),
            **_keys_env(),
            "IMAGEGEN_STORAGE_PRESIGN": "true",
            "IMAGEGEN_DEFAULT_MODEL": "tiny",
        },
        name="gateway-presign",
    )
    try:
        with presigning.client() as client:
            client.headers.update(_auth("alice"))
            job = served.submit(client, "signed", steps=2)
            doc = wait_for_job(client, job)
            url = doc["images"][0]["url"]  # type: ignore[index]
            assert url.startswith(s3.endpoint_url + f"/{s3.bucket}/{PREFIX}/jobs/{job}/images/0?")
            redirect = client.get(f"/v1/generations/{job}/images/0")
            assert redirect.status_code == 307
            fetched = httpx.get(redirect.headers["location"])
            assert fetched.status_code == 200
            assert fetched.headers["content-type"] == "image/png"
            assert fetched.content == _object(s3, f"jobs/{job}/images/0")
            for path in (f"/v1/generations/{job}", f"/v1/generations/{job}/images/0"):
                other = client.get(path, headers=_auth("bob"))
                assert other.status_code == 404
                assert s3.endpoint_url not in other.text
    finally:
        presigning.proc.stop()


def test_a_lost_object_is_a_404_that_names_it(served: TinyService, s3: S3Server) -> None:
    served.clean()
    with served.client() as client:
        client.headers.update(_auth("alice"))
        job = served.submit(client, "soon lost", steps=2)
        assert wait_for_job(client, job)["status"] == "succeeded"
        s3.client().delete_object(Bucket=s3.bucket, Key=f"{PREFIX}/jobs/{job}/images/0")
        answer = client.get(f"/v1/generations/{job}/images/0")
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "image_missing"
    assert f"s3://{s3.bucket}/{PREFIX}/jobs/{job}/images/0" in error["message"]


def test_a_store_that_is_down_refuses_inputs_and_fails_jobs_clearly(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, s3: S3Server
) -> None:
    from imagegen.cli.redis_server import free_port

    down = {**s3.env(PREFIX), "IMAGEGEN_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    broken = TinyService(tmp_path_factory.mktemp("storage-down"), tiny_model_dir, down)
    broken.model_env.update(down)
    worker = broken.worker()
    try:
        with broken.client() as client:
            refused = client.post(
                "/v1/generations",
                json={"prompt": "with an image", "steps": 2, "image": _b64_png(SCENE)},
            )
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "storage_unavailable"
            assert refused.headers["retry-after"]
            assert "127.0.0.1" not in refused.text
            assert list(broken.conn.scan_iter(match=f"{Keys.PREFIX}:job:*")) == []
            # A job without inputs is accepted (nothing to store yet) and fails when its
            # images cannot be stored: failed, said why, never lost or left running.
            job = broken.submit(client, "no images in", steps=2)
            doc = wait_for_job(client, job, timeout_s=90)
        assert doc["status"] == "failed"
        assert doc["error"]["code"] == "storage_unavailable"  # type: ignore[index]
        assert "127.0.0.1" not in str(doc["error"])
        assert broken.conn.zcard(Keys.running("tiny")) == 0
    finally:
        worker.stop()
        broken.close()


def test_the_sweeper_deletes_expired_and_orphaned_objects_only(
    service: TinyService, s3: S3Server
) -> None:
    service.clean()
    url = f"s3://{s3.bucket}/sweep-{time.time_ns()}"
    settings = WorkerSettings(storage_url=url, s3_endpoint_url=s3.endpoint_url)
    store = S3BlobStore(url, endpoint_url=s3.endpoint_url)
    now = time.time()
    jobs = {
        "orphan": "gen_" + "o" * 22,  # no record at all
        "expired": "gen_" + "e" * 22,  # finished longer than the result TTL ago
        "recent": "gen_" + "r" * 22,  # finished just now
        "running": "gen_" + "u" * 22,  # still running
    }
    finished = {"expired": now - 2 * settings.result_ttl_s, "recent": now}
    for kind, job in jobs.items():
        store.put(image_blob(job, 0), b"png", settings.result_ttl_s)
        store.put(input_blob(job, "image"), b"png", settings.result_ttl_s)
        if kind in finished:
            service.conn.hset(
                Keys.job(job), mapping={"status": "succeeded", "finished_at": finished[kind]}
            )
        elif kind == "running":
            service.conn.hset(Keys.job(job), mapping={"status": "running"})
    store.put(control_map_blob("c" * 64), b"map", settings.result_ttl_s)
    sweeper = Sweeper(store, service.conn, settings)

    report = sweeper.sweep(now=now + settings.storage_orphan_after_s + 60)
    assert report.orphan_jobs == [jobs["orphan"]]
    assert report.expired_jobs == [jobs["expired"]]
    assert report.control_maps == 0
    left = {item.path for item in store.listing("")}
    for kind, job in jobs.items():
        present = kind in ("recent", "running")
        assert (f"jobs/{job}/images/0" in left) is present, kind
        assert (f"jobs/{job}/inputs/image" in left) is present, kind
    assert f"control-maps/{'c' * 64}" in left

    later = sweeper.sweep(now=now + settings.result_ttl_s + 60)
    assert later.expired_jobs == [jobs["recent"]]
    assert later.control_maps == 1
    assert {item.path for item in store.listing("")} == {
        f"jobs/{jobs['running']}/images/0",
        f"jobs/{jobs['running']}/inputs/image",
    }
    # One sweeper at a time: the lock makes a second process's sweep a no-op. (On a database
    # of its own: this module's workers sweep too, and take the lock on the shared one.)
    options = service.conn.connection_pool.connection_kwargs
    with redis.Redis(host=options["host"], port=options["port"], db=9) as lock_db:
        lock_db.flushdb()
        alone = Sweeper(store, lock_db, settings)
        assert alone.sweep_if_due() is not None
        assert alone.sweep_if_due() is None
        assert 0 < lock_db.ttl(Keys.BLOB_SWEEP) <= settings.storage_sweep_interval_s
        lock_db.flushdb()
