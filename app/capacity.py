"""Redis memory: read for `/metrics`, and a guard that refuses new jobs before Redis is full.

Redis holds every job's PNGs for IMAGEGEN_RESULT_TTL_S under `noeviction`; once it is full it
refuses every write — heartbeats, take-backs and results of jobs already running included. The
gateway stops accepting jobs a little earlier (IMAGEGEN_REDIS_HIGH_WATER of maxmemory), so the
jobs it already took can still finish and their images expire to make room.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from app.errors import Unavailable

# A submit reads at most this stale a figure; one INFO per second per process, not per submit.
CACHE_S = 1.0
# What a refused client is told to wait: long enough for some images to expire.
RETRY_AFTER_S = 30


@dataclass(frozen=True)
class RedisMemory:
    """Redis's `used_memory` and `maxmemory` in bytes (maxmemory 0: no limit)."""

    used: int
    limit: int

    @property
    def fraction(self) -> float | None:
        return self.used / self.limit if self.limit else None


class MemoryGuard:
    """Reads Redis's memory (cached about a second) and refuses submits past the high water."""

    def __init__(self, connection: aioredis.Redis, high_water: float) -> None:
        self.connection = connection
        self.high_water = high_water
        self._last: RedisMemory | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    async def read(self, max_age_s: float = CACHE_S) -> RedisMemory:
        """Redis's memory figures, at most `max_age_s` old (one INFO at a time per process)."""
        async with self._lock:
            if self._last is None or time.monotonic() - self._read_at >= max_age_s:
                info = await self.connection.info("memory")
                self._last = RedisMemory(int(info["used_memory"]), int(info["maxmemory"]))
                self._read_at = time.monotonic()
            return self._last

    async def check(self) -> None:
        """Raise Unavailable (503 + Retry-After) while Redis is above the high-water mark."""
        if self.high_water >= 1:
            return
        memory = await self.read()
        fraction = memory.fraction
        if fraction is not None and fraction >= self.high_water:
            raise Unavailable(
                f"the job store is {fraction:.0%} full (new jobs wait below "
                f"{self.high_water:.0%}, IMAGEGEN_REDIS_HIGH_WATER); retry later",
                retry_after_s=RETRY_AFTER_S,
            )
