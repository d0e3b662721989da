"""What the gateway knows of models and workers: read from the workers' heartbeats in Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from imagegen.core.contract import Keys, ModelInfo, WorkerHeartbeat

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

    def __init__(
        self,
        connection: redis.Redis,
        default_model: str,
        async_connection: aioredis.Redis | None = None,
    ) -> None:
        self.redis = connection
        self.aredis = async_connection
        self.default_model = default_model
        self._cache: dict[str, tuple[float, ModelInfo]] = {}

    def model_ids(self) -> list[str]:
        ids: set[bytes] = self.redis.smembers(Keys.MODELS)  # type: ignore[assignment]
        return sorted(i.decode() for i in ids)

    async def amodel_ids(self) -> list[str]:
        ids = await self._async().smembers(Keys.MODELS)
        return sorted(as_text(i) for i in ids)

    def get(self, model_id: str) -> ModelInfo | None:
        """The model's record, cached for a second: every submit needs it."""
        cached = self._cached(model_id)
        if cached is not None:
            return cached
        return self._remember(model_id, self.redis.get(Keys.model(model_id)))

    async def aget(self, model_id: str) -> ModelInfo | None:
        """`get` for the event loop."""
        cached = self._cached(model_id)
        if cached is not None:
            return cached
        return self._remember(model_id, await self._async().get(Keys.model(model_id)))

    def _cached(self, model_id: str) -> ModelInfo | None:
        cached = self._cache.get(model_id)
        if cached is not None and time.monotonic() - cached[0] < MODEL_CACHE_S:
            return cached[1]
        return None

    def _remember(self, model_id: str, raw: bytes | str | None) -> ModelInfo | None:
        if not raw:
            return None
        info = ModelInfo.model_validate_json(raw)
        self._cache[model_id] = (time.monotonic(), info)
        return info

    def _async(self) -> aioredis.Redis:
        if self.aredis is None:
            raise RuntimeError("this registry was built without an async connection")
        return self.aredis

    def live_workers(self, model_id: str) -> list[WorkerHeartbeat]:
        """Workers whose heartbeat key has not expired (expiry runs on Redis's clock)."""
        names: list[bytes] = self.redis.zrange(Keys.model_workers(model_id), 0, -1)  # type: ignore[assignment]
        if not names:
            return []
        values: list[bytes | None] = self.redis.mget([Keys.worker(n.decode()) for n in names])  # type: ignore[assignment]
        dead = [n for n, v in zip(names, values, strict=True) if v is None]
        if dead:
            self.redis.zrem(Keys.model_workers(model_id), *dead)
        return [WorkerHeartbeat.model_validate_json(v) for v in values if v is not None]

    def models(self) -> list[tuple[ModelInfo, int]]:
        return [(m.info, m.workers) for m in self.statuses()]

    def statuses(self) -> list[ModelStatus]:
        """Every announced model, with its live workers, warm workers and availability."""
        out = []
        for model_id in self.model_ids():
            info = self.get(model_id)
            if info is None:  # announced long ago by a worker that is gone: forget it
                self.redis.srem(Keys.MODELS, model_id)
                continue
            able = loaded = 0
            reasons = []
            for beat in self.live_workers(model_id):
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


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (the gateway's clients return bytes; their types say bytes | str)."""
    return value.decode() if isinstance(value, bytes) else value
