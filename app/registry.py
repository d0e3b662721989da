"""What the gateway knows of models and workers: read from the workers' heartbeats in Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from imagegen.core.contract import Keys, ModelInfo, WorkerHeartbeat
from imagegen.core.store import as_text

# Model records change when a worker starts; a submit may see one a second old.
MODEL_CACHE_S = 1.0


@dataclass(frozen=True)
class ModelStatus:
    """A model as `GET /v1/models` shows it: live workers able to load it, and holding it."""

    info: ModelInfo
    workers: int  # live workers that list it and can load it
    loaded: int  # of those, the ones holding it warm now
    unavailable: str | None  # why no live worker that lists it can load it (None: one can)


class ModelRegistry:
    """Models that workers have announced, and how many live workers serve each."""

    def __init__(self, connection: aioredis.Redis, default_model: str) -> None:
        self.redis = connection
        self.default_model = default_model
        self._cache: dict[str, tuple[float, ModelInfo]] = {}

    async def model_ids(self) -> list[str]:
        ids = await self.redis.smembers(Keys.MODELS)
        return sorted(as_text(i) for i in ids)

    async def get(self, model_id: str) -> ModelInfo | None:
        """The model's record, cached for a second: every submit needs it."""
        cached = self._cache.get(model_id)
        if cached is not None and time.monotonic() - cached[0] < MODEL_CACHE_S:
            return cached[1]
        raw = await self.redis.get(Keys.model(model_id))
        if not raw:
            return None
        info = ModelInfo.model_validate_json(raw)
        self._cache[model_id] = (time.monotonic(), info)
        return info

    async def live_workers(self, model_id: str) -> list[WorkerHeartbeat]:
        """Workers whose heartbeat key has not expired (expiry runs on Redis's clock)."""
        names: list[bytes] = await self.redis.zrange(Keys.model_workers(model_id), 0, -1)  # type: ignore[assignment]
        if not names:
            return []
        values = await self.redis.mget([Keys.worker(as_text(n)) for n in names])
        dead = [n for n, v in zip(names, values, strict=True) if v is None]
        if dead:
            await self.redis.zrem(Keys.model_workers(model_id), *dead)
        return [WorkerHeartbeat.model_validate_json(v) for v in values if v is not None]

    async def models(self) -> list[tuple[ModelInfo, int]]:
        return [(m.info, m.workers) for m in await self.statuses()]

    async def statuses(self) -> list[ModelStatus]:
        """Every announced model, with its live workers, warm workers and availability."""
        out = []
        for model_id in await self.model_ids():
            info = await self.get(model_id)
            if info is None:  # announced long ago by a worker that is gone: forget it
                await self.redis.srem(Keys.MODELS, model_id)
                continue
            able = loaded = 0
            reasons = []
            for beat in await self.live_workers(model_id):
                for served in beat.served():
                    if served.info.id != model_id:
                        continue
                    if served.unavailable is not None:
                        reasons.append(served.unavailable)
                        continue
                    able += 1
                    loaded += served.loaded
            unavailable = reasons[0] if reasons and not able else None
            out.append(ModelStatus(info, able, loaded, unavailable))
        return out
