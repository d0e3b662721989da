"""Waiting for a job inside one request (the OpenAI and AUTOMATIC1111 endpoints answer with the
images): no thread is held (the EventHub says when the job ends), and the job is canceled as
soon as nobody can collect its images (the client left, the wait limit passed, shutdown)."""

from __future__ import annotations

import logging

import anyio
from fastapi import Request

from app.errors import ApiError, Conflict, Unavailable
from app.events import RESYNC_S, EventHub
from app.schemas import ErrorInfo, JobDocument
from app.service import GenerationService
from imagegen.core.contract import JobSpec, JobStatus

log = logging.getLogger("imagegen.gateway")

# A job that failed for one of these reasons may succeed when tried again: 503, which clients
# (the openai package included) retry. Any other failure is the service's fault: 500.
RETRYABLE_JOB_ERRORS = frozenset({"out_of_memory", "worker_lost", "timeout"})
# The answer to a client that has already gone, so nobody receives it; 499 is nginx's code
# for that case, should a middleware or a log see it.
CLIENT_CLOSED_REQUEST = 499


async def wait_for_job(
    request: Request, service: GenerationService, hub: EventHub, job: JobDocument, owner: str
) -> JobDocument | None:
    """The job's final document, or None when the client left (the job is then canceled).

    The wait is limited by the job's own time limit, which already allows for queueing; past
    it the job is canceled and the client gets a 503.
    """
    # The time limit depends on the work only (steps, size, n): adapters do not change it.
    work = job.request.model_dump(exclude={"loras", "control", "controls"})
    limit_s = service.job_timeout_s(JobSpec.model_validate(work))
    disconnected = False
    finished: JobDocument | None = None
    failure: Exception | None = None

    async def watch_for_disconnect(scope: anyio.CancelScope) -> None:
        nonlocal disconnected
        # The body has been read, so the next ASGI message can only be the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        scope.cancel()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(watch_for_disconnect, group.cancel_scope)
            try:
                with anyio.move_on_after(limit_s):
                    finished = await _until_terminal(service, hub, job.id, owner)
            except Exception as exc:
                # Raised past the task group it would come out as an ExceptionGroup, which no
                # error handler matches (a Redis outage must stay a 503, not become a 500).
                failure = exc
            group.cancel_scope.cancel()
        if failure is not None:
            raise failure
    except BaseException:
        # Shutdown or a Redis error mid-wait: nobody will collect the images.
        with anyio.CancelScope(shield=True):
            await _cancel_quietly(service, job.id, owner)
        raise
    if finished is not None:
        return finished
    # Canceling a job that ended meanwhile returns it unchanged, and then its result stands.
    final = await service.cancel(job.id, owner)
    if disconnected:
        log.info("client left while waiting for job %s; it is %s", job.id, final.status)
        return None
    if final.status == JobStatus.CANCELED:
        raise Unavailable(
            f"generation job {job.id} did not finish within {limit_s} s (the service is busy); "
            "it was canceled. Retry later, or ask for fewer images, pixels or steps"
        )
    return final


async def _until_terminal(
    service: GenerationService, hub: EventHub, job_id: str, owner: str
) -> JobDocument:
    """Wait, without holding a thread, until the job succeeded, failed or was canceled."""
    # Listening starts before the first read, so an end between the two is not missed.
    async with hub.listen(job_id) as messages:
        while True:
            doc = await service.get(job_id, owner)
            if JobStatus(doc.status).is_terminal:
                return doc
            # Messages name the new status or "progress"; only an end is worth a read. A lost
            # message costs at most RESYNC_S, after which the document is read anyway.
            with anyio.move_on_after(RESYNC_S):
                while not _is_terminal_name(await messages.get()):
                    pass


def _is_terminal_name(name: str) -> bool:
    return name in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


async def _cancel_quietly(service: GenerationService, job_id: str, owner: str) -> None:
    try:
        await service.cancel(job_id, owner)
    except Exception:  # the error already under way is the one to report
        log.warning("could not cancel abandoned job %s", job_id, exc_info=True)


def job_failure(job: JobDocument) -> ApiError:
    """The error envelope for a job that ended without images."""
    if job.status == JobStatus.CANCELED:
        # Someone canceled it (DELETE /v1/generations/{id}): the request itself was fine.
        return Conflict(f"generation job {job.id} was canceled before it finished")
    error = job.error or ErrorInfo(code="internal", message="no reason was recorded")
    message = f"generation job {job.id} failed ({error.code}): {error.message}"
    if error.code in RETRYABLE_JOB_ERRORS:
        return Unavailable(message)
    return ApiError(message)
