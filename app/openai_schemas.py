"""Bodies of the OpenAI-compatible `POST /v1/images/generations` (../shared/API.md).

The fields this body shares with `POST /v1/generations` are copies of GenerationRequest's
definitions, so the OpenAPI document states one set of rules. The rules themselves (the
validators, the configured caps, the model's defaults) stay GenerationRequest's and
GenerationService's: `app.routes.openai_images` maps this body onto a GenerationRequest.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.schemas import ControlRequest, GenerationRequest, LoraRequest, OutpaintRequest


def _json_bool(value: Any) -> Any:
    """A boolean only: Literal[False] alone also takes 0 and 0.0 (they equal False)."""
    if not isinstance(value, bool):
        raise ValueError("must be a boolean")
    return value


# Names of OpenAI's own image models. Code written for OpenAI passes one of these; here each
# means "this server's default model", so such code runs unchanged (see `openai_images`).
OPENAI_MODEL_PREFIXES = ("dall-e-", "gpt-image-", "chatgpt-image-")


def _as_in_generations(name: str, description: str | None = None) -> Any:
    """GenerationRequest's field `name`: its limits, default and description, so that the
    OpenAPI document states the same rules for both bodies. GenerationRequest (and its
    validators) still checks every value; this only keeps the two definitions from drifting.
    Typed Any, as pydantic's own `Field()` is, so it can stand as any field's default."""
    field = copy.deepcopy(GenerationRequest.model_fields[name])
    if description is not None:
        field.description = description
    return field


class OpenAIImageRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields plus this API's generation fields."""

    # Strict and closed, like GenerationRequest: an unknown field is a 422, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = _as_in_generations("prompt")
    n: int | None = _as_in_generations("n")
    size: str | None = Field(
        None,
        description='"WIDTHxHEIGHT", each a multiple of 8 and ≥ 64 (e.g. "512x512"); '
        '"auto" or null: the model\'s native size.',
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None,
        description="`b64_json` (default): the PNG inline, base64; `url`: a link to "
        "`GET /v1/generations/{id}/images/{index}`, kept as long as the job's results.",
    )
    model: str | None = _as_in_generations(
        "model",
        "One of the ids `GET /v1/models` lists; OpenAI's names (`dall-e-2`, `dall-e-3`, "
        "`gpt-image-*`, `chatgpt-image-*`) mean the default model.",
    )

    # This API's own fields, as in `POST /v1/generations`.
    negative_prompt: str | None = _as_in_generations("negative_prompt")
    steps: int | None = _as_in_generations("steps")
    guidance_scale: float | None = _as_in_generations("guidance_scale")
    seed: int | None = _as_in_generations("seed")
    scheduler: str | None = _as_in_generations("scheduler")
    image: str | None = _as_in_generations("image")
    strength: float | None = _as_in_generations("strength")
    mask: str | None = _as_in_generations("mask")
    outpaint: OutpaintRequest | None = _as_in_generations("outpaint")
    loras: list[LoraRequest] | None = _as_in_generations("loras")
    control: ControlRequest | None = _as_in_generations("control")
    controls: list[ControlRequest] | None = _as_in_generations("controls")

    # OpenAI fields that change nothing here and are accepted so that code written for OpenAI
    # runs unchanged: `user` and `safety_identifier` (abuse-monitoring ids), `quality`, `style`
    # and `moderation` (knobs of OpenAI's own models). Any value is taken, since none is used.
    user: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    safety_identifier: str | None = Field(
        None, description="Accepted for OpenAI compatibility; ignored."
    )
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = Field(
        None,
        description="The model's default steps scaled: `low` x0.5, `medium`/`standard`/`auto` "
        "x1, `high`/`hd` x1.5 (within the steps cap); explicit `steps` win.",
    )
    style: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    moderation: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    # OpenAI fields accepted only with the value this service produces anyway: a request for
    # a JPEG, a transparent background or a streamed answer is refused rather than silently
    # answered with something else.
    output_format: Literal["png", "jpeg", "webp"] | None = Field(
        None,
        description="The images' format (default `png`, with its `parameters` chunk; JPEG and "
        "WebP carry the parameters in EXIF and XMP), in `b64_json` and behind a `url` alike.",
    )
    output_compression: int | None = Field(
        None, ge=0, le=100, description="JPEG/WebP quality, 0..100 (default 100)."
    )
    background: Literal["auto", "opaque"] | None = Field(
        None, description="`auto` or `opaque`; transparency is not supported."
    )
    stream: Annotated[bool, BeforeValidator(_json_bool)] | None = Field(
        None,
        description="`true`: Server-Sent Events, `image_generation.partial_image` (or "
        "`image_edit.partial_image`) for up to `partial_images` previews while the job runs, "
        "then `image_generation.completed` (`image_edit.completed`) per image.",
    )
    partial_images: int | None = Field(
        None, ge=0, le=3, description="Previews to stream before the images (with `stream`)."
    )


class OpenAIImage(BaseModel):
    """One generated image: exactly one of the two fields, per `response_format`."""

    b64_json: str | None = Field(None, description="The image file, base64-encoded.")
    url: str | None = Field(None, description="Absolute URL of the image file.")


class OpenAIInputTokens(BaseModel):
    text_tokens: int
    image_tokens: int


class OpenAIUsage(BaseModel):
    input_tokens: int
    input_tokens_details: OpenAIInputTokens
    output_tokens: int
    total_tokens: int


class OpenAIImagesResponse(BaseModel):
    """The answer: OpenAI's `ImagesResponse`."""

    created: int = Field(description="Unix time (seconds) at which the images were ready.")
    data: list[OpenAIImage]
    output_format: str | None = Field(None, description="The images' format, as asked.")
    quality: str | None = Field(None, description="The quality, as asked.")
    size: str | None = Field(None, description="WIDTHxHEIGHT of the images.")
    usage: OpenAIUsage | None = Field(
        None,
        description="Token counts as OpenAI reports them: the prompt's tokens (the model's own "
        "tokenizer) as input text tokens; image tokens are not metered here (0).",
    )
