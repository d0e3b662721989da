"""The job contract shared by the gateway and the worker.

Only pydantic lives here: the gateway must never import torch and the worker never FastAPI, so
whatever both need to agree on — the resolved job spec, status names, the worker heartbeat and
the Redis key names — is defined once, in this module.

Why one module of 460 lines: it is the list of everything the two sides agree on — a
reader checks a field against one file, and `Keys` keeps every Redis key name in one place.
"""

from __future__ import annotations

import enum
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

JOB_ID_PREFIX = "gen_"
# 16 random bytes, url-safe base64 without padding: 22 characters.
JOB_ID_RE = re.compile(r"^gen_[A-Za-z0-9_-]{22}$")
SEED_MAX = 2**32 - 1

# The scheduler names a client may ask for, each a diffusers scheduler class (by name) and the
# config it overrides on the pipeline's own: data that the worker and the built-in model's
# recipes both build from, so the two cannot drift.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    # Latent consistency models and LCM-LoRAs: 2-8 steps, guidance 1-2.
    "lcm": ("LCMScheduler", {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)

# What a job does with its inputs: text alone, or image-to-image, inpainting, outpainting.
# "preprocess": a control preview (POST /v1/control/preprocess), the map as its one image.
Task = Literal["text", "img2img", "inpaint", "outpaint", "preprocess"]
# The file format of a job's images: PNG (default, lossless) or, as OpenAI's `output_format`,
# JPEG/WebP at `output_compression` (0..100, OpenAI's default 100).
OutputFormat = Literal["png", "jpeg", "webp"]
# Inpainting options (A1111's `mask_blur` and "only masked" padding), in pixels.
MAX_MASK_BLUR = 64
MAX_PADDING_MASK_CROP = 1024
DEFAULT_OUTPUT_COMPRESSION = 100
# Where a worker is, as its heartbeat says: loading and warming up, idle, running a batch.
WorkerStateName = Literal["starting", "ready", "busy"]

# Schedulers that cannot run fewer steps than this (PNDM's Runge-Kutta warm-up takes 4).
SCHEDULER_MIN_STEPS: dict[str, int] = {"pndm": 4}


class JobStatus(enum.StrEnum):
    """Where a generation job is in its life; the last three are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class ErrorCode(enum.StrEnum):
    """Why a job failed (the job document's `error.code`)."""

    OUT_OF_MEMORY = "out_of_memory"
    WORKER_LOST = "worker_lost"
    TIMEOUT = "timeout"
    CANCELED = "canceled"
    INTERNAL = "internal"
    # The worker could not load the job's model (missing, corrupt, too big for its memory
    # budget): the job fails at once rather than run on another model or loop on a reload.
    MODEL_UNAVAILABLE = "model_unavailable"
    # The request broke a limit only the worker could check (a prompt past the model's
    # max_prompt_tokens when the gateway could not count its tokens).
    INVALID_REQUEST = "invalid_request"
    # The blob store (S3) did not take the job's images or give back its inputs.
    STORAGE_UNAVAILABLE = "storage_unavailable"


class InputRef(BaseModel):
    """An input image as the job shows it: the sha256 of the file sent, and its size (after
    EXIF orientation). The pixels are stored apart, once (`Keys.input`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str
    width: int
    height: int


class Outpaint(BaseModel):
    """Pixels the canvas grows by on each side."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    def sides(self) -> tuple[int, int, int, int]:
        return (self.left, self.right, self.top, self.bottom)


# What a job does with its inputs: draw from noise, or start from / keep part of an image.
TASKS = ("text", "img2img", "inpaint", "outpaint")


MAX_LORAS = 4
LORA_SCALE_LIMIT = 2.0
CONTROL_SCALE_MAX = 2.0
# ControlNets one job may stack (`controls`), as diffusers' MultiControlNetModel sums them.
MAX_CONTROLS = 3
# What turns a user's image into a control map, in the worker ("none": the image is the map).
PREPROCESSORS = ("none", "canny", "scribble", "depth", "pose")


class LoraRef(BaseModel):
    """One LoRA a job runs with: an id among its model's `adapters`, and its scale."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    scale: float


class ControlRef(BaseModel):
    """One ControlNet a job runs with. Its image, normalized to a PNG of the output's size, is
    stored apart (`Keys.input(job, control_blob(k))`, k its place in `controls`); `image` names
    the file sent, `preprocess` (with its `options`) what the worker makes of it first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    scale: float
    start: float
    end: float
    image: InputRef
    preprocess: str = "none"
    options: dict[str, int] = Field(default_factory=dict)


class AdapterInfo(BaseModel):
    """A LoRA or ControlNet a worker serves with its model (from the adapter's card)."""

    id: str
    kind: str  # "lora" | "controlnet"
    description: str = ""
    trigger_words: list[str] = Field(default_factory=list)
    default_scale: float = 1.0
    # A LoRA trained through the API: "you" in its owner's listing (no one else sees it).
    owner: str | None = None
    # The file's layout: "kohya" (civitai, A1111), "diffusers", "peft" (LoRAs), "diffusers"
    # (ControlNets).
    format: str = ""


class UnavailableAdapter(BaseModel):
    """An adapter file a model would serve but cannot: why, in one line."""

    id: str
    reason: str


def control_blob(k: int) -> str:
    """The input blob name of a job's k-th control image ("control" for the first, the one
    name 1.1 stored, so jobs queued before an upgrade keep their input)."""
    return "control" if k == 0 else f"control{k}"


class JobSpec(BaseModel):
    """A generation request with every default filled in: exactly what the worker runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
    # Images in (defaults: text-to-image). `image`/`mask` reference the normalized PNGs stored
    # with the job (`Keys.input(job, "image" | "mask")`); outpainting stores the grown canvas
    # and its mask under the same names.
    task: Task = "text"
    image: InputRef | None = None
    mask: InputRef | None = None
    strength: float | None = None
    outpaint: Outpaint | None = None
    # Inpainting: the composite's mask blur radius; generate only the box around the mask.
    mask_blur: int = 0
    padding_mask_crop: int | None = None

    # Adapters with a scale of 0 are left out at submit: scale 0 is the request without them.
    loras: tuple[LoraRef, ...] = ()
    controls: tuple[ControlRef, ...] = ()

    # How the images are encoded; never part of the batch key (encoding follows the loop).
    output_format: OutputFormat = "png"
    output_compression: int = DEFAULT_OUTPUT_COMPRESSION

    @model_validator(mode="before")
    @classmethod
    def _one_control(cls, data: Any) -> Any:
        # Records written before `controls` (1.1) hold one `control`, stored as "control".
        if isinstance(data, dict) and "control" in data:
            data = dict(data)
            control = data.pop("control")
            data.setdefault("controls", [control] if control is not None else [])
        return data

    @property
    def lane(self) -> str:
        """The queue the job waits in (`Keys.queue`): its model's."""
        return self.model

    @property
    def input_names(self) -> list[str]:
        """The input blobs stored with the job (`Keys.input`)."""
        names = {"text": [], "preprocess": [], "img2img": ["image"]}.get(
            self.task, ["image", "mask"]
        )
        return [*names, *(control_blob(k) for k in range(len(self.controls)))]

    def image_seed(self, index: int) -> int:
        """Image `index` of a job uses seed + index, so n=1 reproduces any single image."""
        return (self.seed + index) % (SEED_MAX + 1)

    @property
    def megapixel_steps(self) -> float:
        """What the job costs a key's daily quota: width*height/1e6 * steps * n."""
        return self.width * self.height / 1e6 * self.steps * self.n

    @property
    def shape_key(self) -> tuple[int, int, int, str]:
        """Jobs that share this key can share one denoising loop."""
        return (self.width, self.height, self.steps, self.scheduler)

    @property
    def adapter_key(self) -> str:
        """The adapter set with its scales and the control id: jobs batch together only when
        it matches ("" for a job without any)."""
        parts = [f"{lora.id}:{lora.scale!r}" for lora in sorted(self.loras, key=lambda x: x.id)]
        if self.controls:
            # In order: the residuals are summed in the order the job names its ControlNets.
            parts.append("control=" + "+".join(control.id for control in self.controls))
        return ",".join(parts)

    @property
    def batch_key(self) -> str:
        """`shape_key` as the text the claim script compares (stored with the job); jobs with
        images in also share task, strength and whether a mask is used, and jobs with adapters
        share the adapter key."""
        key = "|".join(str(part) for part in self.shape_key)
        if self.task != "text":
            masked = "mask" if self.task in ("inpaint", "outpaint") else "nomask"
            key = f"{key}|{self.task}|{self.strength!r}|{masked}"
        return f"{key}|{self.adapter_key}" if self.adapter_key else key


class ImageInfo(BaseModel):
    index: int
    seed: int
    width: int
    height: int
    # The model's safety checker flagged it: no PNG is stored (never a black image).
    filtered: bool = False


# A PIL image's `info` key the worker marks a flagged image with, from the safety checker to
# the job's record.
FILTERED_MARK = "imagegen_filtered"


class JobError(BaseModel):
    code: str
    message: str


# Events a webhook may ask for (API.md "Webhooks"); the default is the terminal three.
WEBHOOK_EVENTS: tuple[str, ...] = ("running", "succeeded", "failed", "canceled")
DEFAULT_WEBHOOK_EVENTS: tuple[str, ...] = ("succeeded", "failed", "canceled")


class WebhookTarget(BaseModel):
    """Where a job's events are posted, and which (checked at the edge)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    events: list[str]


class WebhookDelivery(BaseModel):
    """One attempt to deliver an event: when, the answer's status code or the error, and
    the outcome so far (`delivered`; `retrying`; `failed`: given up, the last attempt)."""

    event: str
    webhook_id: str
    attempt: int
    at: float
    status_code: int | None = None
    error: str | None = None
    outcome: str


class RunRecord(BaseModel):
    """What the lifecycle keeps of anything queued and run: a generation job (`JobRecord`) or a
    training (`imagegen.core.trainings.TrainingRecord`); one hash each, see `Keys.job`."""

    id: str
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress_step: int = 0
    progress_at: float | None = None
    error: JobError | None = None
    api_key: str = ""  # name of the API key that created the job ("" = open service)
    request_id: str = ""  # X-Request-ID of the submit, carried into the worker's logs
    worker: str | None = None
    owner: str | None = None  # "<worker>#<attempt>" of the run that holds the job
    attempts: int = 0
    timeout_s: float = 0.0  # the run's time limit, set at submit (0 = none)
    deadline: float | None = None  # started_at + timeout_s while running
    webhook: WebhookTarget | None = None
    webhook_deliveries: list[WebhookDelivery] = Field(default_factory=list)


class JobRecord(RunRecord):
    """A generation job as stored in Redis."""

    spec: JobSpec
    images: list[ImageInfo] = Field(default_factory=list)
    # When a succeeded job's images expire (finished_at + the worker's result TTL): after it
    # a missing image expired; before it, the store lost it.
    images_expire_at: float | None = None


class TrainingDefaults(BaseModel):
    """How a model is fine-tuned when a training leaves a field out (its card's `training:`
    section, else the family's); a model without them cannot be trained."""

    steps: int = 1000
    rank: int = 16
    learning_rate: float = 1e-4
    # Which UNet layers get the LoRA (worker.training.recipe.UNET_TARGETS).
    targets: Literal["attention", "all"] = "attention"
    batch_size: int = 4
    # The longest caption, in tokens of the model's tokenizer (its text encoder's one window
    # less its start and end markers): the recipe reads no further.
    max_caption_tokens: int = 75


class ModelInfo(BaseModel):
    """What a worker tells the gateway about the model it serves (`GET /v1/models`)."""

    id: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    schedulers: list[str]
    # The model's own request limits (its card, or settings for a hub model); None = only the
    # gateway's global caps apply.
    max_pixels: int | None = None
    max_steps: int | None = None
    adapters: list[AdapterInfo] = Field(default_factory=list)
    controls: list[AdapterInfo] = Field(default_factory=list)
    # The control preprocessors its workers run (besides "none"), e.g. ["canny", "scribble"].
    preprocessors: list[str] = Field(default_factory=list)
    unavailable_adapters: list[UnavailableAdapter] = Field(default_factory=list)
    # What the model is: "sd15" | "sd2" | "sdxl" ("" unknown), where its weights come from
    # ("diffusers" directory, "hub"), and whether its UNet is an inpainting one (9 channels).
    family: str = ""
    source_format: str = ""
    inpainting: bool = False
    # Prompts: the longest prompt in tokens of the model's own tokenizer (its text encoder's
    # windows times the configured count), whether `(word:1.3)` weighting is read, and the
    # sha256 of the tokenizer (`Keys.tokenizer`) the gateway counts with (None: it cannot).
    max_prompt_tokens: int | None = None
    prompt_weighting: bool = False
    tokenizer: str | None = None
    # Trainings (`POST /v1/trainings`): the defaults, or None when the model cannot be trained
    # (`not_trainable` says why).
    training: TrainingDefaults | None = None
    not_trainable: str | None = None


class ServedModel(BaseModel):
    """One model of a worker's list, as its heartbeat announces it."""

    info: ModelInfo
    loaded: bool = False  # held warm in memory now
    unavailable: str | None = None  # why it cannot be loaded (None: it can)
    memory_bytes: int = 0  # held while loaded, else the estimate of what loading takes


class WorkerHeartbeat(BaseModel):
    """Published by each worker every few seconds, independently of its job loop."""

    name: str
    model: ModelInfo
    device: str
    dtype: str
    version: str
    host: str
    pid: int
    started_at: float
    sent_at: float
    state: WorkerStateName
    current_jobs: list[str] = Field(default_factory=list)  # every job of the running batch
    jobs_done: int = 0
    pipelines_loaded: int = 0
    # Every model the worker can serve (its `model` is the first); empty from a worker that
    # serves one model, which then holds `model` warm.
    models: list[ServedModel] = Field(default_factory=list)
    memory_budget_bytes: int = 0  # what loaded models may hold together
    memory_used_bytes: int = 0

    def served(self) -> list[ServedModel]:
        return self.models or [ServedModel(info=self.model, loaded=True)]


class Keys:
    """Every Redis key the service writes, in one place; ids are validated before use."""

    PREFIX = "imagegen"

    @staticmethod
    def job(job_id: str) -> str:
        return f"{Keys.PREFIX}:job:{job_id}"

    @staticmethod
    def image(job_id: str, index: int) -> str:
        return f"{Keys.PREFIX}:job:{job_id}:image:{index}"

    @staticmethod
    def control_map(digest: str) -> str:
        """A preprocessed control map (PNG), by what it was made from
        (worker.preprocessors.cache_key); it expires after the result TTL."""
        return f"{Keys.PREFIX}:control-map:{digest}"

    @staticmethod
    def input(job_id: str, name: str) -> str:
        """An input blob of the job (normalized PNG: its image, mask or control image),
        written at submit and expired with the job's terminal transition."""
        return f"{Keys.PREFIX}:job:{job_id}:input:{name}"

    @staticmethod
    def events(job_id: str) -> str:
        return f"{Keys.PREFIX}:job:{job_id}:events"

    @staticmethod
    def previews(job_id: str) -> str:
        """Channel of the job's preview pictures (JSON `{"step", "image"}`)."""
        return f"{Keys.PREFIX}:job:{job_id}:previews"

    @staticmethod
    def previews_wanted(job_id: str) -> str:
        """Set, with a short TTL, while a client watches the job's previews."""
        return f"{Keys.PREFIX}:job:{job_id}:previews-wanted"

    @staticmethod
    def idempotency(digest: str) -> str:
        return f"{Keys.PREFIX}:idempotency:{digest}"

    @staticmethod
    def model(model_id: str) -> str:
        return f"{Keys.PREFIX}:model:{model_id}"

    MODELS = f"{PREFIX}:models"

    @staticmethod
    def tokenizer(digest: str) -> str:
        """A model's tokenizer (the `tokenizers` JSON), by its sha256: workers write it, the
        gateway counts prompt tokens with it."""
        return f"{Keys.PREFIX}:tokenizer:{digest}"

    # Models that have (or had) a running set: the reaper sweeps every one of them.
    RUNNING_MODELS = f"{PREFIX}:running-models"
    # Order of submission across all queues (a queue is a sorted set scored by it).
    QUEUE_SEQ = f"{PREFIX}:queue-seq"

    @staticmethod
    def queue(model_id: str) -> str:
        """Sorted set of the model's queued job ids, in the order they are to run."""
        return f"{Keys.PREFIX}:queue:{model_id}"

    @staticmethod
    def running(model_id: str) -> str:
        """Sorted set of the model's running job ids, scored by their deadline."""
        return f"{Keys.PREFIX}:running:{model_id}"

    @staticmethod
    def bell(model_id: str) -> str:
        """A list idle workers block on; every submit or take-back rings it."""
        return f"{Keys.PREFIX}:bell:{model_id}"

    JOB_STATS = f"{PREFIX}:stats:jobs"

    # Per API key (by name, "" for an open service), cluster-wide: jobs by final status,
    # megapixel-steps run, webhook deliveries by outcome ("<name>|<counter>" fields).
    KEY_STATS = f"{PREFIX}:stats:keys"

    @staticmethod
    def key_queue(model_id: str, key_name: str) -> str:
        """Sorted set of one key's queued jobs of a model, scored as in the model's queue:
        where the key's next job goes in the fair order."""
        return f"{Keys.PREFIX}:queue:{model_id}:key:{key_name}"

    @staticmethod
    def fair_round(model_id: str) -> str:
        """The round of the model's last claimed job (fair order: one job per key a round)."""
        return f"{Keys.PREFIX}:fair:{model_id}"

    @staticmethod
    def active(key_name: str) -> str:
        """Count of a key's queued and running jobs (deleted at 0)."""
        return f"{Keys.PREFIX}:active:{key_name}"

    @staticmethod
    def a1111(key_name: str) -> str:
        """An API key's AUTOMATIC1111 state: the checkpoint its `/sdapi/v1` requests use
        (`options.sd_model_checkpoint`, per key, never global) and its latest job there."""
        return f"{Keys.PREFIX}:a1111:{key_name}"

    @staticmethod
    def usage(day: str, key_name: str) -> str:
        """A key's use on one UTC day: megapixel_steps charged, jobs by final status."""
        return f"{Keys.PREFIX}:usage:{day}:{key_name}"

    # Webhook outbox: one hash per delivery (written with the job's transition, deleted once
    # delivered or given up) and the deliveries by when they are due next.
    # Held by the one worker sweeping the object store (`imagegen.core.blobs.sweeper`).
    BLOB_SWEEP = f"{PREFIX}:blob-sweep"

    WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"
    WEBHOOKS_BELL = f"{PREFIX}:webhooks:bell"
    # The secret each key's webhook secret derives from, when IMAGEGEN_WEBHOOK_SECRET is unset.
    WEBHOOK_MASTER = f"{PREFIX}:webhook-master"

    @staticmethod
    def webhook(message_id: str) -> str:
        return f"{Keys.PREFIX}:webhook:{message_id}"

    @staticmethod
    def run_seconds(model_id: str) -> str:
        return f"{Keys.PREFIX}:stats:run_seconds:{model_id}"

    @staticmethod
    def rate(budget_digest: str, window: int) -> str:
        return f"{Keys.PREFIX}:rate:{budget_digest}:{window}"

    @staticmethod
    def trainings(key_name: str) -> str:
        """Sorted set of a key's trainings by creation time (`GET /v1/trainings`)."""
        return f"{Keys.PREFIX}:trainings:{key_name}"

    @staticmethod
    def adapter(adapter_id: str) -> str:
        """A trained adapter's registration (hash: owner, model, trigger word, private token,
        training), written by its training's success; no TTL until deleted."""
        return f"{Keys.PREFIX}:adapter:{adapter_id}"

    @staticmethod
    def key_adapters(key_name: str) -> str:
        """Set of the adapter ids a key trained."""
        return f"{Keys.PREFIX}:key-adapters:{key_name}"

    @staticmethod
    def checkpoint(training_id: str) -> str:
        """A running training's last checkpoint (worker.training.recipe), for a resume."""
        return f"{Keys.PREFIX}:job:{training_id}:checkpoint"

    @staticmethod
    def worker(name: str) -> str:
        return f"{Keys.PREFIX}:worker:{name}"

    @staticmethod
    def model_workers(model_id: str) -> str:
        """Sorted set of worker names by last heartbeat time."""
        return f"{Keys.PREFIX}:model:{model_id}:workers"


def utc_day(ts: float) -> str:
    """The UTC date of unix time `ts`, as a quota's day is named: YYYY-MM-DD."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def is_valid_job_id(value: str) -> bool:
    return JOB_ID_RE.fullmatch(value) is not None
