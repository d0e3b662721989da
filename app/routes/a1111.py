"""`/sdapi/v1`: AUTOMATIC1111's API for the apps that speak it (Open WebUI, SillyTavern,
LibreChat's SD tool, `webuiapi` scripts), as a thin translation onto the same jobs (app.a1111):
queue, fair use, keys and limits apply as to any other request.

The checkpoint (`options.sd_model_checkpoint`) is per API key, never a global switch that
changes other users' jobs; `progress`, `interrupt` and `skip` are about the key's latest job.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from app.a1111 import (
    SAMPLERS,
    A1111Error,
    A1111Request,
    a1111_location,
    info,
    infotext,
    parameters_text,
    parse_infotext,
    to_generation,
)
from app.auth import PrincipalDep
from app.deps import MemoryDep, RegistryDep, ServiceDep
from app.errors import InvalidRequest, NotFound
from app.events import EventHub
from app.png_text import with_text
from app.schemas import GenerationRequest
from app.service import GenerationService
from app.waiting import CLIENT_CLOSED_REQUEST, job_failure, wait_for_job
from imagegen.core.contract import JobStatus, Keys
from imagegen.core.image_metadata import carried_parameters
from imagegen.core.store import as_text

router = APIRouter(
    prefix="/sdapi/v1",
    tags=["automatic1111"],
    responses={"4XX": {"model": A1111Error, "description": "Client error (A1111's shape)."}},
)


@router.post("/txt2img")
async def txt2img(
    body: A1111Request,
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    memory: MemoryDep,
) -> Any:
    """A1111's text-to-image: waits for the job and answers `{images, parameters, info}`."""
    return await _generate(body, request, service, principal.name, memory, img2img=False)


@router.post("/img2img")
async def img2img(
    body: A1111Request,
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    memory: MemoryDep,
) -> Any:
    """A1111's image-to-image and inpainting (`init_images`, `denoising_strength`, `mask`)."""
    return await _generate(body, request, service, principal.name, memory, img2img=True)


async def _generate(
    body: A1111Request,
    request: Request,
    service: GenerationService,
    owner: str,
    memory: Any,
    img2img: bool,
) -> Any:
    fields = to_generation(body, await _checkpoint(service, owner), img2img)
    try:
        generation = GenerationRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *a1111_location(tuple(e["loc"])))} for e in exc.errors()]
        ) from exc
    await memory.check()
    job, _ = await service.submit(generation, owner)
    await service.redis.hset(Keys.a1111(owner), "job", job.id)
    hub: EventHub = request.app.state.events
    done = await wait_for_job(request, service, hub, job, owner)
    if done is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if done.status != JobStatus.SUCCEEDED:
        raise job_failure(done)
    document = done.model_dump(mode="json")
    images = []
    for position, image in enumerate(done.images):
        if image.filtered:
            continue
        png = await service.image(done.id, image.index, owner)
        # A1111's "PNG Info" reads the `parameters` chunk as its infotext.
        png = with_text(png, "parameters", infotext(document, position))
        images.append(base64.b64encode(png).decode("ascii"))
    raw = body.model_dump(exclude={"init_images", "mask"})
    return {"images": images, "parameters": raw, "info": info(document, raw)}


async def _checkpoint(service: GenerationService, owner: str) -> str | None:
    value = await service.redis.hget(Keys.a1111(owner), "model")
    return as_text(value) if value else None


@router.get("/sd-models")
async def sd_models(registry: RegistryDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    """The models workers serve, as A1111's checkpoints."""
    return [
        {
            "title": s.info.id,
            "model_name": s.info.id,
            "hash": None,
            "sha256": None,
            "filename": s.info.id,
            "config": None,
        }
        for s in await registry.statuses()
    ]


@router.get("/options")
async def get_options(service: ServiceDep, principal: PrincipalDep) -> dict[str, Any]:
    """This key's options: its checkpoint (the default model until it chose one)."""
    model = await _checkpoint(service, principal.name) or service.settings.default_model
    return {"sd_model_checkpoint": model, "sd_checkpoint_hash": None}


@router.post("/options")
async def set_options(
    options: dict[str, Any], service: ServiceDep, principal: PrincipalDep
) -> None:
    """Set this key's checkpoint; other options are accepted and have no effect here."""
    model = options.get("sd_model_checkpoint")
    if model is None:
        return
    known = await service.registry.model_ids()
    if not isinstance(model, str) or model not in known:
        raise InvalidRequest.for_field(
            "sd_model_checkpoint", f"unknown model {model!r}; one of: {', '.join(known)}"
        )
    await service.redis.hset(Keys.a1111(principal.name), "model", model)


@router.get("/samplers")
async def samplers(principal: PrincipalDep) -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [ours], "options": {}} for name, ours in SAMPLERS.items()]


@router.get("/schedulers")
async def schedulers(principal: PrincipalDep) -> list[dict[str, Any]]:
    return [
        {"name": "automatic", "label": "Automatic", "aliases": None},
        {"name": "karras", "label": "Karras", "aliases": None},
    ]


@router.get("/loras")
async def loras(service: ServiceDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    """The LoRAs of this key's checkpoint (`<lora:name:weight>` in a prompt)."""
    model = await _checkpoint(service, principal.name) or service.settings.default_model
    info_ = await service.registry.get(model)
    adapters = info_.adapters if info_ is not None else []
    return [{"name": a.id, "alias": a.id, "path": a.id, "metadata": {}} for a in adapters]


@router.get("/sd-vae")
async def sd_vae(principal: PrincipalDep) -> list[dict[str, Any]]:
    return []


@router.get("/upscalers")
async def upscalers(principal: PrincipalDep) -> list[dict[str, Any]]:
    return []


@router.get("/scripts")
async def scripts(principal: PrincipalDep) -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/progress")
async def progress(service: ServiceDep, principal: PrincipalDep) -> dict[str, Any]:
    """This key's latest `/sdapi/v1` job: its progress (0..1), what is left, 0 when none runs."""
    job = await _latest(service, principal.name)
    running = job is not None and not JobStatus(job.status).is_terminal
    fraction = 0.0
    eta = 0.0
    if job is not None and running and job.progress.total_steps:
        fraction = job.progress.step / job.progress.total_steps
        eta = job.progress.eta_s or 0.0
    return {
        "progress": round(fraction, 4),
        "eta_relative": eta,
        "state": {
            "skipped": False,
            "interrupted": job is not None and job.status == JobStatus.CANCELED,
            "job": job.id if running and job is not None else "",
            "job_count": 1 if running else 0,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "job_no": 0,
            "sampling_step": job.progress.step if running and job is not None else 0,
            "sampling_steps": job.progress.total_steps if running and job is not None else 0,
        },
        "current_image": None,
        "textinfo": None,
    }


@router.post("/interrupt")
async def interrupt(service: ServiceDep, principal: PrincipalDep) -> None:
    """Cancel this key's latest job (a running one stops at its next step)."""
    job = await _latest(service, principal.name)
    if job is not None:
        await service.cancel(job.id, principal.name)


@router.post("/skip")
async def skip(service: ServiceDep, principal: PrincipalDep) -> None:
    await interrupt(service, principal)


async def _latest(service: GenerationService, owner: str) -> Any:
    job_id = await service.redis.hget(Keys.a1111(owner), "job")
    if not job_id:
        return None
    try:
        return await service.get(as_text(job_id), owner)
    except NotFound:
        return None


class PngInfoRequest(BaseModel):
    image: str = Field(
        max_length=64 * 1024 * 1024, description="A PNG, JPEG or WebP, base64 or data URL."
    )


@router.post("/png-info")
async def png_info(body: PngInfoRequest, principal: PrincipalDep) -> dict[str, Any]:
    """The generation parameters an image of this service carries (PNG chunk, or EXIF for JPEG
    and WebP), as A1111's infotext. Only headers and text chunks are read, never the pixels."""
    text = await anyio.to_thread.run_sync(_parameters_chunk, body.image)
    if text is None:
        return {"info": "", "items": {}, "parameters": {}}
    try:  # this service's own JSON (native and OpenAI images) reads as A1111's infotext
        parameters = json.loads(text)
        text = parameters_text(parameters) if isinstance(parameters, dict) else text
    except ValueError:
        pass  # already an infotext: what the /sdapi/v1 answers carry
    return {"info": text, "items": {"parameters": text}, "parameters": parse_infotext(text)}


def _parameters_chunk(image: str) -> str | None:
    data = image.partition(",")[2] if image.startswith("data:") else image
    try:
        return carried_parameters(base64.b64decode(data, validate=True))
    except (ValueError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidRequest.for_field("image", "not a base64 PNG, JPEG or WebP") from exc
