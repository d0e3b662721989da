"""The worker's loop: claim a batch, run it, repeat; wait on the model's bell when idle.

A claim is one lifecycle script (queued → running, into the running set), so the loop holds
nothing a crash could lose: whatever this process held is in the running set under its name,
and the reaper of any live worker takes it back once this worker's heartbeat expires.
SIGTERM and SIGINT let the running batch finish and then end the loop; if Redis goes away the
loop waits for it and goes on with the warm model.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

import redis

from imagegen.core.contract import ErrorCode, Keys
from imagegen.core.lifecycle import Claimed, Lifecycle
from worker.faults import CrashPoint
from worker.routing import WarmthRouter
from worker.runner import JobRunner
from worker.state import WorkerState
from worker.training.runner import TrainingSlot

log = logging.getLogger("imagegen.worker")

# While a batch has room and max-wait allows, how often the queue is looked at again.
POLL_S = 0.005
# An idle worker re-checks its queue at least this often, even if no bell rang.
IDLE_WAIT_S = 1
# Jobs of a model that cannot be loaded are failed this many at a time.
FAIL_BATCH = 64


class WorkLoop:
    """Claims and runs batches of one model's jobs until told to stop; with a `router`, of
    several models' jobs, in the router's order (routing by warmth, worker.routing)."""

    def __init__(
        self,
        connection: redis.Redis,
        lifecycle: Lifecycle,
        runner: JobRunner,
        state: WorkerState,
        model_id: str,
        worker_name: str,
        max_images: int,
        max_wait_s: float = 0.0,
        crash: CrashPoint | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        router: WarmthRouter | None = None,
        failure_ttl_s: int = 86400,
        between_batches: Callable[[bool], None] | None = None,
        trainings: TrainingSlot | None = None,
        generate: bool = True,
    ) -> None:
        # IMAGEGEN_WORKER_TASKS: whether it takes generations, and its training slot (None:
        # it takes no trainings). A training advances only while no generation waits.
        self.trainings = trainings
        self.generate = generate
        self.router = router
        # Run between batches (no job on the pipelines), told whether SIGHUP asked for it.
        self.between_batches = between_batches
        self.hangup = False
        self.failure_ttl_s = failure_ttl_s
        self.redis = connection
        self.clock = clock
        self.sleep = sleep
        self.lifecycle = lifecycle
        self.runner = runner
        self.state = state
        self.model_id = model_id
        self.worker_name = worker_name
        self.max_images = max_images
        self.max_wait_s = max_wait_s
        self.crash = crash or CrashPoint(None)
        self.stopping = False

    def stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        if not self.stopping:
            log.info("stopping after the running batch (signal %d)", signum)
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        log.info("SIGHUP: looking for LoRA files again before the next batch")
        self.hangup = True

    def run(self) -> None:
        while not self.stopping:
            try:
                if self.between_batches is not None:
                    forced, self.hangup = self.hangup, False
                    self.between_batches(forced)
                batch = self.claim_next() if self.generate else []
                if not batch:
                    if self.trainings is not None and self.trainings.work():
                        continue  # a slice of a training; the queues are looked at again
                    self.redis.blpop(self.bells(), timeout=IDLE_WAIT_S)
                    continue
                self.runner.run(batch)
                self.crash.reached("before_next_claim")
            except redis.exceptions.RedisError as exc:
                log.warning("work loop lost redis: %s", exc)
                self._wait_for_redis()
        if self.trainings is not None:
            self.trainings.hand_back()

    def bells(self) -> list[str]:
        """What an idle worker waits on: its models' queues, and training lanes if it trains."""
        bells = [Keys.bell(m) for m in self.model_ids()] if self.generate else []
        return bells + (self.trainings.bells() if self.trainings is not None else [])

    def model_ids(self) -> list[str]:
        return self.router.model_ids() if self.router is not None else [self.model_id]

    def claim_next(self) -> list[Claimed]:
        """The next batch: of the one model, or of the first model in the router's order
        that has one (a cold model is loaded first; one that cannot be has its jobs failed
        `model_unavailable`, unless another worker can load it)."""
        if self.router is None:
            return self.claim()
        for model in self.router.order():
            reason = self.router.ready(model)
            if reason is not None:
                self._fail_unavailable(model, reason)
                continue
            batch = self.claim(model, self.router.max_images(model))
            if batch:
                self.router.claimed(model)
                return batch
        return []

    def _fail_unavailable(self, model: str, reason: str) -> None:
        if self.router is not None and self.router.others_can_serve(model):
            return
        batch, _ = self.lifecycle.claim(model, self.worker_name, budget=FAIL_BATCH)
        for job in batch:
            log.error("job %s failed: model %s is unavailable: %s", job.id, model, reason)
            self.lifecycle.fail(
                job,
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {model!r} cannot be loaded: {reason}",
                self.failure_ttl_s,
            )

    def claim(self, model: str | None = None, max_images: int | None = None) -> list[Claimed]:
        """The queue's next job and the queued jobs that can share its denoising loop.

        Without `max_wait_s` a batch is whatever is queued now; with it, the loop keeps
        looking while the image budget has room and no job of another shape waits (that one
        is better served next than kept waiting)."""
        model = model or self.model_id
        max_images = max_images or self.max_images
        batch, others_waiting = self.lifecycle.claim(model, self.worker_name, budget=max_images)
        self.state.add(batch)  # listed in the heartbeat before anything else happens
        if not batch:
            return batch
        self.crash.reached("after_claim")
        budget = max_images - sum(job.record.spec.n for job in batch)
        deadline = self.clock() + self.max_wait_s
        while budget > 0 and not others_waiting and self.clock() < deadline:
            self.sleep(POLL_S)
            more, others_waiting = self.lifecycle.claim(
                model, self.worker_name, batch[0].record.spec.batch_key, budget
            )
            self.state.add(more)
            batch += more
            budget -= sum(job.record.spec.n for job in more)
        if len(batch) > 1:
            log.info("batched %d queued job(s) with the next one", len(batch) - 1)
        return batch

    def _wait_for_redis(self, max_wait_s: float = 10.0) -> None:
        wait = 0.5
        while not self.stopping:
            try:
                self.redis.ping()
                log.warning("redis is back; the work loop goes on")
                return
            except redis.exceptions.RedisError:
                time.sleep(wait)
                wait = min(wait * 2, max_wait_s)
