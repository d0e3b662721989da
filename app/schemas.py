"""Request and response bodies of the public API (../shared/API.md).

Why one module of 420 lines: these are the bodies as the OpenAPI document shows them, each
with its rules; one file is where a client author reads the whole native API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from imagegen.core.contract import (
    CONTROL_SCALE_MAX,
    DEFAULT_OUTPUT_COMPRESSION,
    DEFAULT_WEBHOOK_EVENTS,
    LORA_SCALE_LIMIT,
    MAX_CONTROLS,
    MAX_LORAS,
    MAX_MASK_BLUR,
    MAX_PADDING_MASK_CROP,
    SEED_MAX,
    AdapterInfo,
    InputRef,
    Outpaint,
    OutputFormat,
    WebhookTarget,
)
from imagegen.core.destinations import MAX_URL_CHARS, Refused, parse_url


def check_text(value: str, field: str) -> str:
    """Reject text that cannot be stored or tokenized faithfully, naming the problem."""
    if "\x00" in value:
        raise ValueError(f"{field} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field} must be valid Unicode text (no lone surrogates)") from exc
    return value


def _integral_float_to_int(value: Any) -> Any:
    # JSON has one number type: 64.0 is the integer 64 to most encoders and to JSON Schema.
    # Only integral floats are taken; 2.5, "64" and true still fail strict validation.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_Integral = BeforeValidator(_integral_float_to_int)
Width = Annotated[int, Field(ge=64, multiple_of=8), _Integral]
Steps = Annotated[int, Field(ge=1), _Integral]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX), _Integral]
Count = Annotated[int, Field(ge=1), _Integral]
Margin = Annotated[int, Field(ge=0, multiple_of=8), _Integral]


class OutpaintRequest(BaseModel):
    """`outpaint`: pixels the canvas grows by on each side."""

    model_config = ConfigDict(extra="forbid", strict=True)

    left: Margin = Field(0, description="Multiple of 8, ≥ 0.")
    right: Margin = Field(0, description="Multiple of 8, ≥ 0.")
    top: Margin = Field(0, description="Multiple of 8, ≥ 0.")
    bottom: Margin = Field(0, description="Multiple of 8, ≥ 0.")

    @model_validator(mode="after")
    def _not_all_zero(self) -> OutpaintRequest:
        if not (self.left or self.right or self.top or self.bottom):
            raise ValueError("at least one of left, right, top, bottom must be > 0")
        return self

    def to_contract(self) -> Outpaint:
        return Outpaint(left=self.left, right=self.right, top=self.top, bottom=self.bottom)


AdapterId = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]


class LoraRequest(BaseModel):
    """One LoRA of `loras`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: AdapterId = Field(description="One of the model's `adapters`.")
    scale: float = Field(
        1.0,
        ge=-LORA_SCALE_LIMIT,
        le=LORA_SCALE_LIMIT,
        allow_inf_nan=False,
        description="Finite, -2..2; 0 = the request without this LoRA.",
    )


class ControlOptions(BaseModel):
    """`options` of a preprocessor; only `canny` takes any (OpenCV's two thresholds)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    low_threshold: int = Field(100, ge=0, le=255, description="canny: 0..255, default 100.")
    high_threshold: int = Field(200, ge=0, le=255, description="canny: 0..255, default 200.")

    @model_validator(mode="after")
    def _order(self) -> ControlOptions:
        if self.low_threshold >= self.high_threshold:
            raise ValueError("low_threshold must be less than high_threshold")
        return self


# A model id: what keeps odd text out of the Redis key it is looked up under.
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"

Preprocess = Literal["none", "canny", "scribble", "depth", "pose"]


class Preprocessed(BaseModel):
    """The rule and the defaults a body with `preprocess` and `options` shares: only canny
    takes options. Each body declares the two fields itself, `preprocess` first, in its own
    field order."""

    if TYPE_CHECKING:
        preprocess: Preprocess
        options: ControlOptions | None

    @field_validator("options", check_fields=False)
    @classmethod
    def _options_for_canny(cls, value: ControlOptions | None, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("preprocess", "canny") != "canny":
            raise ValueError("only the canny preprocessor takes options")
        return value

    def options_used(self) -> dict[str, int]:
        """The preprocessor's options with their defaults (canny's thresholds), else none."""
        if self.preprocess != "canny":
            return {}
        return (self.options or ControlOptions()).model_dump()


class ControlRequest(Preprocessed):
    """One entry of `controls` (or `control`): a ControlNet and its image."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: AdapterId = Field(description="One of the model's `controls`.")
    image: str = Field(
        description="PNG, JPEG or WebP as base64 or a data:image/...;base64, URI; resized to "
        "the output size. The control map itself, or with `preprocess` a picture to make it "
        "from."
    )
    preprocess: Preprocess = Field(
        "none",
        description="What the worker makes of `image` first: none (it is the map), canny "
        "(OpenCV edges), scribble (XDoG lines), depth, pose; one of the model's "
        "`preprocessors`.",
    )
    options: ControlOptions | None = Field(
        None, description="The preprocessor's options (canny: `low_threshold`, `high_threshold`)."
    )
    scale: float = Field(
        1.0, ge=0, le=CONTROL_SCALE_MAX, allow_inf_nan=False, description="0..2; 0 = no control."
    )
    start: float = Field(
        0.0, ge=0, le=1, allow_inf_nan=False, description="Fraction of the steps where it starts."
    )
    end: float = Field(
        1.0, ge=0, le=1, allow_inf_nan=False, description="Fraction of the steps where it ends."
    )

    @model_validator(mode="after")
    def _window(self) -> ControlRequest:
        if self.start >= self.end:
            raise ValueError("control.start must be less than control.end")
        return self


class PreprocessRequest(Preprocessed):
    """`POST /v1/control/preprocess`: the control map a job would use (A1111's "preview
    annotator"), made by a worker of the model."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        None,
        pattern=MODEL_ID_PATTERN,
        description="The model whose workers make it; default: the service's default model.",
    )
    image: str = Field(
        description="PNG, JPEG or WebP as base64 or a data:image/...;base64, URI (the same "
        "checks as a job's images)."
    )
    preprocess: Preprocess = Field(description="One of the model's `preprocessors`, or none.")
    options: ControlOptions | None = Field(None, description="canny's thresholds.")
    width: Width | None = Field(None, description="The map's size; default the model's.")
    height: Width | None = Field(None, description="The map's size; default the model's.")


WebhookEvent = Literal["running", "succeeded", "failed", "canceled"]


class WebhookRequest(BaseModel):
    """`webhook`: where to POST the job's events, signed as Standard Webhooks says."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(
        max_length=MAX_URL_CHARS,
        # For schema readers; the server's own check (below) explains a refusal.
        json_schema_extra={"pattern": "^https?://"},
        description="https:// URL of a public host (http and private hosts only when the "
        "operator allows them); no credentials in it.",
    )
    events: list[WebhookEvent] = Field(
        default_factory=lambda: [cast(WebhookEvent, e) for e in DEFAULT_WEBHOOK_EVENTS],
        min_length=1,
        max_length=4,
        json_schema_extra={"uniqueItems": True},
        description="Events to deliver; default the terminal three.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parse_url(value)
        except Refused as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each event at most once")
        return value

    def to_contract(self) -> WebhookTarget:
        return WebhookTarget(url=self.url, events=list(self.events))


class GenerationRequest(BaseModel):
    """`POST /v1/generations`. Types are strict: "64" is not a width, and true is not a seed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="1..2000 characters after trimming (cap configurable).")
    negative_prompt: str = Field("", description="0..2000 characters.")
    width: Width | None = Field(None, description="Multiple of 8, ≥ 64; default: the model's.")
    height: Width | None = Field(None, description="Multiple of 8, ≥ 64; default: the model's.")
    steps: Steps | None = Field(None, description="1..150 (cap configurable).")
    guidance_scale: float | None = Field(
        None, ge=0, le=30, allow_inf_nan=False, description="Finite, 0..30."
    )
    seed: Seed | None = Field(None, description="0..2^32-1; null = random.")
    n: Count = Field(1, description="Images in the job, 1..8 (cap configurable).")
    scheduler: str | None = Field(
        None, min_length=1, max_length=64, description="One of the model's `schedulers`."
    )
    model: str | None = Field(
        None,
        pattern=MODEL_ID_PATTERN,
        description="One of the ids `GET /v1/models` lists.",
    )
    # Images in (../shared/API.md "Images in"); checked and decoded by app.images_in.
    image: str | None = Field(
        None,
        description="A PNG, JPEG or WebP as base64 or a data:image/...;base64, URI. Alone: "
        "image-to-image.",
    )
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="0 < s ≤ 1: how much of `image` is re-noised. Default 0.8 for "
        "image-to-image, 1.0 for inpainting and outpainting. Only with `image`.",
    )
    mask: str | None = Field(
        None,
        description="Same encodings as `image`, same size. WHITE (luminance ≥ 128) = repaint, "
        "black = keep. Needs `image`.",
    )
    mask_blur: int | None = Field(
        None,
        ge=0,
        le=MAX_MASK_BLUR,
        description="Inpainting: feather the seam. The result is blended into the input "
        "through the mask blurred by this Gaussian radius in pixels (A1111's `mask_blur`); "
        "default 0, every black-mask pixel kept exactly. Needs `mask`.",
    )
    padding_mask_crop: int | None = Field(
        None,
        ge=0,
        le=MAX_PADDING_MASK_CROP,
        description="Inpainting of the masked area only (A1111's 'only masked', diffusers' "
        "`padding_mask_crop`): the box around the mask, grown by this many pixels and to the "
        "output's aspect, is generated at the full output size and pasted back. Needs `mask`.",
    )
    outpaint: OutpaintRequest | None = Field(
        None,
        description="Grow the canvas by these pixels (multiples of 8) and generate only the new "
        "area. Needs `image`, excludes `mask`.",
    )
    loras: list[LoraRequest] | None = Field(
        None, max_length=MAX_LORAS, description="Up to 4 of the model's `adapters`, each once."
    )
    control: ControlRequest | None = Field(
        None, description="One ControlNet and its image: the one-item form of `controls`."
    )
    controls: list[ControlRequest] | None = Field(
        None,
        max_length=MAX_CONTROLS,
        description="Up to 3 ControlNets, each with its image, preprocessor, scale and window; "
        "their residuals are summed (diffusers' MultiControlNetModel).",
    )
    output_format: OutputFormat | None = Field(
        None,
        description="png (default; parameters in a `parameters` text chunk), jpeg or webp "
        "(parameters in EXIF UserComment and XMP).",
    )
    output_compression: int | None = Field(
        None,
        ge=0,
        le=100,
        description=f"JPEG/WebP quality 0..100 (default {DEFAULT_OUTPUT_COMPRESSION}); "
        "ignored for png, which is lossless.",
    )

    webhook: WebhookRequest | None = Field(
        None,
        description="POST the job's events to a URL, signed (Standard Webhooks); see "
        "`GET /v1/webhook-secret`.",
    )

    @field_validator("controls")
    @classmethod
    def _one_form(cls, value: list[ControlRequest] | None, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("control") is not None:
            raise ValueError("send `control` (one) or `controls` (a list), not both")
        return value

    def control_list(self) -> list[tuple[str, ControlRequest]]:
        """The controls with the field each came in (`control` or `controls[i]`), in order."""
        if self.control is not None:
            return [("control", self.control)]
        return [(f"controls[{i}]", c) for i, c in enumerate(self.controls or [])]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        check_text(value, "prompt")
        if not value.strip():
            raise ValueError("prompt must not be empty or only white space")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt(cls, value: str) -> str:
        return check_text(value, "negative_prompt")


class Progress(BaseModel):
    step: int
    total_steps: int
    eta_s: float | None = Field(None, description="Seconds left, once a step rate is known.")


class ImageLink(BaseModel):
    index: int
    seed: int
    width: int
    height: int
    url: str = Field(
        description="The image's download route; with IMAGEGEN_STORAGE_PRESIGN, a presigned URL "
        "of the result store, valid IMAGEGEN_STORAGE_PRESIGN_EXPIRES_S seconds."
    )
    filtered: bool = Field(
        False,
        description="The model's safety checker withheld this image: its URL answers 404 "
        "`content_filtered`.",
    )


class ErrorInfo(BaseModel):
    code: str
    message: str


class Timings(BaseModel):
    queued_s: float | None = None
    run_s: float | None = None


class LoraParams(BaseModel):
    id: str
    scale: float


class ControlParams(BaseModel):
    """The control as the job uses it; its image shown by digest and size, never its bytes."""

    id: str
    scale: float
    start: float
    end: float
    image: InputRef = Field(description="The control image as sent: sha256 and size.")
    preprocess: str = "none"
    options: dict[str, int] = Field(default_factory=dict)


class GenerationParams(BaseModel):
    """Every parameter as the job uses it, defaults filled in."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    n: int
    scheduler: str
    model: str
    task: str = Field(
        "text", description="text | img2img | inpaint | outpaint | preprocess (a control preview)"
    )
    image: InputRef | None = Field(None, description="The input image: sha256 and size.")
    mask: InputRef | None = Field(None, description="The mask as sent: sha256 and size.")
    strength: float | None = None
    outpaint: Outpaint | None = None
    mask_blur: int = 0
    padding_mask_crop: int | None = None
    loras: list[LoraParams] = Field(default_factory=list)
    controls: list[ControlParams] = Field(default_factory=list)
    control: ControlParams | None = Field(
        None, description="The first of `controls` (the one-item form clients of 1.1 read)."
    )
    output_format: str = "png"
    output_compression: int = DEFAULT_OUTPUT_COMPRESSION


class WebhookAttempt(BaseModel):
    """One attempt to deliver one of the job's events."""

    event: str
    webhook_id: str = Field(description="The `webhook-id` header: the same for every attempt.")
    attempt: int
    at: str
    status_code: int | None = Field(description="The receiver's answer; null: none came.")
    error: str | None
    outcome: str = Field(description="delivered | retrying | failed (given up)")


class WebhookInfo(BaseModel):
    url: str
    events: list[str]
    deliveries: list[WebhookAttempt]


class JobDocument(BaseModel):
    """The job document of `GET /v1/generations/{id}`."""

    id: str
    status: str = Field(description="queued | running | succeeded | failed | canceled")
    created_at: str
    started_at: str | None
    finished_at: str | None
    queue_position: int | None
    progress: Progress
    request: GenerationParams
    images: list[ImageLink]
    error: ErrorInfo | None
    timings: Timings
    webhook: WebhookInfo | None = Field(
        None, description="The job's webhook and every delivery attempt; null without one."
    )


class AdapterEntry(BaseModel):
    """A LoRA (`kind` "lora") or ControlNet (`kind` "controlnet") served with a model."""

    id: str
    kind: str
    description: str
    trigger_words: list[str] = Field(default_factory=list)
    default_scale: float = 1.0
    format: str = Field(
        "",
        description='The file\'s layout: LoRAs "kohya" (civitai, AUTOMATIC1111), "diffusers" or '
        '"peft"; ControlNets "diffusers".',
    )
    owner: str | None = Field(
        None, description='"you": a LoRA this API key trained (`POST /v1/trainings`).'
    )

    @classmethod
    def of(cls, info: AdapterInfo) -> AdapterEntry:
        return cls(**info.model_dump())


class UnavailableAdapterEntry(BaseModel):
    """An adapter file the model would serve but cannot, and why."""

    id: str
    reason: str


class ModelEntry(BaseModel):
    id: str
    default: bool
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    schedulers: list[str]
    max_pixels: int = Field(description="Largest width*height this model accepts.")
    max_steps: int = Field(description="Largest `steps` this model accepts.")
    max_prompt_tokens: int | None = Field(
        None,
        description="Longest `prompt` (and `negative_prompt`) in tokens of this model's own "
        "tokenizer: its text encoder's windows a prompt may fill, each window's tokens less "
        "its start and end markers. Longer prompts are refused (422), never cut.",
    )
    prompt_weighting: bool = Field(
        False,
        description="Whether `(word:1.3)`, `(word)` and `[word]` in prompts are read as weights.",
    )
    workers: int = Field(description="Live workers able to load this model.")
    loaded: int = Field(description="Live workers holding this model warm (loaded) now.")
    available: bool = Field(
        True, description="False when no live worker that lists the model can load it."
    )
    unavailable_reason: str | None = Field(
        None, description="Why the model cannot be loaded (its jobs fail model_unavailable)."
    )
    adapters: list[AdapterEntry] = Field(default_factory=list)
    controls: list[AdapterEntry] = Field(default_factory=list)
    preprocessors: list[str] = Field(
        default_factory=list,
        description='What `controls[i].preprocess` may name besides "none" (canny, scribble, '
        "and depth where its model is configured); empty without controls.",
    )
    family: str = Field(
        "", description='"sd15", "sd2" or "sdxl" (what LoRAs and ControlNets it takes).'
    )
    source_format: str = Field(
        "", description='Where its weights come from: "diffusers" (a directory) or "hub".'
    )
    inpainting: bool = Field(
        False,
        description="An inpainting checkpoint (9-channel UNet): every job is an inpaint; "
        "without `mask` the whole canvas is repainted.",
    )
    unavailable_adapters: list[UnavailableAdapterEntry] = Field(
        default_factory=list,
        description="Adapter files found for this model that it cannot serve (unreadable, "
        "another family's, a module that does not fit), each with one line why.",
    )
    training: TrainingDefaultsEntry | None = Field(
        None, description="Trainings' defaults; null when the model cannot be trained."
    )
    not_trainable: str | None = Field(None, description="Why the model cannot be trained.")


class TrainingDefaultsEntry(BaseModel):
    """What `POST /v1/trainings` uses where a field is left out, for this model."""

    steps: int
    rank: int
    learning_rate: float
    targets: str = Field(description='UNet layers with a LoRA: "attention" or "all".')
    batch_size: int = Field(description="Pictures per step.")
    max_caption_tokens: int = Field(description="Longest caption, in the model's tokens.")


class ModelList(BaseModel):
    data: list[ModelEntry]


class JobCounts(BaseModel):
    succeeded: int
    failed: int
    canceled: int


class UsageDocument(BaseModel):
    """`GET /v1/usage`: the calling key's use of its limits."""

    day: str = Field(description="The UTC day counted, YYYY-MM-DD.")
    megapixel_steps: float = Field(
        description="Charged today: width*height/1e6 * steps * n per job submitted, less "
        "the jobs canceled before they ran."
    )
    quota: float | None = Field(description="The daily quota; null = unlimited.")
    active_jobs: int = Field(description="The key's jobs queued or running now.")
    max_active_jobs: int | None = Field(description="Its limit; null = unlimited.")
    jobs: JobCounts = Field(description="The key's jobs that ended today, by final status.")


class WebhookSecret(BaseModel):
    secret: str = Field(description="`whsec_` + base64: verifies this key's webhooks.")


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorEnvelope(BaseModel):
    """The one shape of every 4xx and 5xx answer."""

    error: ErrorBody


class Health(BaseModel):
    status: str
    detail: str | None = None
