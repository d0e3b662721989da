"""A job's state changes after submit: claim, progress, succeed, fail, cancel and take back,
each one script (`lua/claim.lua`, `lua/progress.lua`, `lua/transition.lua`), over one sync
connection (the worker and the reaper; the gateway's are in `aio`)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from imagegen.core.contract import ImageInfo, JobRecord, JobStatus, Keys, utc_day
from imagegen.core.lifecycle import scripts
from imagegen.core.lifecycle.submit import (
    UNLIMITED,
    Admission,
    Run,
    Submitted,
    parse_submit,
    submit_call,
)
from imagegen.core.store import (
    RUN_SECONDS_BUCKETS,
    encode_fields,
    record_from_hash,
    training_from_hash,
)
from imagegen.core.trainings import AdapterRecord, TrainingRecord, adapter_keys, training_lane


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
class Transition:
    """One state change of `record`'s job: to `new_status` from one of `allowed` (and, with
    `owner`, only while that run holds the job), with the record fields to write, the record's
    TTL (0: none), images to store with it (a succeeded job's) and, for a finished run, its
    seconds; a training's success registers the adapter it made (`adapter`)."""

    record: Run
    allowed: tuple[JobStatus, ...]
    new_status: JobStatus
    fields: Mapping[str, Any] = field(default_factory=dict)
    ttl_s: int = 0
    owner: str = ""
    images: Sequence[tuple[int, bytes]] = ()  # (index, PNG)
    image_ttl_s: int = 0
    run_s: float | None = None
    adapter: AdapterRecord | None = None

    def script_call(self) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of `lua/transition.lua`."""
        record, model, name = self.record, self.record.spec.lane, self.record.api_key
        now = time.time()
        keys = {
            "job": Keys.job(record.id),
            "events": Keys.events(record.id),
            "job_stats": Keys.JOB_STATS,
            "queue": Keys.queue(model),
            "key_queue": Keys.key_queue(model, name),
            "running": Keys.running(model),
            "bell": Keys.bell(model),
            "queue_seq": Keys.QUEUE_SEQ,
            "run_seconds": Keys.run_seconds(model),
            "active": Keys.active(name),
            "usage_today": Keys.usage(utc_day(now), name),
            # The day the submit charged the quota on: a cancel of a queued job refunds it.
            "usage_charged": Keys.usage(utc_day(record.created_at), name),
            "key_stats": Keys.KEY_STATS,
            "webhooks_due": Keys.WEBHOOKS_DUE,
            "webhooks_bell": Keys.WEBHOOKS_BELL,
            **{f"input:{n}": Keys.input(record.id, n) for n in record.spec.input_names},
            **{f"image:{i}": Keys.image(record.id, i) for i, _ in self.images},
        }
        registration: dict[str, Any] = {}
        if self.adapter is not None:
            keys["adapter"], keys["key_adapters"] = adapter_keys(self.adapter)
            registration = {
                "adapter_id": self.adapter.id,
                "adapter_fields": encode_fields(self.adapter.model_dump()),
            }
        histogram = (
            [f"le:{b}" for b in RUN_SECONDS_BUCKETS if self.run_s <= b] + ["count"]
            if self.run_s is not None
            else []
        )
        args = {
            "job_id": record.id,
            "owner": self.owner,
            "new_status": self.new_status.value,
            "ttl": self.ttl_s,
            "image_ttl": self.image_ttl_s,
            "now": repr(now),
            "allowed": [s.value for s in self.allowed],
            "fields": encode_fields(self.fields),
            "histogram": histogram,
            "run_s": repr(self.run_s or 0.0),
            "images": [index for index, _ in self.images],
            **registration,
        }
        return scripts.call(keys, args, [png for _, png in self.images])


class Lifecycle:
    """The job state machine over one (sync) Redis connection: the worker's and the reaper's
    steps. The gateway's (submit, cancel) run on its event loop: `AsyncLifecycle`."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection
        self._claim = connection.register_script(scripts.source("claim", ("outbox",)))
        self._transition = connection.register_script(scripts.source("transition", ("outbox",)))
        self._progress = connection.register_script(scripts.source("progress"))
        self._submit = connection.register_script(scripts.source("submit"))
        self._heads = connection.register_script(scripts.source("heads"))

    # -- gateway --------------------------------------------------------------------------------
    def submit(
        self,
        record: Run,
        max_depth: int,
        idempotency: tuple[str, str, int] | None = None,
        inputs: Mapping[str, bytes] | None = None,
        admission: Admission = UNLIMITED,
        inputs_in_store: bool = False,
    ) -> Submitted:
        """Queue `record` unless the queue is full, the key is at a limit or the
        Idempotency-Key was used (sync); `inputs` (name -> normalized PNG, one per
        `record.spec.input_names`) in the same step."""
        keys, args = submit_call(record, max_depth, idempotency, inputs, admission, inputs_in_store)
        outcome, value = self._submit(keys=keys, args=args)
        return parse_submit(outcome, value)

    def cancel(self, record: Run, ttl_s: int) -> bool:
        """Cancel a queued or running job (a running one's worker stops at its next step)."""
        moved, _ = self.apply(cancellation(record, ttl_s))
        return moved

    # -- worker ---------------------------------------------------------------------------------
    def claim(
        self, model: str, worker: str, batch_key: str = "", budget: int = 0, scan: int = 64
    ) -> tuple[list[Claimed], bool]:
        """Claim the queue's head (`batch_key` ""), then queued jobs of its batch key within
        `budget` images; or, given a `batch_key`, only such jobs. Returns the claimed jobs
        (now running under this worker) and whether a job of another key is waiting."""
        reply = self._claim_raw(model, worker, batch_key, budget, scan)
        claimed = [Claimed(record_from_hash(job_id, raw)) for job_id, raw in reply[1:]]
        return claimed, bool(reply[0])

    def claim_training(self, model: str, worker: str) -> TrainingRecord | None:
        """Claim the next training of `model`'s training lane (now running under this
        worker), or None."""
        reply = self._claim_raw(training_lane(model), worker, "", 0, 8)
        return training_from_hash(*reply[1]) if len(reply) > 1 else None

    def _claim_raw(
        self, lane: str, worker: str, batch_key: str, budget: int, scan: int
    ) -> list[Any]:
        """[others waiting, (id, record fields), ...] of one claim script call on `lane`."""
        keys = {
            "queue": Keys.queue(lane),
            "running": Keys.running(lane),
            "running_models": Keys.RUNNING_MODELS,
            "fair_round": Keys.fair_round(lane),
            "webhooks_due": Keys.WEBHOOKS_DUE,
            "webhooks_bell": Keys.WEBHOOKS_BELL,
        }
        args = {
            "worker": worker,
            "now": repr(time.time()),
            "model": lane,
            "batch_key": batch_key,
            "budget": budget,
            "scan": scan,
        }
        reply = self._claim(*scripts.call(keys, args))
        out: list[Any] = [reply[0]]
        for entry in reply[1:]:
            flat = [scripts.decode(v) for v in entry[1:]]
            out.append((scripts.decode(entry[0]), dict(zip(flat[::2], flat[1::2], strict=True))))
        return out

    def queue_heads(self, models: Sequence[str]) -> dict[str, float | None]:
        """When each model's next queued job was created (None: its queue is empty); one
        read, so a worker can route by warmth and see how long a cold model's job waited."""
        if not models:
            return {}
        reply = self._heads(*scripts.call({m: Keys.queue(m) for m in models}, {}))
        return {
            m: float(scripts.decode(v) or 0) if scripts.decode(v) != "" else None
            for m, v in zip(models, reply, strict=True)
        }

    def progress(
        self, job_id: str, step: int, owner: str, fields: Mapping[str, Any] | None = None
    ) -> tuple[str, bool]:
        """Record that `step` steps are done (with `fields`, more of the record: a training's
        loss); returns the job's status ("lost" when another owner holds it, "" when the
        record is gone) and whether a client watches its previews."""
        keys = {
            "job": Keys.job(job_id),
            "events": Keys.events(job_id),
            "previews_wanted": Keys.previews_wanted(job_id),
        }
        args = {
            "step": step,
            "at": repr(time.time()),
            "owner": owner,
            "fields": encode_fields(fields or {}),
        }
        status, wanted = self._progress(*scripts.call(keys, args))
        return scripts.decode(status), bool(wanted)

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
        in_store: bool = False,
    ) -> bool:
        """Store the images and mark the job succeeded, in one step; False (nothing written)
        if the run no longer holds the job (canceled, or taken back). `pngs` are those of the
        images not `filtered`, in order: a filtered image is recorded, never stored. With
        `in_store` an object store holds them already (`pngs` empty): only the state changes."""
        stored = [i.index for i in images if not i.filtered]
        now = time.time()
        moved, _ = self.apply(
            Transition(
                job.record,
                (JobStatus.RUNNING,),
                JobStatus.SUCCEEDED,
                {
                    "finished_at": now,
                    "images": [i.model_dump() for i in images],
                    "images_expire_at": now + image_ttl_s,
                },
                ttl_s=record_ttl_s,
                owner=job.owner,
                images=[] if in_store else list(zip(stored, pngs, strict=True)),
                image_ttl_s=image_ttl_s,
                run_s=run_s,
            )
        )
        return moved

    def succeed_training(
        self, record: TrainingRecord, adapter: AdapterRecord, record_ttl_s: int, run_s: float
    ) -> bool:
        """Mark a training succeeded and register the adapter it made (its weights are
        stored already), in one step; False if the run no longer holds it."""
        made = {"id": adapter.id, "model": adapter.model, "trigger_word": adapter.trigger_word}
        moved, _ = self.apply(
            Transition(
                record,
                (JobStatus.RUNNING,),
                JobStatus.SUCCEEDED,
                {"finished_at": time.time(), "adapter": made},
                ttl_s=record_ttl_s,
                owner=record.owner or "",
                run_s=run_s,
                adapter=adapter,
            )
        )
        return moved

    def fail(self, job: Claimed, code: str, message: str, ttl_s: int) -> bool:
        """Mark a run's job failed with `code`; False if the run no longer holds it."""
        return self.fail_run(job.record, code, message, ttl_s)

    def fail_run(self, record: Run, code: str, message: str, ttl_s: int) -> bool:
        """Mark the run that `record` names (its owner) failed with `code`."""
        moved, _ = self.apply(
            Transition(
                record,
                (JobStatus.RUNNING,),
                JobStatus.FAILED,
                {"finished_at": time.time(), "error": {"code": code, "message": message}},
                ttl_s=ttl_s,
                owner=record.owner or "",
            )
        )
        return moved

    # -- reaper ---------------------------------------------------------------------------------
    def requeue(self, record: Run) -> bool:
        """Put a lost run's job back at the front of its queue (fenced by the run's owner)."""
        moved, _ = self.apply(
            Transition(
                record,
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
        return bool(moved), scripts.decode(status)


def cancellation(record: Run, ttl_s: int) -> Transition:
    """A client's cancel: a queued or running job turns `canceled` (the worker of a running one
    stops at its next step)."""
    return Transition(
        record,
        (JobStatus.QUEUED, JobStatus.RUNNING),
        JobStatus.CANCELED,
        {
            "finished_at": time.time(),
            "error": {"code": "canceled", "message": "canceled by the client"},
        },
        ttl_s=ttl_s,
    )
