"""Verifying the webhooks the service posts (Standard Webhooks signatures)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from ._errors import ImagegenError

DEFAULT_TOLERANCE_S = 300.0


class WebhookVerificationError(ImagegenError):
    """A webhook's headers or signature do not check out: drop the request (answer 400)."""


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a delivery's `webhook-signature` against `secret` (`whsec_...`, from
    `GET /v1/webhook-secret`) and its timestamp against replays; return the payload
    (`{"type": "generation.<event>", "data": <job document>}`).

    Pass the body exactly as received (bytes), before any JSON parsing. A delivery may come
    more than once: `headers["webhook-id"]` is the same for every copy of one delivery.
    Raises `WebhookVerificationError`."""
    lowered = {name.lower(): value for name, value in headers.items()}
    message_id = lowered.get("webhook-id")
    timestamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (message_id and timestamp and signatures):
        raise WebhookVerificationError(
            "missing webhook-id, webhook-timestamp or webhook-signature header"
        )
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not a unix time") from None
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp is {current - sent_at:+.0f}s away from now (tolerance "
            f"{tolerance_s:g}s): a replay, or a clock off"
        )
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("secret is not `whsec_` + base64") from None
    data = body.encode() if isinstance(body, str) else bytes(body)
    signed = f"{message_id}.{sent_at}.".encode() + data
    expected = hmac.new(key, signed, hashlib.sha256).digest()
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(given, expected):
            try:
                payload: dict[str, Any] = json.loads(data)
            except ValueError as exc:
                raise WebhookVerificationError(f"the body is not JSON: {exc}") from None
            return payload
    raise WebhookVerificationError("no v1 signature matches: wrong secret, or a tampered body")
