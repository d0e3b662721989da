"""Service settings, read from `IMAGEGEN_*` environment variables (or a `.env` file).

Why one module of 450 lines: one class is every setting of every process, which the docs' settings
page is generated from; splitting it per process (gateway, worker, local runner) is planned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from imagegen.core.destinations import AllowList

Toggle = Literal["auto", "on", "off"]


class Settings(BaseSettings):
    """One settings object for the gateway, the worker and the local runner.

    Each field says who reads it; the README's settings table is generated from these docs.
    """

    model_config = SettingsConfigDict(
        env_prefix="IMAGEGEN_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    # --- shared -----------------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis that holds the queues, jobs and images. A password in the URL must "
        "be percent-encoded; better, leave it out and set IMAGEGEN_REDIS_PASSWORD.",
    )
    redis_password: SecretStr | None = Field(
        None,
        description="Password of that Redis, kept out of the URL so that any characters work "
        "(`openssl rand -base64` makes `/` and `+`); unset = the URL's, if any.",
    )
    result_ttl_s: int = Field(
        3600, ge=1, description="How long the images of a succeeded job stay downloadable."
    )
    expired_notice_s: int = Field(
        86400,
        ge=0,
        description="How long a succeeded job's record outlives its images, so a late "
        "download is told the image expired.",
    )
    failure_ttl_s: int = Field(
        86400, ge=1, description="How long failed and canceled jobs stay readable."
    )
    log_level: str = Field("INFO", description="Python log level of every process.")
    log_json: bool = Field(False, description="Log JSON lines (one object per line) to stderr.")

    # --- gateway ----------------------------------------------------------------------------
    default_model: str = Field(
        "shapes-64", description="Model id used when a request names none (gateway)."
    )
    max_pixels: int = Field(
        1024 * 1024, ge=64 * 64, description="Largest width*height a request may ask for."
    )
    max_steps: int = Field(150, ge=1, description="Largest `steps` a request may ask for.")
    max_n: int = Field(8, ge=1, description="Largest `n` (images per job).")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt / negative prompt.")
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
    job_timeout_base_s: int = Field(
        120, ge=1, description="Fixed part of a job's hard time limit (covers queue overhead)."
    )
    job_timeout_s_per_megapixel_step: float = Field(
        4.0,
        gt=0,
        description="Time limit per step per megapixel per image; lower it on a fast GPU.",
    )
    api_keys: str | None = Field(
        None,
        description="API keys as `name:sha256-hex` entries, comma-separated (make them with "
        "`imagegen new-key NAME`); unset (and no file) = an open service.",
    )
    api_keys_file: Path | None = Field(
        None, description="File of `name:sha256-hex` lines, added to IMAGEGEN_API_KEYS."
    )
    rate_limit_per_minute: int = Field(
        600,
        ge=1,
        description="Requests per minute per API key (per client address when open), "
        "counted in Redis across gateway replicas.",
    )
    auth_failures_per_minute: int = Field(
        20,
        ge=1,
        description="Requests with a missing or wrong API key one client address may make per "
        "minute before it is answered 429 rate_limited (with Retry-After) instead of 401; "
        "counted in Redis across gateway replicas.",
    )
    max_body_bytes: int = Field(
        65536, ge=1024, description="Largest request body, chunked or not (413 past it)."
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=4096,
        description="Largest request line plus headers a gateway reads; past it the request "
        "is answered 431 and the connection closed.",
    )
    header_read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's line and headers, from the "
        "connection's first byte; then 408 and the connection is closed.",
    )
    body_read_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds a client has to send a request's whole body once its headers "
        "are in (a slow sender holds a connection and its buffer); then 408 and the "
        "connection is closed.",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="Operator token for `GET /metrics`: with API keys configured, the per-key "
        "series (each key's name, jobs, megapixel-steps, webhook outcomes) are only in a "
        "scrape that sends `Authorization: Bearer <token>`; unset = never on the public port.",
    )
    max_input_image_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Largest input image (`image`, `mask`) as a file, before base64; 422 "
        "naming the field past it.",
    )
    max_image_body_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Largest body of a request that carries images (JSON with `image`/`mask`, "
        "or /v1/images/edits); other requests keep IMAGEGEN_MAX_BODY_BYTES. 413 past it.",
    )
    max_queue_depth: int = Field(
        1000, ge=1, description="Jobs a model's queue may hold; 429 queue_full past it."
    )
    max_active_jobs: int = Field(
        0,
        ge=0,
        description="Jobs (queued + running) one API key may have at once, past which a "
        "submit is 429 too_many_jobs; 0 = unlimited. A key's `max_active_jobs=` in the key "
        "file overrides it (there, 0 = none allowed).",
    )
    daily_quota_megapixel_steps: float = Field(
        0,
        ge=0,
        description="Megapixel-steps (width*height/1e6 * steps * n) one API key may submit "
        "per UTC day, past which a submit is 429 quota_exceeded; 0 = unlimited. A key's "
        "`daily_quota_megapixel_steps=` in the key file overrides it (there, 0 = none).",
    )
    max_streams_per_key: int = Field(
        100,
        ge=1,
        description="Event streams one API key may hold open on one gateway process; 429 "
        "too_many_streams past it.",
    )
    webhook_allowed_hosts: str | None = Field(
        None,
        description="Comma-separated hosts and CIDRs that webhooks may reach although they "
        "are loopback, private or link-local (and over http too), each with an optional port "
        "that it then allows alone, e.g. `hooks.internal:8443,10.1.0.0/16:443,[fd00::/8]:443`; "
        "unset = public https destinations only.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Master secret that each API key's webhook signing secret is derived "
        "from (HMAC with the key's name; `GET /v1/webhook-secret` shows a key its own); unset "
        "= one made at random, kept in Redis. A key's `webhook_secret=whsec_...` in the key "
        "file overrides its own (gateway, webhook delivery).",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, description="Time limit of each phase (connect, send, answer) of a delivery."
    )
    webhook_retry_first_s: float = Field(
        5.0,
        gt=0,
        description="Wait before the first retry of a failed delivery; each later wait doubles "
        "(with jitter) up to IMAGEGEN_WEBHOOK_RETRY_MAX_S.",
    )
    webhook_retry_max_s: float = Field(
        600.0, gt=0, description="Longest wait between two attempts of one delivery."
    )
    webhook_retry_for_s: float = Field(
        3 * 3600.0,
        gt=0,
        description="How long a delivery is retried before it is given up (a final `failed` "
        "record on the job); the contract asks for at least an hour.",
    )
    webhook_concurrency: int = Field(
        8, ge=1, description="Deliveries one webhook delivery process sends at once."
    )
    cors_origins: str | None = Field(
        None,
        description="Comma-separated origins allowed by CORS; unset = no CORS headers at all.",
    )
    redis_max_connections: int = Field(
        64, ge=2, description="Connections in each gateway process's Redis pool."
    )
    worker_stale_s: int = Field(
        30, ge=3, description="A worker whose heartbeat is older than this counts as gone."
    )
    redis_high_water: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Fraction of Redis's maxmemory past which the gateway refuses new jobs "
        "(503 unavailable + Retry-After), before a full Redis refuses heartbeats and results; "
        "1 = off. No effect when Redis has no maxmemory.",
    )
    # --- worker -----------------------------------------------------------------------------
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
    models: str | None = Field(
        None,
        description="Comma-separated models this worker serves, each a hub id or a local "
        "directory, optionally `id=source`; loaded on demand, the least recently used "
        "unloaded past the memory budget. Unset = IMAGEGEN_MODEL alone, or, when that is "
        "unset too, the built-in models on disk (shapes-64 and shapes-64-fast).",
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
    compile_batches: str = Field(
        "1,2,4,8",
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
    fault_injection: bool = Field(
        False, description="Test suites only: honour `__fault__:` prompts (see worker/faults.py)."
    )
    fault_crash_at: str | None = Field(
        None,
        description="Test suites only (with IMAGEGEN_FAULT_INJECTION): die at this named "
        "point of a job's lifecycle, once (see worker/faults.py).",
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

    # --- local runner / gateway process -----------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")

    @field_validator("redis_url")
    @classmethod
    def _parsable_url(cls, value: str) -> str:
        from redis.connection import parse_url

        try:
            parse_url(value)  # type: ignore[no-untyped-call]
        except ValueError:
            # Never echo the URL: it may hold a password.
            raise ValueError(
                "not a redis:// URL that redis-py can read; a password with characters such "
                "as / # @ : must be percent-encoded, or set in IMAGEGEN_REDIS_PASSWORD"
            ) from None
        return value

    @model_validator(mode="after")
    def _one_redis_password(self) -> Settings:
        from redis.connection import parse_url

        in_url = parse_url(self.redis_url).get("password")  # type: ignore[no-untyped-call]
        if self.redis_password is not None and in_url:
            raise ValueError(
                "IMAGEGEN_REDIS_PASSWORD is set and IMAGEGEN_REDIS_URL holds a password too; "
                "keep it in one place"
            )
        return self

    def redis_options(self) -> dict[str, Any]:
        """Keyword arguments for redis-py's `from_url(settings.redis_url, ...)`."""
        if self.redis_password is None:
            return {}
        return {"password": self.redis_password.get_secret_value()}

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _allow_list(cls, value: str | None) -> str | None:
        AllowList.parse(value)  # a ValueError names the entry
        return value

    @field_validator("compile_batches")
    @classmethod
    def _batch_sizes(cls, value: str) -> str:
        parts = [part.strip() for part in value.split(",") if part.strip()]
        if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise ValueError(f"must be positive integers separated by commas, got {value!r}")
        return ",".join(str(size) for size in sorted({int(part) for part in parts}))

    @property
    def compile_batch_sizes(self) -> tuple[int, ...]:
        """IMAGEGEN_COMPILE_BATCHES as numbers, ascending."""
        return tuple(int(part) for part in self.compile_batches.split(","))

    @model_validator(mode="after")
    def _compiled_sizes_hold_every_batch(self) -> Settings:
        # A batch larger than every compiled size would be compiled while a job waits.
        if not self.compile:
            return self
        largest = self.compile_batch_sizes[-1]
        for name, value in (("max_n", self.max_n), ("batch_max_images", self.batch_max_images)):
            if value > largest:
                raise ValueError(
                    f"IMAGEGEN_{name.upper()} ({value}) exceeds the largest size in "
                    f"IMAGEGEN_COMPILE_BATCHES ({largest}); add a size of at least {value}"
                )
        return self


def markdown_table() -> str:
    """Every setting as a Markdown table row: variable, default, meaning (for the README)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else f"`{field.default}`"
        rows.append(f"| `IMAGEGEN_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)
