"""Taking back jobs whose worker is gone, so that no accepted job stays `running` forever.

RQ's own abandoned-job cleanup only runs every `maintenance_interval` and waits for the job's
whole timeout; a GPU job may run for minutes. Every worker therefore sweeps its model's
started-job registry every few seconds and takes back any job whose worker's heartbeat has
expired (killed, OOM-killed, machine gone) or whose live worker no longer runs it (its Redis
writes failed). A taken-back job is queued again at the front, up to `max_attempts` runs in
all; after that it fails with `worker_lost`. The owner fence in the job store makes the
take-back safe against a worker that was only slow, and against several sweepers at once.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from imagegen.contract import ErrorCode, JobRecord, JobStatus, Keys, WorkerHeartbeat
from imagegen.settings import Settings
from imagegen.store import JobStore

log = logging.getLogger("imagegen.worker")


class Reaper:
    """Sweeps one model queue for lost jobs; `start()` runs it in a daemon thread."""

    def __init__(self, connection: redis.Redis, queue_name: str, settings: Settings) -> None:
        self.redis = connection
        self.store = JobStore(connection)
        self.settings = settings
        self.queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
        self.started = StartedJobRegistry(
            queue_name, connection=connection, serializer=JSONSerializer
        )
        self.intermediate = IntermediateQueue(self.queue.key, connection)
        self._seen_claimed: set[str] = set()
        self._seen_taken: set[str] = set()
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

    def sweep(self) -> list[tuple[str, str]]:
        """One pass; returns (job id, "requeued" | "failed") for each job taken back."""
        outcomes = []
        taken_not_started = set()
        for job_id in self.started.get_job_ids(cleanup=False):
            record = self.store.get(job_id)
            if record is None:
                continue
            if record.status == JobStatus.QUEUED:
                # RQ handed it to a worker whose first write (queued -> running) never landed,
                # e.g. Redis went away right then. Seen twice, it is stuck: queue it again.
                taken_not_started.add(job_id)
                if job_id in self._seen_taken:
                    self._requeue_rq_job(job_id)
                    log.warning("job %s: taken by a worker but never started; queued again", job_id)
                    outcomes.append((job_id, "requeued"))
            elif record.status == JobStatus.RUNNING and self._is_lost(record):
                outcomes.append((job_id, self.take_back(record)))
        self._seen_taken = taken_not_started
        self._rescue_claimed()
        return outcomes

    def _is_lost(self, record: JobRecord) -> bool:
        raw: bytes | None = self.redis.get(Keys.worker(record.worker or ""))  # type: ignore[assignment]
        if raw is None:
            return True  # its heartbeat expired: the worker is gone
        beat = WorkerHeartbeat.model_validate_json(raw)
        # Alive, beat after the job started, yet not running it: its writes must have failed.
        started = record.started_at or time.time()
        running_it = record.id == beat.current_job or record.id in beat.current_jobs
        return not running_it and beat.sent_at > started + 2 * self.settings.heartbeat_interval_s

    def take_back(self, record: JobRecord) -> str:
        owner = record.owner or ""
        if record.attempts < self.settings.max_attempts:
            moved, _ = self.store.transition(
                record.id,
                [JobStatus.RUNNING],
                JobStatus.QUEUED,
                {
                    "started_at": "",
                    "worker": "",
                    "owner": "",
                    "progress_step": 0,
                    "progress_at": "",
                },
                owner=owner,
            )
            if moved:
                self._requeue_rq_job(record.id)
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
        moved, _ = self.store.transition(
            record.id,
            [JobStatus.RUNNING],
            JobStatus.FAILED,
            {
                "finished_at": time.time(),
                "error": {"code": ErrorCode.WORKER_LOST.value, "message": message},
            },
            ttl_s=self.settings.failure_ttl_s,
            owner=owner,
        )
        if moved:
            self._fail_rq_job(record.id)
            log.error("job %s failed: worker_lost after %d attempts", record.id, record.attempts)
            return "failed"
        return "raced"

    def _fetch(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None

    def _requeue_rq_job(self, job_id: str) -> None:
        job = self._fetch(job_id)
        if job is None:
            return
        self.started.remove_executions(job)
        self.queue.enqueue_job(job, at_front=True)

    def _fail_rq_job(self, job_id: str) -> None:
        job = self._fetch(job_id)
        if job is None:
            return
        with self.redis.pipeline() as pipe:
            self.started.remove_executions(job, pipeline=pipe)
            job.set_status(RQStatus.FAILED, pipeline=pipe)
            FailedJobRegistry(self.queue.name, connection=self.redis).add(
                job, ttl=self.settings.failure_ttl_s, pipeline=pipe
            )
            pipe.execute()

    def _rescue_claimed(self) -> None:
        """A job popped into RQ's intermediate list by a worker that died before starting it
        would otherwise wait there for RQ's slow cleanup: put it back at the queue's front."""
        claimed = {i.decode() for i in self.redis.lrange(self.intermediate.key, 0, -1)}  # type: ignore[union-attr]
        for job_id in claimed & self._seen_claimed:
            record = self.store.get(job_id)
            still_queued = record is not None and record.status == JobStatus.QUEUED
            if still_queued and self.redis.lrem(self.intermediate.key, 1, job_id):
                self.redis.lpush(self.queue.key, job_id)
                log.warning("job %s: claimed by a lost worker; queued again", job_id)
        self._seen_claimed = claimed
