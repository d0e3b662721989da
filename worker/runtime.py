"""Running generation jobs on the warm pipeline: one job at a time, in the worker's main thread."""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
import torch
from rq.timeouts import JobTimeoutException

from imagegen import __version__
from imagegen.contract import ErrorCode, ImageInfo, JobSpec, JobStatus
from imagegen.logs import request_id
from imagegen.settings import Settings
from imagegen.store import JobStore
from worker import faults
from worker.batch import BatchItem, run_batch, supports_batching
from worker.batching import Batcher, Claimed
from worker.metrics import WorkerMetrics
from worker.pipeline import LoadedModel
from worker.png import encode_png
from worker.schedulers import build_scheduler

log = logging.getLogger("imagegen.worker")


class JobStopped(Exception):
    """Raised from the step callback when the job is no longer ours to run (canceled, or taken
    back from this worker), to leave the denoising loop at once.

    The pipeline's own interrupt flag would skip the remaining steps but still decode the
    latents; raising stops before the VAE too, and nothing partial is ever stored.
    """


class GenerationFailed(Exception):
    """A job failed; `code` is the job document's error code. Raised so RQ records it too."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError)


def png_parameters(spec: JobSpec, index: int) -> dict[str, Any]:
    """The `parameters` chunk of image `index`: enough to reproduce it with n=1."""
    return {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "seed": spec.image_seed(index),
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "width": spec.width,
        "height": spec.height,
        "scheduler": spec.scheduler,
        "model": spec.model,
        "version": __version__,
    }


@dataclass
class Counters:
    """What the heartbeat thread reports and watches; written by the job loop only."""

    jobs_done: int = 0
    pipelines_loaded: int = 0
    current_job: str | None = None
    current_jobs: list[str] = field(default_factory=list)  # the batch, current_job first
    current_owner: str | None = None
    deadline: float | None = None

    def start(self, job_ids: list[str], owner: str, timeout_s: float | None) -> None:
        self.current_owner = owner
        self.current_jobs = job_ids
        self.deadline = time.time() + timeout_s if timeout_s else None
        self.current_job = job_ids[0]

    def add(self, job_id: str) -> None:
        """A job claimed into the running batch (a list append: safe for the heartbeat's reads)."""
        self.current_jobs.append(job_id)

    def finish(self) -> None:
        self.current_job = self.current_owner = None
        self.current_jobs = []
        self.deadline = None
        self.jobs_done += 1


class Runtime:
    """The warm model and everything a job needs; built once per worker process."""

    def __init__(
        self,
        model: LoadedModel,
        connection: redis.Redis,
        settings: Settings,
        worker_name: str,
        counters: Counters,
        metrics: WorkerMetrics | None = None,
        batcher: Batcher | None = None,
    ) -> None:
        self.model = model
        self.metrics = metrics or WorkerMetrics(model.info.id, model.device)
        self.batcher = batcher
        self.redis = connection
        self.store = JobStore(connection)
        self.settings = settings
        self.worker_name = worker_name
        self.counters = counters
        # PNG encoding is zlib, which runs without the GIL: a batch's images encode in
        # parallel instead of one after another while the GPU waits for the next loop.
        self.png_pool = ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="png"
        )

    # -- the pipeline ---------------------------------------------------------------------------
    def generate(self, spec: JobSpec, on_step: Callable[[int], None] | None = None) -> list[Any]:
        """Run the pipeline for one spec and return PIL images, image i seeded seed + i.

        In batch-invariant mode (the default on CPU) each image gets its own pipeline call:
        float kernels give slightly different results for different batch sizes, and this
        mode keeps image i byte-identical to the same seed generated alone (n=1).
        """
        if not self.model.batch_invariant or spec.n == 1:
            return self._call(spec, list(range(spec.n)), on_step)
        images: list[Any] = []
        for i in range(spec.n):
            done = i * spec.steps

            def scaled(step: int, done: int = done) -> None:
                # Progress over all n runs, on the job's 0..steps scale, never going back.
                if on_step is not None:
                    on_step((done + step) * spec.steps // (spec.n * spec.steps))

            images += self._call(spec, [i], scaled)
        return images

    def _call(
        self, spec: JobSpec, indices: list[int], on_step: Callable[[int], None] | None
    ) -> list[Any]:
        pipe = self.model.pipe
        # A fresh scheduler per call: schedulers keep per-run state and must not be shared.
        pipe.scheduler = build_scheduler(spec.scheduler, self.model.scheduler_config)
        # CPU generators make the starting noise identical on every device and batch layout.
        generators = [torch.Generator("cpu").manual_seed(spec.image_seed(i)) for i in indices]

        last = time.perf_counter()

        def callback(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal last
            now = time.perf_counter()
            self.metrics.observe_step(now - last, len(indices), first=step == 0)
            last = now
            if on_step is not None:
                on_step(step + 1)
            return kwargs

        with torch.inference_mode():
            result = pipe(
                prompt=[spec.prompt] * len(indices),
                negative_prompt=[spec.negative_prompt] * len(indices),
                width=spec.width,
                height=spec.height,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=generators,
                output_type="pil",
                callback_on_step_end=callback,
            )
        images: list[Any] = result.images
        return images

    def warm_up(self) -> None:
        """One small generation, so the first job pays no lazy-initialisation cost; with
        torch.compile, one per batch size to be served, so no job pays for compiling."""
        for size in self.model.compiled_batches or (1,):
            self._warm_up_batch(size)
        if self.model.compiled_batches:
            # From now on a shape that was not warmed up (another resolution, a pipeline the
            # batch loop does not pad) runs eagerly: compiling it would stall its batch for a
            # minute, and past dynamo's recompile limit a fullgraph compile is an error.
            torch.compiler.set_stance("eager_on_recompile")

    def _warm_up_batch(self, size: int) -> None:
        info = self.model.info
        spec = JobSpec(
            prompt="warm-up",
            negative_prompt="",
            width=info.width,
            height=info.height,
            steps=2,
            # Guided, so that the batch loop's UNet calls are the 2 * size rows it pads to.
            guidance_scale=max(info.guidance_scale, 2.0)
            if supports_batching(self.model.pipe)
            else info.guidance_scale,
            seed=0,
            n=size,
            scheduler=info.scheduler,
            model=info.id,
        )
        started = time.perf_counter()
        if supports_batching(self.model.pipe):
            run_batch(self.model, [BatchItem(spec)], invariant=self.model.batch_invariant)
        else:
            self.generate(spec)
        log.info("warm-up of batch %d took %.2fs", size, time.perf_counter() - started)

    # -- a job ----------------------------------------------------------------------------------
    def run_job(self, job_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Run job `job_id` end to end — with any queued jobs that can share its denoising
        loop — and record every outcome in the job documents."""
        record = self.store.get(job_id)
        if record is None:
            log.warning("job %s has no record (expired?); skipping", job_id)
            return {"skipped": "no record"}
        attempt = record.attempts + 1
        owner = f"{self.worker_name}#{attempt}"
        moved, status = self.store.transition(
            job_id,
            [JobStatus.QUEUED],
            JobStatus.RUNNING,
            {
                "started_at": time.time(),
                "worker": self.worker_name,
                "owner": owner,
                "attempts": attempt,
                "progress_step": 0,
            },
        )
        if not moved:
            # Canceled (or already taken) before we got to it: it must never run.
            log.info("job %s is %s; not running it", job_id, status)
            return {"skipped": str(status)}
        # Announced as ours before claiming companions, and each companion as soon as it is
        # claimed: a sweeper must never see one of them running on a worker that does not
        # list it (it would take it back), not even while the claim waits for a batch to fill.
        self.counters.start([job_id], owner, timeout_s)
        token = request_id.set(record.request_id or job_id)
        try:
            batch = [Claimed(record, owner, None, None)]
            if self.batcher is not None and supports_batching(self.model.pipe):
                batch += self.batcher.claim(record.spec, self.worker_name, self.counters.add)
            if supports_batching(self.model.pipe):
                return self._run_batch(batch)
            return self._run(job_id, owner, record.spec)
        finally:
            request_id.reset(token)
            self.counters.finish()

    def progress_reporter(self, job_id: str, owner: str, total_steps: int) -> Callable[[int], None]:
        """A step callback that records progress and stops the job once it is canceled.

        Fast steps must not each pay a Redis round trip, so it writes at most once per
        `progress_interval_s` (and at the last step); that same round trip returns the job's
        status, which is how a cancel reaches the running loop.
        """
        interval = self.settings.progress_interval_s
        last_write = 0.0

        def on_step(step: int) -> None:
            nonlocal last_write
            now = time.monotonic()
            if now - last_write >= interval or step == total_steps:
                last_write = now
                status = self.store.set_progress(job_id, step, owner)
                if status != JobStatus.RUNNING.value:
                    raise JobStopped(status or "gone")

        return on_step

    def _step_callback(self, job_id: str, owner: str, spec: JobSpec) -> Callable[[int], None]:
        report = self.progress_reporter(job_id, owner, spec.steps)
        fault = faults.fault_of(spec.prompt) if self.settings.fault_injection else None
        if fault is None:
            return report

        def on_step(step: int) -> None:
            faults.trigger(fault)
            report(step)

        return on_step

    def _run(self, job_id: str, owner: str, spec: JobSpec) -> dict[str, Any]:
        """One job through the stock pipeline call (pipelines the batch loop does not know)."""
        started = time.perf_counter()
        try:
            images = self.generate(spec, self._step_callback(job_id, owner, spec))
        except JobStopped as exc:
            self.free_memory()
            log.info("job %s stopped at a step boundary: it is %s", job_id, exc)
            return {"stopped": str(exc)}
        except Exception as exc:
            self._fail_from_exception(job_id, owner, exc)
            raise
        return self._store(job_id, owner, spec, images, self._encode(spec, images), started)

    def _run_batch(self, batch: list[Claimed]) -> dict[str, Any]:
        """The jobs of `batch` (the RQ job first) through one denoising loop."""
        started = time.perf_counter()
        items = [
            BatchItem(c.record.spec, self._step_callback(c.record.id, c.owner, c.record.spec))
            for c in batch
        ]
        last = time.perf_counter()

        def on_loop_step(step: int, rows: int) -> None:
            nonlocal last
            now = time.perf_counter()
            self.metrics.observe_step(now - last, rows, first=step == 0)
            last = now

        try:
            results = run_batch(
                self.model, items, invariant=self.model.batch_invariant, on_loop_step=on_loop_step
            )
        except Exception as exc:  # the whole batch failed: out of memory, timeout, ...
            for claimed in batch:
                self._fail_from_exception(claimed.record.id, claimed.owner, exc)
            for claimed in batch[1:]:
                self._finish_claimed(claimed, exc)
            raise
        log.debug(
            "batch %s -> %s",
            [c.record.id for c in batch],
            [type(r).__name__ if isinstance(r, Exception) else len(r) for r in results],
        )
        # Every finished job's images go to the encoders at once, before the first is stored.
        encoded = [
            self._encode(c.record.spec, r) if not isinstance(r, Exception) else []
            for c, r in zip(batch, results, strict=True)
        ]
        outcomes = []
        for claimed, result, pngs in zip(batch, results, encoded, strict=True):
            job_id, spec = claimed.record.id, claimed.record.spec
            error: Exception | None = None
            if isinstance(result, JobStopped):
                log.info("job %s stopped at a step boundary: it is %s", job_id, result)
                outcomes.append({"stopped": str(result)})
            elif isinstance(result, Exception):
                self._fail_from_exception(job_id, claimed.owner, result)
                outcomes.append({"failed": type(result).__name__})
                error = result
            else:
                outcomes.append(self._store(job_id, claimed.owner, spec, result, pngs, started))
            if claimed is not batch[0]:
                self._finish_claimed(claimed, error)
        if any(isinstance(r, Exception) for r in results):
            self.free_memory()
        leader = results[0]
        if isinstance(leader, Exception) and not isinstance(leader, JobStopped):
            raise leader  # so RQ records the failure of its own job, as without batching
        return {**outcomes[0], "batched_with": len(batch) - 1}

    def _finish_claimed(self, claimed: Claimed, error: BaseException | None) -> None:
        if self.batcher is not None:
            self.batcher.finish(claimed, error)

    def _encode(self, spec: JobSpec, images: list[Any]) -> list[Future[bytes]]:
        """Start encoding a job's images as PNG, each with its `parameters` chunk."""
        return [
            self.png_pool.submit(encode_png, image, png_parameters(spec, i))
            for i, image in enumerate(images)
        ]

    def _store(
        self,
        job_id: str,
        owner: str,
        spec: JobSpec,
        images: list[Any],
        encoding: list[Future[bytes]],
        started: float,
    ) -> dict[str, Any]:
        """Store a job's encoded images and mark it succeeded (unless it was taken away)."""
        pngs = [future.result() for future in encoding]
        infos = [
            ImageInfo(index=i, seed=spec.image_seed(i), width=img.width, height=img.height)
            for i, img in enumerate(images)
        ]
        ttl_s = self.settings.result_ttl_s
        record_ttl_s = ttl_s + self.settings.expired_notice_s
        if not self.store.finish_succeeded(job_id, owner, pngs, infos, ttl_s, record_ttl_s):
            log.info("job %s was canceled or taken back while running; discarded", job_id)
            return {"stopped": "discarded"}
        run_s = time.perf_counter() - started
        self.store.observe_run(spec.model, run_s)
        self.metrics.observe_job(run_s, len(pngs))
        log.info("job %s succeeded: %d image(s) in %.2fs", job_id, len(pngs), run_s)
        return {"images": len(pngs), "run_s": round(run_s, 3)}

    def _fail_from_exception(self, job_id: str, owner: str, exc: BaseException) -> None:
        if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            # Nothing can be written now; once Redis is back a sweeper queues the job again.
            log.error("job %s: redis unavailable mid-job (%s)", job_id, exc)
            return
        if isinstance(exc, JobTimeoutException):
            code, message = ErrorCode.TIMEOUT, "the job exceeded its time limit"
        elif _is_out_of_memory(exc):
            code, message = (
                ErrorCode.OUT_OF_MEMORY,
                "the worker ran out of memory; try fewer images (n), fewer pixels or fewer steps",
            )
            self.free_memory()
        else:
            code, message = ErrorCode.INTERNAL, f"generation failed ({type(exc).__name__})"
        log.error("job %s failed: %s: %s", job_id, code, exc)
        self.fail(job_id, owner, code, message)

    def fail(self, job_id: str, owner: str, code: str, message: str) -> None:
        self.store.transition(
            job_id,
            [JobStatus.RUNNING],
            JobStatus.FAILED,
            {"finished_at": time.time(), "error": {"code": code, "message": message}},
            ttl_s=self.settings.failure_ttl_s,
            owner=owner,
        )

    def free_memory(self) -> None:
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
