"""`POST /v1/images/edits`: OpenAI's image-edit API (multipart) over this service's jobs.

The form becomes an ordinary GenerationRequest (image + mask: inpainting; image alone:
image-to-image, or inpainting of its transparent pixels when it has some), queued and waited
for exactly as `POST /v1/images/generations` does, and answered in its shape.

MASK CONVENTION HERE IS OPENAI'S: pixels whose ALPHA IS 0 (transparent) are repainted; opaque
pixels are kept. `POST /v1/generations` takes the other convention (white = repaint). The
mask is converted here, so the rest of the service only ever sees white = repaint.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from PIL import Image

from app import images_in
from app.auth import PrincipalDep
from app.deps import MemoryDep, ServiceDep
from app.errors import InvalidRequest
from app.openai_schemas import OpenAIImageRequest, OpenAIImagesResponse
from app.routes.openai_images import STREAMED, answer_when_done
from imagegen.core.settings import GatewaySettings

router = APIRouter(prefix="/v1/images", tags=["openai"])
# `outpaint` is four small integers as JSON ({"left": 64, "right": 64, "top": 64, "bottom": 64}
# is 52 characters): anything longer is refused before the JSON parser sees it, so no nesting
# depth or size can reach the parser's recursion.
MAX_OUTPAINT_CHARS = 200


async def _read(upload: UploadFile, field: str, max_bytes: int) -> bytes:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidRequest.for_field(field, f"the image is over the limit of {max_bytes} bytes")
    return data


def openai_mask_to_ours(data: bytes, settings: GatewaySettings) -> bytes:
    """OpenAI's mask (alpha 0 = repaint) as this API's (white = repaint), a grayscale PNG."""
    decoded = images_in.load_image(
        data, "mask", settings.max_input_image_bytes, settings.max_pixels, keep_alpha=True
    )
    alpha = _alpha(decoded.image)
    if alpha is None:
        raise InvalidRequest.for_field(
            "mask",
            "has no alpha channel; on /v1/images/edits the mask is OpenAI's: a PNG whose "
            "transparent pixels (alpha 0) are repainted (POST /v1/generations takes white = "
            "repaint)",
        )
    return images_in.to_png(alpha.point(lambda a: 255 if a == 0 else 0))


def _alpha(image: Image.Image) -> Image.Image | None:
    if image.mode in ("RGBA", "LA"):
        return image.getchannel("A")
    return None


def _mask_from_image_alpha(data: bytes, settings: GatewaySettings) -> bytes | None:
    """OpenAI edits the transparent pixels of an image sent without a mask."""
    decoded = images_in.load_image(
        data, "image", settings.max_input_image_bytes, settings.max_pixels, keep_alpha=True
    )
    alpha = _alpha(decoded.image)
    if alpha is None or alpha.getextrema()[0] != 0:
        return None
    return images_in.to_png(alpha.point(lambda a: 255 if a == 0 else 0))


@router.post(
    "/edits",
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    openapi_extra={"x-mask-convention": "alpha 0 = repaint (OpenAI's)"},
    responses=STREAMED,  # type: ignore[arg-type]
)
async def edit_image(
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    memory: MemoryDep,
    prompt: Annotated[str, Form(description="What to draw.")],
    image: Annotated[
        UploadFile | None, File(description="PNG, JPEG or WebP (≤ 10 MB by default).")
    ] = None,
    images: Annotated[
        list[UploadFile] | None,
        File(alias="image[]", description="OpenAI's list form; the first one is used."),
    ] = None,
    mask: Annotated[
        UploadFile | None,
        File(
            description="PNG of the image's size: pixels with ALPHA 0 are repainted (OpenAI's "
            "convention; /v1/generations takes white = repaint)."
        ),
    ] = None,
    n: Annotated[int | None, Form()] = None,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[Literal["b64_json", "url"] | None, Form()] = None,
    model: Annotated[str | None, Form()] = None,
    negative_prompt: Annotated[str | None, Form()] = None,
    steps: Annotated[int | None, Form()] = None,
    guidance_scale: Annotated[float | None, Form()] = None,
    seed: Annotated[int | None, Form()] = None,
    scheduler: Annotated[str | None, Form()] = None,
    strength: Annotated[float | None, Form()] = None,
    outpaint: Annotated[str | None, Form(description='JSON, e.g. {"right": 32}.')] = None,
    user: Annotated[str | None, Form()] = None,
    quality: Annotated[str | None, Form()] = None,
    background: Annotated[Literal["auto", "opaque"] | None, Form()] = None,
    output_format: Annotated[Literal["png", "jpeg", "webp"] | None, Form()] = None,
    output_compression: Annotated[int | None, Form(ge=0, le=100)] = None,
    stream: Annotated[bool | None, Form()] = None,
    partial_images: Annotated[int | None, Form(ge=0, le=3)] = None,
    input_fidelity: Annotated[str | None, Form()] = None,
) -> OpenAIImagesResponse | Response:
    """Edit an image (OpenAI's `images.edit`): mask pixels with alpha 0 are repainted."""
    settings: GatewaySettings = service.settings
    upload = image or (images[0] if images else None)
    if upload is None:
        raise InvalidRequest.for_field("image", "is required (a PNG, JPEG or WebP file)")
    image_bytes = await _read(upload, "image", settings.max_input_image_bytes)
    mask_b64: str | None = None
    if mask is not None:
        mask_bytes = await _read(mask, "mask", settings.max_input_image_bytes)
        ours = await anyio.to_thread.run_sync(openai_mask_to_ours, mask_bytes, settings)
        mask_b64 = base64.b64encode(ours).decode()
    elif outpaint is None:
        derived = await anyio.to_thread.run_sync(_mask_from_image_alpha, image_bytes, settings)
        if derived is not None:
            mask_b64 = base64.b64encode(derived).decode()
    fields: dict[str, Any] = {
        "prompt": prompt,
        "n": n,
        "size": size,
        "response_format": response_format,
        "model": model,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "scheduler": scheduler,
        "strength": strength,
        "image": base64.b64encode(image_bytes).decode(),
        "mask": mask_b64,
        "user": user,
        "quality": quality,
        "background": background,
        "output_format": output_format,
        "output_compression": output_compression,
        "stream": stream,
        "partial_images": partial_images,
    }
    if outpaint is not None:
        if len(outpaint) > MAX_OUTPAINT_CHARS:
            raise InvalidRequest.for_field(
                "outpaint", f"must be at most {MAX_OUTPAINT_CHARS} characters of JSON"
            )
        try:
            fields["outpaint"] = json.loads(outpaint)
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest.for_field("outpaint", 'must be JSON, e.g. {"right": 32}') from exc
    body = _validated(fields)
    return await answer_when_done(request, service, principal.name, memory, body)


def _validated(fields: dict[str, Any]) -> OpenAIImageRequest:
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    try:
        return OpenAIImageRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *tuple(e["loc"]))} for e in exc.errors()]
        ) from exc
