"""Webhook delivery: `imagegen webhooks`, a small process of its own (started by `imagegen
serve` and by compose) that posts the deliveries of the outbox.

The outbox is written by the lifecycle's scripts in the same step as the transition it tells
of, so a delivery exists exactly when its transition happened. This process takes a due one
under a lease (`Outbox.take`: if the process dies mid-send, the delivery is due again when the
lease ends, and is sent again with the same `webhook-id`), checks and resolves its destination
again, posts it signed, and records the attempt on the job. A failed attempt is retried with
exponential backoff and jitter for IMAGEGEN_WEBHOOK_RETRY_FOR_S; then a final `failed` record.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from types import FrameType
from urllib.parse import urlsplit

import httpx
import redis

from app.documents import render_document, render_training_document
from imagegen import __version__
from imagegen.core.api_keys import load_entries
from imagegen.core.contract import Keys, WebhookDelivery
from imagegen.core.destinations import (
    Destination,
    IPAddress,
    Refused,
    check_destination,
)
from imagegen.core.lifecycle import Outbox, WebhookTask
from imagegen.core.logs import configure_logging
from imagegen.core.settings import GatewaySettings
from imagegen.core.store import run_from_hash
from imagegen.core.trainings import TrainingRecord
from imagegen.core.webhooks import Secrets, retry_delay, sign

log = logging.getLogger("imagegen.webhooks")
# A delivery is given up only past IMAGEGEN_WEBHOOK_RETRY_FOR_S and after this many attempts.
MIN_ATTEMPTS = 3
# With nothing due, how long a sender waits on the outbox's bell before looking again.
IDLE_WAIT_S = 1.0


class Deliverer:
    """Takes due deliveries from the outbox and posts them, in `concurrency` threads."""

    def __init__(
        self, connection: redis.Redis, settings: GatewaySettings, secrets: Secrets
    ) -> None:
        self.redis = connection
        self.settings = settings
        self.secrets = secrets
        self.outbox = Outbox(connection)
        self.allow = settings.webhook_allow_list
        # Longer than a send can take (connect, send, answer: each within the timeout).
        self.lease_s = 3 * settings.webhook_timeout_s + 1
        self.http = httpx.Client(
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,  # a redirect could lead anywhere: it counts as a failure
            trust_env=False,  # no proxy from the environment between us and the check
            headers={"User-Agent": f"imagegen-webhooks/{__version__}"},
        )
        self.stopping = threading.Event()

    def stop(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        self.stopping.set()

    def run(self) -> None:
        """Deliver until `stop()`; each thread finishes the delivery it is sending."""
        threads = [
            threading.Thread(target=self._loop, name=f"webhooks-{i}", daemon=True)
            for i in range(self.settings.webhook_concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.http.close()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                if not self.deliver_next():
                    continue
            except redis.exceptions.RedisError as exc:
                log.warning("webhook delivery lost redis: %s", exc)
                self.stopping.wait(1.0)

    def deliver_next(self) -> bool:
        """Deliver one due delivery, or wait a little for one; whether one was sent."""
        task, next_due = self.outbox.take(self.lease_s)
        if task is None:
            wait = IDLE_WAIT_S if next_due is None else min(IDLE_WAIT_S, next_due - time.time())
            if wait > 0.001:
                self.redis.blpop([Keys.WEBHOOKS_BELL], timeout=wait)
            return False
        self.deliver(task)
        return True

    def deliver(self, task: WebhookTask) -> WebhookDelivery:
        """One attempt of `task`, recorded on its job; retried later or ended."""
        at = time.time()
        status, error, final = self.send(task)
        next_at = 0.0
        if status is not None and 200 <= status < 300:
            outcome = "delivered"
        elif final:
            outcome = "failed"
        else:
            s = self.settings
            next_at = at + retry_delay(task.attempt, s.webhook_retry_first_s, s.webhook_retry_max_s)
            outcome = "retrying"
            # Past the retry window, and tried a few times at least: a delivery process that
            # was down longer than the window still tries before it gives up.
            if next_at > task.created_at + s.webhook_retry_for_s and task.attempt >= MIN_ATTEMPTS:
                outcome = "failed"  # given up; the record's attempt says after how many
        record = WebhookDelivery(
            event=task.event,
            webhook_id=task.message_id,
            attempt=task.attempt,
            at=at,
            status_code=status,
            error=error,
            outcome=outcome,
        )
        self.outbox.done(task, record, next_at)
        level = logging.INFO if outcome == "delivered" else logging.WARNING
        log.log(
            level,
            "webhook %s of job %s, attempt %d: %s (%s)",
            task.message_id,
            task.job_id,
            task.attempt,
            outcome,
            status if status is not None else error,
        )
        return record

    def body(self, task: WebhookTask) -> bytes:
        """`{"type": "generation.<event>", "data": <the job document at the transition>}`, or
        `training.<event>` with the training's document."""
        record = run_from_hash(task.job_id, task.record)
        if isinstance(record, TrainingRecord):
            kind, document = (
                "training",
                render_training_document(record, None).model_dump(mode="json"),
            )
        else:
            kind, document = "generation", render_document(record, None).model_dump(mode="json")
        payload = {"type": f"{kind}.{task.event}", "data": document}
        return json.dumps(payload, separators=(",", ":")).encode()

    def send(self, task: WebhookTask) -> tuple[int | None, str | None, bool]:
        """Post `task` once: (the answer's status, the error, whether it is final).

        The error is what the job document shows its owner, so it is coarse on purpose
        (`destination_refused`, `unreachable`, `timeout`, `http_<code>`): a finer one would
        tell a tenant which ports and hosts answer behind the service. The log has the detail.
        """
        try:
            destination, addresses = check_destination(task.url, self.allow)
        except Refused as exc:
            log.warning("webhook %s: destination refused: %s", task.message_id, exc)
            return None, "destination_refused", True
        except (OSError, UnicodeError) as exc:
            log.warning("webhook %s: cannot resolve the host: %s", task.message_id, exc)
            return None, "unreachable", False
        body = self.body(task)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": task.message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(
                self.secrets.for_key(task.api_key), task.message_id, timestamp, body
            ),
            "Host": _host_header(destination),
        }
        # Connect to the address just checked, not to whatever the name resolves to next;
        # TLS still verifies the certificate against the host name.
        url = _pinned(task.url, destination, addresses[0])
        extensions = {"sni_hostname": destination.host} if destination.scheme == "https" else {}
        try:
            with self.http.stream(
                "POST", url, content=body, headers=headers, extensions=extensions
            ) as response:
                status = response.status_code  # the body is never read
        except httpx.TimeoutException as exc:
            log.warning("webhook %s: no answer in time: %r", task.message_id, exc)
            return None, "timeout", False
        except httpx.HTTPError as exc:
            log.warning("webhook %s: %s: %s", task.message_id, type(exc).__name__, exc)
            return None, "unreachable", False
        if 200 <= status < 300:
            return status, None, False
        return status, f"http_{status}", False


def _host_header(destination: Destination) -> str:
    default = 443 if destination.scheme == "https" else 80
    host = f"[{destination.host}]" if ":" in destination.host else destination.host
    return host if destination.port == default else f"{host}:{destination.port}"


def _pinned(url: str, destination: Destination, address: IPAddress) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if address.version == 6 else str(address)
    path = parts.path or "/"
    query = f"?{parts.query}" if parts.query else ""
    return f"{destination.scheme}://{host}:{destination.port}{path}{query}"


def run_deliverer(settings: GatewaySettings) -> int:
    """Run the delivery process until SIGTERM or SIGINT."""
    configure_logging(settings.log_level, settings.log_json)
    connection = redis.Redis.from_url(
        settings.redis_url, health_check_interval=30, **settings.redis_options()
    )
    own = {e.name: e.webhook_secret for e in load_entries(settings) if e.webhook_secret}
    deliverer = Deliverer(connection, settings, Secrets(connection, settings, own))
    signal.signal(signal.SIGTERM, deliverer.stop)
    signal.signal(signal.SIGINT, deliverer.stop)
    log.info(
        "webhook delivery started: %d sender(s), retries for %gs",
        settings.webhook_concurrency,
        settings.webhook_retry_for_s,
    )
    deliverer.run()
    log.info("webhook delivery stopped")
    return 0
