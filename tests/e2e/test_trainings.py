"""Trainings through the real service: a zip of pictures in over HTTP, a worker started with
trainings enabled trains a LoRA on the tiny model, and its owner uses it by id; nobody else can,
and nothing leaks. Every bad upload is a 422 naming the field before a training exists, and a
worker killed after a checkpoint leaves a training that another worker resumes from it, ending
with the very weights an uninterrupted run makes."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from imagegen.cli.redis_server import RedisServer
from imagegen.core.contract import Keys
from imagegen.core.trainings import training_lane
from tests.stack import (
    FAST_RECOVERY,
    Gateway,
    Proc,
    announce_idle_model,
    parse_sse,
    start_gateway,
    start_worker,
    wait_for_job,
    wait_for_worker,
)

MODEL = "tiny-train"
KEYS = {"alice": "ig_test_key_alice_0123456789", "bob": "ig_test_key_bob_9876543210"}
TRIGGER = "zxq"
STEPS = 12
# What every training here asks for: small and fast on the tiny model.
FIELDS = {
    "model": MODEL,
    "name": "blocks",
    "trigger_word": TRIGGER,
    "steps": str(STEPS),
    "rank": "4",
    "learning_rate": "0.01",
    "seed": "5",
}
PROMPT = f"a red {TRIGGER} picture"


def _entry(name: str, key: str) -> str:
    return f"{name}:{hashlib.sha256(key.encode()).hexdigest()}"


def worker_env(model_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "IMAGEGEN_MODEL": str(model_dir),
        "IMAGEGEN_MODEL_ID": MODEL,
        "IMAGEGEN_WORKER_TASKS": "generate,train",
        "IMAGEGEN_TRAINING_CHECKPOINT_STEPS": "4",
        **extra,
    }


@pytest.fixture(scope="module")
def trainer(
    redis_server: RedisServer, redis_conn: redis.Redis, log_dir: Path, tiny_model_dir: Path
) -> Iterator[Proc]:
    proc = start_worker(
        redis_server.url, log_dir, "trainer-1", worker_env(tiny_model_dir), forked=True
    )
    wait_for_worker(redis_conn, proc, "trainer-1")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def service(redis_server: RedisServer, log_dir: Path, trainer: Proc) -> Iterator[Gateway]:
    keys = ",".join(_entry(name, key) for name, key in KEYS.items())
    gateway = start_gateway(
        redis_server.url,
        log_dir,
        {
            "IMAGEGEN_API_KEYS": keys,
            "IMAGEGEN_DEFAULT_MODEL": MODEL,
            "IMAGEGEN_MAX_ADAPTERS_PER_KEY": "2",
        },
        name="gateway-trainings",
    )
    yield gateway
    gateway.proc.stop()


def client_of(gateway: Gateway, who: str) -> httpx.Client:
    return gateway.client(headers={"Authorization": f"Bearer {KEYS[who]}"})


def picture(i: int) -> bytes:
    pixels = np.full((64, 64, 3), 240, dtype=np.uint8)
    pixels[12 + 4 * i : 44, 10 + 8 * i : 30 + 8 * i] = (200, 30 + 40 * i, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pictures_zip(count: int = 4, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(count):
            archive.writestr(f"set/{i:02d}.png", picture(i))
            archive.writestr(f"set/{i:02d}.txt", f"a red {TRIGGER} picture {i}")
        archive.writestr("__MACOSX/set/._00.png", b"resource fork")  # skipped, as kohya does
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def submit(client: httpx.Client, archive: bytes | None = None, **fields: str) -> httpx.Response:
    files = {"images": ("pictures.zip", archive or pictures_zip(), "application/zip")}
    return client.post("/v1/trainings", data={**FIELDS, **fields}, files=files)


def wait_for_training(
    client: httpx.Client, training_id: str, timeout_s: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        doc: dict[str, Any] = client.get(f"/v1/trainings/{training_id}").json()
        if doc["status"] in ("succeeded", "failed", "canceled"):
            return doc
        assert time.monotonic() < deadline, f"training {training_id} still {doc['status']}"
        time.sleep(0.05)


def generate(client: httpx.Client, **body: Any) -> bytes:
    request = {"model": MODEL, "prompt": PROMPT, "steps": 3, "seed": 11, **body}
    response = client.post("/v1/generations", json=request)
    assert response.status_code == 202, response.text
    doc = wait_for_job(client, response.json()["id"])
    assert doc["status"] == "succeeded", doc
    return client.get(f"/v1/generations/{doc['id']}/images/0").content


def test_a_training_makes_a_private_adapter_its_owner_uses_and_nothing_leaks(
    service: Gateway, trainer: Proc
) -> None:
    with client_of(service, "alice") as alice, client_of(service, "bob") as bob:
        alice_before = generate(alice)
        bob_before = generate(bob)
        response = submit(alice)
        assert response.status_code == 202, response.text
        first = response.json()
        assert first["object"] == "training" and first["status"] in ("queued", "running")
        assert first["images"] == 4 and first["progress"]["total_steps"] == STEPS
        assert response.headers["location"] == f"/v1/trainings/{first['id']}"
        with alice.stream("GET", f"/v1/trainings/{first['id']}/events") as stream:
            events = parse_sse(list(stream.iter_lines()))
        names = [name for name, _ in events]
        assert names[-1] == "succeeded", names
        losses = [data["progress"]["loss"] for name, data in events if name == "progress"]  # type: ignore[index]
        assert losses and all(isinstance(loss, float) for loss in losses), events
        doc = alice.get(f"/v1/trainings/{first['id']}").json()
        assert doc["status"] == "succeeded" and doc["progress"]["step"] == STEPS
        adapter = doc["adapter"]
        assert adapter["id"].startswith("blocks-") and adapter["trigger_word"] == TRIGGER
        assert adapter["model"] == MODEL
        assert [t["id"] for t in alice.get("/v1/trainings").json()["data"]] == [first["id"]]
        assert bob.get("/v1/trainings").json()["data"] == []

        # Listed for its owner only.
        def own(client: httpx.Client) -> list[dict[str, Any]]:
            models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
            return [a for a in models[MODEL]["adapters"] if a.get("owner") == "you"]

        assert [(a["id"], a["trigger_words"]) for a in own(alice)] == [(adapter["id"], [TRIGGER])]
        assert own(bob) == []

        # Its owner uses it; it changes the picture, and leaves no trace on the others.
        adapted = generate(alice, loras=[{"id": adapter["id"], "scale": 1.0}])
        assert adapted != alice_before
        assert generate(alice) == alice_before  # the same key, without it: as if never trained
        assert generate(bob) == bob_before  # another key, the same words: untouched
        assert generate(alice, loras=[{"id": adapter["id"], "scale": 0}]) == alice_before

        # Another key cannot use, read, download or delete it: as if it did not exist.
        refused = bob.post(
            "/v1/generations",
            json={"model": MODEL, "prompt": PROMPT, "loras": [{"id": adapter["id"]}]},
        )
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["message"].startswith("loras[0].id: unknown adapter")
        assert bob.get(f"/v1/trainings/{first['id']}").status_code == 404
        assert bob.get(f"/v1/adapters/{adapter['id']}/weights").status_code == 404
        assert bob.delete(f"/v1/adapters/{adapter['id']}").status_code == 404

        # The weights download as kohya names them, with the trigger's embedding, and load
        # into diffusers as they were trained.
        weights = alice.get(f"/v1/adapters/{adapter['id']}/weights")
        assert weights.status_code == 200
        assert weights.headers["content-type"] == "application/octet-stream"
        from safetensors.torch import load

        from builtin_model.tiny import build_tiny_pipeline
        from worker.training.export import load_trained

        tensors = load(weights.content)
        assert f"bundle_emb.{TRIGGER}.string_to_param.*" in tensors
        assert any(k.startswith("lora_unet_") for k in tensors)
        pipe = build_tiny_pipeline()
        load_trained(pipe, tensors, TRIGGER, token=TRIGGER, adapter_name="downloaded")
        assert "downloaded" in pipe.get_list_adapters()["unet"]

        # Deleted: gone from the listing, refused by id, its weights gone.
        deleted = alice.delete(f"/v1/adapters/{adapter['id']}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert own(alice) == []
        gone = alice.post(
            "/v1/generations",
            json={"model": MODEL, "prompt": PROMPT, "loras": [{"id": adapter["id"]}]},
        )
        assert gone.status_code == 422, gone.text
        assert alice.get(f"/v1/adapters/{adapter['id']}/weights").status_code == 404
        assert generate(alice) == alice_before
        # And every worker that held it unloads it before its next batch (it looks every 5 s).
        unloaded = f"unloaded trained adapter {adapter['id']}: it was deleted"
        deadline = time.monotonic() + 30
        while unloaded not in trainer.log():
            assert time.monotonic() < deadline, "the deleted adapter stayed loaded"
            generate(alice)


def test_a_training_is_canceled_at_its_next_step_and_makes_no_adapter(service: Gateway) -> None:
    with client_of(service, "alice") as alice:
        response = submit(alice, steps="4000")
        assert response.status_code == 202, response.text
        training = response.json()["id"]
        deadline = time.monotonic() + 60
        while alice.get(f"/v1/trainings/{training}").json()["progress"]["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        canceled = alice.delete(f"/v1/trainings/{training}").json()
        assert canceled["status"] == "canceled"
        doc = wait_for_training(alice, training)
        assert doc["status"] == "canceled" and doc["adapter"] is None
        assert doc["progress"]["step"] < 4000
        # The worker goes back to generations at once.
        generate(alice)


def _field_of(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    field: str = response.json()["error"]["details"][0]["field"]
    return field


def _bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("00.png", b"\0" * (20 * 2**20))  # 20 MiB of zeros in ~20 KB
    return buffer.getvalue()


def _zip_with(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("archive", "fields", "field", "words"),
    [
        (b"not a zip", {}, "images", "not a zip"),
        (_zip_with("notes/readme.md", b"hello"), {}, "images", "no picture"),
        (_bomb(), {}, "images", "zip bomb"),
        (_zip_with("../../etc/evil.png", b"x"), {}, "images", "outside the archive"),
        (_zip_with("/abs.png", b"x"), {}, "images", "outside the archive"),
        (_zip_with("00.png", b"GIF89a not a png"), {}, "images[00.png]", "GIF"),
        (None, {"model": "no-such-model"}, "model", "unknown model"),
        (None, {"trigger_word": "red"}, "trigger_word", "already a word"),
        (None, {"trigger_word": "two words"}, "trigger_word", "one word"),
        (None, {"name": "Bad Name"}, "name", "lowercase"),
        (None, {"steps": "0"}, "steps", "greater than or equal to 1"),
        (None, {"steps": "6000"}, "steps", "at most 5000 (IMAGEGEN_TRAINING_MAX_STEPS)"),
        (None, {"rank": "999"}, "rank", "less than or equal to 128"),
        (None, {"learning_rate": "nan"}, "learning_rate", "finite"),
    ],
)
def test_bad_uploads_are_422s_naming_the_field_before_a_training_exists(
    service: Gateway,
    redis_conn: redis.Redis,
    archive: bytes | None,
    fields: dict[str, str],
    field: str,
    words: str,
) -> None:
    with client_of(service, "alice") as alice:
        response = submit(alice, archive, **fields)
        assert _field_of(response) == field, response.text
        assert words in response.json()["error"]["message"], response.text
    assert redis_conn.zcard(Keys.queue(training_lane(MODEL))) == 0
    assert redis_conn.zcard(Keys.trainings("alice")) == 0


def test_other_forms_and_their_mistakes(service: Gateway, redis_conn: redis.Redis) -> None:
    import base64

    with client_of(service, "alice") as alice:
        # JSON: base64 pictures with captions; a caption past the model's window is refused.
        long_caption = " ".join(["red"] * 40)
        body = {
            "model": MODEL,
            "trigger_word": TRIGGER,
            "steps": 2,
            "images": [{"image": base64.b64encode(picture(0)).decode(), "caption": long_caption}],
        }
        too_long = alice.post("/v1/trainings", json=body)
        assert _field_of(too_long).startswith("captions"), too_long.text
        assert "tokens long" in too_long.json()["error"]["message"]
        assert _field_of(alice.post("/v1/trainings", json={**body, "images": []})) == "images"
        body["images"][0]["caption"] = "a red picture"  # the trigger word is put first
        accepted = alice.post("/v1/trainings", json=body)
        assert accepted.status_code == 202, accepted.text
        # Repeated files with their captions; the counts must match.
        files = [("images[]", (f"{i}.png", picture(i), "image/png")) for i in range(2)]
        mismatch = alice.post(
            "/v1/trainings", data={**FIELDS, "captions[]": ["only one"]}, files=files
        )
        assert _field_of(mismatch) == "captions[]", mismatch.text
        form = alice.post(
            "/v1/trainings", data={**FIELDS, "steps": "2", "captions[]": ["one", "two"]},
            files=files,
        )  # fmt: skip
        assert form.status_code == 202, form.text
        assert form.json()["images"] == 2
        for training in (accepted.json()["id"], form.json()["id"]):
            assert wait_for_training(alice, training)["status"] == "succeeded"
        # A model its workers say cannot be trained (an inpainting one, say) is refused with
        # their reason.
        announce_idle_model(
            redis_conn, "inpaint-like", family="sd15", not_trainable="it is an inpainting model"
        )
        refused = submit(alice, model="inpaint-like")
        assert _field_of(refused) == "model"
        assert "cannot be trained: it is an inpainting model" in refused.text
        # Two adapters held: the key's cap (this module's IMAGEGEN_MAX_ADAPTERS_PER_KEY).
        capped = submit(alice)
        assert capped.status_code == 429, capped.text
        assert capped.json()["error"]["code"] == "too_many_adapters"


def test_an_idempotency_key_replays_a_training_however_its_pictures_are_sent(
    service: Gateway,
) -> None:
    with client_of(service, "alice") as alice:
        headers = {"Idempotency-Key": "train-once"}
        files = {"images": ("pictures.zip", pictures_zip(), "application/zip")}
        fields = {**FIELDS, "steps": "4000"}
        first = alice.post("/v1/trainings", data=fields, files=files, headers=headers)
        assert first.status_code == 202, first.text
        # The same pictures and fields, zipped again (another archive, another boundary).
        again = alice.post(
            "/v1/trainings",
            data=fields,
            files={"images": ("again.zip", pictures_zip(), "application/zip")},
            headers=headers,
        )
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        other = alice.post(
            "/v1/trainings", data={**fields, "rank": "8"}, files=files, headers=headers
        )
        assert other.status_code == 409, other.text
        alice.delete(f"/v1/trainings/{first.json()['id']}")


def test_a_queued_generation_waits_at_most_a_slice_of_a_running_training(
    service: Gateway,
) -> None:
    """A worker that trains and generates runs a generation queued mid-training next (the
    training yields between its steps), then goes on with the training."""
    with client_of(service, "alice") as alice:
        training = submit(alice, steps="4000").json()["id"]
        deadline = time.monotonic() + 60
        while alice.get(f"/v1/trainings/{training}").json()["progress"]["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        waited: list[float] = []

        def timed() -> None:
            started = time.monotonic()
            generate(alice)
            waited.append(time.monotonic() - started)

        worker = threading.Thread(target=timed)
        worker.start()
        worker.join(timeout=60)
        assert waited, "the generation never finished while a training ran"
        still = alice.get(f"/v1/trainings/{training}").json()
        assert still["status"] == "running", still
        alice.delete(f"/v1/trainings/{training}")


def test_the_sdk_and_the_cli_train_and_use_an_adapter(service: Gateway, tmp_path: Path) -> None:
    import anyio
    from imagegen_client import APIError, AsyncClient, Client, TrainingError

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(picture(i))
        (folder / f"{i}.txt").write_text(f"a red {TRIGGER} picture {i}")
    seen: list[int] = []
    with Client(api_key=KEYS["alice"], base_url=service.base_url) as client:
        training = client.trainings.create(
            folder, trigger_word=TRIGGER, model=MODEL, steps=6, rank=4, seed=3
        )
        assert training.images == 3
        done = client.trainings.wait(training, on_progress=lambda t: seen.append(t.progress.step))
        assert done.adapter is not None and seen[-1] == 6
        result = client.generate(PROMPT, model=MODEL, steps=3, seed=11, loras=[done.adapter.id])
        assert len(result.images) == 1
        assert client.trainings.list()[0].id == training.id

    async def train_async() -> None:
        # The same calls, awaited (another key: this module allows two adapters a key).
        async with AsyncClient(api_key=KEYS["bob"], base_url=service.base_url) as client:
            pictures = [(picture(i), f"a red {TRIGGER} picture {i}") for i in range(2)]
            created = await client.trainings.create(
                pictures, trigger_word=TRIGGER, model=MODEL, steps=4, rank=4, name="awaited"
            )
            assert created.images == 2
            done = await client.trainings.wait(created)
            assert done.adapter is not None and done.progress.step == 4
            assert [t.id for t in await client.trainings.list()] == [created.id]
            assert (await client.trainings.get(created.id)).status == "succeeded"
            assert f"bundle_emb.{TRIGGER}." in (
                await client.trainings.weights(done.adapter)
            ).decode("latin-1")
            await client.trainings.delete_adapter(done.adapter)
            with pytest.raises(APIError) as gone:
                await client.trainings.weights(done.adapter)
            assert gone.value.status_code == 404
            queued = await client.trainings.create(pictures, trigger_word=TRIGGER, model=MODEL)
            canceled = await client.trainings.cancel(queued)
            assert canceled.id == queued.id
            with pytest.raises(TrainingError) as ended:
                await client.trainings.wait(queued)
            assert ended.value.training.status == "canceled"

    anyio.run(train_async)
    archive = tmp_path / "pictures.zip"
    archive.write_bytes(pictures_zip(3))
    weights = tmp_path / "mine.safetensors"
    env = {**os.environ, "IMAGEGEN_BASE_URL": service.base_url, "IMAGEGEN_API_KEY": KEYS["alice"]}
    command = [
        sys.executable, "-m", "imagegen", "train", str(archive), "--trigger", TRIGGER,
        "--model", MODEL, "--steps", "6", "--rank", "4", "--name", "cli", "-o", str(weights),
    ]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert lines[0].startswith("training trn_") and "(3 pictures)" in lines[0]
    assert lines[1].startswith("adapter cli-") and f"trigger word '{TRIGGER}'" in lines[1]
    assert weights.stat().st_size > 0 and lines[2] == f"wrote {weights}"
    refused = subprocess.run(
        [*command[:6], "red", *command[7:]], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "already a word" in refused.stderr, refused.stderr


def test_an_sdxl_model_trains_and_its_owner_uses_the_adapter(
    service: Gateway,
    redis_server: RedisServer,
    redis_conn: redis.Redis,
    log_dir: Path,
    tmp_path: Path,
) -> None:
    """SDXL through the API: both text encoders learn the word, the worker reads it under the
    adapter's private token in both tokenizers, and the file holds A1111's `clip_l`/`clip_g`.
    This worker holds one trained adapter at a time: the other one's next job loads it again,
    and draws as it did."""
    from safetensors.torch import load

    from builtin_model.tiny import build_tiny_sdxl_pipeline, save_tiny_sdxl_pipeline
    from worker.training.export import load_trained

    model = "tiny-xl-train"
    env = {
        **worker_env(save_tiny_sdxl_pipeline(tmp_path / "xl")),
        "IMAGEGEN_MODEL_ID": model,
        "IMAGEGEN_MAX_LOADED_TRAINED_ADAPTERS": "1",
    }
    worker = start_worker(redis_server.url, log_dir, "trainer-xl", env, forked=True)
    try:
        wait_for_worker(redis_conn, worker, "trainer-xl")
        with client_of(service, "bob") as bob, client_of(service, "alice") as alice:
            listed = {m["id"]: m for m in bob.get("/v1/models").json()["data"]}[model]
            assert listed["family"] == "sdxl" and listed["training"]["steps"] > 0, listed
            before = generate(bob, model=model)
            response = submit(bob, pictures_zip(3), model=model, steps="4", name="xl")
            assert response.status_code == 202, response.text
            doc = wait_for_training(bob, response.json()["id"])
            assert doc["status"] == "succeeded", doc
            adapter = doc["adapter"]["id"]
            adapted = generate(bob, model=model, loras=[{"id": adapter}])
            assert adapted != before
            assert generate(bob, model=model) == before  # without it: as if never trained
            assert generate(alice, model=model) == before  # another key: untouched
            other = submit(bob, pictures_zip(2), model=model, steps="2", name="xl-other")
            second = wait_for_training(bob, other.json()["id"])["adapter"]["id"]
            assert generate(bob, model=model, loras=[{"id": second}]) not in (before, adapted)
            assert f"unloaded trained adapter {adapter}: the least recently used" in worker.log()
            assert generate(bob, model=model, loras=[{"id": adapter}]) == adapted  # loaded again
            tensors = load(bob.get(f"/v1/adapters/{adapter}/weights").content)
            assert {f"bundle_emb.{TRIGGER}.clip_l", f"bundle_emb.{TRIGGER}.clip_g"} <= set(tensors)
            pipe = build_tiny_sdxl_pipeline()
            load_trained(pipe, tensors, TRIGGER, token=TRIGGER, adapter_name="downloaded")
            assert "downloaded" in pipe.get_list_adapters()["unet"]
            assert bob.delete(f"/v1/adapters/{adapter}").status_code == 200
    finally:
        worker.stop()


def test_a_worker_killed_after_a_checkpoint_leaves_a_training_another_resumes_exactly(
    service: Gateway,
    redis_server: RedisServer,
    redis_conn: redis.Redis,
    log_dir: Path,
    tiny_model_dir: Path,
    trainer: Proc,
) -> None:
    """The same training twice: once uninterrupted (the module's worker), once on a worker
    that dies right after its first checkpoint and is taken over by another. The resumed run
    starts at the checkpoint's step, never from zero, and ends with the same weights."""
    with client_of(service, "alice") as alice:
        whole = submit(alice, name="whole").json()
        done = wait_for_training(alice, whole["id"])
        assert done["status"] == "succeeded" and done["resumed_from_step"] == 0
        reference = alice.get(f"/v1/adapters/{done['adapter']['id']}/weights").content
        # The module's worker leaves the next training to these two (this test runs last).
        trainer.stop()
        crasher = start_worker(
            redis_server.url,
            log_dir,
            "trainer-crash",
            worker_env(tiny_model_dir, **FAST_RECOVERY, IMAGEGEN_FAULT_CRASH_AT="after_checkpoint"),
            forked=True,
        )
        wait_for_worker(redis_conn, crasher, "trainer-crash")
        resumed = submit(alice, name="resumed").json()
        assert crasher.process.wait(timeout=120) == 70, crasher.log()[-3000:]
        killed = alice.get(f"/v1/trainings/{resumed['id']}").json()
        assert killed["status"] == "running" and killed["checkpoint_step"] == 4
        rescuer = start_worker(
            redis_server.url,
            log_dir,
            "trainer-rescue",
            worker_env(tiny_model_dir, **FAST_RECOVERY),
            forked=True,
        )
        try:
            doc = wait_for_training(alice, resumed["id"])
        finally:
            rescuer.stop()
        assert doc["status"] == "succeeded", doc
        assert doc["resumed_from_step"] == 4 and doc["progress"]["step"] == STEPS
        assert int(redis_conn.hget(Keys.job(resumed["id"]), "attempts") or 0) == 2
        weights = alice.get(f"/v1/adapters/{doc['adapter']['id']}/weights").content
    from safetensors.torch import load

    ours, theirs = load(weights), load(reference)
    assert sorted(ours) == sorted(theirs)
    assert all(bool((ours[k] == theirs[k]).all()) for k in ours)
