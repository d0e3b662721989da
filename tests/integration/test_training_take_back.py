"""A lost training goes back to its lane through the one lifecycle, as a lost job does; a run
that stored a checkpoint made progress and is always taken back (the next resumes there), and
only runs lost before any checkpoint count toward IMAGEGEN_MAX_ATTEMPTS (a poison training
still ends `worker_lost`). On the real lifecycle scripts and a real redis-server."""

from __future__ import annotations

import time

import redis

from imagegen.core.contract import JobStatus, Keys
from imagegen.core.lifecycle import Lifecycle
from imagegen.core.settings import WorkerSettings
from imagegen.core.store import JobStore
from imagegen.core.trainings import (
    TrainingRecord,
    TrainingSpec,
    new_training_id,
    training_lane,
)
from worker.reaper import Reaper

MODEL = "take-back-model"


def _submit(lifecycle: Lifecycle) -> str:
    spec = TrainingSpec(
        model=MODEL,
        name="t",
        trigger_word="zxq",
        steps=100,
        rank=4,
        learning_rate=1e-3,
        captions=("zxq",),
        width=64,
        height=64,
    )
    record = TrainingRecord(
        id=new_training_id(), status=JobStatus.QUEUED, spec=spec, created_at=time.time()
    )
    outcome = lifecycle.submit(record, 10, inputs={spec.input_names[0]: b"png"})
    assert outcome.outcome == "created", outcome
    return record.id


def _lose_a_run(
    lifecycle: Lifecycle, reaper: Reaper, training: str, checkpoint_step: int | None
) -> str:
    claimed = lifecycle.claim_training(MODEL, "lost-worker")
    assert claimed is not None and claimed.id == training
    if checkpoint_step is not None:
        fields = {"checkpoint_step": checkpoint_step, "checkpoint_attempt": claimed.attempts}
        status, _ = lifecycle.progress(training, checkpoint_step, claimed.owner or "", fields)
        assert status == "running"
    record = JobStore(lifecycle.redis).get_run(training)
    assert isinstance(record, TrainingRecord)
    return reaper.take_back(record)


def test_a_lost_run_with_a_checkpoint_is_always_taken_back_and_one_without_counts(
    redis_conn: redis.Redis,
) -> None:
    lifecycle = Lifecycle(redis_conn)
    reaper = Reaper(redis_conn, WorkerSettings(max_attempts=2))
    training = _submit(lifecycle)
    # Three runs lost, each after a new checkpoint: past max_attempts, still queued again.
    outcomes = [_lose_a_run(lifecycle, reaper, training, step) for step in (10, 20, 30)]
    assert outcomes == ["requeued"] * 3
    assert redis_conn.zscore(Keys.queue(training_lane(MODEL)), training) is not None
    # A fourth run lost before a checkpoint of its own: a poison past max_attempts.
    assert _lose_a_run(lifecycle, reaper, training, None) == "failed"
    record = JobStore(redis_conn).get_run(training)
    assert isinstance(record, TrainingRecord)
    assert record.status == JobStatus.FAILED and record.error is not None
    assert record.error.code == "worker_lost" and record.checkpoint_step == 30
    assert redis_conn.zcard(Keys.running(training_lane(MODEL))) == 0


def test_a_training_lost_before_any_checkpoint_fails_after_max_attempts(
    redis_conn: redis.Redis,
) -> None:
    lifecycle = Lifecycle(redis_conn)
    reaper = Reaper(redis_conn, WorkerSettings(max_attempts=2))
    training = _submit(lifecycle)
    assert _lose_a_run(lifecycle, reaper, training, None) == "requeued"
    assert _lose_a_run(lifecycle, reaper, training, None) == "failed"
