"""The blob store's interface: what the gateway and the workers do with a job's images, input
images and control maps, whichever store holds them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from imagegen.core.blobs.names import Blob


class StorageUnavailable(Exception):
    """The store did not answer (down, unreachable, refused the credentials): the caller turns
    this into a 503 (gateway) or the job's `storage_unavailable` failure (worker)."""


@dataclass(frozen=True)
class Listed:
    """One object as the store lists it."""

    path: str
    modified_at: float  # unix time


class BlobStore(ABC):
    """Put, get, stream, sign and delete blobs (sync: the worker, the sweeper, and the gateway
    through threads).

    `inline` stores take a job's inputs and images inside the lifecycle scripts themselves
    (Redis: the blobs and the state change are one step); the others are written before the
    step that names them, so a job never succeeds without its images — a crash in between
    leaves orphans, which `sweep` deletes."""

    inline: bool = False

    @abstractmethod
    def put(self, blob: Blob, data: bytes, ttl_s: int) -> None:
        """Store `data` (durably, once this returns); `ttl_s` is how long it must live at
        least (Redis expires it then; an object store's sweeper deletes it later); 0: until it
        is deleted."""

    @abstractmethod
    def get(self, blob: Blob) -> bytes | None:
        """The blob's bytes; None when it is not stored."""

    @abstractmethod
    def chunks(self, blob: Blob) -> Iterator[bytes] | None:
        """The blob as a stream of chunks (None when it is not stored): a download is never
        held whole in the gateway's memory where the store can stream."""

    @abstractmethod
    def delete(self, blobs: Iterable[Blob]) -> None:
        """Delete these blobs (absent ones are skipped)."""

    def url(self, blob: Blob, expires_s: int) -> str | None:
        """A presigned GET URL valid `expires_s` seconds; None where the store has none."""
        return None

    @abstractmethod
    def where(self, blob: Blob) -> str:
        """Where the blob is, for messages (`s3://bucket/prefix/jobs/...`, a Redis key)."""

    def put_many(self, items: Sequence[tuple[Blob, bytes]], ttl_s: int) -> None:
        for blob, data in items:
            self.put(blob, data, ttl_s)

    def listing(self, prefix: str) -> Iterator[Listed]:
        """Every object under `prefix` (object stores, for the sweeper; Redis expires its own)."""
        return iter(())

    def delete_paths(self, paths: list[str]) -> None:
        """Delete objects by path, as `listing` named them (object stores; Redis lists none)."""
        if paths:
            raise NotImplementedError(f"{type(self).__name__} lists no paths to delete")
