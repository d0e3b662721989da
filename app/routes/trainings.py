"""`/v1/trainings`: fine-tune a model on a user's pictures (a zip, files, or base64 JSON) into a
private LoRA; read, follow (SSE), list and cancel trainings. `/v1/adapters/{id}`: download a
trained adapter's weights, or delete it."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.sse import EventSourceResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from app import training_uploads
from app.auth import PrincipalDep
from app.deps import MemoryDep
from app.errors import InvalidRequest
from app.events import open_stream
from app.training_schemas import (
    AdapterDocument,
    TrainingDocument,
    TrainingList,
    TrainingOptions,
    TrainingRequest,
)
from app.training_uploads import Picture
from app.trainings import TrainingService
from imagegen.core.settings import GatewaySettings

router = APIRouter(prefix="/v1", tags=["trainings"])
TrainingId = Path(description="The training id returned at submit (`trn_...`).")
AdapterId = Path(description="A trained adapter's id (`<name>-<short id>`).")
# Form fields besides the pictures, and how many parts a multipart body may have.
OPTION_FIELDS = tuple(TrainingOptions.model_fields)
MAX_PARTS = 2 * 200 + 32


def _form_field(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON field's schema as a form field: its one non-null type (a form has no null)."""
    options = [o for o in schema.get("anyOf", [schema]) if o.get("type") != "null"]
    kept = {k: v for k, v in schema.items() if k not in ("anyOf", "default", "title")}
    return {**kept, **(options[0] if options else {"type": "string"})}


_OPTIONS = TrainingOptions.model_json_schema()["properties"]
_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["trigger_word"],
    "additionalProperties": False,
    "properties": {
        "images": {
            "type": "string",
            "format": "binary",
            "description": "A zip of PNG/JPEG/WebP pictures, each with an optional same-stem "
            ".txt caption (kohya's convention).",
        },
        "images[]": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Or the pictures as repeated files...",
        },
        "captions[]": {
            "type": "array",
            "items": {"type": "string"},
            "description": "...with their captions in the same order.",
        },
        **{name: _form_field(schema) for name, schema in _OPTIONS.items() if name != "webhook"},
        "webhook": {
            "type": "string",
            "description": 'The webhook as JSON (`{"url": ..., "events": [...]}`) or its URL.',
        },
    },
}


def _service(request: Request) -> TrainingService:
    service: TrainingService = request.app.state.trainings
    return service


TrainingsDep = Annotated[TrainingService, Depends(_service)]


@router.post(
    "/trainings",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainingDocument,
    responses={200: {"model": TrainingDocument, "description": "Replay of an Idempotency-Key."}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/TrainingRequest"}},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            },
        }
    },
)
async def submit_training(
    request: Request,
    trainings: TrainingsDep,
    principal: PrincipalDep,
    memory: MemoryDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Same key + same pictures and fields within 24 h returns the first "
            "training (200).",
        ),
    ] = None,
) -> TrainingDocument:
    """Queue a training: the pictures as a zip (`images`), as repeated files (`images[]` with
    `captions[]`) or as JSON (`{"images": [{"image": <base64>, "caption": ...}], ...}`); the
    result is a LoRA usable in `loras` by this API key only."""
    await memory.check()
    limits = trainings.limits()
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        options, count, reader, args = await _multipart(request, limits)
    else:
        body = _json_body(await request.body())
        options, count = body, len(body.images)
        reader = training_uploads.read_base64
        args = ([(item.image, item.caption) for item in body.images], limits)
    # The model, the words, the steps and the cost are checked before any picture is decoded.
    info = await trainings.model_of(options)
    await trainings.check_words(options, info)
    trainings.check_cost(options, info, count)
    pictures: list[Picture] = await anyio.to_thread.run_sync(reader, *args)  # CPU work
    document, created = await trainings.submit(
        TrainingOptions.model_validate(options.model_dump(include=set(OPTION_FIELDS))),
        info,
        pictures,
        principal.name,
        idempotency_key,
        _content_hash(options, pictures) if idempotency_key is not None else "",
    )
    response.headers["Location"] = f"/v1/trainings/{document.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return document


def _json_body(raw: bytes) -> TrainingRequest:
    try:
        return TrainingRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(_in_body(exc)) from None


def _in_body(exc: ValidationError) -> list[Any]:
    return [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]


async def _multipart(
    request: Request, limits: training_uploads.Limits
) -> tuple[TrainingOptions, int, Any, tuple[Any, ...]]:
    """The options, the picture count, and how to read the pictures (a reader and its
    arguments, run in a thread)."""
    try:
        form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS)
    except HTTPException as exc:  # a malformed multipart body, or too many parts
        raise InvalidRequest.for_field(
            "body", f"cannot be read as multipart: {exc.detail}"
        ) from None
    fields: dict[str, Any] = {}
    for name in OPTION_FIELDS:
        value = form.get(name)
        if isinstance(value, str) and value != "":
            fields[name] = value
    hook = fields.get("webhook")
    if isinstance(hook, str):
        # A JSON object ({"url", "events"}) or the URL alone.
        try:
            fields["webhook"] = json.loads(hook) if hook.startswith("{") else {"url": hook}
        except ValueError:
            raise InvalidRequest.for_field("webhook", "is not a JSON object") from None
    unknown = sorted(set(form.keys()) - {*OPTION_FIELDS, "images", "images[]", "captions[]"})
    if unknown:
        raise InvalidRequest.for_field(unknown[0], "is not a field of a training")
    try:
        options = TrainingOptions.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(_in_body(exc)) from None
    archive = form.get("images")
    files = [f for f in form.getlist("images[]") if isinstance(f, UploadFile)]
    if isinstance(archive, UploadFile):
        if files:
            raise InvalidRequest.for_field("images[]", "send a zip (`images`) or files, not both")
        data = await archive.read(limits.max_total_bytes + 1)
        pictures = training_uploads.ZipPictures(data, limits)  # its directory only
        return options, pictures.count, pictures.read, ()
    if not files:
        raise InvalidRequest.for_field(
            "images", "is required: a zip of pictures, or repeated `images[]` files"
        )
    read = [(f.filename or f"images[{i}]", await f.read(limits.max_image_bytes + 1))
            for i, f in enumerate(files)]  # fmt: skip
    captions = [c for c in form.getlist("captions[]") if isinstance(c, str)]
    return options, len(read), training_uploads.read_files, (read, captions or None, limits)


def _content_hash(options: TrainingOptions, pictures: list[Picture]) -> str:
    """What an Idempotency-Key replay must match: the fields and the pictures with their
    captions, however they were sent."""
    digest = hashlib.sha256(options.model_dump_json(include=set(OPTION_FIELDS)).encode())
    for picture in pictures:
        digest.update(hashlib.sha256(picture.png).digest())
        digest.update((picture.caption or "").encode() + b"\0")
    return digest.hexdigest()


@router.get("/trainings", response_model=TrainingList)
async def list_trainings(trainings: TrainingsDep, principal: PrincipalDep) -> TrainingList:
    """This API key's trainings, newest first (those not yet expired)."""
    return TrainingList(data=await trainings.listing(principal.name))


@router.get("/trainings/{training_id}", response_model=TrainingDocument)
async def get_training(
    trainings: TrainingsDep, principal: PrincipalDep, training_id: str = TrainingId
) -> TrainingDocument:
    """The training: status, queue position, progress with the loss, the adapter it made."""
    return await trainings.get(training_id, principal.name)


@router.delete("/trainings/{training_id}", response_model=TrainingDocument)
async def cancel_training(
    trainings: TrainingsDep, principal: PrincipalDep, training_id: str = TrainingId
) -> TrainingDocument:
    """Cancel a queued training at once, a running one at its next step (no adapter is made);
    finished: unchanged."""
    return await trainings.cancel(training_id, principal.name)


async def _existing_training(
    trainings: TrainingsDep, principal: PrincipalDep, training_id: str = TrainingId
) -> TrainingDocument:
    return await trainings.get(training_id, principal.name)


@router.get(
    "/trainings/{training_id}/events",
    response_class=Response,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Successful Response"}},
)
async def stream_training_events(
    request: Request,
    trainings: TrainingsDep,
    principal: PrincipalDep,
    first: Annotated[TrainingDocument, Depends(_existing_training)],
    training_id: str = TrainingId,
) -> EventSourceResponse:
    """Server-Sent Events: the current state, every transition and progress (with `loss`),
    then the end."""
    settings: GatewaySettings = request.app.state.settings
    return open_stream(
        request.app.state.events,
        principal.name,
        settings.max_streams_per_key,
        first.id,
        trainings.read_for_events,
    )


@router.get(
    "/adapters/{adapter_id}/weights",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The LoRA as one `.safetensors` (kohya naming, the trigger word's "
            "embedding bundled as AUTOMATIC1111 reads it).",
        }
    },
)
async def adapter_weights(
    trainings: TrainingsDep, principal: PrincipalDep, adapter_id: str = AdapterId
) -> Response:
    """Download a trained adapter (this API key's own)."""
    _, chunks = await trainings.weights(adapter_id, principal.name)
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{adapter_id}.safetensors"'},
    )


@router.delete("/adapters/{adapter_id}", response_model=AdapterDocument)
async def delete_adapter(
    trainings: TrainingsDep, principal: PrincipalDep, adapter_id: str = AdapterId
) -> AdapterDocument:
    """Delete a trained adapter: its weights, and its id from every worker (a job naming it
    is refused from now on)."""
    return await trainings.delete_adapter(adapter_id, principal.name)
