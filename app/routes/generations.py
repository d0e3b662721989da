"""`/v1/generations`: submit, read, download and cancel generation jobs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse
from fastapi.sse import EventSourceResponse

from app.auth import PrincipalDep
from app.deps import MemoryDep, ServiceDep
from app.events import open_stream
from app.images_in import limit_body_without_images
from app.schemas import GenerationRequest, JobDocument
from imagegen.core.settings import GatewaySettings

router = APIRouter(prefix="/v1/generations", tags=["generations"])

# Any string is accepted here and checked against the id format before it reaches Redis, so a
# malformed or oversized id is simply an unknown one (404).
JobId = Path(description="The job id returned at submit.")


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobDocument,
    responses={200: {"model": JobDocument, "description": "Replay of an Idempotency-Key."}},
    dependencies=[Depends(limit_body_without_images)],
)
async def submit_generation(
    body: GenerationRequest,
    service: ServiceDep,
    principal: PrincipalDep,
    memory: MemoryDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Same key + same body within 24 h returns the first job (200).",
        ),
    ] = None,
) -> JobDocument:
    """Queue a generation job."""
    await memory.check()  # before Redis is too full to take the job's results
    document, created = await service.submit(body, principal.name, idempotency_key)
    response.headers["Location"] = f"/v1/generations/{document.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return document


@router.get("/{job_id}", response_model=JobDocument)
async def get_generation(
    service: ServiceDep, principal: PrincipalDep, job_id: str = JobId
) -> JobDocument:
    """The job document: status, queue position, progress, images, error, timings."""
    return await service.get(job_id, principal.name)


@router.get(
    "/{job_id}/images/{index}",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
            "description": "The image, in the job's `output_format`.",
        },
        307: {"description": "IMAGEGEN_STORAGE_PRESIGN: the image at a presigned store URL."},
    },
)
async def get_generation_image(
    service: ServiceDep,
    principal: PrincipalDep,
    job_id: str = JobId,
    index: int = Path(ge=0, le=1024),
) -> Response:
    """Download image `index` of a succeeded job: a PNG with a `parameters` text chunk, or the
    JPEG/WebP the job asked for, with the parameters in EXIF and XMP. Streamed from the result
    store; with IMAGEGEN_STORAGE_PRESIGN, a 307 to a presigned URL of the store."""
    blob, body = await service.image_download(job_id, index, principal.name)
    if isinstance(body, str):
        return RedirectResponse(body, status_code=307)
    extension = blob.media_type.split("/")[-1]
    return StreamingResponse(
        body,
        media_type=blob.media_type,
        headers={"Content-Disposition": f'inline; filename="{job_id}-{index}.{extension}"'},
    )


@router.delete("/{job_id}", response_model=JobDocument)
async def cancel_generation(
    service: ServiceDep, principal: PrincipalDep, job_id: str = JobId
) -> JobDocument:
    """Cancel a queued job at once, a running one at its next step; finished: unchanged."""
    return await service.cancel(job_id, principal.name)


async def _existing_job(
    service: ServiceDep, principal: PrincipalDep, job_id: str = JobId
) -> JobDocument:
    # Runs before the stream opens, so an unknown id is a plain 404, not a broken stream.
    return await service.get(job_id, principal.name)


@router.get(
    "/{job_id}/events",
    # The stream is formatted by app.events (once per job for all listeners), not by
    # FastAPI's per-stream SSE encoder; the schema of its events is set in app.main.
    response_class=Response,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Successful Response"}},
)
async def stream_generation_events(
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    first: Annotated[JobDocument, Depends(_existing_job)],
    job_id: str = JobId,
    previews: Annotated[
        Literal["true", "false"],
        Query(
            description='Add `preview` events: `{"step", "image": "data:image/jpeg;'
            'base64,..."}`, a small picture of the current estimate, at most one every '
            "IMAGEGEN_PREVIEW_INTERVAL_S.",
        ),
    ] = "false",
) -> EventSourceResponse:
    """Server-Sent Events: the current state, every transition and progress, then the end."""
    settings: GatewaySettings = request.app.state.settings
    return open_stream(
        request.app.state.events,
        principal.name,
        settings.max_streams_per_key,
        first.id,
        service.read_for_events,
        previews == "true",
    )
