"""The worker's heartbeat: a daemon thread, independent of the job loop, that announces the
models this worker serves (which are loaded, which cannot be) and proves the worker is alive
while a long job runs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from imagegen.core.contract import Keys, ModelInfo, WorkerHeartbeat
from worker.pipeline import TOKENIZERS

log = logging.getLogger("imagegen.worker")

# The model record outlives any one worker so queued jobs keep their defaults across restarts.
MODEL_RECORD_TTL_S = 7 * 24 * 3600


class Heartbeat:
    """Publishes `beat()` every `interval_s`; the worker key expires after `ttl_s` without one."""

    def __init__(
        self,
        connection: redis.Redis,
        base: WorkerHeartbeat,
        interval_s: float,
        ttl_s: int,
        snapshot: Callable[[], dict[str, Any]],
        local_file: Path | None = None,
        watchdog: Callable[[], None] | None = None,
    ) -> None:
        self.redis = connection
        self.base = base
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.snapshot = snapshot
        self.local_file = local_file
        self.watchdog = watchdog
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def current(self) -> WorkerHeartbeat:
        return self.base.model_copy(update={**self.snapshot(), "sent_at": time.time()})

    def beat(self) -> None:
        hb = self.current()
        self._publish_tokenizers(hb)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(Keys.worker(hb.name), hb.model_dump_json(), ex=self.ttl_s)
            for served in hb.served():
                model: ModelInfo = served.info
                pipe.zadd(Keys.model_workers(model.id), {hb.name: hb.sent_at})
                # A model this worker cannot load has only its configured defaults: they never
                # overwrite what a worker that loaded it announced.
                pipe.set(
                    Keys.model(model.id),
                    model.model_dump_json(),
                    ex=MODEL_RECORD_TTL_S,
                    nx=served.unavailable is not None,
                )
                pipe.sadd(Keys.MODELS, model.id)
            pipe.execute()
        if self.local_file is not None:
            # Written only after Redis took the beat: a healthy file means a reachable Redis.
            tmp = self.local_file.with_suffix(".tmp")
            tmp.write_text(hb.model_dump_json())
            tmp.replace(self.local_file)

    def _publish_tokenizers(self, hb: WorkerHeartbeat) -> None:
        """Write the tokenizers of the announced models that Redis lacks (one EXISTS per
        beat; the JSON, megabytes for CLIP, only when missing)."""
        digests = sorted({s.info.tokenizer for s in hb.served() if s.info.tokenizer})
        known = [d for d in digests if d in TOKENIZERS]
        if not known:
            return
        present = self.redis.exists(*(Keys.tokenizer(d) for d in known))
        if present == len(known):
            return
        for digest in known:
            self.redis.set(
                Keys.tokenizer(digest), TOKENIZERS[digest], ex=MODEL_RECORD_TTL_S, nx=True
            )

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.watchdog is not None:
                self.watchdog()
            try:
                self.beat()
            except redis.exceptions.RedisError as exc:
                # Redis may be restarting; the next beat retries. The key's TTL covers the gap.
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        """Stop beating and remove this worker's key so it stops counting at once."""
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
        try:
            hb = self.current()
            self.redis.delete(Keys.worker(hb.name))
            for served in hb.served():
                self.redis.zrem(Keys.model_workers(served.info.id), hb.name)
        except redis.exceptions.RedisError:
            pass
        if self.local_file is not None:
            self.local_file.unlink(missing_ok=True)


def check_heartbeat_file(path: Path, max_age_s: float) -> tuple[bool, str]:
    """Whether the worker that writes `path` beat within `max_age_s`, and a line saying so."""
    try:
        beat = WorkerHeartbeat.model_validate_json(path.read_text())
    except (OSError, ValueError) as exc:
        return False, f"no readable heartbeat at {path}: {exc}"
    age = time.time() - beat.sent_at
    if age > max_age_s:
        return False, f"worker {beat.name}: last heartbeat {age:.0f}s ago (limit {max_age_s:.0f}s)"
    return True, f"worker {beat.name} {beat.state}: heartbeat {age:.1f}s ago"
