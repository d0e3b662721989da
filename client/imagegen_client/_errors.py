"""Every exception the SDK raises; all derive from `ImagegenError`.

ImagegenError
├── APIError              the server answered with its error envelope
│   ├── InvalidRequest        422 invalid_request
│   ├── Unauthorized          401 unauthorized
│   ├── NotFound              404 not_found
│   ├── Conflict              409 conflict
│   ├── PayloadTooLarge       413 payload_too_large
│   ├── RateLimited           429 rate_limited
│   ├── QueueFull             429 queue_full
│   ├── Unavailable           503 unavailable
│   └── InternalError         500 internal
├── TransportError        no usable answer at all
│   ├── NetworkError          connection refused, reset or dropped
│   └── RequestTimeout        connect/read/write timeout of one HTTP request
└── JobError              the job ended, or the wait did, without images
    ├── JobFailed
    ├── JobCanceled
    └── WaitTimeout
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._types import Job


class ImagegenError(Exception):
    """Base class of every error raised by this SDK."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        details: Sequence[dict[str, Any]] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        """The HTTP status, when the server answered."""
        self.code = code
        """The API's error code (`not_found`, ...) or the job's (`out_of_memory`, ...)."""
        self.details: list[dict[str, Any]] = list(details or [])
        """Per-field problems of an `invalid_request`: `{"field", "message", "type"}`."""
        self.request_id = request_id
        """The server's `X-Request-ID` for this request, to quote in a bug report."""

    def __str__(self) -> str:
        context = [
            f"{name} {value}"
            for name, value in (
                ("status", self.status_code),
                ("code", self.code),
                ("request id", self.request_id),
            )
            if value is not None
        ]
        return f"{self.message} ({', '.join(context)})" if context else self.message


class APIError(ImagegenError):
    """The server answered with an error (its `{"error": {...}}` envelope)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str | None = None,
        details: Sequence[dict[str, Any]] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            message, status_code=status_code, code=code, details=details, request_id=request_id
        )
        self.status_code: int = status_code
        self.retry_after = retry_after
        """Seconds the server asked to wait (`Retry-After`), if it said."""


class InvalidRequest(APIError):
    """The request breaks a rule of the API; `details` names each field (422)."""


class Unauthorized(APIError):
    """Missing or wrong API key (401)."""


class NotFound(APIError):
    """No such job or image, it expired, or it belongs to another API key (404)."""


class Conflict(APIError):
    """The Idempotency-Key was used before with a different body (409)."""


class PayloadTooLarge(APIError):
    """The request body is over the server's size limit (413)."""


class RateLimited(APIError):
    """Too many requests for this API key; see `retry_after` (429)."""


class TooManyJobs(RateLimited):
    """The API key has its most jobs queued and running at once; wait for one to end (429)."""


class QuotaExceeded(RateLimited):
    """The API key used its daily megapixel-step quota; `retry_after` runs to the next UTC
    midnight (429)."""


class TooManyStreams(RateLimited):
    """The API key has its most event streams open on this server (429)."""


class QueueFull(APIError):
    """The model's queue is at its configured depth; see `retry_after` (429)."""


class Unavailable(APIError):
    """A dependency (Redis, a worker) is not there right now; see `retry_after` (503)."""


class InternalError(APIError):
    """The server failed unexpectedly; quote `request_id` when reporting it (500)."""


class TransportError(ImagegenError):
    """No usable HTTP answer: the connection failed, timed out, or the answer was malformed."""


class NetworkError(TransportError):
    """The connection was refused, reset or dropped."""


class RequestTimeout(TransportError):
    """One HTTP request took longer than the client's `timeout`."""


class JobError(ImagegenError):
    """A job did not give images; `job` is its last known document."""

    def __init__(self, message: str, job: Job, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.job = job


class JobFailed(JobError):
    """The job failed; `code` and `message` are the job's `error`."""


class JobCanceled(JobError):
    """The job was canceled before it finished."""


class WaitTimeout(JobError):
    """`wait(timeout=...)` ran out before the job finished; the job goes on running."""


ERRORS_BY_CODE: dict[str, type[APIError]] = {
    "invalid_request": InvalidRequest,
    "unauthorized": Unauthorized,
    "not_found": NotFound,
    "conflict": Conflict,
    "payload_too_large": PayloadTooLarge,
    "rate_limited": RateLimited,
    "queue_full": QueueFull,
    "too_many_jobs": TooManyJobs,
    "quota_exceeded": QuotaExceeded,
    "too_many_streams": TooManyStreams,
    "unavailable": Unavailable,
    "internal": InternalError,
}

# For answers without the envelope (a proxy's HTML error page, say).
ERRORS_BY_STATUS: dict[int, type[APIError]] = {
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
    500: InternalError,
    503: Unavailable,
}
