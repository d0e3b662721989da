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
import redis.asyncio as aioredis

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
    every gateway and delivery process). `for_key` on the deliverer's blocking client,
    `afor_key` on the gateway's async one; the master is read each time (one round trip),
    never cached: every process then signs and verifies with what Redis holds now, even
    after Redis lost its data."""

    def __init__(
        self,
        connection: redis.Redis | aioredis.Redis,
        settings: GatewaySettings,
        own: Mapping[str, str] | None = None,
    ) -> None:
        self.redis = connection
        self.settings = settings
        self.own = dict(own or {})

    def for_key(self, key_name: str) -> str:
        known = self._without_redis(key_name)
        if known is not None:
            return known
        assert isinstance(self.redis, redis.Redis)
        self.redis.set(Keys.WEBHOOK_MASTER, secrets.token_bytes(32), nx=True)
        return _derived(self.redis.get(Keys.WEBHOOK_MASTER), key_name)

    async def afor_key(self, key_name: str) -> str:
        known = self._without_redis(key_name)
        if known is not None:
            return known
        assert isinstance(self.redis, aioredis.Redis)
        await self.redis.set(Keys.WEBHOOK_MASTER, secrets.token_bytes(32), nx=True)
        return _derived(await self.redis.get(Keys.WEBHOOK_MASTER), key_name)

    def _without_redis(self, key_name: str) -> str | None:
        if self.own.get(key_name):
            return self.own[key_name]
        if self.settings.webhook_secret is not None:
            master = self.settings.webhook_secret.get_secret_value().encode()
            return derive_secret(master, key_name)
        return None


def _derived(stored: bytes | str | None, key_name: str) -> str:
    if not stored:
        raise RuntimeError("the webhook master secret vanished from Redis")
    return derive_secret(stored if isinstance(stored, bytes) else stored.encode(), key_name)


def retry_delay(attempt: int, first_s: float, max_s: float) -> float:
    """The wait after failed attempt `attempt` (1-based): doubling from `first_s` up to
    `max_s`, "equal jitter" (between half and all of it), so that retries spread out."""
    ceiling = min(max_s, first_s * 2 ** min(attempt - 1, 60))
    return random.uniform(ceiling / 2, ceiling)
