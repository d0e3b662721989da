"""Submitting a job: admission (idempotency, the key's active jobs and daily quota, the queue's
depth) and the fair order, in one script (`lua/submit.lua`), which `Lifecycle.submit` and
`AsyncLifecycle.submit` call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imagegen.core.contract import JobRecord, Keys, utc_day
from imagegen.core.lifecycle import scripts
from imagegen.core.store import encode_fields
from imagegen.core.trainings import TrainingRecord

# Anything the lifecycle queues and runs: a generation job or a training.
Run = JobRecord | TrainingRecord


@dataclass(frozen=True)
class Submitted:
    """The outcome of a submit: `created` (with its queue position), `full` (the queue's
    depth), `exists` (the idempotency value), `too_many_jobs` (the key's active jobs) or
    `quota_exceeded` (the megapixel-steps the key used today) or `too_many_adapters` (the
    trained adapters the key holds)."""

    outcome: str
    value: str | int


@dataclass(frozen=True)
class Admission:
    """A key's limits at submit: None = unlimited."""

    max_active_jobs: int | None = None
    daily_quota: float | None = None
    # A training's: the trained adapters a key may hold.
    max_adapters: int | None = None


UNLIMITED = Admission()


def record_fields(record: Run) -> dict[str, str]:
    """The hash fields a new queued job (or training) is written with."""
    spec = record.spec
    return encode_fields(
        {
            "status": record.status.value,
            "spec": spec.model_dump_json(),
            # The queue it waits in: a model's, or its training lane (job counts by it).
            "model": spec.lane,
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


def submit_call(
    record: Run,
    max_depth: int,
    idempotency: tuple[str, str, int] | None,
    inputs: Mapping[str, bytes] | None = None,
    admission: Admission = UNLIMITED,
    inputs_in_store: bool = False,
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the submit script. `idempotency`: (key, value, TTL). `inputs` are
    written with the record, unless `inputs_in_store` (an object store holds them already)."""
    model = record.spec.lane
    names = () if inputs_in_store else record.spec.input_names
    given = dict(inputs or {})
    if sorted(given) != sorted(names):
        raise ValueError(f"job {record.id} needs inputs {names}, got {sorted(given)}")
    key = record.api_key
    keys = {
        "queue": Keys.queue(model),
        "job": Keys.job(record.id),
        "queue_seq": Keys.QUEUE_SEQ,
        "bell": Keys.bell(model),
        "active": Keys.active(key),
        "usage": Keys.usage(utc_day(record.created_at), key),
        "fair_round": Keys.fair_round(model),
        "key_queue": Keys.key_queue(model, key),
        **{f"input:{name}": Keys.input(record.id, name) for name in names},
    }
    if idempotency is not None:
        keys["idempotency"] = idempotency[0]
    if isinstance(record, TrainingRecord):
        keys["index"] = Keys.trainings(key)
        if admission.max_adapters is not None:
            keys["key_adapters"] = Keys.key_adapters(key)
    limit, quota = admission.max_active_jobs, admission.daily_quota
    args = {
        "job_id": record.id,
        "max_depth": max_depth,
        "max_active": -1 if limit is None else limit,
        "quota": -1 if quota is None else float(quota),
        "cost": repr(record.spec.megapixel_steps),
        "idempotency_value": idempotency[1] if idempotency else "",
        "idempotency_ttl": idempotency[2] if idempotency else 0,
        "max_adapters": admission.max_adapters if admission.max_adapters is not None else -1,
        "inputs": list(names),
        "fields": record_fields(record),
    }
    return scripts.call(keys, args, [given[name] for name in names])


def parse_submit(outcome: bytes | str, value: bytes | str | int) -> Submitted:
    text = scripts.decode(outcome)
    if isinstance(value, int):
        return Submitted(text, value)
    return Submitted(text, scripts.decode(value))
