"""Where blobs live (images, input images, control maps): Redis, or S3-compatible object
storage. Read by every process that stores or serves them: the gateway and the workers."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from imagegen.core.settings.config import CONFIG


class StorageSettings(BaseSettings):
    """The blob store. Job state, queues, books and events stay in Redis whatever this says."""

    model_config = CONFIG

    storage_url: str | None = Field(
        None,
        description="Where images, input images and control maps are stored: unset = in Redis "
        "(the default, nothing else to run); `s3://bucket/prefix` = S3-compatible object "
        "storage (AWS S3, MinIO, Ceph RGW, R2, GCS's S3 API). Credentials come from the "
        "standard AWS variables and files (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, roles...).",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="The S3 API's address for a store that is not AWS (MinIO: "
        "`http://minio:9000`); unset = AWS's, from the region.",
    )
    s3_region: str | None = Field(
        None, description="The bucket's region; unset = the AWS configuration's (`AWS_REGION`)."
    )
    storage_presign: bool = Field(
        False,
        description="Image routes answer 307 to a presigned URL of the object store (minted for "
        "the job's owner only), and job documents and OpenAI `url` answers carry those URLs, so "
        "downloads bypass the gateway. S3 only.",
    )
    storage_presign_expires_s: int = Field(
        3600, ge=1, le=604800, description="How long a presigned URL stays valid (S3: ≤ 7 days)."
    )
    s3_presign_endpoint_url: str | None = Field(
        None,
        description="The store's address as clients reach it, for presigned URLs, when it "
        "differs from `IMAGEGEN_S3_ENDPOINT_URL` (compose: `http://localhost:9000`).",
    )
    storage_orphan_after_s: int = Field(
        900,
        ge=60,
        description="S3: a job's objects with no job record left (a submit refused, a process "
        "killed between storing and recording) are deleted once this old.",
    )
    storage_sweep_interval_s: int = Field(
        300, ge=5, description="S3: how often one worker sweeps expired and orphaned objects."
    )

    @field_validator("storage_url")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError("must be s3://bucket or s3://bucket/prefix (unset: Redis)")
        return value

    @field_validator("s3_endpoint_url", "s3_presign_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// address")
        return value
