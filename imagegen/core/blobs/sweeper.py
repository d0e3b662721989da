"""Deleting what an object store holds past its time: a finished job's blobs once its
results expire (its `images_expire_at`, else `IMAGEGEN_RESULT_TTL_S` after it finished);
orphans (objects of a job with no record: a submit that was refused, a process killed between
storing and recording) once `IMAGEGEN_STORAGE_ORPHAN_AFTER_S` old; control maps
`IMAGEGEN_RESULT_TTL_S` after they were made. Redis expires its own blobs; only object stores
are swept. One worker at a time sweeps (a Redis lock), every
`IMAGEGEN_STORAGE_SWEEP_INTERVAL_S`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis

from imagegen.core.blobs.base import BlobStore
from imagegen.core.blobs.names import CONTROL_MAPS, JOBS, job_of
from imagegen.core.contract import JobStatus, Keys
from imagegen.core.settings import CommonSettings

TERMINAL = {s.value for s in JobStatus if s.is_terminal}


@dataclass
class SweepReport:
    expired_jobs: list[str] = field(default_factory=list)
    orphan_jobs: list[str] = field(default_factory=list)
    control_maps: int = 0


class Sweeper:
    def __init__(self, store: BlobStore, connection: redis.Redis, settings: CommonSettings):
        self.store = store
        self.redis = connection
        self.settings = settings

    def sweep_if_due(self) -> SweepReport | None:
        """Sweep unless another process swept within the interval (None then)."""
        if not self.redis.set(
            Keys.BLOB_SWEEP, "1", nx=True, ex=self.settings.storage_sweep_interval_s
        ):
            return None
        return self.sweep()

    def sweep(self, now: float | None = None) -> SweepReport:
        now = time.time() if now is None else now
        report = SweepReport()
        newest: dict[str, float] = {}
        paths: dict[str, list[str]] = {}
        for listed in self.store.listing(JOBS):
            job_id = job_of(listed.path)
            if job_id is None:
                continue
            newest[job_id] = max(newest.get(job_id, 0.0), listed.modified_at)
            paths.setdefault(job_id, []).append(listed.path)
        doomed: list[str] = []
        ids = sorted(paths)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in chunk:
                    pipe.hmget(Keys.job(job_id), "status", "finished_at", "images_expire_at")
                replies = pipe.execute()
            for job_id, (status, finished_at, expire_at) in zip(chunk, replies, strict=True):
                if status is None:
                    if now - newest[job_id] > self.settings.storage_orphan_after_s:
                        report.orphan_jobs.append(job_id)
                        doomed += paths[job_id]
                elif status.decode() in TERMINAL and finished_at:
                    # A succeeded job's own expiry (its worker's TTL); a failed or canceled
                    # job's inputs go after the same time.
                    due = float(expire_at or float(finished_at) + self.settings.result_ttl_s)
                    if now > due:
                        report.expired_jobs.append(job_id)
                        doomed += paths[job_id]
        for listed in self.store.listing(CONTROL_MAPS):
            if now - listed.modified_at > self.settings.result_ttl_s:
                doomed.append(listed.path)
                report.control_maps += 1
        if doomed:
            self.store.delete_paths(doomed)
        return report
