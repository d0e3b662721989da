"""Blobs in Redis (the default): a key per blob with its own TTL. A job's inputs and images are
written by the lifecycle scripts in the same step as its state change (`inline`), so this
store only reads them; control maps are written here."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import redis

from imagegen.core.blobs.base import BlobStore, StorageUnavailable
from imagegen.core.blobs.names import Blob


class RedisBlobStore(BlobStore):
    inline = True

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection

    def put(self, blob: Blob, data: bytes, ttl_s: int) -> None:
        try:
            # ttl_s 0: kept until deleted (a trained adapter's weights).
            self.redis.set(blob.redis_key, data, ex=ttl_s if ttl_s > 0 else None)
        except redis.exceptions.ConnectionError as exc:
            raise StorageUnavailable(f"redis: {exc}") from exc

    def get(self, blob: Blob) -> bytes | None:
        value: bytes | None = self.redis.get(blob.redis_key)  # type: ignore[assignment]
        return value

    def chunks(self, blob: Blob) -> Iterator[bytes] | None:
        value = self.get(blob)
        return None if value is None else iter((value,))

    def delete(self, blobs: Iterable[Blob]) -> None:
        keys = [b.redis_key for b in blobs]
        if keys:
            self.redis.delete(*keys)

    def where(self, blob: Blob) -> str:
        return f"redis key {blob.redis_key}"
