"""Routing by warmth: which of its models' queues a free worker claims from next.

The rule, per claim:

1. a cold model (one this worker does not hold loaded) whose next job has waited at least
   IMAGEGEN_COLD_MAX_WAIT_S, or that this worker passed over for IMAGEGEN_COLD_MAX_SKIPS warm
   claims in a row, comes first (oldest waiting first) — the starvation bound;
2. then the models it holds warm, the most recently used first;
3. then the other cold models with work, oldest waiting job first.

A cold model is loaded before its jobs are claimed, so a job's time limit never pays for the
load and no job is held while weights are read. Jobs of a model this worker cannot load fail
`model_unavailable` — unless another live worker announces it can load that model, which is
then left to serve them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from imagegen.core.contract import Keys, WorkerHeartbeat
from imagegen.core.lifecycle import Lifecycle
from imagegen.core.settings import WorkerSettings
from worker.models import ModelManager, ModelUnavailable

log = logging.getLogger("imagegen.worker")


class WarmthRouter:
    """Orders a multi-model worker's claims (see the module's rule) and loads cold models."""

    def __init__(
        self,
        connection: redis.Redis,
        lifecycle: Lifecycle,
        models: ModelManager,
        settings: WorkerSettings,
        worker_name: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = connection
        self.lifecycle = lifecycle
        self.models = models
        self.max_wait_s = settings.cold_max_wait_s
        self.max_skips = settings.cold_max_skips
        self.worker_name = worker_name
        self.clock = clock
        self.skips: dict[str, int] = {}
        self._waiting_cold: list[str] = []

    def model_ids(self) -> list[str]:
        return self.models.ids()

    def order(self) -> list[str]:
        """The models with queued work, in the order to try claiming them."""
        ids = self.models.ids()
        if len(ids) == 1:
            return ids  # one model: nothing to order, and no read before the claim
        heads = self.lifecycle.queue_heads(ids)
        waiting = {m: t for m, t in heads.items() if t is not None}
        if not waiting:
            self._waiting_cold = []
            return []
        warm = [m for m in self.models.warm_ids() if m in waiting]
        cold = sorted((m for m in waiting if m not in warm), key=lambda m: waiting[m] or 0.0)
        now = self.clock()
        starved = [
            m
            for m in cold
            if now - (waiting[m] or now) >= self.max_wait_s
            or self.skips.get(m, 0) >= self.max_skips
        ]
        self._waiting_cold = cold
        return starved + warm + [m for m in cold if m not in starved]

    def claimed(self, model_id: str) -> None:
        """A batch of `model_id` was claimed: every cold model left waiting was passed over."""
        for other in self._waiting_cold:
            if other != model_id:
                self.skips[other] = self.skips.get(other, 0) + 1
        self.skips[model_id] = 0

    def max_images(self, model_id: str) -> int:
        return self.models.max_images(model_id)

    def ready(self, model_id: str) -> str | None:
        """Load `model_id` if it is cold; None when it is warm now, else why it cannot be."""
        if self.models.is_warm(model_id):
            return None
        try:
            self.models.acquire(model_id)
        except ModelUnavailable as exc:
            return str(exc)
        return None

    def others_can_serve(self, model_id: str) -> bool:
        """Whether another live worker announces `model_id` as one it can load."""
        names: list[bytes] = self.redis.zrange(Keys.model_workers(model_id), 0, -1)  # type: ignore[assignment]
        others = [n.decode() for n in names if n.decode() != self.worker_name]
        if not others:
            return False
        values: list[bytes | None] = self.redis.mget([Keys.worker(n) for n in others])  # type: ignore[assignment]
        for value in values:
            if value is None:
                continue
            beat = WorkerHeartbeat.model_validate_json(value)
            for served in beat.served():
                if served.info.id == model_id and served.unavailable is None:
                    return True
        return False
