"""Claiming queued jobs that can share the running job's denoising loop (dynamic batching).

When a worker starts a job, it looks at the jobs waiting now in the same model queue and
takes those with the same shape key (width, height, steps, scheduler), up to an image budget.
By default it does not wait for more: a batch is whatever is queued at that moment. With
IMAGEGEN_BATCH_MAX_WAIT_S it keeps looking that long while the budget is not full, which
trades a little latency for fuller batches when clients resubmit in waves. Each claim is one
Lua script that removes the job from the queue and marks it running under this worker, so a
cancel or another worker can never take it at the same time. The claimed jobs then go
through RQ's registries like any job (started → finished / failed), and if this worker dies
the recovery sweep takes them back like any other job it held.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue
from rq.executions import Execution
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now

from imagegen.contract import JobRecord, JobSpec, JobStatus, Keys
from imagegen.store import JobStore

log = logging.getLogger("imagegen.worker")

# While waiting for a batch to fill, how often the queue is looked at again.
POLL_S = 0.005

# KEYS: queue list, job hash, events channel. ARGV: job id, worker name, now.
# Returns the attempt number (> 0) if claimed, 0 otherwise.
_CLAIM_LUA = """
if redis.call('HGET', KEYS[2], 'status') ~= 'queued' then return 0 end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) ~= 1 then return 0 end
local attempt = tonumber(redis.call('HGET', KEYS[2], 'attempts') or '0') + 1
redis.call('HSET', KEYS[2], 'status', 'running', 'started_at', ARGV[3], 'worker', ARGV[2],
  'owner', ARGV[2] .. '#' .. attempt, 'attempts', attempt, 'progress_step', 0)
redis.call('PUBLISH', KEYS[3], 'running')
return attempt
"""


@dataclass
class Claimed:
    """A job taken into a batch: its record (as running), owner token and RQ bookkeeping."""

    record: JobRecord
    owner: str
    rq_job: Job | None
    execution: Execution | None


class Batcher:
    """Finds and claims batch companions for a job, and closes their RQ bookkeeping."""

    def __init__(
        self,
        connection: redis.Redis,
        queue_name: str,
        max_images: int,
        max_wait_s: float = 0.0,
        scan: int = 64,
    ) -> None:
        self.redis = connection
        self.store = JobStore(connection)
        self.queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
        self.started = StartedJobRegistry(
            queue_name, connection=connection, serializer=JSONSerializer
        )
        self.max_images = max_images
        self.max_wait_s = max_wait_s
        self.scan = scan
        self._claim = connection.register_script(_CLAIM_LUA)
        self.rq_worker: Any = None  # set by the work loop: RQ bookkeeping goes through it

    def claim(
        self,
        leader: JobSpec,
        worker_name: str,
        on_claim: Callable[[str], None] | None = None,
    ) -> list[Claimed]:
        """Claim queued jobs with `leader`'s shape key, oldest first, within the image budget;
        keep looking for up to `max_wait_s` while the budget is not full and no job of
        another shape is waiting (that one is better served next than kept waiting).
        `on_claim(job_id)` is called as each job becomes this worker's."""
        budget = self.max_images - leader.n
        deadline = time.monotonic() + self.max_wait_s
        # Ids already looked at, not read again while waiting: True for a queued job of
        # another shape (work that waits while this batch does), False for a gone one.
        passed: dict[str, bool] = {}
        claimed: list[Claimed] = []
        while budget > 0:
            found, others_waiting = self._claim_waiting(
                leader, worker_name, budget, passed, on_claim
            )
            claimed += found
            budget -= sum(job.record.spec.n for job in found)
            remaining = deadline - time.monotonic()
            if budget <= 0 or remaining <= 0 or others_waiting:
                break
            time.sleep(min(POLL_S, remaining))
        if claimed:
            log.info("batched %d queued job(s) with the running one", len(claimed))
        return claimed

    def _claim_waiting(
        self,
        leader: JobSpec,
        worker_name: str,
        budget: int,
        passed: dict[str, bool],
        on_claim: Callable[[str], None] | None,
    ) -> tuple[list[Claimed], bool]:
        """One pass over the head of the queue: claim what fits `budget`, oldest first.
        Also returns whether a job this batch cannot take is waiting in the queue."""
        waiting: list[bytes] = self.redis.lrange(self.queue.key, 0, self.scan - 1)  # type: ignore[assignment]
        claimed: list[Claimed] = []
        others_waiting = False
        for raw_id in waiting:
            job_id = raw_id.decode()
            if job_id in passed:
                others_waiting |= passed[job_id]
                continue
            record = self.store.get(job_id)
            if record is None or record.status != JobStatus.QUEUED:
                passed[job_id] = False  # canceled or taken: no work waiting here
                continue
            if record.spec.shape_key != leader.shape_key or record.spec.n > budget:
                # The budget only shrinks: it will not fit later either.
                passed[job_id] = others_waiting = True
                continue
            keys = [self.queue.key, Keys.job(job_id), Keys.events(job_id)]
            attempt = int(self._claim(keys=keys, args=[job_id, worker_name, repr(time.time())]))
            if not attempt:
                passed[job_id] = False
                continue  # canceled or taken meanwhile
            if on_claim is not None:
                on_claim(job_id)
            owner = f"{worker_name}#{attempt}"
            rq_job, execution = self._start_rq_job(job_id)
            claimed.append(Claimed(self.store.get(job_id) or record, owner, rq_job, execution))
            budget -= record.spec.n
            if budget <= 0:
                break
        return claimed, others_waiting

    def _start_rq_job(self, job_id: str) -> tuple[Job | None, Execution | None]:
        if self.rq_worker is None:
            return None, None
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except Exception:  # the RQ job expired: our record still drives the work
            return None, None
        execution = self.rq_worker.prepare_execution(job)
        with self.redis.pipeline() as pipe:
            job.prepare_for_execution(self.rq_worker.name, pipeline=pipe)
            pipe.execute()
        return job, execution

    def finish(self, claimed: Claimed, error: BaseException | None) -> None:
        """Close a claimed job's RQ bookkeeping the way RQ's own loop would."""
        if claimed.rq_job is None or self.rq_worker is None:
            return
        job, execution = claimed.rq_job, claimed.execution
        job.ended_at = now()  # RQ's own loop sets this once the function returns
        try:
            if error is None:
                job._result = {"batched": True}
                self.rq_worker.handle_job_success(job, self.queue, self.started, execution)
            else:
                text = f"{type(error).__name__}: {error}"
                job._exc_info = text
                self.rq_worker.handle_job_failure(
                    job, self.queue, self.started, exc_string=text, execution=execution
                )
        except Exception as exc:  # bookkeeping must never fail the batch: our record is done
            log.warning("could not close RQ job %s: %s", job.id, exc)
