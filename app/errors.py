"""The gateway's errors and their mapping to the API's one error envelope.

Every error a client can see — ours, FastAPI's validation errors, Starlette's 404/405, and any
unexpected exception — leaves through `install_error_handlers`, so the shape never varies and
no stack trace reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagegen.core.blobs import StorageUnavailable

log = logging.getLogger("imagegen.gateway")


class ApiError(Exception):
    """An error with its HTTP status and envelope code."""

    status_code = 500
    code = "internal"

    def __init__(
        self,
        message: str,
        details: Sequence[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details or [])
        self.headers = headers or {}


class InvalidRequest(ApiError):
    """The request breaks a rule of the API (422)."""

    status_code = 422
    code = "invalid_request"

    @classmethod
    def for_field(cls, field: str, message: str) -> InvalidRequest:
        return cls(f"{field}: {message}", [{"field": field, "message": message}])


class Unauthorized(ApiError):
    """No API key, or an unknown one, on a route that needs one (401)."""

    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PayloadTooLarge(ApiError):
    """The request body is larger than the configured limit (413)."""

    status_code = 413
    code = "payload_too_large"


class QueueFull(ApiError):
    """The model's queue is at its configured depth (429, with Retry-After)."""

    status_code = 429
    code = "queue_full"


class TooManyJobs(ApiError):
    """The key has its most jobs queued and running (429, with Retry-After)."""

    status_code = 429
    code = "too_many_jobs"


class QuotaExceeded(ApiError):
    """The key used its daily megapixel-step quota (429, Retry-After: the next UTC midnight)."""

    status_code = 429
    code = "quota_exceeded"


class TooManyAdapters(ApiError):
    """The key holds as many trained adapters as it may (429)."""

    status_code = 429
    code = "too_many_adapters"


class TooManyStreams(ApiError):
    """The key has its most event streams open on this gateway process (429)."""

    status_code = 429
    code = "too_many_streams"


class NotFound(ApiError):
    """No such job, image or route, or one that expired (404)."""

    status_code = 404
    code = "not_found"


class ContentFiltered(NotFound):
    """The model's safety checker withheld the image (404)."""

    code = "content_filtered"


class ImageMissing(NotFound):
    """The job succeeded and its image is within its time, yet the store does not hold it (an
    object deleted or lost outside the service) (404, naming where it should be)."""

    code = "image_missing"


class Conflict(ApiError):
    """The request conflicts with the current state (409)."""

    status_code = 409
    code = "conflict"


class Unavailable(ApiError):
    """A dependency (Redis, a worker) is not there right now (503, with Retry-After)."""

    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: Sequence[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if details:
        body["error"]["details"] = list(details)
    return JSONResponse(body, status_code=status_code, headers=headers)


def _field_name(loc: Sequence[Any]) -> str:
    # FastAPI prefixes locations with "body"/"query"/"path"; clients know fields by name.
    # A list index joins its list as `loras[0]`, as the API reference names such fields.
    name = ""
    for part in loc:
        if part in ("body", "query", "path", "header"):
            continue
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or "body"


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors():
        field = _field_name(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "json_invalid":
            message = "the body is not valid JSON"
            field = "body"
        elif kind == "extra_forbidden":
            message = "unknown field; see the API reference for the accepted fields"
        elif kind == "missing":
            message = "field required"
        else:
            message = str(err.get("msg", "invalid value"))
            # pydantic prefixes custom messages with "Value error, "; clients don't need it.
            message = message.removeprefix("Value error, ")
        details.append({"field": field, "message": message, "type": kind})
    return details


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the envelope."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        first = details[0] if details else {"field": "body", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}"
        if len(details) > 1:
            message += f" (and {len(details) - 1} more problem(s), see details)"
        return error_response(422, "invalid_request", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ApiError):
            # FastAPI wraps errors raised while reading the body (the size limit) in a 400.
            cause = exc.__cause__
            return error_response(
                cause.status_code, cause.code, cause.message, cause.details, cause.headers
            )
        if exc.status_code == 404:
            return error_response(404, "not_found", "no such route")
        if exc.status_code == 405:
            return error_response(
                405,
                "invalid_request",
                "method not allowed on this route",
                headers=getattr(exc, "headers", None),  # carries `Allow`
            )
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # Undecodable bytes, absurd nesting or digits: still just a malformed body (422).
            return error_response(
                422,
                "invalid_request",
                "body: the body is not valid JSON",
                [
                    {
                        "field": "body",
                        "message": "the body is not valid JSON",
                        "type": "json_invalid",
                    }
                ],
            )
        if exc.status_code == 413:
            return error_response(413, "payload_too_large", str(exc.detail))
        code = "internal" if exc.status_code >= 500 else "invalid_request"
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(redis.exceptions.RedisError)
    async def _redis_error(request: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        if _is_store_full(exc):
            # noeviction: Redis refused the first write of the MULTI or script, so nothing was
            # half-written.
            log.error("redis is full: %s", exc)
            return error_response(
                503,
                "unavailable",
                "the job store is full; retry later",
                headers={"Retry-After": "30"},
            )
        if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            log.warning("redis unavailable on %s %s: %s", request.method, request.url.path, exc)
            return error_response(
                503,
                "unavailable",
                "the job store is unavailable; retry shortly",
                headers={"Retry-After": "2"},
            )
        log.exception("redis error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; it has been logged")

    @app.exception_handler(StorageUnavailable)
    async def _storage_down(request: Request, exc: StorageUnavailable) -> JSONResponse:
        # The store's address stays in the log: the client learns what to do, not where it is.
        log.warning("blob store unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503,
            "storage_unavailable",
            "the result store (object storage) is unavailable; nothing was accepted, retry shortly",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; it has been logged")


def _is_store_full(exc: redis.exceptions.RedisError) -> bool:
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    return isinstance(exc, redis.exceptions.ExecAbortError | redis.exceptions.ResponseError) and (
        "OOM" in str(exc)
    )
