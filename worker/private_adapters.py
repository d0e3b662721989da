"""Adapters trained through the API (`POST /v1/trainings`), served to the key that trained them.

A trained adapter is not a file on this worker's disk: its registration (`Keys.adapter`, written
by its training's success) says whose it is, and its weights are a blob of the result store.
The first job that names it loads it into the warm pipeline under its id (the LoRA, as any
other, through `load_lora_weights`), and its trigger word's embedding under the adapter's
private token (`imagegen.core.trainings.private_token`). That job's prompt, and only the prompts
of jobs that name the adapter, read the private token where they say the trigger word: two keys
may train the same word, and no other prompt ever reaches the new embedding row. A job without
the adapter runs with it disabled, byte for byte as if it never existed (the tests show it).

Registrations are read at each job that names one (a deleted adapter fails the job that still
names it), and a worker unloads the deleted ones of a model before that model's next batch
(looking at most every SWEEP_S). A pipeline holds at most IMAGEGEN_MAX_LOADED_TRAINED_ADAPTERS
of them: before a batch, the least recently used ones its jobs do not name are unloaded (their
next job loads them again from the result store).

Unloading takes the LoRA out and leaves the private token and its rows (a row per text encoder,
read by no prompt): removing a token would renumber every token added after it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import redis

from imagegen.core.blobs import BlobStore, adapter_blob
from imagegen.core.contract import JobSpec, Keys
from imagegen.core.store import JobStore
from imagegen.core.trainings import ADAPTER_ID_RE, AdapterRecord
from worker.errors import AdapterGone
from worker.pipeline import LoadedModel
from worker.training.export import load_trained

log = logging.getLogger("imagegen.worker")


# How often a worker looks whether the trained adapters it holds were deleted.
SWEEP_S = 5.0


class PrivateAdapters:
    def __init__(
        self,
        connection: redis.Redis,
        blobs: BlobStore,
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = connection
        self.store = JobStore(connection)
        self.blobs = blobs
        self.capacity = capacity
        self.clock = clock
        self._swept_at = clock()

    def sweep(self, model: LoadedModel, in_use: set[str]) -> None:
        """Before a batch of `model`, whose jobs name `in_use`: unload the trained adapters
        past the capacity, least recently used first, and (at most every SWEEP_S, one round
        trip) those that were deleted (`DELETE /v1/adapters`)."""
        private, files = model.adapters.private, model.adapters.loras
        # What this batch will load: trained adapters it names that are not loaded yet.
        new = {a for a in in_use - private.keys() - files.keys() if ADAPTER_ID_RE.fullmatch(a)}
        room = self.capacity - len(new)
        for adapter_id in [a for a in private if a not in in_use][: max(len(private) - room, 0)]:
            self.forget(model, adapter_id, "the least recently used past the capacity")
        loaded = sorted(private)
        if not loaded or self.clock() - self._swept_at < SWEEP_S:
            return
        self._swept_at = self.clock()
        with self.redis.pipeline(transaction=False) as pipe:
            for adapter_id in loaded:
                pipe.exists(Keys.adapter(adapter_id))
            present = pipe.execute()
        for adapter_id, exists in zip(loaded, present, strict=True):
            if not exists:
                self.forget(model, adapter_id, "it was deleted")

    def prepare(self, model: LoadedModel, spec: JobSpec, api_key: str) -> JobSpec:
        """Load the trained adapters `spec` names (its owner's), and return the spec the
        pipeline runs: each one's trigger word read as its private token. Unchanged for a
        job without any."""
        adapters = model.adapters
        prompt, negative = spec.prompt, spec.negative_prompt
        for lora in spec.loras:
            if lora.id in adapters.loras or not ADAPTER_ID_RE.fullmatch(lora.id):
                continue  # a file-backed LoRA of the model
            record = self.record(lora.id)
            if record is None or record.owner != api_key or record.model != spec.model:
                self.forget(model, lora.id, "it was deleted")
                raise AdapterGone(f"adapter {lora.id!r} was deleted after this job was queued")
            if lora.id not in adapters.private:
                self._load(model, record)
            else:  # the most recently used now: the last to be unloaded
                adapters.private[lora.id] = adapters.private.pop(lora.id)
            word = re.compile(rf"(?<![\w]){re.escape(record.trigger_word)}(?![\w])", re.I)
            prompt = word.sub(record.token, prompt)
            negative = word.sub(record.token, negative)
        if (prompt, negative) == (spec.prompt, spec.negative_prompt):
            return spec
        return spec.model_copy(update={"prompt": prompt, "negative_prompt": negative})

    def record(self, adapter_id: str) -> AdapterRecord | None:
        return self.store.get_adapter(adapter_id)

    def _load(self, model: LoadedModel, record: AdapterRecord) -> None:
        from safetensors.torch import load

        data = self.blobs.get(adapter_blob(record.id))
        if data is None:
            raise AdapterGone(f"the weights of adapter {record.id!r} are not stored")
        load_trained(model.pipe, load(data), record.trigger_word, record.token, record.id)
        model.adapters.private[record.id] = record.info()
        # The set of adapters changed: the next batch sets its own again.
        model.adapters.active = None
        log.info("loaded trained adapter %s for key %r", record.id, record.owner)

    @staticmethod
    def forget(model: LoadedModel, adapter_id: str, why: str) -> None:
        """Take a trained adapter's LoRA out of the pipeline (its token stays, unread)."""
        if model.adapters.private.pop(adapter_id, None) is None:
            return
        try:
            model.pipe.delete_adapters(adapter_id)
        except Exception:  # nothing more to undo; the id is never set active again
            log.warning("could not remove trained adapter %s", adapter_id, exc_info=True)
        model.adapters.active = None
        log.info("unloaded trained adapter %s: %s", adapter_id, why)
