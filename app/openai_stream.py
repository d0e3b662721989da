"""OpenAI's streamed image answer (`stream: true`): Server-Sent Events of partial images while
the job runs, built on the previews the service already makes, then one `completed` event per
image. A client that leaves cancels the job; past the job's time limit the stream ends with an
`error` event and the job is canceled."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from app.events import PING_S, EventHub
from app.openai_usage import openai_usage
from app.schemas import JobDocument
from app.service import GenerationService
from app.waiting import job_failure
from imagegen.core.contract import JobSpec, JobStatus


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _preview_image(frame_data: bytes) -> str | None:
    """The base64 JPEG of a preview frame (`data: {"step", "image": "data:image/jpeg;..."}`)."""
    for line in frame_data.decode().splitlines():
        if line.startswith("data: "):
            image = json.loads(line[len("data: ") :]).get("image", "")
            return str(image).partition(",")[2] or None
    return None


async def stream_images(
    service: GenerationService,
    hub: EventHub,
    job: JobDocument,
    owner: str,
    kind: str,
    partial_images: int,
    answer: dict[str, Any],
) -> AsyncIterator[bytes]:
    """The events of `job` in OpenAI's stream (`kind`: "image_generation" or "image_edit");
    `answer` holds the fields every event carries (size, quality, background, output_format)."""
    work = job.request.model_dump(exclude={"loras", "control", "controls"})
    limit_s = service.job_timeout_s(JobSpec.model_validate(work))
    sent = 0
    finished = False
    try:
        with anyio.move_on_after(limit_s):
            async with hub.subscribe(
                job.id, service.read_for_events, owner, previews=partial_images > 0
            ) as listener:
                while True:
                    frame = await listener.next(PING_S)
                    if frame is None:
                        yield b": ping\n\n"
                        continue
                    if frame.name == "preview" and sent < partial_images:
                        image = _preview_image(frame.data)
                        if image is not None:
                            payload = {
                                **answer,
                                "type": f"{kind}.partial_image",
                                "b64_json": image,
                                "output_format": "jpeg",
                                "partial_image_index": sent,
                                "created_at": int(time.time()),
                            }
                            yield _event(f"{kind}.partial_image", payload)
                            sent += 1
                    if frame.terminal:
                        finished = True
                        break
        if not finished:
            await service.cancel(job.id, owner)
            error = {"message": f"generation job {job.id} did not finish within {limit_s} s"}
            yield _event("error", {"type": "error", "error": error})
            return
        done = await service.get(job.id, owner)
        if done.status != JobStatus.SUCCEEDED:
            failure = job_failure(done)
            error = {"code": failure.code, "message": str(failure)}
            yield _event("error", {"type": "error", "error": error})
            return
        usage = await openai_usage(service, done)
        for link in (i for i in done.images if not i.filtered):
            # Encoded by the worker in the job's output_format.
            data = await service.image(done.id, link.index, owner)
            payload = {
                **answer,
                "type": f"{kind}.completed",
                "b64_json": base64.b64encode(data).decode("ascii"),
                "created_at": int(time.time()),
                "size": f"{link.width}x{link.height}",
                "usage": usage,
            }
            yield _event(f"{kind}.completed", payload)
    finally:
        if not finished:  # the client left (or the wait ended): nobody collects the images
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await service.cancel(job.id, owner)
