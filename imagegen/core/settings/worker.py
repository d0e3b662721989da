"""What a worker (`imagegen worker`) reads: the models it serves, the device and its speed-ups,
batching, recovery, heartbeats, previews."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import NoDecode

from imagegen.core.settings.base import CommaList, CommonSettings

Toggle = Literal["auto", "on", "off"]


def _batch_sizes(value: object) -> tuple[int, ...]:
    """`4,1,2` → (1, 2, 4): positive, unique, ascending."""
    parts = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    try:
        sizes = {int(str(part).strip()) for part in parts if str(part).strip()}
    except ValueError:
        sizes = set()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"must be positive integers separated by commas, got {value!r}")
    return tuple(sorted(sizes))


BatchSizes = Annotated[tuple[int, ...], NoDecode, BeforeValidator(_batch_sizes)]


class WorkerSettings(CommonSettings):
    """A worker's settings."""

    max_prompt_chunks: int = Field(
        4,
        ge=1,
        description="Worker: text-encoder windows a prompt may fill (longer prompts are encoded "
        "window by window and concatenated); with the window size it sets each model's "
        "`max_prompt_tokens` (4 x 75 = 300 for CLIP).",
    )
    prompt_weighting: bool = Field(
        True,
        description="Worker: read `(word:1.3)`, `(word)`, `[word]` in prompts as weights "
        "(off: brackets are plain text).",
    )
    model: str | None = Field(
        None,
        description="Hub id or local directory of a diffusers text-to-image pipeline; "
        "unset = the built-in shapes-64 model.",
    )
    model_id: str | None = Field(
        None,
        description="Id the worker serves the model under; default: the hub id, the local "
        "model's imagegen.json id, or its directory name.",
    )
    models: CommaList = Field(
        [],
        description="Comma-separated models this worker serves, each a hub id or a local "
        "directory, optionally `id=source`; loaded on demand, the least recently used "
        "unloaded past the memory budget. Unset = IMAGEGEN_MODEL alone, or, when that is "
        "unset too, the built-in models on disk (shapes-64 and shapes-64-fast).",
    )
    models_file: Path | None = Field(
        None,
        description="The model catalog (YAML, `models:` a list of `id`, `source`, `revision`, "
        "`vae`, `dtype`, `defaults` {steps, guidance_scale, scheduler, width, height}, "
        "`max_pixels`, `max_steps`; see docs/bring-your-own-models.md), checked whole at start: "
        "one line per problem. Served before the IMAGEGEN_MODELS entries, if both are set.",
    )
    lora_dir: Path | None = Field(
        None,
        description="The LoRA library: `<id>.safetensors` files (kohya/civitai, diffusers or "
        "PEFT), each with an optional `<id>.json` card (`description`, `trigger_words`, "
        "`default_scale`), served with every model whose family a file fits (hub models too); "
        "unset = only the `loras/` beside each local model.",
    )
    safety_checker: Literal["auto", "off"] = Field(
        "auto",
        description="auto = run the safety checker a model ships (Stable Diffusion 1.x/2.x "
        "checkpoints do): a flagged image is withheld (`filtered: true`, its PNG a 404 "
        "`content_filtered`), never a silent black image. off = no checker runs and every "
        "image is returned: the operator answers for what the service then shows.",
    )
    depth_model: str | None = Field(
        None,
        description="The `depth` control preprocessor: a transformers depth-estimation model "
        "(a local directory or a hub id in the cache, e.g. "
        "depth-anything/Depth-Anything-V2-Small-hf); unset = no `depth` preprocessor. `canny` "
        "and `scribble` need no model. Loaded at start: one that fails is left out (logged).",
    )
    pose_model: str | None = Field(
        None,
        description="The `pose` control preprocessor: a transformers ViTPose checkpoint (a "
        "local directory or a hub id in the cache, e.g. usyd-community/vitpose-base-simple); "
        "the whole picture is read as one person and drawn as OpenPose draws a body. Unset = "
        "no `pose` preprocessor. Loaded at start: one that fails is left out (logged).",
    )
    lora_rescan_s: float = Field(
        10.0,
        ge=0,
        description="How often, between batches, a worker looks for LoRA files added to or "
        "removed from IMAGEGEN_LORA_DIR and its models' `loras/` (SIGHUP: at once); 0 = only "
        "when a model loads, and on SIGHUP.",
    )
    model_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Memory the worker's loaded models may hold together; unset = "
        "IMAGEGEN_MODEL_MEMORY_FRACTION of free GPU memory (CUDA) or of available RAM (CPU).",
    )
    model_memory_fraction: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Share of free GPU memory / available RAM at start that loaded models "
        "may hold (the rest is for activations), unless IMAGEGEN_MODEL_MEMORY_GIB is set.",
    )
    model_retry_s: float = Field(
        60.0,
        ge=0,
        description="After a model failed to load, its jobs fail `model_unavailable` for this "
        "long before the worker tries to load it again (no reload loop).",
    )
    cold_max_wait_s: float = Field(
        10.0,
        ge=0,
        description="Routing by warmth: a job of a model this worker does not hold warm is "
        "taken before warm models' jobs once it has waited this long.",
    )
    cold_max_skips: int = Field(
        8,
        ge=0,
        description="Routing by warmth: a cold model's waiting job is taken next after the "
        "worker passed it over for this many warm claims in a row.",
    )
    model_max_pixels: int | None = Field(
        None,
        ge=64 * 64,
        description="Pixel cap (width*height) announced with a model whose directory has no "
        "imagegen.json `max_pixels` (a hub model); unset = only IMAGEGEN_MAX_PIXELS.",
    )
    model_max_steps: int | None = Field(
        None,
        ge=1,
        description="Steps cap announced with a model whose imagegen.json has no `max_steps`; "
        "unset = only IMAGEGEN_MAX_STEPS.",
    )
    device: Literal["auto", "cuda", "cpu", "mps"] = Field(
        "auto", description="Torch device; auto = cuda when available, else cpu."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights dtype; auto = float16 on CUDA, float32 elsewhere."
    )
    attention_slicing: Toggle = Field(
        "auto", description="Attention slicing; auto = on only when free GPU memory is short."
    )
    vae_tiling: Toggle = Field(
        "auto", description="VAE tiling; auto = on only when free GPU memory is short."
    )
    low_memory_gib: float = Field(
        6.0, ge=0, description="Free GPU memory below which `auto` turns slicing/tiling on."
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet and VAE decoder at start (CUDA), warmed up for the "
        "batch sizes in IMAGEGEN_COMPILE_BATCHES; halves GPU latency, costs about a minute per "
        "size at start on an H100 (less on a restart with TORCHINDUCTOR_CACHE_DIR kept).",
    )
    compile_batches: BatchSizes = Field(
        (1, 2, 4, 8),
        description="Batch sizes (images) compiled and warmed up at start, at the model's "
        "native size; a batch is padded up to the next of them, and other shapes run eagerly, "
        "so no job waits for a compilation. The largest must hold IMAGEGEN_MAX_N and "
        "IMAGEGEN_BATCH_MAX_IMAGES.",
    )
    fuse_qkv: bool = Field(
        False, description="Fuse the attention QKV projections (where the model allows)."
    )
    channels_last: bool = Field(
        False, description="Run the UNet and VAE in channels_last memory format."
    )
    batch_invariant: Toggle = Field(
        "auto",
        description="Generate each image of a job in its own pipeline call, so image i is "
        "byte-identical to seed+i alone; auto = on for CPU, off for GPU (speed).",
    )
    batch_max_images: int = Field(
        0,
        ge=0,
        description="Images one denoising loop may hold when queued jobs share a shape; "
        "0 = auto (1 on CPU, from free memory on a GPU).",
    )
    batch_max_wait_s: float = Field(
        0.0,
        ge=0,
        le=5,
        description="How long a worker starting a job keeps looking for queued jobs to fill "
        "its batch (less once it is full or a job of another shape waits); 0 = take only "
        "what is queued at that moment.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Runs a job gets when its worker is lost before it fails."
    )
    recovery_interval_s: float = Field(
        5.0, gt=0, description="How often each worker sweeps for jobs of lost workers."
    )
    hard_timeout_grace_s: float = Field(
        15.0,
        gt=0,
        description="Past a job's time limit plus this, a worker whose job is stuck in native "
        "code fails the job and exits for its supervisor to restart it.",
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of the worker's own Prometheus endpoint; 0 = off."
    )
    warmup: bool = Field(True, description="Run one small generation before taking jobs.")
    heartbeat_interval_s: float = Field(
        2.0, gt=0, description="How often a worker publishes its heartbeat."
    )
    worker_name: str | None = Field(None, description="Worker name; default host.pid.random.")
    heartbeat_file: Path | None = Field(
        None,
        description="File the worker rewrites after each heartbeat Redis took; "
        "`imagegen check-worker` reads it (container healthcheck).",
    )
    preview_interval_s: float = Field(
        0.5,
        gt=0,
        description="Least time between two live previews of one job (only made while a "
        "client watches them: `/events?previews=true`).",
    )
    progress_interval_s: float = Field(
        0.1, gt=0, description="Least time between two progress writes of one job."
    )
    worker_tasks: CommaList = Field(
        ["generate"],
        description="What this worker takes: `generate` (generation jobs), `train` "
        "(trainings, `POST /v1/trainings`), or both (`generate,train`: a training runs "
        "only while no generation waits, and yields to one between its steps).",
    )
    training_checkpoint_steps: int = Field(
        100,
        ge=1,
        description="A running training stores a checkpoint every this many steps (in the "
        "result store); a worker that takes it over after a crash resumes from the last one.",
    )
    max_loaded_trained_adapters: int = Field(
        32,
        ge=1,
        description="Trained adapters (`POST /v1/trainings`) a warm pipeline holds at most; "
        "before a batch, the least recently used ones its jobs do not name are unloaded, and "
        "load again from the result store when a job names them.",
    )
    training_precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="What a training's frozen weights run in: `fp16`/`bf16` under autocast "
        "with the LoRA and the trigger word learning in fp32 (fp16 with a loss scaler), or "
        "`fp32`. `auto`: bf16 on a GPU that has it, else fp16; fp32 on a CPU.",
    )
    training_gradient_checkpointing: Toggle = Field(
        "auto",
        description="Recompute a training's activations in its backward pass: less GPU memory "
        "beside the warm pipeline the worker serves, more time per step (each block runs twice). "
        "`auto`: on on a GPU, off on a CPU.",
    )

    @model_validator(mode="after")
    def _known_tasks(self) -> WorkerSettings:
        unknown = sorted(set(self.worker_tasks) - {"generate", "train"})
        if unknown or not self.worker_tasks:
            raise ValueError(
                f"IMAGEGEN_WORKER_TASKS takes `generate`, `train` or both, got {unknown or '[]'}"
            )
        return self

    @model_validator(mode="after")
    def _compiled_sizes_hold_every_batch(self) -> WorkerSettings:
        # A batch larger than every compiled size would be compiled while a job waits.
        if not self.compile:
            return self
        largest = self.compile_batches[-1]
        for name, value in (("max_n", self.max_n), ("batch_max_images", self.batch_max_images)):
            if value > largest:
                raise ValueError(
                    f"IMAGEGEN_{name.upper()} ({value}) exceeds the largest size in "
                    f"IMAGEGEN_COMPILE_BATCHES ({largest}); add a size of at least {value}"
                )
        return self
