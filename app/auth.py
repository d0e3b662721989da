"""API keys, per-key ownership and the per-key request budget.

Keys are configured hashed (`name:sha256-hex`, see `imagegen new-key`), so neither the
environment nor a key file holds a usable secret. A presented key is hashed and compared
with every configured hash in constant time. Without keys the service is open: every caller
is the anonymous principal and the request budget is counted per client address.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from app.errors import ApiError, Unauthorized
from imagegen.core.api_keys import KeyEntry, Limits, limits_for, load_entries
from imagegen.core.contract import Keys
from imagegen.core.settings import GatewaySettings

log = logging.getLogger("imagegen.gateway")


class RateLimited(ApiError):
    """The key used up its requests for this minute (429, with Retry-After)."""

    status_code = 429
    code = "rate_limited"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's name, or "" when the service runs without keys."""

    name: str
    budget_id: str  # what the request budget is counted against


class KeyStore:
    """The configured keys (hashes and each key's own limits), by name."""

    def __init__(self, entries: list[KeyEntry], settings: GatewaySettings | None = None) -> None:
        self._entries = {entry.name: entry for entry in entries}
        self._settings = settings or GatewaySettings()

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> KeyStore:
        return cls(load_entries(settings), settings)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> KeyEntry | None:
        return self._entries.get(name)

    def webhook_secrets(self) -> dict[str, str]:
        """The keys that have a webhook secret of their own in the key file."""
        return {n: e.webhook_secret for n, e in self._entries.items() if e.webhook_secret}

    def limits(self, name: str) -> Limits:
        """The key's limits: its own overrides in the key file, else the global defaults."""
        return limits_for(self._entries.get(name), self._settings)

    def identify(self, presented: str) -> str | None:
        """The name of the key, or None; every entry is compared, in constant time."""
        digest = hash_key(presented)
        found = None
        for name, entry in self._entries.items():
            if hmac.compare_digest(digest, entry.digest):
                found = name
        return found


class RateLimiter:
    """Fixed one-minute windows, counted in Redis so every replica shares them: requests per
    principal, and failed authentications per client address (a key guessed at is slowed
    down, and its 401s cost the service no more than the limit allows)."""

    def __init__(
        self, connection: aioredis.Redis, per_minute: int, auth_failures_per_minute: int = 20
    ) -> None:
        self.redis = connection
        self.per_minute = per_minute
        self.auth_failures_per_minute = auth_failures_per_minute

    async def hit(self, budget_id: str) -> None:
        """Count a request of `budget_id`; `RateLimited` past the budget."""
        await self._count(budget_id, self.per_minute, "requests per minute")

    async def failed_auth(self, client: str) -> None:
        """Count a request from `client` without a valid key; `RateLimited` past the limit."""
        await self._count(
            f"auth-failures:{client}",
            self.auth_failures_per_minute,
            "requests without a valid API key per minute from this address",
        )

    async def _count(self, budget_id: str, limit: int, what: str) -> None:
        now = time.time()
        window = int(now // 60)
        key = Keys.rate(hashlib.sha256(budget_id.encode()).hexdigest()[:32], window)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 61)
            count, _ = await pipe.execute()
        if int(count) > limit:
            retry_after = max(1, int(60 - now % 60) + 1)
            raise RateLimited(
                f"rate limit of {limit} {what} reached; retry in {retry_after}s",
                headers={"Retry-After": str(retry_after)},
            )


def _key_of(header: str) -> str:
    """The API key of an Authorization header: `Bearer <key>`, or HTTP Basic with the key as
    the password (any user name), as AUTOMATIC1111 clients such as Open WebUI send it."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    if scheme.lower() == "basic" and 0 < len(token) <= 4096:
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[2]
    return ""


async def _principal(request: Request) -> Principal:
    keys: KeyStore = request.app.state.keys
    limiter: RateLimiter = request.app.state.limiter
    client = request.client.host if request.client else "unknown"
    if keys.enabled:
        name = keys.identify(_key_of(request.headers.get("authorization", "")))
        if name is None:
            await limiter.failed_auth(client)
            raise Unauthorized("a valid API key is required: `Authorization: Bearer <key>`")
        principal = Principal(name=name, budget_id=f"key:{name}")
    else:
        principal = Principal(name="", budget_id=f"ip:{client}")
    await limiter.hit(principal.budget_id)
    return principal


PrincipalDep = Annotated[Principal, Depends(_principal)]
