"""The synchronous client."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ._base import (
    DEFAULT_TIMEOUT,
    GENERATIONS,
    MODELS,
    SSE_HEADERS,
    USAGE,
    ClientConfig,
    Deadline,
    EventStreamState,
    ImageInput,
    JobRef,
    RetryPolicy,
    SSEDecoder,
    TimeoutTypes,
    at_deadline,
    check_event_stream,
    control_object,
    error_from_response,
    events_path,
    image_fields,
    image_path,
    job_from_response,
    job_path,
    log,
    log_retry,
    lora_list,
    outcome,
    poll_delays,
    submit_parts,
    transport_error,
)
from ._errors import APIError, ImagegenError, TransportError, WaitTimeout
from ._trainings import Trainings
from ._types import Event, GeneratedImage, Generation, Job, Model, Usage

_C = TypeVar("_C", bound="Client")
# One name for every wait, so that tests can skip the waiting.
_sleep = time.sleep


def _cut_at(deadline: Deadline | None, response: httpx.Response) -> threading.Timer | None:
    """Shut the stream's socket at `deadline`, so that a read blocked on a quiet stream ends
    then rather than at the next keep-alive ping (a read timeout is fixed when the stream
    opens). The connection is not reused (`Connection: close`), so nothing else is cut."""
    if deadline is None:
        return None
    network_stream = response.extensions.get("network_stream")
    sock = network_stream.get_extra_info("socket") if network_stream is not None else None
    if not isinstance(sock, socket.socket):
        return None  # not a plain socket (a mock transport): the read timeout bounds the wait

    def shut() -> None:
        with contextlib.suppress(OSError):
            # socket.socket's own shutdown: SSLSocket's would drop its TLS state under the
            # reading thread's feet; this just makes the read see the end of the stream.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    timer = threading.Timer(deadline.remaining(), shut)
    timer.daemon = True
    timer.start()
    return timer


class Client:
    """A synchronous client of the imagegen API.

    `api_key` and `base_url` default to `$IMAGEGEN_API_KEY` and `$IMAGEGEN_BASE_URL` (else
    `http://127.0.0.1:8000`). `timeout` applies to each HTTP request; `max_retries` (or a full
    `retry_policy`) to 429/503 answers and connection errors. Close it, or use it in `with`.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int | None = None,
        retry_policy: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._config = ClientConfig.resolve(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            retry_policy=retry_policy,
        )
        self._http = httpx.Client(
            base_url=self._config.base_url,
            headers=self._config.headers(),
            timeout=self._config.timeout,
            transport=transport,
        )
        # Fine-tuning: create, follow and cancel trainings; their adapters.
        self.trainings = Trainings(self._http, self._send)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- generation jobs ------------------------------------------------------------------------
    def submit(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        n: int | None = None,
        scheduler: str | None = None,
        model: str | None = None,
        image: ImageInput | None = None,
        mask: ImageInput | None = None,
        strength: float | None = None,
        outpaint: Mapping[str, int] | None = None,
        loras: Sequence[Mapping[str, Any] | tuple[str, float] | str] | None = None,
        control: Mapping[str, Any] | None = None,
        controls: Sequence[Mapping[str, Any]] | None = None,
        webhook: Mapping[str, Any] | None = None,
        output_format: str | None = None,
        output_compression: int | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a generation job and return its document; None fields take the server's
        defaults. Without an `idempotency_key` one is made up, so retries never double a job.
        `webhook` (`{"url": ..., "events": [...]}`): the job's events are POSTed there, signed
        (check them with `verify_webhook`)."""
        body, headers = submit_parts(
            prompt,
            idempotency_key,
            {
                "negative_prompt": negative_prompt,
                "width": width,
                "height": height,
                "steps": steps,
                "guidance_scale": guidance_scale,
                "seed": seed,
                "n": n,
                "scheduler": scheduler,
                "model": model,
                **image_fields(image, mask, strength, outpaint),
                "loras": lora_list(loras),
                "control": control_object(control),
                "controls": [control_object(c) for c in controls] if controls is not None else None,
                "webhook": dict(webhook) if webhook is not None else None,
                "output_format": output_format,
                "output_compression": output_compression,
            },
        )
        return job_from_response(self._request("POST", GENERATIONS, json=body, headers=headers))

    def get(self, job: JobRef) -> Job:
        """The job's current document."""
        return job_from_response(self._request("GET", job_path(job)))

    def cancel(self, job: JobRef) -> Job:
        """Cancel a queued or running job; a finished one is returned unchanged."""
        return job_from_response(self._request("DELETE", job_path(job)))

    def download(self, job: JobRef, index: int = 0) -> bytes:
        """The file of image `index` of a succeeded job: PNG bytes, or the job's `output_format`."""
        return self._request(
            "GET", image_path(job, index), headers={"Accept": "image/png, image/jpeg, image/webp"}
        ).content

    def stream(self, job: JobRef, *, previews: bool = False) -> Generator[Event, None]:
        """The job's events (`queued`, `running`, `progress`, ...) up to and including the
        terminal one; the current state comes first. Reconnects if the connection drops.
        With `previews`, `preview` events too (`event.preview`: a small JPEG of the current
        estimate, at most one every IMAGEGEN_PREVIEW_INTERVAL_S)."""
        return self._stream(job, None, previews)

    def wait(self, job: JobRef, *, timeout: float | None = None) -> Job:
        """Block until the job finishes and return it. Raises `JobFailed`, `JobCanceled`, or
        `WaitTimeout` after `timeout` seconds (the job goes on). Follows the event stream,
        falling back to polling where the stream is not available."""
        deadline = Deadline.after(timeout)
        try:
            with contextlib.closing(self._stream(job, deadline)) as events:
                for event in events:
                    if event.job.is_terminal:
                        return outcome(event.job)
        except (APIError, TransportError) as exc:
            log.info("event stream unavailable (%s); polling instead", exc)
        return self._poll(job, deadline)

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        n: int | None = None,
        scheduler: str | None = None,
        model: str | None = None,
        image: ImageInput | None = None,
        mask: ImageInput | None = None,
        strength: float | None = None,
        outpaint: Mapping[str, int] | None = None,
        loras: Sequence[Mapping[str, Any] | tuple[str, float] | str] | None = None,
        control: Mapping[str, Any] | None = None,
        controls: Sequence[Mapping[str, Any]] | None = None,
        webhook: Mapping[str, Any] | None = None,
        output_format: str | None = None,
        output_compression: int | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """Submit, wait and download: the finished job and its images (PNG bytes, and PIL
        images via `.pil`). If the wait times out, the job is canceled before `WaitTimeout`."""
        job = self.submit(
            prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            n=n,
            scheduler=scheduler,
            model=model,
            image=image,
            mask=mask,
            strength=strength,
            outpaint=outpaint,
            loras=loras,
            control=control,
            controls=controls,
            webhook=webhook,
            output_format=output_format,
            output_compression=output_compression,
            idempotency_key=idempotency_key,
        )
        try:
            done = self.wait(job, timeout=timeout)
        except WaitTimeout:
            with contextlib.suppress(ImagegenError):  # the timeout is the error to report
                self.cancel(job)
            raise
        images = [
            GeneratedImage(
                ref.index, ref.seed, ref.width, ref.height, self.download(done, ref.index)
            )
            for ref in done.images
            if not ref.filtered  # withheld by the safety checker: nothing to download
        ]
        return Generation(done, images)

    def usage(self) -> Usage:
        """This API key's use of its limits today (UTC): megapixel-steps against the daily
        quota, jobs queued or running against `max_active_jobs`, jobs that ended."""
        return Usage.from_dict(self._request("GET", USAGE).json())

    def models(self) -> list[Model]:
        """The models the service offers, with their defaults and live workers."""
        data = self._request("GET", MODELS).json()
        return [Model.from_dict(entry) for entry in data["data"]]

    # -- plumbing -------------------------------------------------------------------------------
    def _stream(
        self, job: JobRef, deadline: Deadline | None, previews: bool = False
    ) -> Generator[Event, None]:
        state = EventStreamState(self._config, deadline)
        while True:
            if state.expired:
                yield at_deadline(self.get(job), deadline)
                return
            error: TransportError | None = None
            try:
                request = self._http.build_request(
                    "GET",
                    events_path(job, previews),
                    headers=SSE_HEADERS,
                    timeout=state.timeout(),
                )
                response = self._send(request, stream=True)
                watchdog = _cut_at(deadline, response)
                try:
                    check_event_stream(response)
                    decoder = SSEDecoder()
                    for line in response.iter_lines():
                        event = decoder.feed(line)
                        if event is not None and state.accept(event):
                            yield event
                            if event.job.is_terminal:
                                return
                        if state.expired:
                            break
                except httpx.TransportError as exc:
                    raise transport_error(exc, request) from exc
                finally:
                    if watchdog is not None:
                        watchdog.cancel()
                    response.close()
            except TransportError as exc:
                error = exc
            _sleep(state.reconnect_delay(error))

    def _poll(self, job: JobRef, deadline: Deadline | None) -> Job:
        delays = poll_delays(deadline)
        while True:
            current = self.get(job)
            if current.is_terminal:
                return outcome(current)
            if deadline is not None and deadline.expired:
                return outcome(at_deadline(current, deadline).job)
            _sleep(next(delays))

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return self._send(self._http.build_request(method, path, json=json, headers=headers))

    def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send with the retry policy; a 2xx response, or the typed error."""
        retry = self._config.retry
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=stream)
                if not response.is_success:
                    with contextlib.closing(response):
                        response.read()
            except httpx.TransportError as exc:
                delay = retry.delay(request, attempt, exception=exc)
                if delay is None:
                    raise transport_error(exc, request) from exc
                reason = type(exc).__name__
            else:
                if response.is_success:
                    return response
                error = error_from_response(response)
                delay = retry.delay(request, attempt, error=error)
                if delay is None:
                    raise error
                reason = f"{response.status_code} {error.code}"
            attempt += 1
            log_retry(request, reason, delay, attempt)
            _sleep(delay)
