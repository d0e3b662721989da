"""What the gateway knows of models and workers: read from the workers' heartbeats in Redis."""

from __future__ import annotations

import redis

from imagegen.contract import Keys, ModelInfo, WorkerHeartbeat


class ModelRegistry:
    """Models that workers have announced, and how many live workers serve each."""

    def __init__(self, connection: redis.Redis, default_model: str) -> None:
        self.redis = connection
        self.default_model = default_model

    def model_ids(self) -> list[str]:
        ids: set[bytes] = self.redis.smembers(Keys.MODELS)  # type: ignore[assignment]
        return sorted(i.decode() for i in ids)

    def get(self, model_id: str) -> ModelInfo | None:
        raw: bytes | None = self.redis.get(Keys.model(model_id))  # type: ignore[assignment]
        return ModelInfo.model_validate_json(raw) if raw else None

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
        out = []
        for model_id in self.model_ids():
            info = self.get(model_id)
            if info is None:  # announced long ago by a worker that is gone: forget it
                self.redis.srem(Keys.MODELS, model_id)
                continue
            out.append((info, len(self.live_workers(model_id))))
        return out
