"""The job store: one Redis hash per job, moved between states by an atomic compare-and-set.

The gateway creates records and cancels them; the worker starts, advances and finishes them.
Every state change goes through `JobStore.transition`, a Lua script, so a cancel and a start
racing each other can never both win.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from imagegen.contract import ImageInfo, JobError, JobRecord, JobSpec, JobStatus, Keys

# KEYS[1] = job hash, KEYS[2] = events channel.
# ARGV = n_allowed, allowed..., owner ("" = any), new_status, ttl, field, value, ...
# `owner` fences a worker's writes: once a job was taken back from a worker presumed dead,
# that worker's late writes find another owner and change nothing.
# Returns {1, new_status} on success, {0, current_status or ""} otherwise.
_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
local n = tonumber(ARGV[1])
local ok = false
for i = 2, n + 1 do
  if ARGV[i] == cur then ok = true end
end
if not ok then return {0, cur} end
local owner = ARGV[n + 2]
if owner ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= owner then return {0, cur} end
local new_status = ARGV[n + 3]
local ttl = tonumber(ARGV[n + 4])
redis.call('HSET', KEYS[1], 'status', new_status)
for i = n + 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
redis.call('PUBLISH', KEYS[2], new_status)
if new_status == 'succeeded' or new_status == 'failed' or new_status == 'canceled' then
  -- Cluster-wide job counts by model and final status, for /metrics on any gateway.
  local model = cjson.decode(redis.call('HGET', KEYS[1], 'spec'))['model']
  redis.call('HINCRBY', KEYS[3], model .. '|' .. new_status, 1)
end
return {1, new_status}
"""

# Progress only moves forward and only while running under this owner: a late write never
# resurrects a canceled job or rolls a finished one back. Returns the job's status ("lost" if
# another owner holds it), so the worker learns of a cancel on the round trip it already makes.
_PROGRESS_LUA = """
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


RUN_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _encode(fields: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in fields.items():
        if value is None:
            out[key] = ""
        elif isinstance(value, str):
            out[key] = value
        elif isinstance(value, bool | int | float):
            out[key] = repr(value)
        else:
            out[key] = json.dumps(value, separators=(",", ":"))
    return out


def _opt_float(raw: str | None) -> float | None:
    return float(raw) if raw else None


def record_from_hash(job_id: str, raw: Mapping[str, str]) -> JobRecord:
    """Decode the hash that `JobStore` writes."""
    error = raw.get("error")
    return JobRecord(
        id=job_id,
        status=JobStatus(raw["status"]),
        spec=JobSpec.model_validate_json(raw["spec"]),
        created_at=float(raw["created_at"]),
        started_at=_opt_float(raw.get("started_at")),
        finished_at=_opt_float(raw.get("finished_at")),
        progress_step=int(raw.get("progress_step") or 0),
        progress_at=_opt_float(raw.get("progress_at")),
        images=[ImageInfo.model_validate(i) for i in json.loads(raw.get("images") or "[]")],
        error=JobError.model_validate_json(error) if error else None,
        api_key=raw.get("api_key") or "",
        request_id=raw.get("request_id") or "",
        worker=raw.get("worker") or None,
        owner=raw.get("owner") or None,
        attempts=int(raw.get("attempts") or 0),
    )


class JobStore:
    """Reads and writes job records over a bytes connection (the one RQ uses too)."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection
        self._transition = connection.register_script(_TRANSITION_LUA)
        self._progress = connection.register_script(_PROGRESS_LUA)

    def create(self, record: JobRecord, pipeline: Any) -> None:
        """Write a new record inside `pipeline` (the gateway sends it with the RQ enqueue, in
        one atomic step)."""
        pipeline.hset(
            Keys.job(record.id),
            mapping=_encode(
                {
                    "status": record.status.value,
                    "spec": record.spec.model_dump_json(),
                    "created_at": record.created_at,
                    "progress_step": 0,
                    "attempts": 0,
                    "api_key": record.api_key,
                    "request_id": record.request_id,
                }
            ),
        )

    def get(self, job_id: str) -> JobRecord | None:
        raw: dict[bytes, bytes] = self.redis.hgetall(Keys.job(job_id))  # type: ignore[assignment]
        if not raw or b"status" not in raw:
            return None
        return record_from_hash(job_id, {k.decode(): v.decode() for k, v in raw.items()})

    def transition(
        self,
        job_id: str,
        allowed: Iterable[JobStatus],
        new_status: JobStatus,
        fields: Mapping[str, Any] | None = None,
        ttl_s: int = 0,
        owner: str = "",
    ) -> tuple[bool, JobStatus | None]:
        """Move a job to `new_status` if it is in one of `allowed` (and, if `owner` is given,
        still held by that owner); returns (moved, status)."""
        allowed_values = [s.value for s in allowed]
        args: list[str] = [
            str(len(allowed_values)),
            *allowed_values,
            owner,
            new_status.value,
            str(ttl_s),
        ]
        for key, value in _encode(fields or {}).items():
            args += [key, value]
        keys = [Keys.job(job_id), Keys.events(job_id), Keys.JOB_STATS]
        moved, status = self._transition(keys=keys, args=args)
        return bool(moved), (JobStatus(status.decode()) if status else None)

    def set_progress(self, job_id: str, step: int, owner: str) -> str:
        """Record that `step` steps are done; returns the job's status, "lost" when another
        owner holds it, or "" when the record is gone."""
        keys = [Keys.job(job_id), Keys.events(job_id)]
        status: bytes = self._progress(keys=keys, args=[step, repr(time.time()), owner])
        return status.decode()

    def finish_succeeded(
        self,
        job_id: str,
        owner: str,
        pngs: list[bytes],
        images: list[ImageInfo],
        ttl_s: int,
        record_ttl_s: int,
    ) -> bool:
        """Store the images, then mark the job succeeded; False if it was canceled meanwhile.

        Images are written first with their TTL so a client that sees `succeeded` can always
        download them; if the job turns out to be canceled the images are deleted again. The
        record outlives the images (`record_ttl_s`), so a late download learns that the image
        expired rather than that it never existed.
        """
        with self.redis.pipeline(transaction=True) as pipe:
            for info, png in zip(images, pngs, strict=True):
                pipe.set(Keys.image(job_id, info.index), png, ex=ttl_s)
            pipe.execute()
        moved, status = self.transition(
            job_id,
            [JobStatus.RUNNING],
            JobStatus.SUCCEEDED,
            {"finished_at": time.time(), "images": [i.model_dump() for i in images]},
            ttl_s=record_ttl_s,
            owner=owner,
        )
        if not moved and status != JobStatus.SUCCEEDED:
            # Canceled meanwhile. (If another run of the same job already succeeded, the images
            # are the same bytes — same seeds — so leaving them is harmless and correct.)
            self.redis.delete(*(Keys.image(job_id, i.index) for i in images))
        return moved

    def observe_run(self, model: str, seconds: float) -> None:
        """Add a succeeded job's run time to the model's cluster-wide histogram."""
        key = Keys.run_seconds(model)
        with self.redis.pipeline(transaction=False) as pipe:
            for bound in RUN_SECONDS_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(key, f"le:{bound}", 1)
            pipe.hincrby(key, "count", 1)
            pipe.hincrbyfloat(key, "sum", seconds)
            pipe.execute()

    def job_stats(self) -> dict[tuple[str, str], int]:
        """(model, final status) -> jobs that ended so."""
        raw: dict[bytes, bytes] = self.redis.hgetall(Keys.JOB_STATS)  # type: ignore[assignment]
        out = {}
        for field, value in raw.items():
            model, _, status = field.decode().rpartition("|")
            out[(model, status)] = int(value)
        return out

    def run_histogram(self, model: str) -> tuple[list[tuple[str, float]], float]:
        """Cumulative (le, count) buckets including +Inf, and the sum of seconds."""
        raw: dict[bytes, bytes] = self.redis.hgetall(Keys.run_seconds(model))  # type: ignore[assignment]
        fields = {k.decode(): float(v) for k, v in raw.items()}
        buckets = [(str(b), fields.get(f"le:{b}", 0.0)) for b in RUN_SECONDS_BUCKETS]
        buckets.append(("+Inf", fields.get("count", 0.0)))
        return buckets, fields.get("sum", 0.0)

    def get_image(self, job_id: str, index: int) -> bytes | None:
        value: bytes | None = self.redis.get(Keys.image(job_id, index))  # type: ignore[assignment]
        return value
