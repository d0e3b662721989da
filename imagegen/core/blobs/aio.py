"""The blob store on the gateway's event loop: Redis through its async client; an object store
through worker threads (its client blocks), streaming a download chunk by chunk."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import anyio
import redis.asyncio as aioredis

from imagegen.core.blobs.base import BlobStore
from imagegen.core.blobs.names import Blob


class AsyncBlobStore:
    """What the gateway does with blobs. With Redis (`inline`) a job's inputs go into the
    submit script itself, so `put_many` and `delete` are never called for them."""

    def __init__(self, store: BlobStore | None, connection: aioredis.Redis) -> None:
        self.store = store  # None: Redis, read through `connection`
        self.redis = connection

    @property
    def inline(self) -> bool:
        return self.store is None or self.store.inline

    async def put_many(self, items: Sequence[tuple[Blob, bytes]], ttl_s: int) -> None:
        if self.store is not None and items:
            await anyio.to_thread.run_sync(self.store.put_many, items, ttl_s)

    async def delete(self, blobs: Sequence[Blob]) -> None:
        if not blobs:
            return
        if self.store is None:
            await self.redis.delete(*[blob.redis_key for blob in blobs])
        else:
            await anyio.to_thread.run_sync(self.store.delete, blobs)

    async def get(self, blob: Blob) -> bytes | None:
        if self.store is None:
            value = await self.redis.get(blob.redis_key)
            return value.encode() if isinstance(value, str) else value
        return await anyio.to_thread.run_sync(self.store.get, blob)

    async def chunks(self, blob: Blob) -> Iterator[bytes] | None:
        """The blob's chunks (a blocking iterator: Starlette's StreamingResponse reads it in
        a thread); None when it is not stored."""
        if self.store is None:
            value = await self.get(blob)
            return None if value is None else iter((value,))
        return await anyio.to_thread.run_sync(self.store.chunks, blob)

    def url(self, blob: Blob, expires_s: int) -> str | None:
        """A presigned URL (signed locally: no round trip); None where the store has none."""
        return None if self.store is None else self.store.url(blob, expires_s)

    def where(self, blob: Blob) -> str:
        return f"redis key {blob.redis_key}" if self.store is None else self.store.where(blob)
