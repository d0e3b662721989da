"""The training contract shared by the gateway and the worker: a fine-tuning run (`POST
/v1/trainings`) as the lifecycle queues and runs it, and the adapter it leaves behind.

A training is a run like a generation job: one hash under `Keys.job`, the same states, the same
lifecycle scripts, webhooks, idempotency and books. It waits in its model's training lane (a
queue of its own, `training_lane`), so only workers started with trainings enabled take it and
no generation ever waits behind one in its model's queue. Its pictures are its inputs
(`train-000`, ...: stored and expired like a job's input images); its checkpoint is a blob
beside them; its result is an adapter registered under `Keys.adapter`, private to the key that
trained it.
"""

from __future__ import annotations

import re
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from imagegen.core.contract import AdapterInfo, Keys, RunRecord

TRAINING_ID_PREFIX = "trn_"
TRAINING_ID_RE = re.compile(r"^trn_[A-Za-z0-9_-]{22}$")
# A trained adapter's id: "<name>-<8 lowercase letters and digits>".
ADAPTER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}-[a-z0-9]{8}$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
# A trigger word: one word of letters and digits (a tokenizer adds it as one new token).
TRIGGER_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{1,31}$")
MAX_TRAINING_IMAGES = 200
MAX_RANK = 128
MAX_TRAINING_STEPS = 20000
# The lane suffix: a model id never holds ':' (it names Redis keys and URLs).
LANE_SUFFIX = ":train"
# The input blob name of the training's i-th picture.
IMAGE_INPUT = "train-{:03d}"


def training_lane(model: str) -> str:
    """The queue a model's trainings wait in (`Keys.queue(training_lane(model))`)."""
    return model + LANE_SUFFIX


def new_training_id() -> str:
    return TRAINING_ID_PREFIX + secrets.token_urlsafe(16)


def is_valid_training_id(value: str) -> bool:
    return TRAINING_ID_RE.fullmatch(value) is not None


def adapter_id_for(name: str, training_id: str) -> str:
    """`<name>-<short id>`: the short id is made of the training id's random part, lowercased
    letters and digits only, so one name trained twice gets two ids."""
    short = "".join(c for c in training_id[len(TRAINING_ID_PREFIX) :].lower() if c.isalnum())
    return f"{name}-{(short + '00000000')[:8]}"


def private_token(adapter_id: str) -> str:
    """The word an adapter's trigger is loaded under in a worker's shared tokenizer: the
    owner's trigger word is rewritten to it in that owner's prompts only, so two keys may train
    the same trigger word and no other prompt ever reads it."""
    return "zq" + "".join(c for c in adapter_id if c.isalnum())


class TrainingSpec(BaseModel):
    """A training with every default filled in: exactly what the worker runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["training"] = "training"
    model: str
    name: str
    trigger_word: str
    steps: int
    rank: int
    learning_rate: float
    train_text_encoder: bool = False
    targets: Literal["attention", "all"] = "attention"
    batch_size: int = 4
    seed: int = 0
    # One caption per picture, each naming the trigger word.
    captions: tuple[str, ...]
    # The model's native size: what each step trains on (for the cost).
    width: int
    height: int

    @property
    def lane(self) -> str:
        return training_lane(self.model)

    @property
    def n(self) -> int:
        return 1

    @property
    def batch_key(self) -> str:
        # Never shares a claim with another run: the claim takes it alone.
        return "training"

    @property
    def input_names(self) -> list[str]:
        return [IMAGE_INPUT.format(i) for i in range(len(self.captions))]

    @property
    def megapixel_steps(self) -> float:
        """What the training costs a key's daily quota: every step trains `batch_size` pictures
        of the model's size, each as a generation step of that size costs."""
        return self.width * self.height / 1e6 * self.steps * min(self.batch_size, self.images)

    @property
    def images(self) -> int:
        return len(self.captions)


class TrainedAdapter(BaseModel):
    """What a succeeded training made: a LoRA usable in `loras` by its owner."""

    id: str
    model: str
    trigger_word: str


class TrainingRecord(RunRecord):
    """A training as stored in Redis."""

    spec: TrainingSpec
    loss: float | None = None
    # The last step a checkpoint holds (and the run, by attempt, that stored it), and the step
    # a rerun resumed from (0: it did not).
    checkpoint_step: int = 0
    checkpoint_attempt: int = 0
    resumed_from_step: int = 0
    adapter: TrainedAdapter | None = None


class AdapterRecord(BaseModel):
    """A trained adapter's registration (`Keys.adapter`): whose it is, what it adapts, and the
    token its trigger word is loaded under in a worker."""

    id: str
    owner: str  # the API key name that trained it ("" on an open service)
    model: str
    trigger_word: str
    token: str
    training_id: str
    created_at: float
    rank: int = 0
    description: str = Field(default="")

    def info(self) -> AdapterInfo:
        """The adapter as its owner's listings show it (`owner` "you"); nobody else sees it."""
        return AdapterInfo(
            id=self.id,
            kind="lora",
            description=self.description,
            trigger_words=[self.trigger_word],
            format="kohya",
            owner="you",
        )


def adapter_keys(record: AdapterRecord) -> tuple[str, str]:
    """(the adapter's registration, its owner's set of adapters)."""
    return Keys.adapter(record.id), Keys.key_adapters(record.owner)
