"""Several models per worker: the list, loading on demand within a memory budget (LRU),
`model_unavailable`, routing by warmth with its starvation bound, per-model caps, /v1/models."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from typer.testing import CliRunner

from builtin_model.tiny import save_tiny_pipeline
from imagegen.cli.main import app as cli
from imagegen.cli.redis_server import RedisServer, free_port
from imagegen.core.contract import JobRecord, JobSpec, JobStatus, Keys
from imagegen.core.lifecycle import Lifecycle
from imagegen.core.settings import Settings
from tests.stack import (
    ROOT,
    Gateway,
    Proc,
    job_spec,
    service_env,
    start_gateway,
    start_process,
    start_worker,
    wait_for_job,
    wait_for_worker,
)
from worker.inference import Inference
from worker.loop import WorkLoop
from worker.models import ModelManager, ModelSource, ModelUnavailable, parse_models
from worker.pipeline import load_model
from worker.routing import WarmthRouter
from worker.runner import JobRunner
from worker.state import WorkerState

# -- the list and the manager --------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny SD pipelines with different random weights (so their images differ)."""
    root = tmp_path_factory.mktemp("two-models")
    return save_tiny_pipeline(root / "a", seed=0), save_tiny_pipeline(root / "b", seed=1)


def test_the_list_takes_hub_ids_directories_and_ids() -> None:
    assert parse_models(
        Settings(models=" sd=runwayml/sd15 , /models/x,, stabilityai/sdxl-turbo ").models
    ) == [
        ModelSource("sd", "runwayml/sd15"),
        ModelSource(None, "/models/x"),
        ModelSource(None, "stabilityai/sdxl-turbo"),
    ]


def test_least_recently_used_model_is_unloaded_past_the_budget(
    two_models: tuple[Path, Path],
) -> None:
    a, b = two_models
    settings = Settings(models=f"a={a},b={b}", device="cpu")
    sizing = ModelManager(settings)
    one = sizing.entries["a"].estimate
    assert one > 0
    manager = ModelManager(settings, budget_bytes=int(one * 1.5))  # room for one model
    first = manager.acquire("a")
    assert manager.acquire("a") is first  # warm: no second load
    assert manager.loads == 1
    manager.acquire("b")
    assert manager.warm_ids() == ["b"]  # a was the least recently used
    served = {m.info.id: m for m in manager.served()}
    assert served["b"].loaded and not served["a"].loaded
    assert manager.used_bytes() <= manager.budget

    roomy = ModelManager(settings, budget_bytes=int(one * 2.5))
    roomy.acquire("a")
    roomy.acquire("b")
    roomy.acquire("a")
    assert roomy.warm_ids() == ["a", "b"] and roomy.loads == 2


def test_a_model_that_cannot_load_is_unavailable_not_a_crash(
    two_models: tuple[Path, Path], tmp_path: Path
) -> None:
    a, _ = two_models
    corrupt = tmp_path / "corrupt"
    shutil.copytree(a, corrupt)
    (corrupt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    settings = Settings(
        models=f"a={a},gone=/nowhere/model,corrupt={corrupt}", device="cpu", model_retry_s=3600
    )
    manager = ModelManager(settings)
    served = {m.info.id: m for m in manager.served()}
    assert "no model directory at /nowhere/model" in (served["gone"].unavailable or "")
    from worker.models import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="no model directory"):
        manager.acquire("gone")
    with pytest.raises(ModelUnavailable, match="loading failed"):
        manager.acquire("corrupt")
    loads = manager.loads
    with pytest.raises(ModelUnavailable, match="loading failed"):
        manager.acquire("corrupt")  # remembered: no reload until model_retry_s
    assert manager.loads == loads
    tight = ModelManager(Settings(models=f"a={a}", device="cpu"), budget_bytes=1000)
    with pytest.raises(ModelUnavailable, match="memory budget"):
        tight.acquire("a")


def _in_hub_cache(model: Path, cache: Path, repo: str) -> None:
    """`model` laid out as the Hugging Face cache holds a downloaded snapshot of `repo`."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    shutil.copytree(model, folder / "snapshots" / ("0" * 40))


HUB_PROBE = """
import json
from imagegen.core.settings import Settings
from worker.models import ModelManager, ModelUnavailable
local = ModelManager(Settings(models="a=LOCAL", device="cpu")).entries["a"].estimate
hub = ModelManager(Settings(models="h=someone/tiny", device="cpu"))
loaded = hub.acquire("h").model.info.id
tight = ModelManager(Settings(models="h=someone/tiny", device="cpu"), budget_bytes=1)
try:
    tight.acquire("h")
    refused = ""
except ModelUnavailable as exc:
    refused = str(exc)
print(json.dumps([local, hub.entries["h"].estimate, loaded, refused]))
"""


def test_a_hub_model_is_measured_from_its_cached_files(
    two_models: tuple[Path, Path], tmp_path: Path
) -> None:
    """A hub model counted 0 bytes once: two of them loaded under a 1-byte budget. Here, as in
    a worker after `imagegen prefetch`: offline, from the Hugging Face cache."""
    a, _ = two_models
    _in_hub_cache(a, tmp_path / "hub", "someone/tiny")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    probe = subprocess.run(
        [sys.executable, "-c", HUB_PROBE.replace("LOCAL", str(a))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    local, hub, loaded, refused = json.loads(probe.stdout.strip().splitlines()[-1])
    assert hub == local > 0 and loaded == "h"
    assert "memory budget" in refused


def test_controlnets_count_in_the_budget_and_lora_modules_are_never_shared(
    two_models: tuple[Path, Path], tmp_path: Path
) -> None:
    from builtin_model.tiny import save_tiny_adapters
    from worker.models import module_bytes

    a, _ = two_models
    with_adapters = tmp_path / "with-adapters"
    shutil.copytree(a, with_adapters)
    save_tiny_adapters(with_adapters)
    manager = ModelManager(Settings(models=f"a={a},ad={with_adapters}", device="cpu"))
    assert manager.entries["ad"].estimate > manager.entries["a"].estimate
    plain = manager.acquire("a").model
    adapted = manager.acquire("ad").model
    nets = list(adapted.adapters.controlnets.values())
    assert nets and manager.used_bytes() >= module_bytes(nets) + module_bytes([plain.pipe.unet])
    # Same UNet file, but one model's carries LoRA layers: each has its own.
    assert adapted.pipe.unet is not plain.pipe.unet
    assert adapted.pipe.vae is plain.pipe.vae


def test_identical_components_are_shared_not_loaded_twice(
    two_models: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two_models
    # A "fine-tune" of a: its own UNet (b's), a's VAE, text encoder and tokenizer.
    tune = tmp_path / "tune"
    shutil.copytree(a, tune)
    shutil.rmtree(tune / "unet")
    shutil.copytree(b / "unet", tune / "unet")
    manager = ModelManager(Settings(models=f"a={a},tune={tune}", device="cpu"))
    base = manager.acquire("a").model.pipe
    tuned = manager.acquire("tune").model.pipe
    assert tuned.vae is base.vae and tuned.text_encoder is base.text_encoder
    assert tuned.unet is not base.unet


def test_linked_copies_share_only_what_is_the_same_file(
    two_models: tuple[Path, Path], tmp_path: Path
) -> None:
    """Models built by hand with links (`cp -rs`, `ln -s`), as users swap a component: each
    component is fingerprinted by the bytes its links reach, never by the link target's name
    (every UNet file is called diffusion_pytorch_model.safetensors)."""
    a, b = two_models
    link_a, link_b = tmp_path / "link-a", tmp_path / "link-b"
    subprocess.run(["cp", "-rs", str(a), str(link_a)], check=True)
    subprocess.run(["cp", "-rs", str(b), str(link_b)], check=True)
    (link_b / "vae").rename(tmp_path / "b-vae")
    subprocess.run(["cp", "-rs", str(a / "vae"), str(link_b / "vae")], check=True)  # a's VAE
    manager = ModelManager(Settings(models=f"a={link_a},b={link_b}", device="cpu"))
    pipe_a = manager.acquire("a").model.pipe
    pipe_b = manager.acquire("b").model.pipe
    assert pipe_b.vae is pipe_a.vae  # the same file behind both links: shared
    assert pipe_b.unet is not pipe_a.unet and pipe_b.text_encoder is not pipe_a.text_encoder
    alone = load_model(Settings(model=str(b), device="cpu")).pipe
    for name, tensor in alone.unet.state_dict().items():
        assert torch.equal(pipe_b.unet.state_dict()[name], tensor), name


def test_a_model_of_another_kind_is_unavailable_and_the_rest_serve(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    video = tmp_path / "video"
    video.mkdir()
    (video / "model_index.json").write_text(json.dumps({"_class_name": "TextToVideoSDPipeline"}))
    manager = ModelManager(Settings(models=f"v={video},t={tiny_model_dir}", device="cpu"))
    assert manager.servable_ids() == ["t"]
    reason = manager.unavailable("v")
    assert reason is not None and "it is a TextToVideoSDPipeline" in reason
    with pytest.raises(ModelUnavailable, match="TextToVideoSDPipeline"):
        manager.acquire("v")
    assert manager.acquire("t").model.info.id == "t"


def test_the_worker_refuses_an_unsupported_family_with_one_line(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    video = tmp_path / "video"
    video.mkdir()
    (video / "model_index.json").write_text(json.dumps({"_class_name": "TextToVideoSDPipeline"}))
    env = service_env(redis_server.url, {"IMAGEGEN_MODELS": f"clip={video}"})
    proc = start_process([sys.executable, "-m", "imagegen", "worker"], env, tmp_path / "w.log")
    assert proc.process.wait(timeout=120) == 2
    refusals = [line for line in proc.log().splitlines() if "refusing to start" in line]
    assert len(refusals) == 1 and "TextToVideoSDPipeline" in refusals[0]
    assert "Traceback" not in proc.log()


# -- routing by warmth ---------------------------------------------------------------------------


class _Models:
    """A manager stand-in: which models are warm, and loading one makes it warm."""

    def __init__(self, ids: list[str], warm: list[str]) -> None:
        self._ids, self.warm = ids, list(warm)

    def ids(self) -> list[str]:
        return self._ids

    def warm_ids(self) -> list[str]:
        return list(reversed(self.warm))

    def is_warm(self, model_id: str) -> bool:
        return model_id in self.warm

    def max_images(self, _model_id: str) -> int:
        return 1

    def acquire(self, model_id: str) -> None:
        if model_id not in self.warm:
            self.warm.append(model_id)


def _spec(model: str) -> JobSpec:
    return job_spec(model=model, steps=2, guidance_scale=1.0, seed=0)


def _queue(connection: redis.Redis, model: str, created_at: float | None = None) -> str:
    record = JobRecord(
        id=secrets.token_hex(8),
        status=JobStatus.QUEUED,
        spec=_spec(model),
        created_at=created_at if created_at is not None else time.time(),
    )
    assert Lifecycle(connection).submit(record, max_depth=1000).outcome == "created"
    return record.id


def _router_loop(
    connection: redis.Redis, models: _Models, max_wait_s: float, max_skips: int, now: list[float]
) -> WorkLoop:
    lifecycle = Lifecycle(connection)
    settings = Settings(cold_max_wait_s=max_wait_s, cold_max_skips=max_skips)
    router = WarmthRouter(
        connection, lifecycle, cast(ModelManager, models), settings, "w", clock=lambda: now[0]
    )
    return WorkLoop(
        connection,
        lifecycle,
        cast(JobRunner, None),  # claiming only
        WorkerState(),
        models.ids()[0],
        "w",
        max_images=1,
        router=router,
    )


def test_a_warm_models_job_goes_first_and_a_cold_one_within_the_skip_bound(
    redis_conn: redis.Redis,
) -> None:
    hot, cold = f"hot-{secrets.token_hex(3)}", f"cold-{secrets.token_hex(3)}"
    now = [time.time()]
    loop = _router_loop(redis_conn, _Models([cold, hot], warm=[hot]), 3600, 3, now)
    cold_job = _queue(redis_conn, cold)  # queued first, and listed first
    taken: list[str] = []
    for _ in range(10):
        _queue(redis_conn, hot)  # a steady stream of hot-model jobs
        batch = loop.claim_next()
        assert len(batch) == 1
        taken.append(batch[0].record.spec.model)
        if batch[0].id == cold_job:
            break
    # Three warm claims pass the cold job over; the fourth claim is the cold job.
    assert taken == [hot, hot, hot, cold]


def test_a_cold_job_that_waited_past_the_bound_is_taken_next(redis_conn: redis.Redis) -> None:
    hot, cold = f"hot-{secrets.token_hex(3)}", f"cold-{secrets.token_hex(3)}"
    now = [time.time()]
    loop = _router_loop(redis_conn, _Models([hot, cold], warm=[hot]), 10, 1000, now)
    cold_job = _queue(redis_conn, cold, created_at=now[0])
    _queue(redis_conn, hot)
    _queue(redis_conn, hot)
    assert loop.claim_next()[0].record.spec.model == hot  # the cold job waited 0 s
    now[0] += 10  # ... now it has waited the bound
    assert loop.claim_next()[0].id == cold_job
    # With no warm work, a cold model's job is taken at once (after loading the model).
    hot2, lone = f"hot-{secrets.token_hex(3)}", f"lone-{secrets.token_hex(3)}"
    models = _Models([hot2, lone], warm=[hot2])
    idle = _router_loop(redis_conn, models, 3600, 1000, now)
    _queue(redis_conn, hot2)
    assert idle.claim_next()[0].record.spec.model == hot2
    lone_job = _queue(redis_conn, lone)
    assert idle.claim_next()[0].id == lone_job and models.is_warm(lone)


# -- the whole way: one worker, several models ---------------------------------------------------


@pytest.fixture(scope="module")
def multi(
    tmp_path_factory: pytest.TempPathFactory, two_models: tuple[Path, Path]
) -> Iterator[tuple[Gateway, Proc, redis.Redis]]:
    a, b = two_models
    root = tmp_path_factory.mktemp("multi")
    server = RedisServer(root / "redis", appendonly=False).start()
    connection = redis.Redis.from_url(server.url)
    sizing = ModelManager(Settings(models=f"a={a}", device="cpu")).entries["a"].estimate
    env = {
        "IMAGEGEN_MODELS": f"m-a={a}, m-b={b}, m-gone=/nowhere/model",
        # Room for one tiny model at a time: every switch unloads the other.
        "IMAGEGEN_MODEL_MEMORY_GIB": str(1.5 * sizing / 2**30),
        "IMAGEGEN_DEVICE": "cpu",
        "IMAGEGEN_METRICS_PORT": str(METRICS_PORT),
    }
    worker = start_worker(server.url, root, "multi", env, forked=True)
    wait_for_worker(connection, worker, "multi")
    gateway = start_gateway(server.url, root, {"IMAGEGEN_DEFAULT_MODEL": "m-a"})
    yield gateway, worker, connection
    gateway.proc.stop()
    worker.stop()
    connection.close()
    server.stop()


METRICS_PORT = free_port()


def _models(client: Any) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in client.get("/v1/models").json()["data"]}


def _wait_models(client: Any, check: Any, timeout_s: float = 30) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        models = _models(client)
        if check(models) or time.monotonic() > deadline:
            return models
        time.sleep(0.1)


def test_one_worker_serves_each_job_on_its_own_model(
    multi: tuple[Gateway, Proc, redis.Redis], two_models: tuple[Path, Path]
) -> None:
    gateway, _worker, _ = multi
    body = {"prompt": "a red circle", "seed": 5, "steps": 3}
    with gateway.client() as client:
        start = _models(client)
        assert start["m-a"]["loaded"] == 1 and start["m-a"]["workers"] == 1
        assert start["m-b"]["loaded"] == 0 and start["m-b"]["workers"] == 1
        assert start["m-gone"]["available"] is False and start["m-gone"]["workers"] == 0
        pngs = {}
        for model in ("m-b", "m-a", "m-b"):
            created = client.post("/v1/generations", json={**body, "model": model})
            assert created.status_code == 202, created.text
            done = wait_for_job(client, created.json()["id"])
            assert done["status"] == "succeeded", done
            pngs[model] = client.get(done["images"][0]["url"]).content  # type: ignore[index]
            params = json.loads(Image.open(io.BytesIO(pngs[model])).text["parameters"])  # type: ignore[attr-defined]
            assert params["model"] == model
        # m-b was loaded last; the budget holds one model, so m-a was unloaded.
        now = _wait_models(client, lambda m: m["m-b"]["loaded"] == 1 and m["m-a"]["loaded"] == 0)
        assert now["m-b"]["loaded"] == 1 and now["m-a"]["loaded"] == 0

    # The weights' identity: each image is what that model's own pipeline draws, not the other's.
    spec = _spec("x").model_copy(update={"prompt": "a red circle", "seed": 5, "steps": 3})
    spec = spec.model_copy(update={"guidance_scale": 7.5, "scheduler": "euler"})
    for model, path in zip(("m-a", "m-b"), two_models, strict=True):
        served = np.asarray(Image.open(io.BytesIO(pngs[model])).convert("RGB"), dtype=float)
        local = {
            name: np.asarray(
                Inference(load_model(Settings(model=str(p), device="cpu"))).generate(spec)[0],
                dtype=float,
            )
            for name, p in zip(("m-a", "m-b"), two_models, strict=True)
        }
        other = "m-b" if model == "m-a" else "m-a"
        assert np.abs(served - local[model]).mean() < 1.0, model
        assert np.abs(served - local[other]).mean() > 5.0, model
        del path


def test_jobs_of_a_model_that_cannot_load_fail_model_unavailable(
    multi: tuple[Gateway, Proc, redis.Redis],
) -> None:
    gateway, worker, _ = multi
    with gateway.client() as client:
        created = client.post("/v1/generations", json={"prompt": "x", "model": "m-gone"})
        assert created.status_code == 202, created.text
        done = wait_for_job(client, created.json()["id"])
        assert done["status"] == "failed"
        assert done["error"]["code"] == "model_unavailable"  # type: ignore[index]
        assert "no model directory" in done["error"]["message"]  # type: ignore[index]
        models = _models(client)
        assert models["m-gone"]["available"] is False
        assert "no model directory" in models["m-gone"]["unavailable_reason"]
        # The worker goes on serving the others.
        ok = client.post("/v1/generations", json={"prompt": "x", "model": "m-a", "steps": 2})
        assert wait_for_job(client, ok.json()["id"])["status"] == "succeeded"
    assert worker.process.poll() is None


def test_the_worker_announces_its_budget_and_loaded_set(
    multi: tuple[Gateway, Proc, redis.Redis],
) -> None:
    _, _, connection = multi
    from imagegen.core.contract import WorkerHeartbeat

    def read_beat() -> WorkerHeartbeat:
        return WorkerHeartbeat.model_validate_json(connection.get(Keys.worker("multi")))  # type: ignore[arg-type]

    # A beat sent while a model was being swapped in may show none loaded: wait for the next.
    deadline = time.monotonic() + 30
    while sum(m.loaded for m in read_beat().models) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    beat = read_beat()
    assert [m.info.id for m in beat.models] == ["m-a", "m-b", "m-gone"]
    assert sum(m.loaded for m in beat.models) == 1
    assert 0 < beat.memory_used_bytes <= beat.memory_budget_bytes
    import httpx

    scrape = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics").text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line and not line.startswith("#")
    }
    assert values["imagegen_worker_model_memory_budget_bytes"] == beat.memory_budget_bytes
    loaded = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line.startswith("imagegen_worker_model_loaded{")
    }
    assert loaded["m-gone"] == -1 and loaded["m-a"] + loaded["m-b"] == 1


# -- limits per model ----------------------------------------------------------------------------


def test_a_request_past_a_models_own_caps_is_a_422_naming_the_field_and_cap() -> None:
    from app.errors import InvalidRequest
    from app.resolve import Target, resolve_request
    from app.schemas import GenerationRequest
    from builtin_model import MODEL_DIR
    from imagegen.core.contract import SCHEDULER_NAMES, ModelInfo

    card = json.loads((MODEL_DIR / "imagegen.json").read_text())
    info = ModelInfo(
        id="shapes-64",
        width=64,
        height=64,
        steps=20,
        guidance_scale=4.0,
        scheduler="dpmpp_2m",
        schedulers=list(SCHEDULER_NAMES),
        max_pixels=card["max_pixels"],
        max_steps=card["max_steps"],
    )
    settings = Settings()

    def resolve(**body: object) -> JobSpec:
        request = GenerationRequest.model_validate({"prompt": "p", **body})
        return resolve_request(request, settings, Target("shapes-64", info, ("shapes-64",)))[0]

    with pytest.raises(InvalidRequest) as big:
        resolve(width=1024, height=1024)  # within the gateway's cap, not the model's
    assert big.value.status_code == 422
    assert big.value.details == [
        {
            "field": "width",
            "message": "width*height = 1048576 exceeds model 'shapes-64''s pixel cap of "
            "16384 (its native size is 64x64)",
        }
    ]
    with pytest.raises(InvalidRequest) as tall:
        resolve(height=1024)
    assert tall.value.details[0]["field"] == "height"  # type: ignore[index]
    with pytest.raises(InvalidRequest) as steps:
        resolve(steps=card["max_steps"] + 1)
    assert steps.value.details[0]["field"] == "steps"  # type: ignore[index]
    assert "for model 'shapes-64'" in steps.value.details[0]["message"]  # type: ignore[index]
    assert resolve(width=128, height=128).width == 128  # at the cap is fine
    # A model without caps of its own has only the gateway's.
    free = info.model_copy(update={"max_pixels": None, "max_steps": None})
    request = GenerationRequest.model_validate({"prompt": "p", "width": 1024, "height": 1024})
    assert resolve_request(request, settings, Target("x", free, ("x",)))[0].width == 1024


def test_models_announce_their_caps(multi: tuple[Gateway, Proc, redis.Redis]) -> None:
    gateway, _, _ = multi
    with gateway.client() as client:
        models = _models(client)
    # Tiny models ship no card: the gateway's caps apply, and are shown.
    assert models["m-a"]["max_pixels"] == Settings().max_pixels
    assert models["m-a"]["max_steps"] == Settings().max_steps


# -- pipeline families ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "dtype", "guidance"),
    [("sd", "float32", 7.5), ("sdxl", "float16", 5.0), ("fewstep", "float32", 1.5)],
)
def test_every_family_runs_through_the_manager_as_the_stock_pipeline_does(
    tmp_path: Path, family: str, dtype: str, guidance: float
) -> None:
    """Saved and loaded like a hub model; the worker's image is byte-identical to the stock
    diffusers pipeline's for the same inputs (SDXL: two text encoders, micro-conditioning and
    its VAE upcast to fp32 for the decode in fp16; few-step: the guidance embedding)."""
    from diffusers import AutoPipelineForText2Image

    from builtin_model.tiny import (
        save_tiny_fewstep_pipeline,
        save_tiny_pipeline,
        save_tiny_sdxl_pipeline,
    )
    from worker.batch_loop import BatchItem

    save = {
        "sd": save_tiny_pipeline,
        "sdxl": save_tiny_sdxl_pipeline,
        "fewstep": save_tiny_fewstep_pipeline,
    }[family]
    path = save(tmp_path / family)
    settings = Settings(models=f"{family}={path}", device="cpu", dtype=dtype)
    manager = ModelManager(settings)
    (served,) = manager.served()
    assert served.unavailable is None and served.info.width == 64
    inference = manager.acquire(family)
    spec = _spec(family).model_copy(
        update={"prompt": "a red circle", "seed": 3, "steps": 3, "guidance_scale": guidance}
    )
    (images,) = inference.run([BatchItem(spec)])
    assert isinstance(images, list)

    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    stock = AutoPipelineForText2Image.from_pretrained(path, torch_dtype=torch_dtype)
    stock.set_progress_bar_config(disable=True)
    from worker.schedulers import build_scheduler

    stock.scheduler = build_scheduler("euler", stock.scheduler.config)
    expected = stock(
        prompt=["a red circle"],
        negative_prompt=None,
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=[torch.Generator("cpu").manual_seed(3)],
        output_type="pil",
    ).images[0]
    assert images[0].tobytes() == expected.tobytes()
    if family == "fewstep":
        assert stock.unet.config.time_cond_proj_dim == 32
        assert not stock.do_classifier_free_guidance  # one UNet row per image: guidance embedded


class _Unloadable(_Models):
    """A manager stand-in whose model `gone` cannot be loaded."""

    def acquire(self, model_id: str) -> None:
        from worker.models import ModelUnavailable

        if model_id == "gone" or model_id.startswith("gone-"):
            raise ModelUnavailable("no model directory at /nowhere")
        super().acquire(model_id)


def test_a_model_this_worker_cannot_load_is_left_to_a_worker_that_can(
    redis_conn: redis.Redis,
) -> None:
    from imagegen.core.contract import ModelInfo, ServedModel, WorkerHeartbeat

    gone = f"gone-{secrets.token_hex(3)}"
    now = [time.time()]
    loop = _router_loop(redis_conn, _Unloadable([gone], warm=[]), 3600, 1000, now)
    job = _queue(redis_conn, gone)
    info = ModelInfo(
        id=gone, width=64, height=64, steps=2, guidance_scale=1.0, scheduler="euler",
        schedulers=["euler"],
    )  # fmt: skip
    other = WorkerHeartbeat(
        name=f"able-{gone}", model=info, device="cpu", dtype="float32", version="x", host="h",
        pid=1, started_at=now[0], sent_at=now[0], state="ready",
        models=[ServedModel(info=info, loaded=False)],
    )  # fmt: skip
    redis_conn.set(Keys.worker(other.name), other.model_dump_json(), ex=60)
    redis_conn.zadd(Keys.model_workers(gone), {other.name: now[0]})
    # Another live worker can load it: this one leaves the job queued.
    assert loop.claim_next() == []
    assert redis_conn.hget(Keys.job(job), "status") == b"queued"
    # No worker can: the job fails model_unavailable at once, naming why.
    redis_conn.delete(Keys.worker(other.name))
    assert loop.claim_next() == []
    record = redis_conn.hgetall(Keys.job(job))
    assert record[b"status"] == b"failed"
    error = json.loads(record[b"error"])
    assert error["code"] == "model_unavailable" and "/nowhere" in error["message"]


def test_prefetch_covers_every_model_of_the_list(two_models: tuple[Path, Path]) -> None:
    from worker.prefetch import prefetch_model

    a, b = two_models
    said = prefetch_model(Settings(models=f"a={a},{b},mine=/models/mine"))
    assert said == [
        f"nothing to fetch: {a} is a local path",
        f"nothing to fetch: {b} is a local path",
        "nothing to fetch: /models/mine is a local path",
    ]


def test_prefetch_reports_a_model_it_cannot_fetch_and_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gated or missing hub model must not keep compose from starting every worker."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: every hub fetch fails
    # huggingface_hub reads the variable once, at import: an earlier test may have imported it,
    # and then a real connection would be tried (and time out, ~20 s).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    result = CliRunner().invoke(
        cli, ["prefetch"], env={"IMAGEGEN_MODELS": "gated=someone/gated-model,mine=/models/x"}
    )
    assert result.exit_code == 0, result.output
    assert "could not fetch someone/gated-model" in result.output
    assert "nothing to fetch: /models/x is a local path" in result.output
