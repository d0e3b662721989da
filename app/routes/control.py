"""`POST /v1/control/preprocess`: see the control map a job would use before generating (A1111's
"preview annotator"). The map is made where every preprocessor runs, in a worker of the model:
the request is a small job on that model's queue (task "preprocess", admitted and counted as
any job), and the answer is its one image."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from app.auth import PrincipalDep
from app.deps import MemoryDep, ServiceDep
from app.events import EventHub
from app.images_in import limit_body_without_images
from app.schemas import PreprocessRequest
from app.waiting import CLIENT_CLOSED_REQUEST, job_failure, wait_for_job
from imagegen.core.contract import JobStatus

router = APIRouter(prefix="/v1/control", tags=["control"])


@router.post(
    "/preprocess",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The control map (PNG)."}},
    dependencies=[Depends(limit_body_without_images)],
)
async def preprocess(
    body: PreprocessRequest,
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    memory: MemoryDep,
) -> Response:
    """The control map of `image` through `preprocess` at the output size, as a PNG; the
    header `X-Job-Id` names the job that made it."""
    await memory.check()
    job = await service.preprocess(body, principal.name)
    hub: EventHub = request.app.state.events
    done = await wait_for_job(request, service, hub, job, principal.name)
    if done is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if done.status != JobStatus.SUCCEEDED:
        raise job_failure(done)
    png = await service.image(done.id, 0, principal.name)
    return Response(png, media_type="image/png", headers={"X-Job-Id": done.id})
