"""The one owner of a job's lifecycle: every state change is one Lua script, here.

A job is always in exactly one of these places, and moves between them atomically:

- queued:  its id is in the model's queue (`Keys.queue`, a sorted set in run order: the fair
  order of `lua/submit.lua`, one job per API key a round) and in its key's queue of that
  model;
- running: its id is in the model's running set (`Keys.running`, scored by its deadline), its
  record names the run's `owner` ("<worker>#<attempt>");
- terminal: neither; the record (and a succeeded job's images) carry a TTL.

Each script checks the record's status (and, for a worker's writes, its owner), moves the id
between the sets, writes the record and publishes the event, in one step: there is no instant
where a job is in no queue and no running set, and no write of a run that was taken back can
land. Recovery (`worker.reaper`) reads only what these scripts write. The gateway (submit,
cancel) and the worker (claim, progress, finish, fail) and the reaper (take back) all go
through this package; nothing else writes a job's state.

The same steps keep each API key's books (active jobs, the day's megapixel-steps, totals) and
write the webhook outbox (`lua/outbox.lua`): a delivery exists exactly when its transition
happened.

By concern: `submit` (admission and the fair order), `jobs` (every later state change),
`outbox` (the delivery side of webhooks), `aio` (the gateway's steps, on its event loop),
`scripts` (loading the `lua/` files and calling them with named keys and arguments).
"""

from imagegen.core.lifecycle.aio import AsyncLifecycle
from imagegen.core.lifecycle.jobs import Claimed, Lifecycle, Transition, cancellation
from imagegen.core.lifecycle.outbox import Outbox, WebhookTask
from imagegen.core.lifecycle.submit import (
    UNLIMITED,
    Admission,
    Submitted,
    record_fields,
    submit_call,
)

__all__ = [
    "UNLIMITED",
    "Admission",
    "AsyncLifecycle",
    "Claimed",
    "Lifecycle",
    "Outbox",
    "Submitted",
    "Transition",
    "WebhookTask",
    "cancellation",
    "record_fields",
    "submit_call",
]
