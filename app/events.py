"""Job events for Server-Sent Events streams, serialized once per job for all its listeners.

Workers publish a short message on `imagegen:job:{id}:events` at every state change and
progress write (see imagegen.core.lifecycle). Each gateway process holds ONE pattern subscription
and hands messages to a `JobFeed` per job that has listeners in this process: the feed reads
the job document once per batch of messages, formats each SSE frame once, and offers the same
bytes to every listener. A listener's buffer is small: when its client does not read, progress
and preview frames are dropped for it (never a state change), so 400 idle streams on a job
cost the job one read and one formatting per event, not 400.

Messages only say "look again": the feed re-reads the job document, so a lost message delays
an event by at most `RESYNC_S` but never loses it. Previews (`imagegen:job:{id}:previews`)
carry their picture and go only to listeners that asked for them; while any does, the feed
keeps the job's preview flag set in Redis, which is how the worker knows to make them.

Why one module of 400 lines: the hub, a job's feed and a stream's listener share one
subscription and one buffer policy; apart, each would be half of the same mechanism.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from app.errors import TooManyStreams
from imagegen.core.contract import JobStatus, Keys, RunRecord

log = logging.getLogger("imagegen.gateway")

PATTERN = Keys.events("*")
PREVIEW_PATTERN = Keys.previews("*")
# With no message for this long, a feed re-reads the document anyway.
RESYNC_S = 5.0
# A stream with nothing to send for this long gets a comment line (proxies keep it open).
PING_S = 15.0
# Frames a listener may have waiting; past it, its progress and preview frames are dropped.
LISTENER_BUFFER = 8
# Progress frames a feed sends, to all its streams together, per second at most: one stream
# gets every progress step the worker writes (10 a second), 400 streams about 2.5 a second.
FRAME_BUDGET_PER_S = 1000
# The preview flag's lifetime; a feed with preview listeners renews it well before.
PREVIEW_FLAG_TTL_S = 10
# How long stop() waits for the subscription to wind down (it polls Redis once a second).
STOP_WAIT_S = 3.0
_RANK = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2, "canceled": 2}

# Reads a job (or a training) for a feed: its record and document (any listener's right to it
# was checked when its stream opened).
Reader = Callable[[str], Awaitable[tuple[RunRecord, BaseModel]]]


@dataclass(frozen=True)
class Frame:
    """One SSE event, formatted once: `seq` orders a feed's frames."""

    seq: int
    name: str
    data: bytes

    @property
    def droppable(self) -> bool:
        return self.name in ("progress", "preview")

    @property
    def terminal(self) -> bool:
        return _RANK.get(self.name, 0) == 2


def format_frame(seq: int, name: str, payload: str) -> Frame:
    return Frame(seq, name, f"event: {name}\ndata: {payload}\n\n".encode())


class Listener:
    """One open stream's buffer of frames."""

    def __init__(self, key: str, previews: bool, capacity: int = LISTENER_BUFFER) -> None:
        self.key = key
        self.previews = previews
        self.capacity = capacity
        self.seq = -1
        self.dropped = 0
        self._frames: deque[Frame] = deque()
        self._ready = asyncio.Event()

    def offer(self, frame: Frame) -> None:
        """Take `frame` unless it is older than what this listener has; when the buffer is
        full, a progress or preview frame is dropped (the newest state frame never is)."""
        if frame.seq <= self.seq or (frame.name == "preview" and not self.previews):
            return
        if len(self._frames) >= self.capacity:
            if frame.droppable:
                self.dropped += 1
                return
            old = next((f for f in self._frames if f.droppable), None)
            if old is not None:
                self._frames.remove(old)
                self.dropped += 1
        self._frames.append(frame)
        self.seq = frame.seq
        self._ready.set()

    async def next(self, timeout_s: float) -> Frame | None:
        """The next frame, or None after `timeout_s` with none."""
        if not self._frames:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout_s)
        return self._frames.popleft() if self._frames else None


class JobFeed:
    """A job's events in this process: read and formatted once, offered to every listener."""

    def __init__(self, hub: EventHub, job_id: str, read: Reader) -> None:
        self.hub = hub
        self.job_id = job_id
        self.read = read
        self.listeners: set[Listener] = set()
        self.messages: list[str] = []
        self._wake = asyncio.Event()
        self.seq = 0
        self.state: Frame | None = None  # the current state, for a listener that joins
        self.rank = -1
        self.step = 0
        self.attempts = 0
        self.task: asyncio.Task[None] | None = None
        self._starting: asyncio.Future[None] | None = None
        self._last_progress = 0.0
        self._held_until: float | None = None
        self.reads = 0

    @property
    def preview_listeners(self) -> int:
        return sum(1 for listener in self.listeners if listener.previews)

    def notify(self, message: str) -> None:
        self.messages.append(message)
        self._wake.set()

    def preview(self, payload: str) -> None:
        """A preview picture from the worker (JSON `{"step", "image"}`), as it came."""
        if self.rank == 1 and self.preview_listeners:
            self.seq += 1
            frame = format_frame(self.seq, "preview", payload)
            for listener in self.listeners:
                listener.offer(frame)

    async def join(self, listener: Listener) -> None:
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)
        assert self.state is not None
        listener.offer(self.state)
        self.listeners.add(listener)
        if listener.previews and self.preview_listeners == 1:
            await self.hub.want_previews(self.job_id)

    async def _start(self) -> None:
        """The first read, then the task that follows the job."""
        record, document = await self._read()
        self.rank, self.step = _RANK[record.status], record.progress_step
        self.attempts = record.attempts
        self.state = format_frame(self.seq, record.status.value, document.model_dump_json())
        self.task = asyncio.create_task(self._follow(), name=f"feed-{self.job_id}")

    async def _read(self) -> tuple[RunRecord, BaseModel]:
        self.reads += 1
        return await self.read(self.job_id)

    async def _follow(self) -> None:
        last_flag = asyncio.get_running_loop().time()
        while self.rank < 2:
            wait = RESYNC_S
            if self._held_until is not None:  # a progress frame held back: send it then
                wait = max(0.0, self._held_until - asyncio.get_running_loop().time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            batch, self.messages = self.messages, []
            try:
                record, document = await self._read()
            except Exception as exc:  # Redis away: the next message or resync tries again
                log.warning("event feed of job %s could not read it: %s", self.job_id, exc)
                await asyncio.sleep(1.0)
                continue
            self._advance(batch, record, document)
            now = asyncio.get_running_loop().time()
            if self.preview_listeners and now - last_flag > PREVIEW_FLAG_TTL_S / 3:
                last_flag = now
                await self.hub.want_previews(self.job_id)

    def _advance(self, batch: list[str], record: RunRecord, document: BaseModel) -> None:
        """Publish the frames that `batch` (and the record read after it) make, in order."""
        names: list[str] = []
        status = record.status.value
        if self.rank == 1 and (
            "queued" in batch
            or record.status == JobStatus.QUEUED
            or record.attempts != self.attempts
        ):
            # Taken back from a lost worker: queued again (perhaps already rerunning), and the
            # rerun's progress starts from step 0.
            names.append("queued")
            self.rank, self.step = 0, 0
        # Each transition under its own name, in order; then the state if one was missed.
        for name in batch:
            if _RANK.get(name, -1) > self.rank:
                names.append(name)
                self.rank = _RANK[name]
        if _RANK[status] > self.rank:
            names.append(status)
            self.rank = _RANK[status]
        self.attempts = record.attempts
        self._held_until = None
        if self.rank == 1 and status == "running" and record.progress_step > self.step:
            # Many streams on one job: progress frames to all of them together stay within
            # FRAME_BUDGET_PER_S (one stream: every step the worker reports).
            now = asyncio.get_running_loop().time()
            gap = len(self.listeners) / FRAME_BUDGET_PER_S
            if names or now - self._last_progress >= gap:
                names.append("progress")
                self._last_progress = now
            else:
                self._held_until = self._last_progress + gap
                return
        self.step = max(self.step, record.progress_step)
        if not names:
            return
        payload = document.model_dump_json()  # once, for every listener and frame
        for name in names:
            self.seq += 1
            frame = format_frame(self.seq, name, payload)
            for listener in self.listeners:
                listener.offer(frame)
        # A listener that joins now starts from here, under the status's own name.
        self.state = format_frame(self.seq, status, payload)


class EventHub:
    """One pattern subscription per process, and one feed per job with listeners."""

    def __init__(self, connection: aioredis.Redis) -> None:
        self.redis = connection
        self._raw: dict[str, set[asyncio.Queue[str]]] = defaultdict(set)
        self._feeds: dict[str, JobFeed] = {}
        self._per_key: dict[str, int] = defaultdict(int)
        self._dropped = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def open_streams(self) -> int:
        return sum(len(feed.listeners) for feed in self._feeds.values())

    @property
    def open_feeds(self) -> int:
        return len(self._feeds)

    @property
    def dropped(self) -> int:
        """Frames dropped for slow listeners, by this process, so far."""
        return self._dropped + sum(
            listener.dropped for feed in self._feeds.values() for listener in feed.listeners
        )

    def streams_of(self, key: str) -> int:
        return self._per_key.get(key, 0)

    def reserve_stream(self, key: str, cap: int) -> bool:
        """Count a stream for `key` if it has fewer than `cap` open; whether it was counted.
        Check and count are one step (no await between them), so concurrent opens cannot
        all pass the check; `release_stream` gives the place back when the stream ends."""
        if self._per_key.get(key, 0) >= cap:
            return False
        self._per_key[key] += 1
        return True

    def release_stream(self, key: str) -> None:
        self._per_key[key] -= 1
        if self._per_key[key] <= 0:
            del self._per_key[key]

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-hub")

    async def stop(self) -> None:
        # A cancel alone is not enough: one that lands as redis-py's read timeout fires is
        # swallowed (the read's own asyncio timeout takes it for its expiry), and the loop
        # polled on. A gateway whose port was taken stopped right after starting and hung in
        # its shutdown. The flag ends the loop at its next poll; the wait is bounded anyway.
        self._stopping = True
        tasks = [t for t in [self._task, *(f.task for f in self._feeds.values())] if t]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
        if pending:
            log.warning("%d event task(s) did not stop within %.0f s", len(pending), STOP_WAIT_S)

    async def want_previews(self, job_id: str) -> None:
        """Tell the worker that someone watches this job's previews (for a while)."""
        try:
            await self.redis.set(Keys.previews_wanted(job_id), 1, ex=PREVIEW_FLAG_TTL_S)
        except Exception as exc:
            log.warning("could not ask for previews of job %s: %s", job_id, exc)

    @contextlib.asynccontextmanager
    async def listen(self, job_id: str) -> AsyncIterator[asyncio.Queue[str]]:
        """The job's raw messages (a status name or "progress"), for a wait that needs no
        stream of its own (the OpenAI endpoints)."""
        channel = Keys.events(job_id)
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._raw[channel].add(queue)
        try:
            yield queue
        finally:
            listeners = self._raw.get(channel)
            if listeners is not None:
                listeners.discard(queue)
                if not listeners:
                    del self._raw[channel]

    @contextlib.asynccontextmanager
    async def subscribe(
        self, job_id: str, read: Reader, key: str, previews: bool = False
    ) -> AsyncIterator[Listener]:
        """A listener on the job's feed: the current state first, then every event. (Its
        place in the key's stream count is `reserve_stream`'s, taken before.)"""
        listener = Listener(key, previews)
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = JobFeed(self, job_id, read)
        try:
            await feed.join(listener)
            yield listener
        finally:
            feed.listeners.discard(listener)
            self._dropped += listener.dropped
            if not feed.listeners and self._feeds.get(job_id) is feed:
                del self._feeds[job_id]
                if feed.task is not None:
                    feed.task.cancel()

    def feed(self, job_id: str) -> JobFeed | None:
        return self._feeds.get(job_id)

    def _dispatch(self, channel: str, data: str) -> None:
        # imagegen:job:<id>:events | imagegen:job:<id>:previews
        head, _, kind = channel.rpartition(":")
        job_id = head.removeprefix(f"{Keys.PREFIX}:job:")
        feed = self._feeds.get(job_id)
        if kind == "previews":
            if feed is not None:
                feed.preview(data)
            return
        for queue in self._raw.get(channel, ()):
            queue.put_nowait(data)
        if feed is not None:
            feed.notify(data)

    async def _run(self) -> None:
        while not self._stopping:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(PATTERN, PREVIEW_PATTERN)
                while not self._stopping:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    self._dispatch(message["channel"].decode(), message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarts must not end event delivery for good.
                log.warning("event subscription lost (%s); resubscribing", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


async def sse_stream(
    hub: EventHub, job_id: str, read: Reader, key: str, previews: bool = False
) -> AsyncIterator[bytes]:
    """The bytes of a job's event stream: the current state first, then every transition,
    progress step (and preview, if asked), until a terminal state; comment pings between."""
    async with hub.subscribe(job_id, read, key, previews) as listener:
        while True:
            frame = await listener.next(PING_S)
            if frame is None:
                yield b": ping\n\n"
                continue
            yield frame.data
            if frame.terminal:
                return


def open_stream(
    hub: EventHub, key: str, max_streams: int, run_id: str, read: Reader, previews: bool = False
) -> ReservedStream:
    """A run's (a job's or a training's) event stream for API key `key`, holding one of the
    key's `max_streams` places on this server until it ends; 429 when none is free."""
    if not hub.reserve_stream(key, max_streams):
        raise TooManyStreams(
            f"this API key has {max_streams} event streams open on this server, its limit "
            "(IMAGEGEN_MAX_STREAMS_PER_KEY); close one, or poll",
            headers={"Retry-After": "5"},
        )
    return ReservedStream(
        sse_stream(hub, run_id, read, key, previews),
        release=lambda: hub.release_stream(key),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def preview_payload(step: int, image: str) -> str:
    """What a worker publishes and a preview event carries: `{"step", "image"}`."""
    return json.dumps({"step": step, "image": image}, separators=(",", ":"))


class ReservedStream(EventSourceResponse):
    """An event stream that gives its key's reserved place back however it ends: after the
    last event, on a client gone, or without ever starting (the body generator's own
    `finally` would not run if it was never iterated)."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None], **kw: Any):
        super().__init__(content, **kw)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
