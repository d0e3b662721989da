"""Running a claimed batch of jobs to its end: every job's outcome lands in one lifecycle step.

The work loop claims jobs (they are running, in the model's running set, listed in the
worker's heartbeat); the runner runs them through one denoising loop under the alarm of the
latest deadline, encodes their PNGs and finishes each job with one script: images and the
owner-checked `succeeded` land together or not at all. A job's failure is its own: a job past
its deadline or canceled leaves the loop alone, and when the whole batch runs out of memory it
is split in halves and retried, so only a job that does not fit even alone fails
`out_of_memory`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from imagegen.core.blobs import BlobStore, RedisBlobStore, StorageUnavailable, image_blob
from imagegen.core.contract import FILTERED_MARK, ErrorCode, ImageInfo, JobSpec
from imagegen.core.lifecycle import Claimed, Lifecycle
from imagegen.core.logs import request_id
from imagegen.core.settings import WorkerSettings
from worker import edits, faults
from worker.batch_loop import BatchItem, BatchResult
from worker.encoding import encode_image, image_parameters
from worker.errors import (
    JobStopped,
    JobTimedOut,
    failure_of,
    is_out_of_memory,
    is_redis_down,
)
from worker.faults import CrashPoint
from worker.inference import Inference
from worker.metrics import WorkerMetrics
from worker.preprocessors import Preprocessors
from worker.private_adapters import PrivateAdapters
from worker.progress import ProgressReporter
from worker.state import WorkerState

log = logging.getLogger("imagegen.worker")


@dataclass(frozen=True)
class Outcome:
    """What became of one job of a batch, for logs and tests."""

    job_id: str
    status: str  # "succeeded" | "failed" | "stopped" | "discarded" | "unwritten"
    detail: str = ""


class JobRunner:
    """Runs claimed batches on the warm model; one per worker process."""

    def __init__(
        self,
        inference: Inference,
        lifecycle: Lifecycle,
        settings: WorkerSettings,
        state: WorkerState,
        metrics: WorkerMetrics,
        crash: CrashPoint | None = None,
        inference_for: Callable[[str], Inference] | None = None,
        fault_injection: bool = False,
        preprocessors: Preprocessors | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.inference = inference
        # A worker serving several models: the warm Inference of a batch's model, by id.
        self.inference_for = inference_for
        self.lifecycle = lifecycle
        # Where inputs are read and images stored: Redis (by the lifecycle's own steps) or S3.
        self.blobs = blobs or RedisBlobStore(lifecycle.redis)
        self.private = PrivateAdapters(
            lifecycle.redis, self.blobs, settings.max_loaded_trained_adapters
        )
        self.settings = settings
        self.state = state
        self.metrics = metrics
        self.crash = crash or CrashPoint(None)
        self.fault_injection = fault_injection  # FaultSettings: `__fault__:` prompts honoured
        self.preprocessors = preprocessors or Preprocessors(
            settings.depth_model, settings.pose_model
        )
        self.progress = ProgressReporter(
            lifecycle,
            settings.progress_interval_s,
            fault_injection,
            self.crash,
            settings.preview_interval_s,
        )
        # PNG encoding is zlib, which runs without the GIL: a batch's images encode in
        # parallel instead of one after another while the GPU waits for the next loop.
        self.png_pool = ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="png"
        )

    def run(self, batch: list[Claimed]) -> list[Outcome]:
        """Run `batch` (already claimed, and listed in `state`) and finish every job of it."""
        token = request_id.set(batch[0].record.request_id or batch[0].id)
        started = time.perf_counter()
        try:
            model = batch[0].record.spec.model
            # A batch is one model's (one queue's): it runs on that model's pipeline or not at all.
            assert all(job.record.spec.model == model for job in batch)
            if self.inference_for is not None:
                try:
                    self.inference = self.inference_for(model)
                except Exception as exc:  # ModelUnavailable, or anything a load raised
                    return [self._unavailable(job, model, exc) for job in batch]
                self.metrics.use_model(model)
            # Deleted trained adapters, and those past the capacity, leave first.
            named = {lora.id for job in batch for lora in job.record.spec.loras}
            self.private.sweep(self.inference.model, named)
            results = self._infer(batch)
            encoded = [
                self._encode(job, result) if isinstance(result, list) else []
                for job, result in zip(batch, results, strict=True)
            ]
            for futures in encoded:
                for future in futures:
                    future.result()
            self.crash.reached("after_encode")
            outcomes = [
                self._finish(job, result, pngs, started)
                for job, result, pngs in zip(batch, results, encoded, strict=True)
            ]
            self.crash.reached("after_finish")
            if any(isinstance(r, Exception) for r in results):
                self.inference.free_memory()
            return outcomes
        finally:
            for job in batch:
                self.state.remove(job.id)
            request_id.reset(token)

    def _infer(self, batch: list[Claimed]) -> list[BatchResult]:
        """Results for every job; a batch-wide failure becomes each job's own result, after
        halving the batch on out-of-memory until a job fails alone."""
        loaded: list[dict[str, Any] | Exception] = []
        prompts = self.inference.model.prompts
        specs: dict[str, JobSpec] = {}
        for job in batch:
            try:
                if prompts is not None:
                    # The gateway's limit, checked here too: it counts only where it can
                    # read the model's tokenizer. A prompt past it fails invalid_request.
                    prompts.check(job.record.spec)
                # Trained adapters load on first use; their trigger words read as their tokens.
                specs[job.id] = self.private.prepare(
                    self.inference.model, job.record.spec, job.record.api_key
                )
                stored: dict[str, Any] = dict(
                    edits.load_inputs(self.blobs, job.id, job.record.spec)
                )
                # Preprocessing a control image (a depth model, say) can fail: the job fails.
                stored["controls"] = self.preprocessors.maps(
                    self.blobs, job.record.spec, stored, self.settings.result_ttl_s
                )
                loaded.append(stored)
            except Exception as exc:  # that job fails alone; the others run
                loaded.append(exc)
        if any(isinstance(inputs, Exception) for inputs in loaded):
            runnable = [
                j for j, x in zip(batch, loaded, strict=True) if not isinstance(x, Exception)
            ]
            rest = iter(self._infer(runnable) if runnable else [])
            return [x if isinstance(x, Exception) else next(rest) for x in loaded]
        if batch[0].record.spec.task == "preprocess":
            # A control preview: the map is the job's one image; no pipeline runs.
            return [[inputs["controls"][0]] for inputs in loaded if isinstance(inputs, dict)]
        items = []
        for job, inputs in zip(batch, loaded, strict=True):
            if isinstance(inputs, Exception):
                continue
            progress = self.progress.for_job(job, self.inference.previews)
            items.append(
                BatchItem(
                    specs[job.id],
                    progress,
                    image=inputs.get("image"),
                    mask=inputs.get("mask"),
                    control_images=inputs["controls"],
                    preview=progress,
                )
            )
        on_loop_step = self.metrics.step_clock()
        if self.fault_injection:
            on_loop_step = faults.memory_limited(on_loop_step, [j.record.spec for j in batch])
        try:
            with _alarm(max((job.record.deadline or 0.0) for job in batch)):
                return self.inference.run(items, on_loop_step)
        except Exception as exc:
            if is_out_of_memory(exc) and len(batch) > 1:
                half = len(batch) // 2
                log.warning("batch of %d jobs ran out of memory; retrying in halves", len(batch))
                return self._infer(batch[:half]) + self._infer(batch[half:])
            return [exc] * len(batch)

    def _encode(self, job: Claimed, images: list[Any]) -> list[Future[bytes]]:
        """Start encoding a job's images in its output format, each carrying its parameters."""
        spec = job.record.spec
        return [
            self.png_pool.submit(
                encode_image,
                image,
                image_parameters(spec, i),
                spec.output_format,
                spec.output_compression,
            )
            for i, image in enumerate(images)
            if not image.info.get(FILTERED_MARK)  # a flagged image is never stored
        ]

    def _finish(
        self, job: Claimed, result: BatchResult, pngs: list[Future[bytes]], started: float
    ) -> Outcome:
        if isinstance(result, JobStopped):
            log.info("job %s stopped at a step boundary: it is %s", job.id, result)
            return Outcome(job.id, "stopped", str(result))
        if isinstance(result, Exception):
            return self._fail(job, result)
        spec = job.record.spec
        infos = [
            ImageInfo(
                index=i,
                seed=spec.image_seed(i),
                width=img.width,
                height=img.height,
                filtered=bool(img.info.get(FILTERED_MARK)),
            )
            for i, img in enumerate(result)
        ]
        run_s = time.perf_counter() - started
        ttl_s = self.settings.result_ttl_s
        data = [future.result() for future in pngs]
        kept = [image_blob(job.id, i.index, spec.output_format) for i in infos if not i.filtered]
        if not self.blobs.inline:
            # Durably stored first, then the one step that names them: a crash between the two
            # leaves objects the sweeper deletes, never a succeeded job without its images.
            try:
                self.blobs.put_many(list(zip(kept, data, strict=True)), ttl_s)
            except StorageUnavailable as exc:
                return self._fail(job, exc)
            self.crash.reached("after_store")
        if not self.lifecycle.succeed(
            job,
            data if self.blobs.inline else [],
            infos,
            image_ttl_s=ttl_s,
            record_ttl_s=ttl_s + self.settings.expired_notice_s,
            run_s=run_s,
            in_store=not self.blobs.inline,
        ):
            # Stored objects stay for the sweeper: a job taken back may already be rerun by
            # another worker under the same names, and deleting them would leave its success
            # without images.
            log.info("job %s was canceled or taken back while running; discarded", job.id)
            return Outcome(job.id, "discarded")
        self.metrics.observe_job(run_s, len(infos))
        log.info("job %s succeeded: %d image(s) in %.2fs", job.id, len(infos), run_s)
        return Outcome(job.id, "succeeded")

    def _unavailable(self, job: Claimed, model: str, exc: Exception) -> Outcome:
        log.error("job %s failed: model %s is unavailable: %s", job.id, model, exc)
        self.lifecycle.fail(
            job,
            ErrorCode.MODEL_UNAVAILABLE,
            f"model {model!r} cannot be loaded: {exc}",
            self.settings.failure_ttl_s,
        )
        return Outcome(job.id, "failed", ErrorCode.MODEL_UNAVAILABLE)

    def _fail(self, job: Claimed, exc: BaseException) -> Outcome:
        if is_redis_down(exc):
            # Nothing can be written now; once Redis is back the reaper queues the job again
            # (this worker no longer lists it as running).
            log.error("job %s: redis unavailable mid-job (%s)", job.id, exc)
            return Outcome(job.id, "unwritten", str(exc))
        code, message = failure_of(exc)
        log.error("job %s failed: %s: %r", job.id, code, exc)
        self.lifecycle.fail(job, code, message, self.settings.failure_ttl_s)
        return Outcome(job.id, "failed", code)


@contextmanager
def _alarm(deadline: float) -> Iterator[None]:
    """Raise `JobTimedOut` in this (the main) thread at `deadline` (unix time; 0 = none).

    Steps check their own job's deadline; the alarm catches a single step that runs long in
    Python. A step stuck in native code, which no signal reaches, is the heartbeat
    watchdog's (worker.main)."""
    if deadline <= 0:
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise JobTimedOut("batch deadline")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.time(), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
