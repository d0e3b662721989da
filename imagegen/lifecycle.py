"""The one owner of a job's lifecycle: every state change is one Lua script, here.

A job is always in exactly one of these places, and moves between them atomically:

- queued:  its id is in the model's queue (`Keys.queue`, a sorted set in run order);
- running: its id is in the model's running set (`Keys.running`, scored by its deadline), its
  record names the run's `owner` ("<worker>#<attempt>");
- terminal: neither; the record (and a succeeded job's images) carry a TTL.

Each script checks the record's status (and, for a worker's writes, its owner), moves the id
between the sets, writes the record and publishes the event, in one step: there is no instant
where a job is in no queue and no running set, and no write of a run that was taken back can
land. Recovery (`worker.reaper`) reads only what these scripts write. The gateway (submit,
cancel) and the worker (claim, progress, finish, fail) and the reaper (take back) all go
through this module; nothing else writes a job's state.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from imagegen.contract import ImageInfo, JobRecord, JobStatus, Keys
from imagegen.store import RUN_SECONDS_BUCKETS, encode_fields, record_from_hash

_P = Keys.PREFIX

# Submit. KEYS: queue, job, queue-seq, bell, idempotency record or '', then input blob keys.
# ARGV: max depth, idempotency value, idempotency TTL, job id, number of input blobs m, the m
# blobs, then the record's field/value pairs. Input blobs are kept as long as the record (no
# TTL while the job lives; every terminal transition expires them with the record).
# Returns {'created', position} | {'full', depth} | {'exists', idempotency value}.
# Out of memory (noeviction), Redis refuses the script's first write and so the whole job.
_SUBMIT = """
if KEYS[5] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {'exists', existing} end
end
local depth = redis.call('ZCARD', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {'full', depth} end
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], ARGV[2], 'EX', ARGV[3]) end
local m = tonumber(ARGV[5])
for k = 1, m do redis.call('SET', KEYS[5 + k], ARGV[5 + k]) end
redis.call('HSET', KEYS[2], unpack(ARGV, 6 + m))
redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[3]), ARGV[4])
redis.call('LPUSH', KEYS[4], 1)
redis.call('LTRIM', KEYS[4], 0, 63)
redis.call('EXPIRE', KEYS[4], 60)
return {'created', redis.call('ZRANK', KEYS[1], ARGV[4])}
"""

# Claim: the head of the queue (when ARGV[4] is '') and then, or only, queued jobs of batch key
# ARGV[4] that fit the image budget, among the first ARGV[6] of the queue, oldest first.
# KEYS: queue, running set, running-models set.
# ARGV: worker, now, model, batch key or '', image budget, scan length.
# Returns {others_waiting (0/1), {job id, record field, value, ...}, ...}.
_CLAIM = """
local want = ARGV[4]
local budget = tonumber(ARGV[5])
local now = tonumber(ARGV[2])
local out = {0}
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[6]) - 1)
for _, id in ipairs(ids) do
  local jk = '{P}:job:' .. id
  local f = redis.call('HMGET', jk, 'status', 'batch_key', 'n', 'attempts', 'timeout_s')
  if f[1] ~= 'queued' then
    redis.call('ZREM', KEYS[1], id)  -- its record expired: nothing to run
  elseif want == '' or (f[2] == want and tonumber(f[3]) <= budget) then
    if want == '' then want = f[2] end
    budget = budget - tonumber(f[3])
    local attempt = tonumber(f[4] or '0') + 1
    local timeout = tonumber(f[5] or '0')
    local deadline = 0
    if timeout > 0 then deadline = now + timeout end
    redis.call('HSET', jk, 'status', 'running', 'started_at', ARGV[2], 'worker', ARGV[1],
      'owner', ARGV[1] .. '#' .. attempt, 'attempts', attempt, 'progress_step', 0,
      'progress_at', '', 'deadline', deadline)
    redis.call('ZREM', KEYS[1], id)
    local score = deadline
    if score == 0 then score = now + 1e9 end
    redis.call('ZADD', KEYS[2], score, id)
    redis.call('PUBLISH', jk .. ':events', 'running')
    local entry = redis.call('HGETALL', jk)
    table.insert(entry, 1, id)
    table.insert(out, entry)
    if budget <= 0 then break end
  else
    out[1] = 1
  end
end
if #out > 1 then redis.call('SADD', KEYS[3], ARGV[3]) end
return out
"""

# Any other state change. KEYS: job, events, stats, queue, running set, bell, queue-seq,
# run-seconds histogram, then blob keys (a succeeded job's images).
# ARGV: job id, owner ('' = any), new status, record TTL, blob TTL, n allowed, allowed...,
# n fields, field, value, ..., n histogram fields, field..., run seconds, then one blob per
# blob key. Returns {1, new status} or {0, current status | 'lost' | ''}.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
local i = 6
local n = tonumber(ARGV[i])
local ok = false
for k = i + 1, i + n do
  if ARGV[k] == cur then ok = true end
end
if not ok then return {0, cur} end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return {0, 'lost'} end
local id, new = ARGV[1], ARGV[3]
i = i + n + 1
n = tonumber(ARGV[i])
if n > 0 then redis.call('HSET', KEYS[1], 'status', new, unpack(ARGV, i + 1, i + 2 * n)) end
if n == 0 then redis.call('HSET', KEYS[1], 'status', new) end
i = i + 2 * n + 1
local hist = tonumber(ARGV[i])
local hist_first = i + 1
i = i + hist + 1
local run_s = ARGV[i]
local blob_ttl = tonumber(ARGV[5])
for k = 9, #KEYS do
  redis.call('SET', KEYS[k], ARGV[i + k - 8], 'EX', blob_ttl)
end
if cur == 'queued' then redis.call('ZREM', KEYS[4], id) end
if cur == 'running' then redis.call('ZREM', KEYS[5], id) end
if new == 'queued' then
  -- Back at the front: it already waited its turn once.
  local head = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  local score = redis.call('INCR', KEYS[7])
  if head[2] then score = tonumber(head[2]) - 1 end
  redis.call('ZADD', KEYS[4], score, id)
  redis.call('LPUSH', KEYS[6], 1)
  redis.call('LTRIM', KEYS[6], 0, 63)
  redis.call('EXPIRE', KEYS[6], 60)
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
if ttl == 0 then redis.call('PERSIST', KEYS[1]) end
if new == 'succeeded' or new == 'failed' or new == 'canceled' then
  -- The job's input blobs (named in its 'inputs' field) go with the record: expired now,
  -- at once when the record itself has no TTL.
  local inputs = redis.call('HGET', KEYS[1], 'inputs')
  if inputs and inputs ~= '' then
    for name in string.gmatch(inputs, '[^,]+') do
      local ik = KEYS[1] .. ':input:' .. name
      if ttl > 0 then redis.call('EXPIRE', ik, ttl) else redis.call('DEL', ik) end
    end
  end
  -- Cluster-wide job counts by model and final status, for /metrics on any gateway.
  local model = redis.call('HGET', KEYS[1], 'model')
  redis.call('HINCRBY', KEYS[3], model .. '|' .. new, 1)
  for k = hist_first, hist_first + hist - 1 do
    redis.call('HINCRBY', KEYS[8], ARGV[k], 1)
  end
  if hist > 0 then redis.call('HINCRBYFLOAT', KEYS[8], 'sum', run_s) end
end
redis.call('PUBLISH', KEYS[2], new)
return {1, new}
"""

# Progress only moves forward and only while running under this owner: a late write never
# resurrects a canceled job or rolls a finished one back. Returns the job's status ("lost" if
# another owner holds it), so the worker learns of a cancel on the round trip it already makes.
_PROGRESS = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then return status or '' end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[3] then return 'lost' end
local cur = tonumber(redis.call('HGET', KEYS[1], 'progress_step') or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('HSET', KEYS[1], 'progress_step', ARGV[1], 'progress_at', ARGV[2])
  redis.call('PUBLISH', KEYS[2], 'progress')
end
return status
"""


def _script(source: str) -> str:
    return source.replace("{P}", _P)


@dataclass(frozen=True)
class Claimed:
    """A job this worker now runs: its record (as running) and the run's owner token."""

    record: JobRecord

    @property
    def owner(self) -> str:
        return self.record.owner or ""

    @property
    def id(self) -> str:
        return self.record.id


@dataclass(frozen=True)
class Submitted:
    """The outcome of a submit: `created` (with its queue position), `full`, or `exists`."""

    outcome: str
    value: str | int


def record_fields(record: JobRecord) -> dict[str, str]:
    """The hash fields a new queued job is written with."""
    spec = record.spec
    return encode_fields(
        {
            "status": record.status.value,
            "spec": spec.model_dump_json(),
            "model": spec.model,
            "batch_key": spec.batch_key,
            "n": spec.n,
            "created_at": record.created_at,
            "progress_step": 0,
            "attempts": 0,
            "api_key": record.api_key,
            "request_id": record.request_id,
            "timeout_s": record.timeout_s,
            "inputs": ",".join(spec.inputs),
        }
    )


def _transition_call(
    job_id: str,
    model: str,
    allowed: Iterable[JobStatus],
    new_status: JobStatus,
    fields: Mapping[str, Any] | None = None,
    ttl_s: int = 0,
    owner: str = "",
    blobs: Sequence[tuple[str, bytes]] = (),
    blob_ttl_s: int = 0,
    run_s: float | None = None,
) -> tuple[list[str], list[Any]]:
    allowed_values = [s.value for s in allowed]
    encoded = encode_fields(fields or {})
    hist = (
        [f"le:{b}" for b in RUN_SECONDS_BUCKETS if run_s <= b] + ["count"]
        if run_s is not None
        else []
    )
    args: list[Any] = [
        job_id,
        owner,
        new_status.value,
        ttl_s,
        blob_ttl_s,
        len(allowed_values),
        *allowed_values,
        len(encoded),
    ]
    for key, value in encoded.items():
        args += [key, value]
    args += [len(hist), *hist, repr(run_s or 0.0), *(blob for _, blob in blobs)]
    keys = [
        Keys.job(job_id),
        Keys.events(job_id),
        Keys.JOB_STATS,
        Keys.queue(model),
        Keys.running(model),
        Keys.bell(model),
        Keys.QUEUE_SEQ,
        Keys.run_seconds(model),
        *(key for key, _ in blobs),
    ]
    return keys, args


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Lifecycle:
    """The job state machine over one (sync) Redis connection; the gateway's submit has an
    async twin, `AsyncSubmitter`."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection
        self._claim = connection.register_script(_script(_CLAIM))
        self._transition = connection.register_script(_script(_TRANSITION))
        self._progress = connection.register_script(_script(_PROGRESS))
        self._submit = connection.register_script(_script(_SUBMIT))

    # -- gateway --------------------------------------------------------------------------------
    def submit(
        self,
        record: JobRecord,
        max_depth: int,
        idempotency: tuple[str, str, int] | None = None,
        inputs: Mapping[str, bytes] | None = None,
    ) -> Submitted:
        """Queue `record` (with its input blobs, by name) unless the queue is full or the
        Idempotency-Key was used (sync)."""
        keys, args = submit_call(record, max_depth, idempotency, inputs)
        outcome, value = self._submit(keys=keys, args=args)
        return parse_submit(outcome, value)

    def cancel(self, record: JobRecord, ttl_s: int) -> bool:
        """Cancel a queued or running job (a running one's worker stops at its next step)."""
        moved, _ = self.transition(
            record.id,
            record.spec.model,
            [JobStatus.QUEUED, JobStatus.RUNNING],
            JobStatus.CANCELED,
            {
                "finished_at": time.time(),
                "error": {"code": "canceled", "message": "canceled by the client"},
            },
            ttl_s=ttl_s,
        )
        return moved

    # -- worker ---------------------------------------------------------------------------------
    def claim(
        self, model: str, worker: str, batch_key: str = "", budget: int = 0, scan: int = 64
    ) -> tuple[list[Claimed], bool]:
        """Claim the queue's head (`batch_key` ""), then queued jobs of its batch key within
        `budget` images; or, given a `batch_key`, only such jobs. Returns the claimed jobs
        (now running under this worker) and whether a job of another key is waiting."""
        keys = [Keys.queue(model), Keys.running(model), Keys.RUNNING_MODELS]
        reply = self._claim(
            keys=keys, args=[worker, repr(time.time()), model, batch_key, budget, scan]
        )
        claimed = []
        for entry in reply[1:]:
            job_id = _decode(entry[0])
            flat = [_decode(v) for v in entry[1:]]
            raw = dict(zip(flat[::2], flat[1::2], strict=True))
            claimed.append(Claimed(record_from_hash(job_id, raw)))
        return claimed, bool(reply[0])

    def read_input(self, job_id: str, name: str) -> bytes | None:
        """An input blob of a job (read only; its writes are the submit and the terminal
        transitions')."""
        value: bytes | None = self.redis.get(Keys.input(job_id, name))  # type: ignore[assignment]
        return value

    def progress(self, job_id: str, step: int, owner: str) -> str:
        """Record that `step` steps are done; returns the job's status, "lost" when another
        owner holds it, or "" when the record is gone."""
        keys = [Keys.job(job_id), Keys.events(job_id)]
        status: bytes = self._progress(keys=keys, args=[step, repr(time.time()), owner])
        return status.decode()

    def succeed(
        self,
        job: Claimed,
        pngs: Sequence[bytes],
        images: Sequence[ImageInfo],
        image_ttl_s: int,
        record_ttl_s: int,
        run_s: float,
    ) -> bool:
        """Store the images and mark the job succeeded, in one step; False (nothing written)
        if the run no longer holds the job (canceled, or taken back)."""
        blobs = [
            (Keys.image(job.id, info.index), png) for info, png in zip(images, pngs, strict=True)
        ]
        moved, _ = self.transition(
            job.id,
            job.record.spec.model,
            [JobStatus.RUNNING],
            JobStatus.SUCCEEDED,
            {"finished_at": time.time(), "images": [i.model_dump() for i in images]},
            ttl_s=record_ttl_s,
            owner=job.owner,
            blobs=blobs,
            blob_ttl_s=image_ttl_s,
            run_s=run_s,
        )
        return moved

    def fail(self, job: Claimed, code: str, message: str, ttl_s: int) -> bool:
        """Mark a run's job failed with `code`; False if the run no longer holds it."""
        moved, _ = self.transition(
            job.id,
            job.record.spec.model,
            [JobStatus.RUNNING],
            JobStatus.FAILED,
            {"finished_at": time.time(), "error": {"code": code, "message": message}},
            ttl_s=ttl_s,
            owner=job.owner,
        )
        return moved

    # -- reaper ---------------------------------------------------------------------------------
    def requeue(self, record: JobRecord) -> bool:
        """Put a lost run's job back at the front of its queue (fenced by the run's owner)."""
        moved, _ = self.transition(
            record.id,
            record.spec.model,
            [JobStatus.RUNNING],
            JobStatus.QUEUED,
            {
                "started_at": "",
                "worker": "",
                "owner": "",
                "progress_step": 0,
                "progress_at": "",
                "deadline": "",
            },
            owner=record.owner or "",
        )
        return moved

    def transition(
        self,
        job_id: str,
        model: str,
        allowed: Iterable[JobStatus],
        new_status: JobStatus,
        fields: Mapping[str, Any] | None = None,
        ttl_s: int = 0,
        owner: str = "",
        blobs: Sequence[tuple[str, bytes]] = (),
        blob_ttl_s: int = 0,
        run_s: float | None = None,
    ) -> tuple[bool, str]:
        """Move a job to `new_status` if it is in one of `allowed` (and, with `owner`, still
        held by that run), keeping the queue and running sets in step; (moved, status)."""
        keys, args = _transition_call(
            job_id,
            model,
            allowed,
            new_status,
            fields,
            ttl_s,
            owner,
            blobs,
            blob_ttl_s,
            run_s,
        )
        moved, status = self._transition(keys=keys, args=args)
        return bool(moved), _decode(status)


def submit_call(
    record: JobRecord,
    max_depth: int,
    idempotency: tuple[str, str, int] | None,
    inputs: Mapping[str, bytes] | None = None,
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the submit script. `idempotency`: (key, value, TTL); `inputs`: the
    job's input blobs by name, exactly those its spec names (`JobSpec.inputs`)."""
    inputs = dict(inputs or {})
    if sorted(inputs) != sorted(record.spec.inputs):
        raise ValueError(f"job inputs {sorted(inputs)} != {sorted(record.spec.inputs)}")
    model = record.spec.model
    keys = [Keys.queue(model), Keys.job(record.id), Keys.QUEUE_SEQ, Keys.bell(model), ""]
    args: list[Any] = [max_depth, "", 0, record.id, len(inputs)]
    if idempotency is not None:
        keys[4] = idempotency[0]
        args[1], args[2] = idempotency[1], idempotency[2]
    for name, blob in inputs.items():
        keys.append(Keys.input(record.id, name))
        args.append(blob)
    for key, value in record_fields(record).items():
        args += [key, value]
    return keys, args


def parse_submit(outcome: bytes | str, value: bytes | str | int) -> Submitted:
    text = _decode(outcome)
    if isinstance(value, int):
        return Submitted(text, value)
    return Submitted(text, _decode(value))


class AsyncSubmitter:
    """The submit script on the gateway's event loop (one Redis round trip per submit)."""

    def __init__(self, connection: aioredis.Redis) -> None:
        self._submit = connection.register_script(_script(_SUBMIT))

    async def submit(
        self,
        record: JobRecord,
        max_depth: int,
        idempotency: tuple[str, str, int] | None = None,
        inputs: Mapping[str, bytes] | None = None,
    ) -> Submitted:
        keys, args = submit_call(record, max_depth, idempotency, inputs)
        outcome, value = await self._submit(keys=keys, args=args)
        return parse_submit(outcome, value)


def queue_position(connection: redis.Redis, record: JobRecord) -> int | None:
    """0 for the next job to start, None when not queued."""
    if record.status != JobStatus.QUEUED:
        return None
    rank: int | None = connection.zrank(Keys.queue(record.spec.model), record.id)  # type: ignore[assignment]
    return rank if rank is not None else 0
