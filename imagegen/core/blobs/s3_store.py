"""Blobs in S3-compatible object storage (AWS S3, MinIO, Ceph RGW, R2, GCS's S3 API), through
boto3: it reads the standard AWS credential chain (variables, shared files, SSO, instance and
task roles) that users of these stores already configure, signs URLs locally, and its
botocore client is safe to share between threads. The gateway calls it from worker threads."""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
from botocore.config import Config

from imagegen.core.blobs.base import BlobStore, Listed, StorageUnavailable
from imagegen.core.blobs.names import Blob

CHUNK = 64 * 1024
# Bounded waits: a store that does not answer is a 503 or a failed job in seconds, not minutes.
CLIENT_CONFIG = Config(
    connect_timeout=3,
    read_timeout=15,
    retries={"max_attempts": 3, "mode": "standard"},
)
MISSING = {"NoSuchKey", "404", "NotFound"}


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix/"); no prefix → ("bucket", "")."""
    parts = urlsplit(url)
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


class S3BlobStore(BlobStore):
    inline = False

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        presign_endpoint_url: str | None = None,
    ) -> None:
        self.bucket, self.prefix = split_url(url)
        # A store that is not AWS (MinIO, moto, RGW) is addressed by path: bucket names in
        # host names need DNS that such a deployment rarely has.
        style = Config(s3={"addressing_style": "path"}) if endpoint_url else Config()
        session = boto3.session.Session(region_name=region)
        self.client = session.client(
            "s3", endpoint_url=endpoint_url, config=CLIENT_CONFIG.merge(style)
        )
        self.signer = (
            session.client(
                "s3", endpoint_url=presign_endpoint_url, config=CLIENT_CONFIG.merge(style)
            )
            if presign_endpoint_url
            else self.client
        )

    def key(self, blob: Blob) -> str:
        return self.prefix + blob.path

    def put(self, blob: Blob, data: bytes, ttl_s: int) -> None:
        self._call(
            "put_object",
            Bucket=self.bucket,
            Key=self.key(blob),
            Body=data,
            ContentType=blob.media_type,
        )

    def get(self, blob: Blob) -> bytes | None:
        reply = self._get_object(blob)
        if reply is None:
            return None
        with reply["Body"] as body:
            data: bytes = body.read()
        return data

    def chunks(self, blob: Blob) -> Iterator[bytes] | None:
        reply = self._get_object(blob)
        if reply is None:
            return None
        return _closing_chunks(reply["Body"])

    def delete(self, blobs: Iterable[Blob]) -> None:
        self.delete_paths([blob.path for blob in blobs])

    def delete_paths(self, paths: list[str]) -> None:
        """Delete objects by their paths under the prefix (S3 takes 1000 at a time)."""
        for start in range(0, len(paths), 1000):
            keys = [{"Key": self.prefix + p} for p in paths[start : start + 1000]]
            self._call(
                "delete_objects", Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}
            )

    def url(self, blob: Blob, expires_s: int) -> str | None:
        params = {
            "Bucket": self.bucket,
            "Key": self.key(blob),
            "ResponseContentType": blob.media_type,
            "ResponseContentDisposition": f'inline; filename="{blob.filename}"',
        }
        url: str = self.signer.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=expires_s
        )
        return url

    def where(self, blob: Blob) -> str:
        return f"s3://{self.bucket}/{self.key(blob)}"

    def listing(self, prefix: str) -> Iterator[Listed]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield Listed(
                        item["Key"][len(self.prefix) :],
                        float(calendar.timegm(item["LastModified"].utctimetuple())),
                    )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise StorageUnavailable(f"s3://{self.bucket}/{self.prefix}: {exc}") from exc

    def _get_object(self, blob: Blob) -> dict[str, Any] | None:
        try:
            return self._call("get_object", Bucket=self.bucket, Key=self.key(blob))
        except _Missing:
            return None

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = getattr(self.client, operation)(**params)
            return reply
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in MISSING:
                raise _Missing from None
            raise StorageUnavailable(f"s3://{self.bucket}/{self.prefix}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            # Connection refused, timeouts, no credentials: the store cannot be used now.
            raise StorageUnavailable(f"s3://{self.bucket}/{self.prefix}: {exc}") from exc


class _Missing(Exception):
    """The object is not there (S3's NoSuchKey)."""


def _closing_chunks(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()
