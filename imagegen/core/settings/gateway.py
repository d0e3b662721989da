"""What the gateway (`imagegen api`) and the webhook deliverer (`imagegen webhooks`) read: how
it listens, the caps on a request, API keys and fair use, webhooks."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from imagegen.core.destinations import AllowList
from imagegen.core.settings.base import CommaList, CommonSettings


class GatewaySettings(CommonSettings):
    """The gateway's settings (and the webhook deliverer's, which shares its webhook rules)."""

    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    default_model: str = Field(
        "shapes-64", description="Model id used when a request names none (gateway)."
    )
    max_pixels: int = Field(
        1024 * 1024, ge=64 * 64, description="Largest width*height a request may ask for."
    )
    max_steps: int = Field(150, ge=1, description="Largest `steps` a request may ask for.")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt / negative prompt.")
    job_timeout_base_s: int = Field(
        120, ge=1, description="Fixed part of a job's hard time limit (covers queue overhead)."
    )
    job_timeout_s_per_megapixel_step: float = Field(
        4.0,
        gt=0,
        description="Time limit per step per megapixel per image; lower it on a fast GPU.",
    )
    api_keys: CommaList = Field(
        [],
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
    training_max_images: int = Field(
        200, ge=1, le=200, description="Most pictures one training may send (API.md: 1..200)."
    )
    training_max_bytes: int = Field(
        200 * 2**20,
        ge=1,
        description="Largest training upload: the request body, and the pictures a zip holds "
        "once unpacked. 413 / 422 past it.",
    )
    training_max_steps: int = Field(
        5000, ge=1, le=20000, description="Largest `steps` a training may ask for."
    )
    training_max_megapixel_steps: float = Field(
        2000.0,
        gt=0,
        description="Largest cost of one training (the model's width*height/1e6 * steps * "
        "pictures per step), checked before it is queued; it counts against the key's daily "
        "quota like a generation's.",
    )
    training_timeout_s: int = Field(
        6 * 3600, ge=60, description="A running training's time limit (it fails `timeout`)."
    )
    max_adapters_per_key: int = Field(
        20,
        ge=0,
        description="Trained adapters one API key may hold; a training past it is 429 "
        "too_many_adapters (delete one with `DELETE /v1/adapters/{id}`).",
    )
    max_streams_per_key: int = Field(
        100,
        ge=1,
        description="Event streams one API key may hold open on one gateway process; 429 "
        "too_many_streams past it.",
    )
    webhook_allowed_hosts: CommaList = Field(
        [],
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
    cors_origins: CommaList = Field(
        [],
        description="Comma-separated origins allowed by CORS; unset = no CORS headers at all.",
    )
    redis_max_connections: int = Field(
        64, ge=2, description="Connections in each gateway process's Redis pool."
    )
    redis_high_water: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Fraction of Redis's maxmemory past which the gateway refuses new jobs "
        "(503 unavailable + Retry-After), before a full Redis refuses heartbeats and results; "
        "1 = off. No effect when Redis has no maxmemory.",
    )

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _allow_list(cls, value: list[str]) -> list[str]:
        AllowList.parse(value)  # a ValueError names the entry
        return value

    @cached_property
    def webhook_allow_list(self) -> AllowList:
        """IMAGEGEN_WEBHOOK_ALLOWED_HOSTS, parsed (it was validated with the settings)."""
        return AllowList.parse(self.webhook_allowed_hosts)
