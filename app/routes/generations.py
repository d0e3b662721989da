"""`/v1/generations`: submit, read, download and cancel generation jobs."""

from __future__ import annotations

from fastapi import APIRouter, Path, Response, status

from app.deps import ServiceDep
from app.schemas import GenerationRequest, JobDocument

router = APIRouter(prefix="/v1/generations", tags=["generations"])

# Any string is accepted here and checked against the id format before it reaches Redis, so a
# malformed or oversized id is simply an unknown one (404).
JobId = Path(description="The job id returned at submit.")


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobDocument)
def submit_generation(
    body: GenerationRequest, service: ServiceDep, response: Response
) -> JobDocument:
    """Queue a generation job."""
    document = service.submit(body)
    response.headers["Location"] = f"/v1/generations/{document.id}"
    return document


@router.get("/{job_id}", response_model=JobDocument)
def get_generation(service: ServiceDep, job_id: str = JobId) -> JobDocument:
    """The job document: status, queue position, progress, images, error, timings."""
    return service.get(job_id)


@router.get(
    "/{job_id}/images/{index}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG image."}},
)
def get_generation_image(
    service: ServiceDep, job_id: str = JobId, index: int = Path(ge=0, le=1024)
) -> Response:
    """Download image `index` of a succeeded job (a PNG with a `parameters` text chunk)."""
    png = service.image(job_id, index)
    return Response(
        png,
        media_type="image/png",
        headers={"Content-Disposition": f'inline; filename="{job_id}-{index}.png"'},
    )


@router.delete("/{job_id}", response_model=JobDocument)
def cancel_generation(service: ServiceDep, job_id: str = JobId) -> JobDocument:
    """Cancel a queued job; a finished job is returned unchanged."""
    return service.cancel(job_id)
