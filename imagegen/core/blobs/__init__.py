"""Where blobs live: a job's images, its input images and preprocessed control maps.

Two stores behind one interface (`BlobStore`): Redis (the default; a job's inputs and images
are written by the lifecycle scripts in the same step as its state change) and S3-compatible
object storage (`IMAGEGEN_STORAGE_URL=s3://bucket/prefix`; blobs are written first, then the
one state change that names them, and `Sweeper` deletes what outlived its job). Job state,
queues, books and events stay in Redis whichever store holds the blobs.

By concern: `names` (what each blob is called in each store), `base` (the interface),
`redis_store` and `s3_store` (the two stores), `aio` (the gateway's view, on its event loop),
`sweeper` (expiry and orphans in object stores).
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from imagegen.core.blobs.aio import AsyncBlobStore
from imagegen.core.blobs.base import BlobStore, Listed, StorageUnavailable
from imagegen.core.blobs.names import (
    Blob,
    adapter_blob,
    checkpoint_blob,
    control_map_blob,
    image_blob,
    input_blob,
    job_of,
)
from imagegen.core.blobs.redis_store import RedisBlobStore
from imagegen.core.blobs.sweeper import Sweeper, SweepReport
from imagegen.core.settings import StorageSettings

__all__ = [
    "AsyncBlobStore",
    "Blob",
    "BlobStore",
    "Listed",
    "RedisBlobStore",
    "StorageUnavailable",
    "SweepReport",
    "Sweeper",
    "adapter_blob",
    "checkpoint_blob",
    "control_map_blob",
    "image_blob",
    "input_blob",
    "job_of",
    "object_store",
    "open_async_blob_store",
    "open_blob_store",
]


def object_store(settings: StorageSettings) -> BlobStore | None:
    """The object store `IMAGEGEN_STORAGE_URL` names; None when it is unset (blobs in Redis)."""
    if settings.storage_url is None:
        return None
    from imagegen.core.blobs.s3_store import S3BlobStore  # boto3 only where S3 is used

    return S3BlobStore(
        settings.storage_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        presign_endpoint_url=settings.s3_presign_endpoint_url,
    )


def open_blob_store(settings: StorageSettings, connection: redis.Redis) -> BlobStore:
    """The store the settings name, sync (the worker): Redis through `connection` by default."""
    return object_store(settings) or RedisBlobStore(connection)


def open_async_blob_store(settings: StorageSettings, connection: aioredis.Redis) -> AsyncBlobStore:
    """The gateway's view of the store the settings name (`connection`: its async Redis)."""
    return AsyncBlobStore(object_store(settings), connection)
