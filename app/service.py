"""The generation service: turns validated requests into queued jobs and jobs into documents."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime

import anyio
import redis
import redis.asyncio as aioredis
from rq import Queue
from rq.serializers import JSONSerializer

from app.errors import Conflict, InvalidRequest, NotFound, QueueFull, Unavailable
from app.registry import ModelRegistry, as_text
from app.schemas import (
    ErrorInfo,
    GenerationParams,
    GenerationRequest,
    ImageLink,
    JobDocument,
    Progress,
    Timings,
)
from imagegen.contract import (
    JOB_ID_PREFIX,
    SCHEDULER_MIN_STEPS,
    JobRecord,
    JobSpec,
    JobStatus,
    Keys,
    ModelInfo,
    is_valid_job_id,
    queue_name,
)
from imagegen.logs import request_id
from imagegen.settings import Settings
from imagegen.store import JobStore

# The worker's job function, enqueued by dotted path so the gateway never imports it.
JOB_FUNCTION = "worker.jobs.run_generation"
IDEMPOTENCY_TTL_S = 24 * 3600

# Submit in one atomic step. KEYS[1]: the model's RQ queue; KEYS[2] (optional): the
# Idempotency-Key's record. ARGV: the queue's depth limit; the claim's length (0 or 2) and the
# claim (value, TTL); then the writes that queue the job, each as its argument count followed
# by the command and its arguments. A replay wins over a full queue: that job already exists.
# Out of memory (noeviction), Redis refuses a script's first write and so the whole job: it is
# never half-written. The job's own keys (its record, RQ's job hash and queue set) are not
# declared in KEYS: like RQ itself, this needs a single Redis, not a Cluster.
_SUBMIT_LUA = """
if KEYS[2] then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {'exists', existing} end
end
local depth = redis.call('LLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {'full', depth} end
local claimed = tonumber(ARGV[2])
if claimed > 0 then redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4]) end
local i = 3 + claimed
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return {'created', redis.call('LLEN', KEYS[1])}
"""


def new_job_id() -> str:
    return JOB_ID_PREFIX + secrets.token_urlsafe(16)


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class GenerationService:
    """Submit, read and cancel generation jobs."""

    def __init__(
        self,
        connection: redis.Redis,
        store: JobStore,
        registry: ModelRegistry,
        settings: Settings,
        async_connection: aioredis.Redis,
    ) -> None:
        self.redis = connection
        self.aredis = async_connection
        self.store = store
        self.registry = registry
        self.settings = settings
        self._queues: dict[str, Queue] = {}
        self._submit_script = async_connection.register_script(_SUBMIT_LUA)

    def queue(self, model_id: str) -> Queue:
        queue = self._queues.get(model_id)
        if queue is None:
            queue = Queue(queue_name(model_id), connection=self.redis, serializer=JSONSerializer)
            self._queues[model_id] = queue
        return queue

    async def _queue_for_enqueue(self, model_id: str) -> Queue:
        """The model's queue, ready to record an enqueue without touching Redis: RQ reads the
        server's version once per queue (INFO, sync), so that read happens off the event loop."""
        queue = self.queue(model_id)
        if not queue.redis_server_version:
            await anyio.to_thread.run_sync(queue.get_redis_server_version)
        return queue

    # -- submit ---------------------------------------------------------------------------------
    async def resolve(self, request: GenerationRequest) -> JobSpec:
        """Fill in the model's defaults and apply the configured limits, naming any field."""
        model_id = request.model or self.settings.default_model
        info = await self.registry.aget(model_id)
        known = await self.registry.amodel_ids() if info is None else []
        return self._resolve(request, model_id, info, known)

    def _resolve(
        self, request: GenerationRequest, model_id: str, info: ModelInfo | None, known: list[str]
    ) -> JobSpec:
        s = self.settings
        if info is None:
            if request.model is None:
                raise Unavailable(
                    f"the default model {model_id!r} has no worker registered yet; retry shortly"
                )
            raise InvalidRequest.for_field(
                "model", f"unknown model {model_id!r}; known models: {', '.join(known) or 'none'}"
            )
        if len(request.prompt.strip()) > s.max_prompt_chars:
            raise InvalidRequest.for_field(
                "prompt", f"must be at most {s.max_prompt_chars} characters after trimming"
            )
        if len(request.negative_prompt) > s.max_prompt_chars:
            raise InvalidRequest.for_field(
                "negative_prompt", f"must be at most {s.max_prompt_chars} characters"
            )
        width = request.width if request.width is not None else info.width
        height = request.height if request.height is not None else info.height
        if width * height > s.max_pixels:
            raise InvalidRequest.for_field(
                "width" if request.width is not None else "height",
                f"width*height = {width * height} exceeds the pixel cap of {s.max_pixels}",
            )
        steps = request.steps if request.steps is not None else info.steps
        if steps > s.max_steps:
            raise InvalidRequest.for_field("steps", f"must be at most {s.max_steps}")
        if request.n > s.max_n:
            raise InvalidRequest.for_field("n", f"must be at most {s.max_n}")
        scheduler = request.scheduler if request.scheduler is not None else info.scheduler
        if scheduler not in info.schedulers:
            raise InvalidRequest.for_field(
                "scheduler",
                f"unknown scheduler {scheduler!r}; one of: {', '.join(info.schedulers)}",
            )
        min_steps = SCHEDULER_MIN_STEPS.get(scheduler, 1)
        if steps < min_steps:
            raise InvalidRequest.for_field(
                "steps", f"scheduler {scheduler!r} needs at least {min_steps} steps"
            )
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        return JobSpec(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=(
                request.guidance_scale
                if request.guidance_scale is not None
                else info.guidance_scale
            ),
            seed=seed,
            n=request.n,
            scheduler=scheduler,
            model=model_id,
        )

    def job_timeout_s(self, spec: JobSpec) -> int:
        """A hard limit that grows with the work: steps x megapixels x images."""
        work = spec.steps * spec.width * spec.height * spec.n / 1e6
        return int(
            self.settings.job_timeout_base_s + work * self.settings.job_timeout_s_per_megapixel_step
        )

    async def submit(
        self, request: GenerationRequest, api_key: str = "", idempotency_key: str | None = None
    ) -> tuple[JobDocument, bool]:
        """Queue a job for `api_key`; returns its document and whether it was created (False:
        an Idempotency-Key replay).

        One round trip to Redis, on the event loop: a script checks the Idempotency-Key and
        the queue's depth and, only if both allow it, writes the job (see `_SUBMIT_LUA`).
        """
        spec = await self.resolve(request)  # a bad request never consumes an idempotency key
        queue = await self._queue_for_enqueue(spec.model)
        record = JobRecord(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            spec=spec,
            created_at=time.time(),
            api_key=api_key,
            request_id=request_id.get(),
        )
        keys = [queue.key]
        claim: list[str | int] = []
        body_hash = ""
        if idempotency_key is not None:
            body_hash = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
            owner_key = hashlib.sha256(f"{api_key}\n{idempotency_key}".encode()).hexdigest()
            keys.append(Keys.idempotency(owner_key))
            claim = [f"{record.id} {body_hash}", IDEMPOTENCY_TTL_S]
        outcome, value = await self._submit_script(
            keys=keys,
            args=[
                self.settings.max_queue_depth,
                len(claim),
                *claim,
                *self._writes(record, queue),
            ],
        )
        if outcome == b"created":
            # The script pushed the job last in its queue: its position is the length less one.
            return self.document(record, queue_position=int(value) - 1), True
        if outcome == b"full":
            raise QueueFull(
                f"the queue of model {spec.model!r} holds {int(value)} jobs, its limit; "
                "retry later",
                headers={"Retry-After": "10"},
            )
        job_id, stored_hash = as_text(value).split(" ", 1)  # outcome "exists": a replay
        if stored_hash != body_hash:
            raise Conflict("Idempotency-Key was already used with a different request body")
        return await anyio.to_thread.run_sync(self.get, job_id, api_key), False

    def _writes(self, record: JobRecord, queue: Queue) -> list[bytes | str | int | float]:
        """The writes that queue `record`, flattened for `_SUBMIT_LUA`: per command its
        argument count, then the command and its arguments.

        RQ speaks sync redis-py, so it enqueues into a sync pipeline that is never executed;
        its commands, exactly as RQ made them, run inside the script. RQ stays the author of
        its own keys (job hash, queue list, queue set).
        """
        recorder = self.redis.pipeline(transaction=True)
        recorder.multi()  # buffer everything, as a MULTI would
        try:
            self.store.create(record, recorder)
            queue.enqueue_call(
                JOB_FUNCTION,
                args=(record.id,),
                job_id=record.id,
                timeout=self.job_timeout_s(record.spec),
                result_ttl=self.settings.result_ttl_s,
                failure_ttl=self.settings.failure_ttl_s,
                description=f"generation {record.id}",
                pipeline=recorder,
            )
            flat: list[bytes | str | int | float] = []
            for args, _ in recorder.command_stack:
                flat += [len(args), *args]
            return flat
        finally:
            recorder.reset()

    # -- read -----------------------------------------------------------------------------------
    def get_record(self, job_id: str, api_key: str) -> JobRecord:
        """The job, if it exists and belongs to `api_key`; another key's job is a 404 too."""
        # Ids are checked before any Redis access: nothing user-made reaches a key unchecked.
        record = self.store.get(job_id) if is_valid_job_id(job_id) else None
        if record is None or not hmac.compare_digest(record.api_key, api_key):
            shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."
            raise NotFound(f"no generation job {shown!r} (unknown id, or it expired)")
        return record

    def get(self, job_id: str, api_key: str = "") -> JobDocument:
        return self.document(self.get_record(job_id, api_key))

    def image(self, job_id: str, index: int, api_key: str = "") -> bytes:
        record = self.get_record(job_id, api_key)
        if index < 0 or index >= record.spec.n:
            raise NotFound(f"job {job_id} has images 0..{record.spec.n - 1}, not {index}")
        if record.status != JobStatus.SUCCEEDED:
            raise NotFound(
                f"image {index} of job {job_id} does not exist yet (job is {record.status})"
            )
        png = self.store.get_image(job_id, index)
        if png is None:
            raise NotFound(
                f"image {index} of job {job_id} has expired (results are kept "
                f"{self.settings.result_ttl_s}s after a job finishes)"
            )
        return png

    def queue_position(self, record: JobRecord) -> int | None:
        if record.status != JobStatus.QUEUED:
            return None
        position = self.queue(record.spec.model).get_job_position(record.id)
        # Between leaving the queue and being marked running a job is "next": position 0.
        return position if position is not None else 0

    def document(self, record: JobRecord, queue_position: int | None = None) -> JobDocument:
        spec = record.spec
        images = [
            ImageLink(
                index=i.index,
                seed=i.seed,
                width=i.width,
                height=i.height,
                url=f"/v1/generations/{record.id}/images/{i.index}",
            )
            for i in record.images
        ]
        queued_s = run_s = None
        if record.started_at is not None:
            queued_s = round(record.started_at - record.created_at, 3)
            if record.finished_at is not None:
                run_s = round(record.finished_at - record.started_at, 3)
        elif record.finished_at is not None:
            queued_s = round(record.finished_at - record.created_at, 3)
        return JobDocument(
            id=record.id,
            status=record.status.value,
            created_at=rfc3339(record.created_at) or "",
            started_at=rfc3339(record.started_at),
            finished_at=rfc3339(record.finished_at),
            queue_position=(
                queue_position if queue_position is not None else self.queue_position(record)
            ),
            progress=Progress(
                step=record.progress_step, total_steps=spec.steps, eta_s=self._eta_s(record)
            ),
            request=GenerationParams(**spec.model_dump()),
            images=images,
            error=ErrorInfo(**record.error.model_dump()) if record.error else None,
            timings=Timings(queued_s=queued_s, run_s=run_s),
        )

    @staticmethod
    def _eta_s(record: JobRecord) -> float | None:
        """Seconds left at the step rate seen so far; None until a step rate is known."""
        if record.status != JobStatus.RUNNING or not record.progress_step:
            return None
        if record.started_at is None or record.progress_at is None:
            return None
        per_step = (record.progress_at - record.started_at) / record.progress_step
        return round(per_step * (record.spec.steps - record.progress_step), 2)

    # -- cancel ---------------------------------------------------------------------------------
    def cancel(self, job_id: str, api_key: str = "") -> JobDocument:
        """Cancel a queued or running job; a finished job is returned unchanged.

        The record turns `canceled` at once. A queued job leaves its queue (and a worker that
        pops it anyway sees `canceled` and skips it); a running job's worker learns of it at
        its next progress write and stops at that step boundary.
        """
        record = self.get_record(job_id, api_key)
        if not record.status.is_terminal:
            moved, _ = self.store.transition(
                job_id,
                [JobStatus.QUEUED, JobStatus.RUNNING],
                JobStatus.CANCELED,
                {
                    "finished_at": time.time(),
                    "error": {"code": "canceled", "message": "canceled by the client"},
                },
                ttl_s=self.settings.failure_ttl_s,
            )
            if moved and record.status == JobStatus.QUEUED:
                self.queue(record.spec.model).remove(job_id)
            record = self.get_record(job_id, api_key)
        return self.document(record)
