"""`POST /v1/images/generations`: OpenAI's image API over this service's generation jobs.

The body becomes an ordinary GenerationRequest, queued through GenerationService like any other
job, and the request then waits for that job: the EventHub says when it ends, so no thread is
held meanwhile. The job is canceled as soon as nobody can collect its images any more: the
client disconnected, the wait limit passed, or the gateway is shutting down.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from typing import Any
from urllib.parse import urljoin

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse
from pydantic import ValidationError

from app.auth import PrincipalDep
from app.capacity import MemoryGuard
from app.deps import MemoryDep, ServiceDep
from app.errors import InvalidRequest
from app.events import EventHub
from app.images_in import limit_body_without_images
from app.openai_schemas import (
    OPENAI_MODEL_PREFIXES,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    OpenAIUsage,
)
from app.openai_stream import stream_images
from app.openai_usage import openai_usage
from app.schemas import GenerationRequest, JobDocument
from app.service import GenerationService
from app.waiting import CLIENT_CLOSED_REQUEST, job_failure, wait_for_job
from imagegen.core.contract import JobStatus

log = logging.getLogger("imagegen.gateway")

router = APIRouter(prefix="/v1/images", tags=["openai"])

# At most 5 digits a side: the pixel cap rejects anything that large anyway, and int() of an
# unbounded digit string is itself a cost (and a ValueError past 4300 digits).
SIZE_RE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
# OpenAI's `quality` as a share of the model's default steps (explicit `steps` win).
QUALITY_STEPS = {"low": 0.5, "high": 1.5, "hd": 1.5}
# How many images the model's safety checker withheld from `data` (absent: none).
FILTERED_HEADER = "X-Imagegen-Filtered"


# With `stream: true` the answer is Server-Sent Events (app.openai_stream).
STREAMED = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "The images, or with `stream: true` their events.",
    }
}


@router.post(
    "/generations",
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(limit_body_without_images)],
    responses=STREAMED,  # type: ignore[arg-type]
)
async def create_image(
    body: OpenAIImageRequest,
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    memory: MemoryDep,
) -> OpenAIImagesResponse | Response:
    """Generate images and answer with them once done (OpenAI's `images.generate`)."""
    return await answer_when_done(request, service, principal.name, memory, body)


async def answer_when_done(
    request: Request,
    service: GenerationService,
    owner: str,
    memory: MemoryGuard,
    body: OpenAIImageRequest,
) -> OpenAIImagesResponse | Response:
    """Submit `body` as a job, wait for it and answer in OpenAI's shape (generations and
    edits alike)."""
    generation = to_generation_request(body)
    await memory.check()
    job = await _submit(service, generation, owner, body.size is not None, body.quality)
    hub: EventHub = request.app.state.events
    if body.stream:
        kind = "image_edit" if request.url.path.endswith("/edits") else "image_generation"
        common = {
            "background": body.background or "auto",
            "quality": body.quality or "auto",
            "output_format": body.output_format or "png",
            "size": body.size or "auto",
        }

        events = stream_images(service, hub, job, owner, kind, body.partial_images or 0, common)
        return EventSourceResponse(events, headers={"Cache-Control": "no-cache"})
    done = await wait_for_job(request, service, hub, job, owner)
    if done is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if done.status != JobStatus.SUCCEEDED:
        raise job_failure(done)
    # Images the model's safety checker withheld are left out of `data`; the header counts them.
    shown = [image for image in done.images if not image.filtered]
    if body.response_format == "url":
        # The job document's link, made absolute against this request's base URL (which
        # carries any root_path), so the link format stays defined in one place.
        base = str(request.base_url)
        data = [OpenAIImage(url=urljoin(base, image.url.lstrip("/"))) for image in shown]
    else:
        files = [await service.image(done.id, image.index, owner) for image in shown]
        data = [OpenAIImage(b64_json=base64.b64encode(file).decode("ascii")) for file in files]
    first = done.images[0] if done.images else None
    answer = OpenAIImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=body.output_format,
        quality=body.quality,
        size=f"{first.width}x{first.height}" if first is not None else None,
        usage=OpenAIUsage.model_validate(await openai_usage(service, done)),
    )
    if len(shown) == len(done.images):
        return answer
    return JSONResponse(
        answer.model_dump(exclude_none=True),
        headers={FILTERED_HEADER: str(len(done.images) - len(shown))},
    )


def to_generation_request(body: OpenAIImageRequest) -> GenerationRequest:
    """This API's request for an OpenAI body; GenerationRequest's rules apply, naming `size`
    where the width or height came from it."""
    width = height = None
    if body.size is not None and body.size != "auto":
        match = SIZE_RE.fullmatch(body.size)
        if match is None:
            raise InvalidRequest.for_field(
                "size", f'must be "WIDTHxHEIGHT" (e.g. "512x512") or "auto", not {body.size!r}'
            )
        width, height = int(match[1]), int(match[2])
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "width": width,
        "height": height,
        "steps": body.steps,
        "guidance_scale": body.guidance_scale,
        "seed": body.seed,
        "n": body.n,
        "scheduler": body.scheduler,
        "model": body.model,
        "image": body.image,
        "strength": body.strength,
        "mask": body.mask,
        "outpaint": body.outpaint,
        "loras": body.loras,
        "control": body.control,
        "controls": body.controls,
        "output_format": body.output_format,
        # OpenAI takes a compression with any format; PNG is lossless, so it has none.
        "output_compression": (
            body.output_compression if body.output_format in ("jpeg", "webp") else None
        ),
    }
    try:
        # Unset fields are left out, so GenerationRequest's defaults are the only defaults.
        return GenerationRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        # Raised as FastAPI's own validation error, so the envelope is the one every 422 has.
        raise RequestValidationError([_as_body_error(e, body.size) for e in exc.errors()]) from exc


def _as_body_error(error: Any, size: str | None) -> dict[str, Any]:
    """A GenerationRequest error located in the OpenAI body: width/height problems are `size`'s."""
    loc = tuple(error["loc"])
    if loc and loc[0] in ("width", "height"):
        message = f"{loc[0]} of {size!r}: {error['msg']}"
        return {**error, "loc": ("body", "size"), "msg": message}
    return {**error, "loc": ("body", *loc)}


async def _submit(
    service: GenerationService,
    request: GenerationRequest,
    owner: str,
    size_given: bool,
    quality: str | None = None,
) -> JobDocument:
    """Queue the job."""
    model = request.model
    # Code written for OpenAI names an OpenAI model, meaning "the image model": it gets this
    # server's default, unless a model here really is served under that name.
    if (
        model is not None
        and model.startswith(OPENAI_MODEL_PREFIXES)
        and await service.registry.get(model) is None
    ):
        request = request.model_copy(update={"model": None})
    scale = QUALITY_STEPS.get(quality or "auto", 1.0)
    if scale != 1.0 and request.steps is None:
        info = await service.registry.get(request.model or service.settings.default_model)
        if info is not None:
            cap = min(info.max_steps or service.settings.max_steps, service.settings.max_steps)
            request = request.model_copy(
                update={"steps": min(max(round(info.steps * scale), 1), cap)}
            )
    try:
        job, _ = await service.submit(request, owner)
    except InvalidRequest as exc:
        # The pixel cap is checked on width and height; the client sent them as `size`.
        fields = {detail.get("field") for detail in exc.details}
        if size_given and fields & {"width", "height"}:
            message = exc.details[0]["message"]
            raise InvalidRequest.for_field("size", message) from exc
        raise
    return job
