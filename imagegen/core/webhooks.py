"""Webhooks, the parts the gateway and the delivery process share besides where a webhook may
go (`imagegen.core.destinations`): each key's signing secret, the Standard Webhooks signature,
and the retry schedule.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import secrets
from collections.abc import Mapping

import redis

from imagegen.core.contract import Keys
from imagegen.core.settings import GatewaySettings


# -- signing (Standard Webhooks) ----------------------------------------------------------------
def derive_secret(master: bytes, key_name: str) -> str:
    """A key's webhook secret, `whsec_` + base64 of 32 bytes: HMAC of its name."""
    digest = hmac.new(master, b"imagegen webhook secret\x00" + key_name.encode(), "sha256")
    return "whsec_" + base64.b64encode(digest.digest()).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    mac = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Secrets:
    """Each API key's webhook secret: its own from the key file, else derived from
    IMAGEGEN_WEBHOOK_SECRET, else from a random master kept in Redis (made once, shared by
    every gateway and delivery process)."""

    def __init__(
        self,
        connection: redis.Redis,
        settings: GatewaySettings,
        own: Mapping[str, str] | None = None,
    ) -> None:
        self.redis = connection
        self.settings = settings
        self.own = dict(own or {})

    def master(self) -> bytes:
        if self.settings.webhook_secret is not None:
            return self.settings.webhook_secret.get_secret_value().encode()
        # Read each time (one round trip), never cached: every process then signs and
        # verifies with what Redis holds now, even after Redis lost its data.
        self.redis.set(Keys.WEBHOOK_MASTER, secrets.token_bytes(32), nx=True)
        stored: bytes | None = self.redis.get(Keys.WEBHOOK_MASTER)  # type: ignore[assignment]
        if not stored:
            raise RuntimeError("the webhook master secret vanished from Redis")
        return stored

    def for_key(self, key_name: str) -> str:
        return self.own.get(key_name) or derive_secret(self.master(), key_name)


def retry_delay(attempt: int, first_s: float, max_s: float) -> float:
    """The wait after failed attempt `attempt` (1-based): doubling from `first_s` up to
    `max_s`, "equal jitter" (between half and all of it), so that retries spread out."""
    ceiling = min(max_s, first_s * 2 ** min(attempt - 1, 60))
    return random.uniform(ceiling / 2, ceiling)
