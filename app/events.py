"""Job events for Server-Sent Events streams.

Workers publish a short message on `imagegen:job:{id}:events` at every state change and
progress write (see imagegen.store). Each gateway process holds ONE pattern subscription and
fans messages out to the streams it serves, so a stream costs no Redis connection of its own
and any replica can serve any job. Messages only say "look again": the stream re-reads the job
document, so a lost message delays an event by at most `RESYNC_S` but never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
from fastapi.sse import ServerSentEvent

from app.schemas import JobDocument
from imagegen.contract import Keys

log = logging.getLogger("imagegen.gateway")

PATTERN = Keys.events("*")
# With no message for this long, a stream re-reads the document anyway.
RESYNC_S = 5.0
_RANK = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2, "canceled": 2}


class EventHub:
    """One pattern subscription per process, fanned out to per-stream queues."""

    def __init__(self, connection: aioredis.Redis) -> None:
        self.redis = connection
        self._listeners: dict[str, set[asyncio.Queue[str]]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    @property
    def open_streams(self) -> int:
        return sum(len(queues) for queues in self._listeners.values())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.asynccontextmanager
    async def listen(self, job_id: str) -> AsyncIterator[asyncio.Queue[str]]:
        channel = Keys.events(job_id)
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._listeners[channel].add(queue)
        try:
            yield queue
        finally:
            listeners = self._listeners.get(channel)
            if listeners is not None:
                listeners.discard(queue)
                if not listeners:
                    del self._listeners[channel]

    async def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(PATTERN)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    channel = message["channel"].decode()
                    data = message["data"].decode()
                    for queue in self._listeners.get(channel, ()):
                        queue.put_nowait(data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarts must not end event delivery for good.
                log.warning("event subscription lost (%s); resubscribing", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def job_event_stream(
    hub: EventHub,
    job_id: str,
    read: Callable[[str], Awaitable[JobDocument]],
) -> AsyncIterator[ServerSentEvent]:
    """Current state first, then every transition and progress step, until a terminal state."""

    def event(name: str, doc: JobDocument) -> ServerSentEvent:
        return ServerSentEvent(event=name, data=doc.model_dump(mode="json"))

    async with hub.listen(job_id) as messages:
        doc = await read(job_id)
        yield event(doc.status, doc)
        last_rank, last_step = _RANK[doc.status], doc.progress.step
        run_started = doc.started_at
        while last_rank < 2:
            try:
                batch = [await asyncio.wait_for(messages.get(), timeout=RESYNC_S)]
            except TimeoutError:
                batch = []
            while not messages.empty():  # a backlog of progress pings costs one read
                batch.append(messages.get_nowait())
            doc = await read(job_id)
            if last_rank == 1 and (
                "queued" in batch or doc.status == "queued" or doc.started_at != run_started
            ):
                # Taken back from a lost worker: queued again (perhaps already rerunning),
                # and the rerun's progress starts from step 0.
                yield event("queued", doc)
                last_rank, last_step = 0, 0
            # Each transition under its own name, in order; then the state if one was missed.
            for name in batch:
                if _RANK.get(name, -1) > last_rank:
                    yield event(name, doc)
                    last_rank = _RANK[name]
            if _RANK[doc.status] > last_rank:
                yield event(doc.status, doc)
                last_rank = _RANK[doc.status]
            run_started = doc.started_at
            if last_rank == 1 and doc.status == "running" and doc.progress.step > last_step:
                yield event("progress", doc)
            last_step = max(last_step, doc.progress.step)
