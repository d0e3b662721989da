"""The lifecycle steps the gateway takes, on its event loop and its one async Redis client:
submit (`lua/submit.lua`), cancel (`lua/transition.lua`) and a queued job's position. The
scripts, their keys and what their replies mean are the ones `Lifecycle` uses."""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis

from imagegen.core.contract import JobStatus, Keys
from imagegen.core.lifecycle import scripts
from imagegen.core.lifecycle.jobs import cancellation
from imagegen.core.lifecycle.submit import (
    UNLIMITED,
    Admission,
    Run,
    Submitted,
    parse_submit,
    submit_call,
)


class AsyncLifecycle:
    """Submit and cancel, one Redis round trip each."""

    def __init__(self, connection: aioredis.Redis) -> None:
        self.redis = connection
        self._submit = connection.register_script(scripts.source("submit"))
        self._transition = connection.register_script(scripts.source("transition", ("outbox",)))

    async def submit(
        self,
        record: Run,
        max_depth: int,
        idempotency: tuple[str, str, int] | None = None,
        inputs: Mapping[str, bytes] | None = None,
        admission: Admission = UNLIMITED,
        inputs_in_store: bool = False,
    ) -> Submitted:
        """`Lifecycle.submit`: queue `record` unless a limit or its Idempotency-Key says no."""
        keys, args = submit_call(record, max_depth, idempotency, inputs, admission, inputs_in_store)
        outcome, value = await self._submit(keys=keys, args=args)
        return parse_submit(outcome, value)

    async def cancel(self, record: Run, ttl_s: int) -> bool:
        """`Lifecycle.cancel`: a queued or running job turns `canceled`."""
        keys, args = cancellation(record, ttl_s).script_call()
        moved, _ = await self._transition(keys=keys, args=args)
        return bool(moved)

    async def queue_position(self, record: Run) -> int | None:
        """0 for the next job to start, None when not queued."""
        if record.status != JobStatus.QUEUED:
            return None
        rank: int | None = await self.redis.zrank(Keys.queue(record.spec.lane), record.id)  # type: ignore[assignment]
        return rank if rank is not None else 0
