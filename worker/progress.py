"""A job's step callback: progress writes, cancel, its own time limit, injected faults."""

from __future__ import annotations

import time

from imagegen.contract import JobStatus
from imagegen.lifecycle import Claimed, Lifecycle
from worker import faults
from worker.batch_loop import StepCallback
from worker.errors import JobStopped, JobTimedOut


class ProgressReporter:
    """Builds each job's step callback."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        interval_s: float,
        fault_injection: bool = False,
        crash: faults.CrashPoint | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.interval_s = interval_s
        self.fault_injection = fault_injection
        self.crash = crash or faults.CrashPoint(None)

    def for_job(self, job: Claimed) -> StepCallback:
        """Records progress and stops the job once it is canceled, taken back or past its
        deadline (that job alone: the others of its batch go on).

        Fast steps must not each pay a Redis round trip, so it writes at most once per
        `interval_s` (and at the last step); that same round trip returns the job's status,
        which is how a cancel reaches the running loop. Progress is on the request's
        0..steps scale even where the scheduler runs another number of timesteps (PNDM runs
        steps + 1), so it never passes `steps` and the ETA never goes negative.
        """
        steps = job.record.spec.steps
        deadline = job.record.deadline
        fault = faults.fault_of(job.record.spec.prompt) if self.fault_injection else None
        last_write = 0.0

        def on_step(done: int, total: int) -> None:
            nonlocal last_write
            if fault is not None and done == 1:
                faults.trigger(fault)
            if done == 2:
                self.crash.reached("mid_loop")
            if deadline is not None and time.time() > deadline:
                raise JobTimedOut(job.id)
            now = time.monotonic()
            if now - last_write >= self.interval_s or done >= total:
                last_write = now
                step = min(steps, done * steps // max(total, 1))
                status = self.lifecycle.progress(job.id, step, job.owner)
                if status != JobStatus.RUNNING.value:
                    raise JobStopped(status or "gone")

        return on_step
