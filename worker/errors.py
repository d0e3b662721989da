"""Why a job stops early, and how an exception becomes the job document's error."""

from __future__ import annotations

import redis
import torch

from imagegen.core.blobs import StorageUnavailable
from imagegen.core.contract import ErrorCode
from worker.prompts import PromptTooLong


class JobStopped(Exception):
    """Raised from a job's step callback when the job is no longer this run's (canceled, or
    taken back), to leave the denoising loop at once: nothing partial is ever stored."""


class JobTimedOut(Exception):
    """Raised from a job's step callback, or by the worker's alarm, once the job is past its
    own time limit: that job fails `timeout`, the others of its batch go on."""


class AdapterGone(Exception):
    """A job names a trained adapter that was deleted after it was queued."""


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError)


def is_redis_down(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)


def failure_of(exc: BaseException) -> tuple[str, str]:
    """The job document's (code, message) for a job that raised `exc`."""
    if isinstance(exc, PromptTooLong | AdapterGone):
        return ErrorCode.INVALID_REQUEST, str(exc)
    if isinstance(exc, StorageUnavailable):
        # The store's address stays in the worker's log, not in the client's answer.
        return (
            ErrorCode.STORAGE_UNAVAILABLE,
            "the result store (object storage) did not answer; nothing was kept, retry the job",
        )
    if isinstance(exc, JobTimedOut):
        return ErrorCode.TIMEOUT, "the job exceeded its time limit"
    if is_out_of_memory(exc):
        return (
            ErrorCode.OUT_OF_MEMORY,
            "the worker ran out of memory; try fewer images (n), fewer pixels or fewer steps",
        )
    return ErrorCode.INTERNAL, f"generation failed ({type(exc).__name__})"
