"""The one owner of a job's lifecycle: every state change is one Lua script, here.

A job is always in exactly one of these places, and moves between them atomically:

- queued:  its id is in the model's queue (`Keys.queue`, a sorted set in run order: the fair
  order of `_SUBMIT`, one job per API key a round) and in its key's queue of that model;
- running: its id is in the model's running set (`Keys.running`, scored by its deadline), its
  record names the run's `owner` ("<worker>#<attempt>");
- terminal: neither; the record (and a succeeded job's images) carry a TTL.

Each script checks the record's status (and, for a worker's writes, its owner), moves the id
between the sets, writes the record and publishes the event, in one step: there is no instant
where a job is in no queue and no running set, and no write of a run that was taken back can
land. Recovery (`worker.reaper`) reads only what these scripts write. The gateway (submit,
cancel) and the worker (claim, progress, finish, fail) and the reaper (take back) all go
through this module; nothing else writes a job's state.

The same steps keep each API key's books (active jobs, the day's megapixel-steps, totals) and
write the webhook outbox (`_OUTBOX`): a delivery exists exactly when its transition happened.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from imagegen.core.contract import (
    ImageInfo,
    JobRecord,
    JobStatus,
    Keys,
    WebhookDelivery,
    utc_day,
)
from imagegen.core.store import RUN_SECONDS_BUCKETS, encode_fields, record_from_hash

_P = Keys.PREFIX

# Submit. KEYS: queue, job, queue-seq, bell, the key's active count, the key's usage today,
# the model's fair round, the key's queue of the model, the k input blob keys,
# [idempotency record]. ARGV: max depth, idempotency value, idempotency TTL, job id, max active
# jobs (-1: unlimited), daily quota (-1: unlimited), the job's megapixel-steps, k, the k input
# blobs, then the record's field/value pairs. Returns {'created', position} | {'full', depth}
# | {'exists', idempotency value} | {'too_many_jobs', active} | {'quota_exceeded', used}.
# The inputs are written with the record, in the same step, and carry no TTL while the job is
# queued or running (the record has none either); every terminal transition expires them with
# the record (see _TRANSITION). Out of memory (noeviction), Redis refuses the script's first
# write and so the whole job.
#
# Fair order: a model's queue is served in rounds, one job per key a round. A job goes into
# the round after its key's last queued job, or, when the key has none queued, into the round
# being served now (that of the last claimed job); its score is round * ROUND + submit order,
# so within a round keys go in the order they submitted. A key's thousand queued jobs fill a
# thousand rounds, and another key's single job joins the current one.
_SUBMIT = """
local k = tonumber(ARGV[8])
local idem = KEYS[9 + k]
if idem then
  local existing = redis.call('GET', idem)
  if existing then return {'exists', existing} end
end
local max_active = tonumber(ARGV[5])
local active = tonumber(redis.call('GET', KEYS[5]) or '0')
if max_active >= 0 and active >= max_active then return {'too_many_jobs', active} end
local quota = tonumber(ARGV[6])
local used = tonumber(redis.call('HGET', KEYS[6], 'megapixel_steps') or '0')
if quota >= 0 and used + tonumber(ARGV[7]) > quota then
  return {'quota_exceeded', tostring(used)}
end
local depth = redis.call('ZCARD', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {'full', depth} end
if idem then redis.call('SET', idem, ARGV[2], 'EX', ARGV[3]) end
for j = 1, k do
  redis.call('SET', KEYS[8 + j], ARGV[8 + j])
end
redis.call('HSET', KEYS[2], unpack(ARGV, 9 + k))
redis.call('INCR', KEYS[5])
redis.call('HINCRBYFLOAT', KEYS[6], 'megapixel_steps', ARGV[7])
redis.call('EXPIRE', KEYS[6], {USAGE_TTL})
local round = tonumber(redis.call('GET', KEYS[7]) or '0')
local last = redis.call('ZRANGE', KEYS[8], -1, -1, 'WITHSCORES')
if last[2] then
  local after = math.floor(tonumber(last[2]) / {ROUND}) + 1
  if after > round then round = after end
end
local score = round * {ROUND} + redis.call('INCR', KEYS[3]) % {ROUND}
redis.call('ZADD', KEYS[1], score, ARGV[4])
redis.call('ZADD', KEYS[8], score, ARGV[4])
redis.call('LPUSH', KEYS[4], 1)
redis.call('LTRIM', KEYS[4], 0, 63)
redis.call('EXPIRE', KEYS[4], 60)
return {'created', redis.call('ZRANK', KEYS[1], ARGV[4])}
"""

# The webhook outbox, written in the same step as the transition it tells of: if the job's
# webhook asks for `event`, a delivery (a hash holding a snapshot of the record as it is now)
# and its due time. Delivery ids name the job, the event and the run: a receiver can drop
# repeats of one id (deliveries are sent at least once). Prepended to the scripts that use it.
_OUTBOX = """
local function outbox(jk, id, event, now)
  local hook = redis.call('HGET', jk, 'webhook')
  if not hook or hook == '' then return end
  local target = cjson.decode(hook)
  local wanted = false
  for _, name in ipairs(target['events']) do
    if name == event then wanted = true end
  end
  if not wanted then return end
  local attempt = redis.call('HGET', jk, 'attempts') or '0'
  local msg = 'msg_' .. string.sub(id, 5) .. '_' .. event .. '_' .. attempt
  redis.call('HSET', '{P}:webhook:' .. msg, 'job', id, 'event', event, 'url', target['url'],
    'api_key', redis.call('HGET', jk, 'api_key') or '', 'created_at', now, 'attempts', 0,
    'record', cjson.encode(redis.call('HGETALL', jk)))
  -- A safety net, far past any retry window: a delivery no process ever takes goes away.
  redis.call('EXPIRE', '{P}:webhook:' .. msg, {OUTBOX_TTL})
  redis.call('ZADD', '{P}:webhooks:due', now, msg)
  redis.call('LPUSH', '{P}:webhooks:bell', 1)
  redis.call('LTRIM', '{P}:webhooks:bell', 0, 63)
  redis.call('EXPIRE', '{P}:webhooks:bell', 60)
end
"""

# Claim: the head of the queue (when ARGV[4] is '') and then, or only, queued jobs of batch key
# ARGV[4] that fit the image budget, among the first ARGV[6] of the queue, oldest first.
# KEYS: queue, running set, running-models set, the model's fair round.
# ARGV: worker, now, model, batch key or '', image budget, scan length.
# Returns {others_waiting (0/1), {job id, record field, value, ...}, ...}.
_CLAIM = (
    _OUTBOX
    + """
local want = ARGV[4]
local budget = tonumber(ARGV[5])
local now = tonumber(ARGV[2])
local out = {0}
local round = tonumber(redis.call('GET', KEYS[4]) or '0')
local served = round
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[6]) - 1, 'WITHSCORES')
for i = 1, #ids, 2 do
  local id = ids[i]
  local jk = '{P}:job:' .. id
  local f = redis.call('HMGET', jk, 'status', 'batch_key', 'n', 'attempts', 'timeout_s', 'api_key')
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
    redis.call('ZREM', '{P}:queue:' .. ARGV[3] .. ':key:' .. (f[6] or ''), id)
    local job_round = math.floor(tonumber(ids[i + 1]) / {ROUND})
    if job_round > served then served = job_round end
    local score = deadline
    if score == 0 then score = now + 1e9 end
    redis.call('ZADD', KEYS[2], score, id)
    redis.call('PUBLISH', jk .. ':events', 'running')
    outbox(jk, id, 'running', ARGV[2])
    local entry = redis.call('HGETALL', jk)
    table.insert(entry, 1, id)
    table.insert(out, entry)
    if budget <= 0 then break end
  else
    out[1] = 1
  end
end
if served > round then redis.call('SET', KEYS[4], served) end
if #out > 1 then redis.call('SADD', KEYS[3], ARGV[3]) end
return out
"""
)

# Read only: for each queue in KEYS, when its head job was created ('' when it is empty), for
# the worker's routing by warmth. Returns one value per key.
_HEADS = """
local out = {}
for i, key in ipairs(KEYS) do
  local head = redis.call('ZRANGE', key, 0, 0)
  local created = ''
  if head[1] then created = redis.call('HGET', '{P}:job:' .. head[1], 'created_at') or '0' end
  out[i] = created
end
return out
"""

# Any other state change. KEYS: job, events, stats, queue, running set, bell, queue-seq,
# run-seconds histogram, then blob keys (a succeeded job's images).
# ARGV: job id, owner ('' = any), new status, record TTL, blob TTL, now, today (UTC day),
# n allowed, allowed..., n fields, field, value, ..., n histogram fields, field..., run seconds,
# then one blob per blob key. Returns {1, new status} or {0, current status | 'lost' | ''}.
# A terminal transition also settles the job's key: one active job fewer, the job counted on
# today's usage and the key's totals, and a job canceled while queued refunds its
# megapixel-steps to the day it was charged to.
_TRANSITION = (
    _OUTBOX
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
local i = 8
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
local model = redis.call('HGET', KEYS[1], 'model')
local name = redis.call('HGET', KEYS[1], 'api_key') or ''
local key_queue = '{P}:queue:' .. model .. ':key:' .. name
if cur == 'queued' then
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZREM', key_queue, id)
end
if cur == 'running' then redis.call('ZREM', KEYS[5], id) end
if new == 'queued' then
  -- Back at the front: it already waited its turn once.
  local head = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  local score = redis.call('INCR', KEYS[7])
  if head[2] then score = tonumber(head[2]) - 1 end
  redis.call('ZADD', KEYS[4], score, id)
  redis.call('ZADD', key_queue, score, id)
  redis.call('LPUSH', KEYS[6], 1)
  redis.call('LTRIM', KEYS[6], 0, 63)
  redis.call('EXPIRE', KEYS[6], 60)
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
if ttl == 0 then redis.call('PERSIST', KEYS[1]) end
-- The job's input images (listed in the record) live exactly as long as the record.
local inputs = redis.call('HGET', KEYS[1], 'inputs') or ''
for input in string.gmatch(inputs, '[^,]+') do
  local input_key = '{P}:job:' .. id .. ':input:' .. input
  if ttl > 0 then redis.call('EXPIRE', input_key, ttl) end
  if ttl == 0 then redis.call('PERSIST', input_key) end
end
if new == 'succeeded' or new == 'failed' or new == 'canceled' then
  -- Cluster-wide job counts by model and final status, for /metrics on any gateway.
  redis.call('HINCRBY', KEYS[3], model .. '|' .. new, 1)
  for k = hist_first, hist_first + hist - 1 do
    redis.call('HINCRBY', KEYS[8], ARGV[k], 1)
  end
  if hist > 0 then redis.call('HINCRBYFLOAT', KEYS[8], 'sum', run_s) end
  -- The key's books.
  local active = '{P}:active:' .. name
  if redis.call('DECR', active) <= 0 then redis.call('DEL', active) end
  local cost = redis.call('HGET', KEYS[1], 'megapixel_steps') or '0'
  if cur == 'queued' and new == 'canceled' then
    local charged = '{P}:usage:' .. (redis.call('HGET', KEYS[1], 'usage_day') or '') .. ':' .. name
    if redis.call('EXISTS', charged) == 1 then
      redis.call('HINCRBYFLOAT', charged, 'megapixel_steps', '-' .. cost)
    end
  else
    redis.call('HINCRBYFLOAT', '{P}:stats:keys', name .. '|megapixel_steps', cost)
  end
  local today = '{P}:usage:' .. ARGV[7] .. ':' .. name
  redis.call('HINCRBY', today, new, 1)
  redis.call('EXPIRE', today, {USAGE_TTL})
  redis.call('HINCRBY', '{P}:stats:keys', name .. '|' .. new, 1)
  outbox(KEYS[1], id, new, ARGV[6])
end
redis.call('PUBLISH', KEYS[2], new)
return {1, new}
"""
)

# Progress only moves forward and only while running under this owner: a late write never
# resurrects a canceled job or rolls a finished one back. Returns {the job's status ("lost" if
# another owner holds it), whether a client watches its previews}, so the worker learns of a
# cancel, and of a preview watcher, on the round trip it already makes.
# KEYS: job, events, previews-wanted flag.
_PROGRESS = """
local status = redis.call('HGET', KEYS[1], 'status')
local wanted = redis.call('EXISTS', KEYS[3])
if status ~= 'running' then return {status or '', wanted} end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[3] then return {'lost', wanted} end
local cur = tonumber(redis.call('HGET', KEYS[1], 'progress_step') or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('HSET', KEYS[1], 'progress_step', ARGV[1], 'progress_at', ARGV[2])
  redis.call('PUBLISH', KEYS[2], 'progress')
end
return {status, wanted}
"""

# Webhook delivery, taking: the first delivery due by ARGV[1] (now), leased for ARGV[2]
# seconds (its due time moves past the lease, so a delivery process killed mid-send leaves it
# to be sent again), with its attempt counted. KEYS: the due set. Returns {message id, hash
# field, value, ...}, or {'', next due time or ''} when none is due.
_WEBHOOK_TAKE = """
while true do
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
  if not due[1] then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {'', first[2] or ''}
  end
  local wk = '{P}:webhook:' .. due[1]
  if redis.call('EXISTS', wk) == 1 then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), due[1])
    redis.call('HINCRBY', wk, 'attempts', 1)
    local entry = redis.call('HGETALL', wk)
    table.insert(entry, 1, due[1])
    return entry
  end
  redis.call('ZREM', KEYS[1], due[1])
end
"""

# Webhook delivery, an attempt's outcome: recorded on the job (its `webhook_deliveries`, if
# the record still exists; the last 50 kept) and in the key's totals; 'retrying' puts the
# delivery back at ARGV[3], 'delivered' and 'failed' (given up) end it. KEYS: the due set,
# the delivery. ARGV: message id, outcome, next due time, the attempt record (JSON).
_WEBHOOK_DONE = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local f = redis.call('HMGET', KEYS[2], 'job', 'api_key')
local jk = '{P}:job:' .. f[1]
if redis.call('EXISTS', jk) == 1 then
  local items = {}
  local kept = redis.call('HGET', jk, 'webhook_deliveries')
  if kept and kept ~= '' then items = cjson.decode(kept) end
  table.insert(items, cjson.decode(ARGV[4]))
  while #items > 50 do table.remove(items, 1) end
  redis.call('HSET', jk, 'webhook_deliveries', cjson.encode(items))
end
redis.call('HINCRBY', '{P}:stats:keys', (f[2] or '') .. '|webhook_' .. ARGV[2], 1)
if ARGV[2] == 'retrying' then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
end
return 1
"""

# Fair order: a queue score is round * ROUND + submit order (see _SUBMIT).
ROUND = 1_000_000
# A key's daily usage record outlives its day by two, for /v1/usage and `imagegen usage`.
USAGE_TTL_S = 3 * 86400
# A webhook delivery no delivery process took is dropped after this (retries end far sooner).
OUTBOX_TTL_S = 7 * 86400


def _script(source: str) -> str:
    return (
        source.replace("{P}", _P)
        .replace("{ROUND}", str(ROUND))
        .replace("{USAGE_TTL}", str(USAGE_TTL_S))
        .replace("{OUTBOX_TTL}", str(OUTBOX_TTL_S))
    )


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
    """The outcome of a submit: `created` (with its queue position), `full` (the queue's
    depth), `exists` (the idempotency value), `too_many_jobs` (the key's active jobs) or
    `quota_exceeded` (the megapixel-steps the key used today)."""

    outcome: str
    value: str | int


@dataclass(frozen=True)
class Admission:
    """A key's limits at submit: None = unlimited."""

    max_active_jobs: int | None = None
    daily_quota: float | None = None


UNLIMITED = Admission()


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
            "inputs": ",".join(spec.input_names),
            # What the key's quota was charged, and on which UTC day (for a refund).
            "megapixel_steps": spec.megapixel_steps,
            "usage_day": utc_day(record.created_at),
            "webhook": record.webhook.model_dump_json() if record.webhook else "",
        }
    )


@dataclass(frozen=True)
class Transition:
    """One state change: to `new_status` from one of `allowed` (and, with `owner`, only while
    that run holds the job), with the record fields to write, the record's TTL (0: none),
    blobs to store with it (a succeeded job's images) and, for a finished run, its seconds."""

    job_id: str
    model: str
    allowed: tuple[JobStatus, ...]
    new_status: JobStatus
    fields: Mapping[str, Any] = field(default_factory=dict)
    ttl_s: int = 0
    owner: str = ""
    blobs: Sequence[tuple[str, bytes]] = ()
    blob_ttl_s: int = 0
    run_s: float | None = None

    def script_call(self) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of `_TRANSITION`."""
        allowed_values = [s.value for s in self.allowed]
        encoded = encode_fields(self.fields)
        hist = (
            [f"le:{b}" for b in RUN_SECONDS_BUCKETS if self.run_s <= b] + ["count"]
            if self.run_s is not None
            else []
        )
        now = time.time()
        args: list[Any] = [
            self.job_id,
            self.owner,
            self.new_status.value,
            self.ttl_s,
            self.blob_ttl_s,
            repr(now),
            utc_day(now),
            len(allowed_values),
            *allowed_values,
            len(encoded),
        ]
        for key, value in encoded.items():
            args += [key, value]
        args += [len(hist), *hist, repr(self.run_s or 0.0), *(blob for _, blob in self.blobs)]
        keys = [
            Keys.job(self.job_id),
            Keys.events(self.job_id),
            Keys.JOB_STATS,
            Keys.queue(self.model),
            Keys.running(self.model),
            Keys.bell(self.model),
            Keys.QUEUE_SEQ,
            Keys.run_seconds(self.model),
            *(key for key, _ in self.blobs),
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
        self._heads = connection.register_script(_script(_HEADS))

    # -- gateway --------------------------------------------------------------------------------
    def submit(
        self,
        record: JobRecord,
        max_depth: int,
        idempotency: tuple[str, str, int] | None = None,
        inputs: Mapping[str, bytes] | None = None,
        admission: Admission = UNLIMITED,
    ) -> Submitted:
        """Queue `record` unless the queue is full, the key is at a limit or the
        Idempotency-Key was used (sync); `inputs` (name -> normalized PNG, one per
        `record.spec.input_names`) in the same step."""
        keys, args = submit_call(record, max_depth, idempotency, inputs, admission)
        outcome, value = self._submit(keys=keys, args=args)
        return parse_submit(outcome, value)

    def cancel(self, record: JobRecord, ttl_s: int) -> bool:
        """Cancel a queued or running job (a running one's worker stops at its next step)."""
        moved, _ = self.apply(
            Transition(
                record.id,
                record.spec.model,
                (JobStatus.QUEUED, JobStatus.RUNNING),
                JobStatus.CANCELED,
                {
                    "finished_at": time.time(),
                    "error": {"code": "canceled", "message": "canceled by the client"},
                },
                ttl_s=ttl_s,
            )
        )
        return moved

    # -- worker ---------------------------------------------------------------------------------
    def claim(
        self, model: str, worker: str, batch_key: str = "", budget: int = 0, scan: int = 64
    ) -> tuple[list[Claimed], bool]:
        """Claim the queue's head (`batch_key` ""), then queued jobs of its batch key within
        `budget` images; or, given a `batch_key`, only such jobs. Returns the claimed jobs
        (now running under this worker) and whether a job of another key is waiting."""
        keys = [Keys.queue(model), Keys.running(model), Keys.RUNNING_MODELS, Keys.fair_round(model)]
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

    def queue_heads(self, models: Sequence[str]) -> dict[str, float | None]:
        """When each model's next queued job was created (None: its queue is empty); one
        read, so a worker can route by warmth and see how long a cold model's job waited."""
        if not models:
            return {}
        reply = self._heads(keys=[Keys.queue(m) for m in models])
        return {
            m: float(_decode(v) or 0) if _decode(v) != "" else None
            for m, v in zip(models, reply, strict=True)
        }

    def progress(self, job_id: str, step: int, owner: str) -> tuple[str, bool]:
        """Record that `step` steps are done; returns the job's status ("lost" when another
        owner holds it, "" when the record is gone) and whether a client watches its
        previews."""
        keys = [Keys.job(job_id), Keys.events(job_id), Keys.previews_wanted(job_id)]
        status, wanted = self._progress(keys=keys, args=[step, repr(time.time()), owner])
        return _decode(status), bool(wanted)

    def publish_preview(self, job_id: str, payload: str) -> None:
        """A preview picture for the job's watchers (JSON `{"step", "image"}`); not stored."""
        self.redis.publish(Keys.previews(job_id), payload)

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
        moved, _ = self.apply(
            Transition(
                job.id,
                job.record.spec.model,
                (JobStatus.RUNNING,),
                JobStatus.SUCCEEDED,
                {"finished_at": time.time(), "images": [i.model_dump() for i in images]},
                ttl_s=record_ttl_s,
                owner=job.owner,
                blobs=blobs,
                blob_ttl_s=image_ttl_s,
                run_s=run_s,
            )
        )
        return moved

    def fail(self, job: Claimed, code: str, message: str, ttl_s: int) -> bool:
        """Mark a run's job failed with `code`; False if the run no longer holds it."""
        return self.fail_run(job.record, code, message, ttl_s)

    def fail_run(self, record: JobRecord, code: str, message: str, ttl_s: int) -> bool:
        """Mark the run that `record` names (its owner) failed with `code`."""
        moved, _ = self.apply(
            Transition(
                record.id,
                record.spec.model,
                (JobStatus.RUNNING,),
                JobStatus.FAILED,
                {"finished_at": time.time(), "error": {"code": code, "message": message}},
                ttl_s=ttl_s,
                owner=record.owner or "",
            )
        )
        return moved

    # -- reaper ---------------------------------------------------------------------------------
    def requeue(self, record: JobRecord) -> bool:
        """Put a lost run's job back at the front of its queue (fenced by the run's owner)."""
        moved, _ = self.apply(
            Transition(
                record.id,
                record.spec.model,
                (JobStatus.RUNNING,),
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
        )
        return moved

    def apply(self, change: Transition) -> tuple[bool, str]:
        """Make `change` if the job allows it, keeping the queue and running sets in step;
        returns (moved, the job's status now, or 'lost' when another run holds it)."""
        keys, args = change.script_call()
        moved, status = self._transition(keys=keys, args=args)
        return bool(moved), _decode(status)


@dataclass(frozen=True)
class WebhookTask:
    """A delivery taken from the outbox: which job and event, to where, for which key, the
    record as it was at the transition, and which attempt this is."""

    message_id: str
    job_id: str
    event: str
    url: str
    api_key: str
    created_at: float
    attempt: int
    record: dict[str, str]


class Outbox:
    """The webhook outbox's delivery side (the transitions write it: see `_OUTBOX`)."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection
        self._take = connection.register_script(_script(_WEBHOOK_TAKE))
        self._done = connection.register_script(_script(_WEBHOOK_DONE))

    def take(self, lease_s: float) -> tuple[WebhookTask | None, float | None]:
        """The next due delivery, leased for `lease_s`; else (None, when the next is due)."""
        reply = self._take(keys=[Keys.WEBHOOKS_DUE], args=[repr(time.time()), repr(lease_s)])
        first = _decode(reply[0])
        if not first:
            due = _decode(reply[1]) if len(reply) > 1 else ""
            return None, float(due) if due else None
        flat = [_decode(v) for v in reply[1:]]
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        values = json.loads(raw["record"])
        record = dict(zip(values[::2], values[1::2], strict=True))
        task = WebhookTask(
            message_id=first,
            job_id=raw["job"],
            event=raw["event"],
            url=raw["url"],
            api_key=raw.get("api_key", ""),
            created_at=float(raw["created_at"]),
            attempt=int(raw["attempts"]),
            record=record,
        )
        return task, None

    def done(self, task: WebhookTask, attempt: WebhookDelivery, next_at: float = 0.0) -> bool:
        """Record `attempt` on the job; reschedule the delivery at `next_at` when retrying,
        else end it. False when the delivery was already ended."""
        keys = [Keys.WEBHOOKS_DUE, Keys.webhook(task.message_id)]
        args = [task.message_id, attempt.outcome, repr(next_at), attempt.model_dump_json()]
        return bool(self._done(keys=keys, args=args))


def submit_call(
    record: JobRecord,
    max_depth: int,
    idempotency: tuple[str, str, int] | None,
    inputs: Mapping[str, bytes] | None = None,
    admission: Admission = UNLIMITED,
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the submit script. `idempotency`: (key, value, TTL)."""
    model = record.spec.model
    names = record.spec.input_names
    given = dict(inputs or {})
    if sorted(given) != sorted(names):
        raise ValueError(f"job {record.id} needs inputs {names}, got {sorted(given)}")
    key = record.api_key
    keys = [
        Keys.queue(model),
        Keys.job(record.id),
        Keys.QUEUE_SEQ,
        Keys.bell(model),
        Keys.active(key),
        Keys.usage(utc_day(record.created_at), key),
        Keys.fair_round(model),
        Keys.key_queue(model, key),
    ]
    keys += [Keys.input(record.id, name) for name in names]
    limit = admission.max_active_jobs
    quota = admission.daily_quota
    args: list[Any] = [
        max_depth,
        "",
        0,
        record.id,
        -1 if limit is None else limit,
        -1 if quota is None else repr(float(quota)),
        repr(record.spec.megapixel_steps),
        len(names),
        *(given[n] for n in names),
    ]
    if idempotency is not None:
        keys.append(idempotency[0])
        args[1], args[2] = idempotency[1], idempotency[2]
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
        admission: Admission = UNLIMITED,
    ) -> Submitted:
        keys, args = submit_call(record, max_depth, idempotency, inputs, admission)
        outcome, value = await self._submit(keys=keys, args=args)
        return parse_submit(outcome, value)


def queue_position(connection: redis.Redis, record: JobRecord) -> int | None:
    """0 for the next job to start, None when not queued."""
    if record.status != JobStatus.QUEUED:
        return None
    rank: int | None = connection.zrank(Keys.queue(record.spec.model), record.id)  # type: ignore[assignment]
    return rank if rank is not None else 0
