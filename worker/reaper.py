"""Taking back jobs whose worker is gone, so that no accepted job stays `running` forever.

Every worker sweeps the running set of every model (not only its own: a model whose last
worker died still has its jobs taken back) every few seconds. A running job is lost when its
worker's heartbeat expired (killed, OOM-killed, machine gone), or when its worker is alive but
no longer lists it (its Redis writes failed). A lost job goes back to the front of its queue,
up to `max_attempts` runs in all; after that it fails with `worker_lost`. Each take-back is
one lifecycle script fenced by the lost run's owner, so a worker that was only slow cannot
overwrite the rerun, and several sweepers at once take a job back once.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from imagegen.core.blobs import StorageUnavailable, Sweeper
from imagegen.core.contract import ErrorCode, JobRecord, JobStatus, Keys, WorkerHeartbeat
from imagegen.core.lifecycle import Lifecycle
from imagegen.core.settings import WorkerSettings
from imagegen.core.store import JobStore
from imagegen.core.trainings import TrainingRecord

log = logging.getLogger("imagegen.worker")


class Reaper:
    """Sweeps every model's running set for lost jobs; `start()` runs it in a daemon thread."""

    def __init__(
        self, connection: redis.Redis, settings: WorkerSettings, sweeper: Sweeper | None = None
    ) -> None:
        self.redis = connection
        # An object store's expiry and orphans (Redis expires its own blobs).
        self.sweeper = sweeper
        self.store = JobStore(connection)
        self.lifecycle = Lifecycle(connection)
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.recovery_interval_s):
            try:
                self.sweep()
            except redis.exceptions.RedisError as exc:
                log.warning("recovery sweep failed: %s", exc)
            if self.sweeper is not None:
                self._sweep_blobs(self.sweeper)

    def _sweep_blobs(self, sweeper: Sweeper) -> None:
        try:
            report = sweeper.sweep_if_due()
        except (StorageUnavailable, redis.exceptions.RedisError) as exc:
            log.warning("blob sweep failed: %s", exc)
            return
        if report is not None and (report.expired_jobs or report.orphan_jobs):
            log.info(
                "blob sweep: deleted the objects of %d expired and %d orphaned job(s), "
                "%d control map(s)",
                len(report.expired_jobs),
                len(report.orphan_jobs),
                report.control_maps,
            )

    def sweep(self) -> list[tuple[str, str]]:
        """One pass; returns (job id, "requeued" | "failed") for each job taken back."""
        outcomes = []
        models: set[bytes] = self.redis.smembers(Keys.RUNNING_MODELS)  # type: ignore[assignment]
        for model in sorted(m.decode() for m in models):
            ids: list[bytes] = self.redis.zrange(Keys.running(model), 0, -1)  # type: ignore[assignment]
            for raw_id in ids:
                record = self.store.get_run(raw_id.decode())
                if record is None:
                    # The record expired under a running job (a record without TTL cannot):
                    # drop the stray entry.
                    self.redis.zrem(Keys.running(model), raw_id)
                elif record.status == JobStatus.RUNNING and self._is_lost(record):
                    outcomes.append((record.id, self.take_back(record)))
        return outcomes

    def _is_lost(self, record: JobRecord | TrainingRecord) -> bool:
        raw: bytes | None = self.redis.get(Keys.worker(record.worker or ""))  # type: ignore[assignment]
        if raw is None:
            return True  # its heartbeat expired: the worker is gone
        beat = WorkerHeartbeat.model_validate_json(raw)
        # Alive, beat well after the job started, yet not running it: its writes failed.
        started = record.started_at or time.time()
        running_it = record.id in beat.current_jobs
        return not running_it and beat.sent_at > started + 2 * self.settings.heartbeat_interval_s

    def take_back(self, record: JobRecord | TrainingRecord) -> str:
        # A training whose lost run stored a checkpoint made progress: it is no poison, and
        # the next run resumes from there, however many runs were lost before.
        progressed = (
            isinstance(record, TrainingRecord)
            and record.checkpoint_step > 0
            and record.checkpoint_attempt == record.attempts
        )
        if record.attempts < self.settings.max_attempts or progressed:
            if self.lifecycle.requeue(record):
                log.warning(
                    "job %s: worker %s lost; queued again (attempt %d of %d done)",
                    record.id,
                    record.worker,
                    record.attempts,
                    self.settings.max_attempts,
                )
                return "requeued"
            return "raced"
        message = (
            f"the worker running this job was lost {record.attempts} time(s) "
            f"(killed, out of host memory, or crashed by this job); giving up"
        )
        if self.lifecycle.fail_run(
            record, ErrorCode.WORKER_LOST.value, message, self.settings.failure_ttl_s
        ):
            log.error("job %s failed: worker_lost after %d attempts", record.id, record.attempts)
            return "failed"
        return "raced"
