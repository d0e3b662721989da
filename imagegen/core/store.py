"""Reading job records: one Redis hash per job (written by `imagegen.core.lifecycle` alone)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from imagegen.core.contract import (
    ImageInfo,
    JobError,
    JobRecord,
    JobSpec,
    JobStatus,
    Keys,
    WebhookDelivery,
    WebhookTarget,
)
from imagegen.core.trainings import (
    TRAINING_ID_PREFIX,
    AdapterRecord,
    TrainedAdapter,
    TrainingRecord,
    TrainingSpec,
)

RUN_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def encode_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """Hash field values as text: None as "", numbers by repr, anything else as JSON."""
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
    """Decode the hash that `imagegen.core.lifecycle` writes for a generation job."""
    return JobRecord(
        **_run_fields(job_id, raw),
        spec=JobSpec.model_validate_json(raw["spec"]),
        images=[ImageInfo.model_validate(i) for i in json.loads(raw.get("images") or "[]")],
        images_expire_at=_opt_float(raw.get("images_expire_at")),
    )


def training_from_hash(training_id: str, raw: Mapping[str, str]) -> TrainingRecord:
    """Decode the hash that `imagegen.core.lifecycle` writes for a training."""
    adapter = raw.get("adapter")
    return TrainingRecord(
        **_run_fields(training_id, raw),
        spec=TrainingSpec.model_validate_json(raw["spec"]),
        loss=_opt_float(raw.get("loss")),
        checkpoint_step=int(raw.get("checkpoint_step") or 0),
        checkpoint_attempt=int(raw.get("checkpoint_attempt") or 0),
        resumed_from_step=int(raw.get("resumed_from_step") or 0),
        adapter=TrainedAdapter.model_validate_json(adapter) if adapter else None,
    )


def run_from_hash(run_id: str, raw: Mapping[str, str]) -> JobRecord | TrainingRecord:
    """A job's or a training's record, by its id's prefix."""
    if run_id.startswith(TRAINING_ID_PREFIX):
        return training_from_hash(run_id, raw)
    return record_from_hash(run_id, raw)


def _run_fields(run_id: str, raw: Mapping[str, str]) -> dict[str, Any]:
    """The fields every run's hash has (`RunRecord`)."""
    error = raw.get("error")
    deadline = _opt_float(raw.get("deadline"))
    hook = raw.get("webhook")
    return {
        "id": run_id,
        "status": JobStatus(raw["status"]),
        "created_at": float(raw["created_at"]),
        "started_at": _opt_float(raw.get("started_at")),
        "finished_at": _opt_float(raw.get("finished_at")),
        "progress_step": int(raw.get("progress_step") or 0),
        "progress_at": _opt_float(raw.get("progress_at")),
        "error": JobError.model_validate_json(error) if error else None,
        "api_key": raw.get("api_key") or "",
        "request_id": raw.get("request_id") or "",
        "worker": raw.get("worker") or None,
        "owner": raw.get("owner") or None,
        "attempts": int(raw.get("attempts") or 0),
        "timeout_s": float(raw.get("timeout_s") or 0),
        "deadline": deadline or None,
        "webhook": WebhookTarget.model_validate_json(hook) if hook else None,
        "webhook_deliveries": [
            WebhookDelivery.model_validate(d) for d in _json_list(raw.get("webhook_deliveries"))
        ],
    }


def _json_list(raw: str | None) -> list[Any]:
    """A JSON list field; Lua's cjson writes an empty list as `{}`."""
    value = json.loads(raw) if raw else []
    return value if isinstance(value, list) else []


@dataclass(frozen=True)
class KeyUsage:
    """One key's books for a day."""

    day: str
    megapixel_steps: float
    active_jobs: int
    jobs: dict[str, int]


class JobStore:
    """Reads job records, images and cluster-wide job statistics (the worker's and the CLI's
    blocking client; the gateway's event loop has `AsyncJobStore`). What a reply means is
    read by the `parse_*` functions both share."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection

    def get(self, job_id: str) -> JobRecord | None:
        return parse_record(job_id, self.redis.hgetall(Keys.job(job_id)))

    def get_adapter(self, adapter_id: str) -> AdapterRecord | None:
        """A trained adapter's registration (None: none, or deleted)."""
        return parse_adapter(self.redis.hgetall(Keys.adapter(adapter_id)))

    def get_run(self, run_id: str) -> JobRecord | TrainingRecord | None:
        """A job's or a training's record (the reaper sweeps both)."""
        return parse_run(run_id, self.redis.hgetall(Keys.job(run_id)))

    def job_stats(self) -> dict[tuple[str, str], int]:
        """(model, final status) -> jobs that ended so."""
        return parse_job_stats(self.redis.hgetall(Keys.JOB_STATS))

    def run_histogram(self, model: str) -> tuple[list[tuple[str, float]], float]:
        """Cumulative (le, count) buckets including +Inf, and the sum of seconds."""
        return parse_run_histogram(self.redis.hgetall(Keys.run_seconds(model)))

    def usage(self, key_name: str, day: str) -> KeyUsage:
        """A key's use on UTC `day` and its jobs queued or running now."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(Keys.usage(day, key_name))
            pipe.get(Keys.active(key_name))
            raw, active = pipe.execute()
        return parse_usage(day, raw, active)

    def active_jobs(self, key_names: list[str]) -> list[int]:
        """Each key's jobs queued or running now (one round trip)."""
        if not key_names:
            return []
        return parse_active(self.redis.mget([Keys.active(n) for n in key_names]))

    def key_stats(self) -> dict[str, dict[str, float]]:
        """Per key name, its cluster-wide totals: jobs by final status, megapixel_steps,
        webhook deliveries by outcome (`webhook_<outcome>`)."""
        return parse_key_stats(self.redis.hgetall(Keys.KEY_STATS))

    def get_image(self, job_id: str, index: int) -> bytes | None:
        value: bytes | None = self.redis.get(Keys.image(job_id, index))  # type: ignore[assignment]
        return value

    def get_input(self, job_id: str, name: str) -> bytes | None:
        """An input image of the job (the normalized PNG stored at submit)."""
        value: bytes | None = self.redis.get(Keys.input(job_id, name))  # type: ignore[assignment]
        return value


class AsyncJobStore:
    """`JobStore` on the gateway's event loop: the same reads, one client for the process."""

    def __init__(self, connection: aioredis.Redis) -> None:
        self.redis = connection

    async def get(self, job_id: str) -> JobRecord | None:
        return parse_record(job_id, await self.redis.hgetall(Keys.job(job_id)))

    async def get_adapter(self, adapter_id: str) -> AdapterRecord | None:
        return parse_adapter(await self.redis.hgetall(Keys.adapter(adapter_id)))

    async def key_adapters(self, key_name: str, model: str | None = None) -> list[AdapterRecord]:
        """The adapters `key_name` trained (of `model`, if named), by id."""
        ids: set[bytes] = await self.redis.smembers(Keys.key_adapters(key_name))  # type: ignore[assignment]
        out = []
        for adapter_id in sorted(as_text(i) for i in ids):
            record = await self.get_adapter(adapter_id)
            if record is not None and record.owner == key_name and model in (None, record.model):
                out.append(record)
        return out

    async def get_training(self, training_id: str) -> TrainingRecord | None:
        fields = _text_fields(await self.redis.hgetall(Keys.job(training_id)))
        return training_from_hash(training_id, fields) if "status" in fields else None

    async def job_stats(self) -> dict[tuple[str, str], int]:
        return parse_job_stats(await self.redis.hgetall(Keys.JOB_STATS))

    async def run_histogram(self, model: str) -> tuple[list[tuple[str, float]], float]:
        return parse_run_histogram(await self.redis.hgetall(Keys.run_seconds(model)))

    async def usage(self, key_name: str, day: str) -> KeyUsage:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(Keys.usage(day, key_name))
            pipe.get(Keys.active(key_name))
            raw, active = await pipe.execute()
        return parse_usage(day, raw, active)

    async def active_jobs(self, key_names: list[str]) -> list[int]:
        if not key_names:
            return []
        return parse_active(await self.redis.mget([Keys.active(n) for n in key_names]))

    async def key_stats(self) -> dict[str, dict[str, float]]:
        return parse_key_stats(await self.redis.hgetall(Keys.KEY_STATS))

    async def get_image(self, job_id: str, index: int) -> bytes | None:
        value = await self.redis.get(Keys.image(job_id, index))
        return value.encode() if isinstance(value, str) else value


# What redis-py's clients are typed to return (they return bytes: no decode_responses).
Reply = bytes | str


def as_text(value: Reply) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else value


def _text_fields(raw: Mapping[Reply, Reply]) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in raw.items()}


def parse_record(job_id: str, raw: Mapping[Reply, Reply]) -> JobRecord | None:
    """A job's hash (HGETALL) as its record; None when there is none."""
    fields = _text_fields(raw)
    if "status" not in fields:
        return None
    return record_from_hash(job_id, fields)


def parse_adapter(raw: Mapping[Reply, Reply]) -> AdapterRecord | None:
    fields = _text_fields(raw)
    return AdapterRecord.model_validate(fields) if fields else None


def parse_run(run_id: str, raw: Mapping[Reply, Reply]) -> JobRecord | TrainingRecord | None:
    """A job's or a training's hash as its record; None when there is none."""
    fields = _text_fields(raw)
    return run_from_hash(run_id, fields) if "status" in fields else None


def parse_job_stats(raw: Mapping[Reply, Reply]) -> dict[tuple[str, str], int]:
    out = {}
    for field, value in raw.items():
        model, _, status = as_text(field).rpartition("|")
        out[(model, status)] = int(value)
    return out


def parse_run_histogram(raw: Mapping[Reply, Reply]) -> tuple[list[tuple[str, float]], float]:
    fields = {as_text(k): float(v) for k, v in raw.items()}
    buckets = [(str(b), fields.get(f"le:{b}", 0.0)) for b in RUN_SECONDS_BUCKETS]
    buckets.append(("+Inf", fields.get("count", 0.0)))
    return buckets, fields.get("sum", 0.0)


def parse_usage(day: str, raw: Mapping[Reply, Reply], active: Reply | None) -> KeyUsage:
    fields = {as_text(k): as_text(v) for k, v in raw.items()}
    return KeyUsage(
        day=day,
        megapixel_steps=round(max(float(fields.get("megapixel_steps") or 0), 0.0), 6),
        active_jobs=max(int(active or 0), 0),
        jobs={s: int(fields.get(s) or 0) for s in ("succeeded", "failed", "canceled")},
    )


def parse_active(values: list[Reply | None]) -> list[int]:
    return [max(int(v or 0), 0) for v in values]


def parse_key_stats(raw: Mapping[Reply, Reply]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for field, value in raw.items():
        name, _, counter = as_text(field).rpartition("|")
        out.setdefault(name, {})[counter] = float(value)
    return out
