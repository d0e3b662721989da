"""What every process reads: where Redis is, how long results live, how to log; and the two
setting types the others share (comma-separated lists, read once into lists)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from imagegen.core.settings.config import CONFIG
from imagegen.core.settings.storage import StorageSettings


def _comma_separated(value: object) -> object:
    """`a, b,,c` → ["a", "b", "c"]; None (unset) → []; a list (from Python) passes as it is."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# A list setting is written as comma-separated text in its variable (NoDecode: not JSON) and
# read once, here, into a list: no other module splits a setting's text.
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_comma_separated)]


class CommonSettings(StorageSettings):
    """Read by every process: the gateway, the worker, the webhook deliverer, the CLI (and the
    blob store's settings, `StorageSettings`)."""

    model_config = CONFIG

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

    worker_stale_s: int = Field(
        30, ge=3, description="A worker whose heartbeat is older than this counts as gone."
    )
    max_n: int = Field(8, ge=1, description="Largest `n` (images per job).")

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
    def _one_redis_password(self) -> CommonSettings:
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
