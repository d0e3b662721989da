"""What the worker is doing now: written by the job loop, read by the heartbeat thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from imagegen.core.lifecycle import Claimed


@dataclass
class WorkerState:
    """The jobs this worker runs (each with its owner token and deadline) and its totals.

    The heartbeat lists `running` so the reaper never takes back a job this worker still
    runs, and its watchdog reads the deadlines. Both threads go through the lock.
    """

    jobs_done: int = 0
    pipelines_loaded: int = 0
    _running: dict[str, Claimed] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, jobs: list[Claimed]) -> None:
        with self._lock:
            for job in jobs:
                self._running[job.id] = job

    def remove(self, job_id: str) -> None:
        with self._lock:
            if self._running.pop(job_id, None) is not None:
                self.jobs_done += 1

    def running(self) -> list[Claimed]:
        with self._lock:
            return list(self._running.values())

    def job_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)
