"""A job's step callback: progress writes, cancel, its own time limit, injected faults, and
live previews while a client watches them."""

from __future__ import annotations

import json
import logging
import time

import torch

from imagegen.core.contract import JobStatus
from imagegen.core.lifecycle import Claimed, Lifecycle
from worker import faults
from worker.errors import JobStopped, JobTimedOut
from worker.previews import LatentProjection

log = logging.getLogger("imagegen.worker")


class JobProgress:
    """One job's step callback (call it after each denoising step) and preview hook.

    Fast steps must not each pay a Redis round trip, so it writes progress at most once per
    `interval_s` (and at the last step); that same round trip returns the job's status, which
    is how a cancel reaches the running loop, and whether a client watches its previews. Progress
    is on the request's 0..steps scale even where the scheduler runs another number of
    timesteps (PNDM runs steps + 1), so it never passes `steps` and the ETA never goes negative.
    """

    def __init__(
        self,
        reporter: ProgressReporter,
        job: Claimed,
        projection: LatentProjection | None,
    ) -> None:
        self.reporter = reporter
        self.job = job
        self.projection = projection
        spec = job.record.spec
        self.steps = spec.steps
        self.deadline = job.record.deadline
        self.fault = faults.fault_of(spec.prompt) if reporter.fault_injection else None
        self.last_write = 0.0
        self.watched = False
        self.last_preview = 0.0
        self.previews = 0

    def __call__(self, done: int, total: int) -> None:
        reporter = self.reporter
        if self.fault is not None and done == 1:
            faults.trigger(self.fault)
        if done == 2:
            reporter.crash.reached("mid_loop")
        if self.deadline is not None and time.time() > self.deadline:
            raise JobTimedOut(self.job.id)
        now = time.monotonic()
        if now - self.last_write >= reporter.interval_s or done >= total:
            self.last_write = now
            step = min(self.steps, done * self.steps // max(total, 1))
            status, self.watched = reporter.lifecycle.progress(self.job.id, step, self.job.owner)
            if status != JobStatus.RUNNING.value:
                raise JobStopped(status or "gone")

    def due(self) -> bool:
        """Whether to make a preview now: someone watches, and the interval has passed."""
        return (
            self.watched
            and self.projection is not None
            and time.monotonic() - self.last_preview >= self.reporter.preview_interval_s
        )

    def show(self, done: int, total: int, latents: torch.Tensor) -> None:
        """Publish a preview of one image's estimated clean latents (C, h, w)."""
        if self.projection is None:
            return
        self.last_preview = time.monotonic()
        spec = self.job.record.spec
        image = self.projection.data_uri(latents, spec.width, spec.height)
        step = min(self.steps, done * self.steps // max(total, 1))
        payload = json.dumps({"step": step, "image": image}, separators=(",", ":"))
        self.reporter.lifecycle.publish_preview(self.job.id, payload)
        self.previews += 1


class ProgressReporter:
    """Builds each job's step callback."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        interval_s: float,
        fault_injection: bool = False,
        crash: faults.CrashPoint | None = None,
        preview_interval_s: float = 0.5,
    ) -> None:
        self.lifecycle = lifecycle
        self.interval_s = interval_s
        self.fault_injection = fault_injection
        self.crash = crash or faults.CrashPoint(None)
        self.preview_interval_s = preview_interval_s

    def for_job(self, job: Claimed, projection: LatentProjection | None = None) -> JobProgress:
        """Records progress and stops the job once it is canceled, taken back or past its
        deadline (that job alone: the others of its batch go on); with a `projection`, it
        also makes the job's previews while a client watches them."""
        return JobProgress(self, job, projection)
