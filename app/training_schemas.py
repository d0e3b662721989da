"""The request and documents of `/v1/trainings` and `/v1/adapters` (API.md "Trainings")."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import ErrorInfo, Timings, WebhookInfo, WebhookRequest
from imagegen.core.trainings import MAX_RANK, MAX_TRAINING_IMAGES, MAX_TRAINING_STEPS

# A caption is one window of the text encoder at most (checked in tokens too): 1000 characters
# is far past any window.
MAX_CAPTION_CHARS = 1000


class TrainingOptions(BaseModel):
    """A training's fields besides its pictures (multipart form fields, or JSON members)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200, description="Default: the default model.")
    name: str = Field(
        "lora",
        max_length=40,
        description="Names the adapter (`<name>-<short id>`): lowercase letters, digits, '-'.",
    )
    trigger_word: str = Field(
        max_length=32,
        description="The new word prompts use for what the pictures show: one word of letters "
        "and digits that the model does not know yet (e.g. `zxq`).",
    )
    steps: int | None = Field(None, ge=1, le=MAX_TRAINING_STEPS)
    rank: int | None = Field(None, ge=1, le=MAX_RANK)
    learning_rate: float | None = Field(None, gt=0, le=1.0, allow_inf_nan=False)
    train_text_encoder: bool = False
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    webhook: WebhookRequest | None = None


class TrainingImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="Base64 (or a data URI) of a PNG, JPEG or WebP.")
    caption: str | None = Field(None, max_length=MAX_CAPTION_CHARS)


class TrainingRequest(TrainingOptions):
    """`POST /v1/trainings` as JSON."""

    images: list[TrainingImage] = Field(min_length=1, max_length=MAX_TRAINING_IMAGES)


class TrainingProgress(BaseModel):
    step: int
    total_steps: int
    loss: float | None = Field(None, description="The last step's training loss.")
    eta_s: float | None = Field(None, description="Seconds left, once a step rate is known.")


class AdapterRef(BaseModel):
    """The adapter a succeeded training made: put its id in a generation's `loras`."""

    id: str
    model: str
    trigger_word: str


class TrainingDocument(BaseModel):
    """A training (`GET /v1/trainings/{id}`)."""

    id: str
    object: str = "training"
    status: str = Field(description="queued | running | succeeded | failed | canceled")
    model: str
    name: str
    trigger_word: str
    images: int = Field(description="Pictures it trains on.")
    steps: int
    rank: int
    learning_rate: float
    train_text_encoder: bool
    queue_position: int | None
    progress: TrainingProgress
    checkpoint_step: int = Field(
        0, description="The last step stored in a checkpoint (a rerun resumes there)."
    )
    resumed_from_step: int = Field(
        0, description="The step a rerun resumed from after its worker was lost (0: none)."
    )
    adapter: AdapterRef | None
    error: ErrorInfo | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    timings: Timings
    webhook: WebhookInfo | None = None


class TrainingList(BaseModel):
    object: str = "list"
    data: list[TrainingDocument]


class AdapterDocument(BaseModel):
    """A trained adapter (`DELETE /v1/adapters/{id}` answers it, `deleted` true)."""

    id: str
    object: str = "adapter"
    model: str
    trigger_word: str
    training_id: str
    created_at: str
    deleted: bool = False
