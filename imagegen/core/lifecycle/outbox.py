"""The webhook outbox's delivery side: take a due delivery under a lease, record an attempt's
outcome (`lua/webhook_take.lua`, `lua/webhook_done.lua`). The transitions write the outbox in
the same step as the change they tell of (`lua/outbox.lua`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from imagegen.core.contract import Keys, WebhookDelivery
from imagegen.core.lifecycle import scripts


@dataclass(frozen=True)
class WebhookTask:
    """A delivery taken from the outbox: which job and event, to where, for which key, the
    record as it was at the transition, and which attempt this is."""

    message_id: str
    job_id: str
    event: str
    url: str
    api_key: str
    created_at: float
    attempt: int
    record: dict[str, str]


class Outbox:
    """The webhook outbox's delivery side."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection
        self._take = connection.register_script(scripts.source("webhook_take"))
        self._done = connection.register_script(scripts.source("webhook_done"))

    def take(self, lease_s: float) -> tuple[WebhookTask | None, float | None]:
        """The next due delivery, leased for `lease_s`; else (None, when the next is due)."""
        keys = {"webhooks_due": Keys.WEBHOOKS_DUE}
        reply = self._take(*scripts.call(keys, {"now": repr(time.time()), "lease": repr(lease_s)}))
        first = scripts.decode(reply[0])
        if not first:
            due = scripts.decode(reply[1]) if len(reply) > 1 else ""
            return None, float(due) if due else None
        flat = [scripts.decode(v) for v in reply[1:]]
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        values = json.loads(raw["record"])
        record = dict(zip(values[::2], values[1::2], strict=True))
        task = WebhookTask(
            message_id=first,
            job_id=raw["job"],
            event=raw["event"],
            url=raw["url"],
            api_key=raw.get("api_key", ""),
            created_at=float(raw["created_at"]),
            attempt=int(raw["attempts"]),
            record=record,
        )
        return task, None

    def done(self, task: WebhookTask, attempt: WebhookDelivery, next_at: float = 0.0) -> bool:
        """Record `attempt` on the job; reschedule the delivery at `next_at` when retrying,
        else end it. False when the delivery was already ended."""
        keys = {
            "webhooks_due": Keys.WEBHOOKS_DUE,
            "delivery": Keys.webhook(task.message_id),
            "job": Keys.job(task.job_id),
            "key_stats": Keys.KEY_STATS,
        }
        args = {
            "message_id": task.message_id,
            "outcome": attempt.outcome,
            "next_at": repr(next_at),
            "attempt": attempt.model_dump(mode="json"),
        }
        return bool(self._done(*scripts.call(keys, args)))
