"""What `Client` and `AsyncClient` share: configuration, request building, the retry policy,
error mapping, SSE parsing and job outcomes. Nothing here does I/O, so both clients are thin
loops around it: the sync one with `httpx.Client` and `time.sleep`, the async one with
`httpx.AsyncClient` and `anyio.sleep`. That is why it is one module of 500 lines: it is all
of both clients' logic, kept in one place so the two cannot drift.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast
from urllib.parse import quote

import httpx

from ._errors import (
    ERRORS_BY_CODE,
    ERRORS_BY_STATUS,
    APIError,
    ImagegenError,
    JobCanceled,
    JobFailed,
    NetworkError,
    RequestTimeout,
    TransportError,
    WaitTimeout,
)
from ._types import Event, EventName, Job, Preview
from ._version import __version__

log = logging.getLogger("imagegen_client")

ENV_API_KEY = "IMAGEGEN_API_KEY"
ENV_BASE_URL = "IMAGEGEN_BASE_URL"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Per HTTP request. The event stream pings every 15 s, so a read timeout above that never
# fires on a healthy stream however long the job is queued.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2

# Polling, when the event stream is not available: quick at first, then every 2 s.
POLL_FIRST_S = 0.2
POLL_MAX_S = 2.0

TimeoutTypes: TypeAlias = float | httpx.Timeout | None
JobRef: TypeAlias = str | Job
"""A job id, or a job document (its id is used)."""

_RETRY_STATUSES = frozenset({429, 503})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT"})
# Errors that mean "the request may not have been handled"; timeouts of a started read are not
# among them (the server may still be working on it, and retrying doubles the load).
_RETRY_EXCEPTIONS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a request again and how long to wait first.

    Only 429 and 503 answers and connection errors are retried, and only for requests that are
    safe to repeat: GET and DELETE, and POST with an `Idempotency-Key` (which `submit` always
    sends). A `Retry-After` from the server is honoured as is; otherwise the wait grows
    exponentially with jitter.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_s: float = 0.5
    """The first wait; each later one doubles, up to `max_backoff_s`."""
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 60.0
    """A `Retry-After` longer than this is not waited for: the error is raised instead."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("backoff_s, max_backoff_s and max_retry_after_s must be >= 0")

    def backoff(self, attempt: int) -> float:
        """The wait before retry `attempt` (0-based) when the server named none."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        # "Equal jitter": never less than half the ceiling, so retries still back off.
        return random.uniform(ceiling / 2, ceiling)

    def delay(
        self,
        request: httpx.Request,
        attempt: int,
        *,
        error: APIError | None = None,
        exception: httpx.TransportError | None = None,
    ) -> float | None:
        """Seconds to wait before retrying `request` after a failed `attempt`; None: give up."""
        if attempt >= self.max_retries or not is_safe_to_retry(request):
            return None
        if exception is not None:
            return self.backoff(attempt) if isinstance(exception, _RETRY_EXCEPTIONS) else None
        if error is None or error.status_code not in _RETRY_STATUSES:
            return None
        if error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_retry_after_s else None
        return self.backoff(attempt)


def is_safe_to_retry(request: httpx.Request) -> bool:
    """GET, DELETE and the like always; POST only with an Idempotency-Key."""
    return request.method in _SAFE_METHODS or "Idempotency-Key" in request.headers


@dataclass(frozen=True)
class ClientConfig:
    """A client's settings, resolved once from arguments and the environment."""

    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    retry: RetryPolicy

    @classmethod
    def resolve(
        cls,
        *,
        api_key: str | None,
        base_url: str | None,
        timeout: TimeoutTypes,
        max_retries: int | None,
        retry_policy: RetryPolicy | None,
    ) -> ClientConfig:
        if max_retries is not None and retry_policy is not None:
            raise ValueError("pass max_retries or retry_policy, not both")
        if retry_policy is None:
            retry_policy = RetryPolicy(
                max_retries=DEFAULT_MAX_RETRIES if max_retries is None else max_retries
            )
        return cls(
            base_url=(base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/"),
            api_key=api_key or os.environ.get(ENV_API_KEY) or None,
            timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            retry=retry_policy,
        )

    def headers(self) -> dict[str, str]:
        headers = {
            "Accept": "application/json",
            "User-Agent": f"imagegen-client/{__version__} python-httpx/{httpx.__version__}",
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def stream_timeout(self, deadline: Deadline | None) -> httpx.Timeout:
        """The request timeout for an event stream: reads end no later than `deadline`."""
        if deadline is None:
            return self.timeout
        read = deadline.remaining()
        if self.timeout.read is not None:
            read = min(read, self.timeout.read)
        return httpx.Timeout(
            connect=self.timeout.connect,
            read=max(read, 0.001),
            write=self.timeout.write,
            pool=self.timeout.pool,
        )


# -- paths and bodies ---------------------------------------------------------------------------
GENERATIONS = "/v1/generations"
MODELS = "/v1/models"
USAGE = "/v1/usage"


def job_id_of(job: JobRef) -> str:
    return job.id if isinstance(job, Job) else job


def job_path(job: JobRef, suffix: str = "") -> str:
    return f"{GENERATIONS}/{quote(job_id_of(job), safe='')}{suffix}"


def image_path(job: JobRef, index: int) -> str:
    return job_path(job, f"/images/{int(index)}")


def events_path(job: JobRef, previews: bool = False) -> str:
    return job_path(job, "/events?previews=true" if previews else "/events")


def lora_list(
    loras: Sequence[Mapping[str, Any] | tuple[str, float] | str] | None,
) -> list[dict[str, Any]] | None:
    """`loras` as the API takes it: `[{"id", "scale"}]` from dicts, `(id, scale)` pairs or
    ids alone (scale 1, as the API's default)."""
    if loras is None:
        return None
    return [
        {"id": lora, "scale": 1.0}
        if isinstance(lora, str)
        else dict(lora)
        if isinstance(lora, Mapping)
        else {"id": lora[0], "scale": lora[1]}
        for lora in loras
    ]


def control_object(control: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`control` (or an entry of `controls`) as the API takes it; its `image` may be anything
    `encode_image` takes."""
    if control is None:
        return None
    out = dict(control)
    out["image"] = encode_image(out.get("image"))
    return out


def submit_parts(
    prompt: str, idempotency_key: str | None, fields: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The JSON body (None fields left out: the server fills its defaults) and headers."""
    body: dict[str, Any] = {"prompt": prompt}
    body.update({name: value for name, value in fields.items() if value is not None})
    # Always keyed, so that a retried submit never queues a second job.
    return body, {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}


ImageInput: TypeAlias = "bytes | str | os.PathLike[str] | Any"


def encode_image(value: ImageInput | None) -> str | None:
    """An input image for the JSON body: PNG/JPEG/WebP bytes, a file path, a PIL image, or
    a string that already is a `data:` URI, all as base64 (the server checks the content)."""

    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, str) and value.startswith("data:"):
        return value
    elif isinstance(value, str | os.PathLike):
        with open(value, "rb") as file:
            data = file.read()
    elif hasattr(value, "save"):  # a PIL image
        import io

        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise TypeError(f"an image is bytes, a path or a PIL image, not {type(value).__name__}")
    return base64.b64encode(data).decode("ascii")


def image_fields(
    image: ImageInput | None,
    mask: ImageInput | None,
    strength: float | None,
    outpaint: Mapping[str, int] | None,
) -> dict[str, Any]:
    return {
        "image": encode_image(image),
        "mask": encode_image(mask),
        "strength": strength,
        "outpaint": dict(outpaint) if outpaint is not None else None,
    }


# -- answers ------------------------------------------------------------------------------------
def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        seconds = email.utils.mktime_tz(parsed) - time.time()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def error_from_response(response: httpx.Response) -> APIError:
    """The typed error for a 4xx/5xx answer; the body must have been read."""
    code: str | None = None
    message = ""
    details: list[dict[str, Any]] = []
    try:
        envelope = response.json()
    except ValueError:
        envelope = None
    if isinstance(envelope, dict) and isinstance(envelope.get("error"), dict):
        error = envelope["error"]
        code = str(error["code"]) if error.get("code") is not None else None
        message = str(error.get("message") or "")
        raw_details = error.get("details")
        if isinstance(raw_details, list):
            details = [d for d in raw_details if isinstance(d, dict)]
    if not message:
        text = response.text.strip()
        message = f"HTTP {response.status_code}" + (f": {text[:200]}" if text else "")
    cls = ERRORS_BY_CODE.get(code or "") or ERRORS_BY_STATUS.get(response.status_code, APIError)
    return cls(
        message,
        status_code=response.status_code,
        code=code,
        details=details,
        request_id=response.headers.get("X-Request-ID"),
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


def transport_error(exc: httpx.TransportError, request: httpx.Request) -> TransportError:
    """The SDK's error for an httpx transport failure (chain the original with `from`)."""
    target = f"{request.method} {request.url}"
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeout(f"{type(exc).__name__} on {target}: {exc}")
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return NetworkError(f"{type(exc).__name__} on {target}: {exc}")
    return TransportError(f"{type(exc).__name__} on {target}: {exc}")


def job_from_response(response: httpx.Response) -> Job:
    return Job.from_dict(response.json())


def outcome(job: Job) -> Job:
    """A succeeded job; a failed or canceled one raises."""
    if job.status == "failed":
        error = job.error
        raise JobFailed(
            f"job {job.id} failed: {error.message if error else 'no reason given'}",
            job,
            code=error.code if error else None,
        )
    if job.status == "canceled":
        raise JobCanceled(f"job {job.id} was canceled", job)
    return job


def at_deadline(job: Job, deadline: Deadline | None) -> Event:
    """The job as read when the wait's time ran out: its terminal event if it finished just
    then (or before: `timeout=0` just checks), else `WaitTimeout`."""
    if job.is_terminal:
        return Event(cast(EventName, job.status), job)
    waited = f" after {deadline.seconds:g} s" if deadline is not None else ""
    raise WaitTimeout(f"job {job.id} still {job.status}{waited}", job, code="timeout")


# -- time ---------------------------------------------------------------------------------------
class Deadline:
    """A point in monotonic time; `None` deadlines are represented by not having one."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(self._at - time.monotonic(), 0.0)

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._at

    @classmethod
    def after(cls, seconds: float | None) -> Deadline | None:
        return None if seconds is None else cls(seconds)


def poll_delays(deadline: Deadline | None) -> Iterator[float]:
    """Waits between polls: growing from POLL_FIRST_S to POLL_MAX_S, never past `deadline`."""
    delay = POLL_FIRST_S
    while True:
        yield delay if deadline is None else min(delay, deadline.remaining())
        delay = min(delay * 1.5, POLL_MAX_S)


# -- Server-Sent Events -------------------------------------------------------------------------
EVENT_NAMES = frozenset(
    {"queued", "running", "progress", "preview", "succeeded", "failed", "canceled"}
)


def check_event_stream(response: httpx.Response) -> None:
    """Refuse a 200 that is not an event stream (a buffering proxy, an old server)."""
    content_type = response.headers.get("Content-Type", "")
    if not content_type.startswith("text/event-stream"):
        raise TransportError(
            f"GET {response.request.url} answered {content_type or 'no content type'!r}, "
            "not text/event-stream"
        )


class SSEDecoder:
    """Turns the lines of a `text/event-stream` into job events (WHATWG SSE rules)."""

    def __init__(self) -> None:
        self._name = ""
        self._data: list[str] = []
        self._job: Job | None = None  # the last document: what a preview event refers to

    def feed(self, line: str) -> Event | None:
        """Take one line (without its line break); return an event when one is complete."""
        if line == "":
            return self._dispatch()
        if line.startswith(":"):  # a comment: the server's keep-alive ping
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._name = value
        elif name == "data":
            self._data.append(value)
        return None  # `id` and `retry` are of no use: a reconnect gets the current state

    def _dispatch(self) -> Event | None:
        name, data = self._name or "message", self._data
        self._name, self._data = "", []
        if not data:
            return None
        try:
            document = json.loads("\n".join(data))
            if name == "preview":
                preview = Preview(step=int(document["step"]), image=str(document["image"]))
                if self._job is None:
                    return None
                return Event("preview", self._job, preview)
            job = Job.from_dict(document)
            self._job = job
        except (ValueError, KeyError, TypeError) as exc:
            raise TransportError(
                f"malformed {name!r} event in the job's event stream: {exc}"
            ) from exc
        if name not in EVENT_NAMES:
            log.debug("ignoring unknown event %r", name)
            return None
        return Event(cast(EventName, name), job)


# A stream's connection is not reused: it may be cut at a deadline (see Client._stream).
SSE_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-cache", "Connection": "close"}


def same_state(a: Event | None, b: Event) -> bool:
    """Whether `b` repeats `a`, as the first event after a reconnect may."""
    return (
        a is not None
        and a.name == b.name
        and a.job.status == b.job.status
        and a.job.progress.step == b.job.progress.step
    )


class EventStreamState:
    """The reconnect logic of one job's event stream, shared by both clients.

    The server sends the current state first on every connection, so reconnecting loses
    nothing; the repeated state is dropped here. Connections that fail (or that the server
    closes early) are retried with backoff up to the retry policy's `max_retries` in a row.
    """

    def __init__(self, config: ClientConfig, deadline: Deadline | None) -> None:
        self.config = config
        self.deadline = deadline
        self.last: Event | None = None
        self.failures = 0

    @property
    def expired(self) -> bool:
        return self.deadline is not None and self.deadline.expired

    def timeout(self) -> httpx.Timeout:
        """The timeout of the next connection: no read blocks past the deadline."""
        return self.config.stream_timeout(self.deadline)

    def accept(self, event: Event) -> bool:
        """Whether to hand `event` on (a repeat after a reconnect is not)."""
        if event.preview is not None:
            return True
        if same_state(self.last, event):
            return False
        self.last, self.failures = event, 0
        return True

    def reconnect_delay(self, error: ImagegenError | None) -> float:
        """The wait before reconnecting after a connection ended without a terminal event
        (`error` None: the server closed it). Raises when it is time to give up."""
        if self.expired:
            return 0.0
        if error is not None and not isinstance(error, NetworkError | RequestTimeout):
            raise error
        self.failures += 1
        if self.failures > self.config.retry.max_retries:
            raise error or NetworkError("the event stream ended before the job finished")
        return self.config.retry.backoff(self.failures - 1)


def log_retry(request: httpx.Request, reason: str, delay: float, attempt: int) -> None:
    log.info(
        "%s %s: %s; retry %d in %.2f s", request.method, request.url.path, reason, attempt, delay
    )
