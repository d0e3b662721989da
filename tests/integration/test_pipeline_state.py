"""The warm pipeline stays what it was loaded as: after a failed job (SDXL's fp16 VAE left in
fp32 by a failed decode), with SDXL's empty negative prompt, and progress on PNDM's extra step.
A tiny SDXL pipeline in fp16 on the CPU stands in for the real one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from builtin_model.tiny import save_tiny_sdxl_pipeline
from imagegen.core.contract import JobRecord, JobSpec, JobStatus
from imagegen.core.lifecycle import Claimed, Lifecycle
from imagegen.core.settings import Settings
from tests.stack import job_spec
from worker.batch_loop import BatchItem
from worker.inference import Inference
from worker.pipeline import LoadedModel, load_model
from worker.progress import ProgressReporter
from worker.schedulers import build_scheduler


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def _load(sdxl_dir: Path) -> LoadedModel:
    settings = Settings(model=str(sdxl_dir), model_id="sdxl", device="cpu", dtype="float16")
    return load_model(settings)


@pytest.fixture
def sdxl(sdxl_dir: Path) -> Iterator[LoadedModel]:
    yield _load(sdxl_dir)


def spec(**changes: Any) -> JobSpec:
    defaults = {"prompt": "a red circle", "steps": 3, "guidance_scale": 5.0, "seed": 7}
    return job_spec(**{**defaults, "model": "sdxl", **changes})


def pixels(images: Any) -> list[np.ndarray]:
    assert not isinstance(images, BaseException), images
    return [np.asarray(image) for image in images]


def test_after_a_failed_decode_the_next_job_matches_a_fresh_worker(
    sdxl: LoadedModel, sdxl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inference = Inference(sdxl)
    vae = sdxl.pipe.vae
    decode = vae.decode
    calls = 0

    def decode_failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            # The stock SDXL pipeline has upcast its fp16 VAE to fp32 by now.
            assert vae.dtype == torch.float32
            raise torch.OutOfMemoryError("injected out of memory in the VAE decode")
        return decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode_failing_once)
    with pytest.raises(torch.OutOfMemoryError):
        inference.run([BatchItem(spec())])
    assert vae.dtype == torch.float16  # put back as loaded
    (after,) = inference.run([BatchItem(spec(prompt="the next job", seed=8))])
    (fresh,) = Inference(_load(sdxl_dir)).run([BatchItem(spec(prompt="the next job", seed=8))])
    assert all(np.array_equal(a, b) for a, b in zip(pixels(after), pixels(fresh), strict=True))


def test_an_empty_negative_prompt_reaches_sdxl_as_zeros(sdxl: LoadedModel) -> None:
    job = spec()
    (ours,) = Inference(sdxl).run([BatchItem(job)])

    def stock(negative_prompt: list[str] | None) -> list[np.ndarray]:
        sdxl.pipe.scheduler = build_scheduler(job.scheduler, sdxl.scheduler_config)
        with torch.inference_mode():
            result = sdxl.pipe(
                prompt=[job.prompt],
                negative_prompt=negative_prompt,
                width=64,
                height=64,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(job.seed)],
            )
        return pixels(result.images)

    # SDXL encodes a missing negative prompt as zeros (force_zeros_for_empty_prompt) and ""
    # as the encoding of the empty text: an empty field must mean the former.
    with_zeros, with_empty_text = stock(None), stock([""])
    assert np.array_equal(pixels(ours)[0], with_zeros[0])
    assert not np.array_equal(with_zeros[0], with_empty_text[0])


def test_the_stock_path_decodes_one_image_at_a_time(tmp_path: Path) -> None:
    # SDXL runs in the batch loop (one image per decode call while its VAE is upcast); a
    # pipeline the loop does not run, such as a few-step guidance-embedding one, is stock.
    from builtin_model.tiny import save_tiny_fewstep_pipeline

    path = save_tiny_fewstep_pipeline(tmp_path / "fewstep")
    model = load_model(Settings(model=str(path), device="cpu"))
    inference = Inference(model)
    assert not inference.batching
    assert model.pipe.vae.use_slicing


class _RecordingLifecycle:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def progress(self, _job_id: str, step: int, _owner: str) -> tuple[str, bool]:
        self.steps.append(step)
        return JobStatus.RUNNING.value, False


def test_progress_stays_on_the_requests_scale_when_the_scheduler_runs_an_extra_step() -> None:
    recorder = _RecordingLifecycle()
    reporter = ProgressReporter(cast(Lifecycle, recorder), interval_s=0.0)
    job = Claimed(
        JobRecord(
            id="j",
            status=JobStatus.RUNNING,
            spec=spec(steps=30, scheduler="pndm"),
            created_at=time.time(),
            owner="w#1",
        )
    )
    on_step = reporter.for_job(job)
    for done in range(1, 32):  # PNDM (skip_prk_steps) runs steps + 1 timesteps
        on_step(done, 31)
    assert recorder.steps == sorted(recorder.steps)
    assert max(recorder.steps) == recorder.steps[-1] == 30
