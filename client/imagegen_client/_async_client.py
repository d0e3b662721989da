"""The asynchronous client: `Client`'s API with `await` (asyncio or trio, through anyio)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import anyio
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
from ._trainings import AsyncTrainings
from ._types import Event, GeneratedImage, Generation, Job, Model, Usage

_C = TypeVar("_C", bound="AsyncClient")
# One name for every wait, so that tests can skip the waiting.
_sleep = anyio.sleep


class AsyncClient:
    """An asynchronous client of the imagegen API; the same methods as `Client`, awaited.

    `stream()` is an async iterator; to leave it early, close it
    (`async with contextlib.aclosing(client.stream(job)) as events: ...`). Close the client
    with `await client.aclose()`, or use it in `async with`.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int | None = None,
        retry_policy: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._config = ClientConfig.resolve(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            retry_policy=retry_policy,
        )
        self._http = httpx.AsyncClient(
            base_url=self._config.base_url,
            headers=self._config.headers(),
            timeout=self._config.timeout,
            transport=transport,
        )
        # Fine-tuning, as `Client.trainings`, awaited.
        self.trainings = AsyncTrainings(self._http, self._send)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- generation jobs ------------------------------------------------------------------------
    async def submit(
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
        response = await self._request("POST", GENERATIONS, json=body, headers=headers)
        return job_from_response(response)

    async def get(self, job: JobRef) -> Job:
        """The job's current document."""
        return job_from_response(await self._request("GET", job_path(job)))

    async def cancel(self, job: JobRef) -> Job:
        """Cancel a queued or running job; a finished one is returned unchanged."""
        return job_from_response(await self._request("DELETE", job_path(job)))

    async def download(self, job: JobRef, index: int = 0) -> bytes:
        """The file of image `index` of a succeeded job: PNG bytes, or the job's `output_format`."""
        response = await self._request(
            "GET", image_path(job, index), headers={"Accept": "image/png, image/jpeg, image/webp"}
        )
        return response.content

    def stream(self, job: JobRef, *, previews: bool = False) -> AsyncGenerator[Event, None]:
        """The job's events (`queued`, `running`, `progress`, ...) up to and including the
        terminal one; the current state comes first. Reconnects if the connection drops.
        With `previews`, `preview` events too (`event.preview`: a small JPEG of the current
        estimate, at most one every IMAGEGEN_PREVIEW_INTERVAL_S)."""
        return self._stream(job, None, previews)

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> Job:
        """Wait until the job finishes and return it. Raises `JobFailed`, `JobCanceled`, or
        `WaitTimeout` after `timeout` seconds (the job goes on). Follows the event stream,
        falling back to polling where the stream is not available."""
        deadline = Deadline.after(timeout)
        # The scope ends a read blocked on a quiet stream right at the deadline.
        with anyio.move_on_after(timeout):
            try:
                events = self._stream(job, deadline)
                async with contextlib.aclosing(events):
                    async for event in events:
                        if event.job.is_terminal:
                            return outcome(event.job)
            except (APIError, TransportError) as exc:
                log.info("event stream unavailable (%s); polling instead", exc)
            return await self._poll(job, deadline)
        return outcome(at_deadline(await self.get(job), deadline).job)

    async def generate(
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
        job = await self.submit(
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
            done = await self.wait(job, timeout=timeout)
        except WaitTimeout:
            with contextlib.suppress(ImagegenError):  # the timeout is the error to report
                await self.cancel(job)
            raise
        images = [
            GeneratedImage(
                ref.index, ref.seed, ref.width, ref.height, await self.download(done, ref.index)
            )
            for ref in done.images
            if not ref.filtered  # withheld by the safety checker: nothing to download
        ]
        return Generation(done, images)

    async def usage(self) -> Usage:
        """This API key's use of its limits today (UTC): megapixel-steps against the daily
        quota, jobs queued or running against `max_active_jobs`, jobs that ended."""
        return Usage.from_dict((await self._request("GET", USAGE)).json())

    async def models(self) -> list[Model]:
        """The models the service offers, with their defaults and live workers."""
        data = (await self._request("GET", MODELS)).json()
        return [Model.from_dict(entry) for entry in data["data"]]

    # -- plumbing -------------------------------------------------------------------------------
    async def _stream(
        self, job: JobRef, deadline: Deadline | None, previews: bool = False
    ) -> AsyncGenerator[Event, None]:
        state = EventStreamState(self._config, deadline)
        while True:
            if state.expired:
                yield at_deadline(await self.get(job), deadline)
                return
            error: TransportError | None = None
            try:
                request = self._http.build_request(
                    "GET",
                    events_path(job, previews),
                    headers=SSE_HEADERS,
                    timeout=state.timeout(),
                )
                response = await self._send(request, stream=True)
                try:
                    check_event_stream(response)
                    decoder = SSEDecoder()
                    async for line in response.aiter_lines():
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
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
            except TransportError as exc:
                error = exc
            await _sleep(state.reconnect_delay(error))

    async def _poll(self, job: JobRef, deadline: Deadline | None) -> Job:
        delays = poll_delays(deadline)
        while True:
            current = await self.get(job)
            if current.is_terminal:
                return outcome(current)
            if deadline is not None and deadline.expired:
                return outcome(at_deadline(current, deadline).job)
            await _sleep(next(delays))

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return await self._send(self._http.build_request(method, path, json=json, headers=headers))

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send with the retry policy; a 2xx response, or the typed error."""
        retry = self._config.retry
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=stream)
                if not response.is_success:
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
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
            await _sleep(delay)
