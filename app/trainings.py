"""Trainings and the adapters they make, at the gateway: `POST /v1/trainings` turns a user's
pictures into a queued training (every check before it exists), and the reads, cancel, event
feed, adapter listing, download and delete that follow.

A training goes through the same submit script as a generation (`GenerationService.admit`:
idempotency, the key's active runs and daily quota, the queue's depth, and here the key's cap
on trained adapters), into its model's training lane; the worker side is
worker.training.runner.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Iterator

from app.documents import render_training_document, rfc3339
from app.errors import InvalidRequest, NotFound
from app.service import GenerationService
from app.training_schemas import AdapterDocument, TrainingDocument, TrainingOptions
from app.training_uploads import Limits, Picture
from imagegen.core.blobs import Blob, adapter_blob
from imagegen.core.contract import JobStatus, Keys, ModelInfo
from imagegen.core.lifecycle import Admission
from imagegen.core.logs import request_id
from imagegen.core.store import as_text
from imagegen.core.trainings import (
    IMAGE_INPUT,
    NAME_RE,
    TRIGGER_RE,
    AdapterRecord,
    TrainingRecord,
    TrainingSpec,
    is_valid_training_id,
    new_training_id,
)

# `GET /v1/trainings` lists a key's newest trainings, at most this many.
LIST_LIMIT = 100


class TrainingService:
    """Trainings and trained adapters, on the generation service's Redis client, registry,
    blob store and lifecycle."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service
        self.redis = service.redis
        self.settings = service.settings
        self.store = service.store
        self.blobs = service.blobs

    def limits(self) -> Limits:
        s = self.settings
        return Limits(
            max_images=s.training_max_images,
            max_total_bytes=s.training_max_bytes,
            max_image_bytes=s.max_input_image_bytes,
            max_pixels=s.max_pixels,
        )

    # -- submit -----------------------------------------------------------------------------
    async def model_of(self, options: TrainingOptions) -> ModelInfo:
        """The model to train, as workers published it; a 422 naming `model` when it is
        unknown or cannot be trained (checked before any picture is read)."""
        model_id = options.model or self.settings.default_model
        info = await self.service.registry.get(model_id)
        if info is None:
            known = await self.service.registry.model_ids()
            raise InvalidRequest.for_field(
                "model", f"unknown model {model_id!r}; served: {', '.join(known) or 'none'}"
            )
        if info.training is None:
            why = info.not_trainable or "its workers do not say it can be trained"
            raise InvalidRequest.for_field("model", f"model {model_id!r} cannot be trained: {why}")
        return info

    async def check_words(self, options: TrainingOptions, info: ModelInfo) -> None:
        if not NAME_RE.fullmatch(options.name):
            raise InvalidRequest.for_field(
                "name", "is 1-40 lowercase letters, digits and '-', starting with a letter or digit"
            )
        if not TRIGGER_RE.fullmatch(options.trigger_word):
            raise InvalidRequest.for_field(
                "trigger_word", "is one word of 2-32 letters and digits, starting with a letter"
            )
        known = await self.service.token_counters.known_word(info, options.trigger_word)
        if known:
            raise InvalidRequest.for_field(
                "trigger_word",
                f"{options.trigger_word!r} is already a word of model {info.id!r}: training it "
                "would change what it means in every prompt that uses the adapter; pick a new "
                "word (e.g. a rare letter string like 'zxq')",
            )

    def check_cost(self, options: TrainingOptions, info: ModelInfo, pictures: int) -> None:
        """The steps and the cost within their caps, from the picture count alone (before any
        picture is decoded); a 422 naming `steps` otherwise."""
        defaults = info.training
        assert defaults is not None  # model_of checked it
        steps = options.steps if options.steps is not None else defaults.steps
        if steps > self.settings.training_max_steps:
            raise InvalidRequest.for_field(
                "steps",
                f"is at most {self.settings.training_max_steps} (IMAGEGEN_TRAINING_MAX_STEPS)",
            )
        per_step = min(defaults.batch_size, pictures)
        cost = info.width * info.height / 1e6 * steps * per_step
        cap = self.settings.training_max_megapixel_steps
        if cost > cap:
            raise InvalidRequest.for_field(
                "steps",
                f"this training costs {cost:g} megapixel-steps ({info.width}x{info.height}/1e6 "
                f"* {steps} steps * {per_step} pictures per step), over the limit of {cap:g} "
                "(IMAGEGEN_TRAINING_MAX_MEGAPIXEL_STEPS); fewer steps",
            )

    async def submit(
        self,
        options: TrainingOptions,
        info: ModelInfo,
        pictures: list[Picture],
        api_key: str,
        idempotency_key: str | None = None,
        body_hash: str = "",
    ) -> tuple[TrainingDocument, bool]:
        """Queue a training of `pictures` (already checked and normalized); its document and
        whether it was created (False: an Idempotency-Key replay)."""
        if options.webhook is not None:
            await self.service.check_webhook(options.webhook.url)
        defaults = info.training
        assert defaults is not None  # model_of checked it
        steps = options.steps if options.steps is not None else defaults.steps
        captions = await self.captions(options, info, pictures)
        spec = TrainingSpec(
            model=info.id,
            name=options.name,
            trigger_word=options.trigger_word,
            steps=steps,
            rank=options.rank if options.rank is not None else defaults.rank,
            learning_rate=(
                options.learning_rate
                if options.learning_rate is not None
                else defaults.learning_rate
            ),
            train_text_encoder=options.train_text_encoder,
            targets=defaults.targets,
            batch_size=defaults.batch_size,
            seed=options.seed if options.seed is not None else secrets.randbelow(2**32),
            captions=tuple(captions),
            width=info.width,
            height=info.height,
        )
        record = TrainingRecord(
            id=new_training_id(),
            status=JobStatus.QUEUED,
            spec=spec,
            created_at=time.time(),
            api_key=api_key,
            request_id=request_id.get(),
            timeout_s=self.settings.training_timeout_s,
            webhook=options.webhook.to_contract() if options.webhook is not None else None,
        )
        limits = self.service.api_keys.limits(api_key)
        admission = Admission(
            limits.max_active_jobs, limits.daily_quota, self.settings.max_adapters_per_key
        )
        blobs = {IMAGE_INPUT.format(i): p.png for i, p in enumerate(pictures)}
        created, value = await self.service.admit(
            record, blobs, admission, idempotency_key, body_hash
        )
        if created:
            return render_training_document(record, int(value)), True
        return await self.get(str(value), api_key), False

    async def captions(
        self, options: TrainingOptions, info: ModelInfo, pictures: list[Picture]
    ) -> list[str]:
        """Each picture's caption naming the trigger word (the word alone without a caption;
        put first when a caption does not name it), no longer than the model reads."""
        trigger = options.trigger_word
        names = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE)
        encode = await self.service.token_counters.encoder(info)
        limit = info.training.max_caption_tokens if info.training else 75
        out = []
        for picture in pictures:
            caption = picture.caption or trigger
            if not names.search(caption):
                caption = f"{trigger} {caption}"
            if encode is not None:
                # The trigger is one token once trained; the tokenizer does not know it yet.
                tokens = len(encode(names.sub(" ", caption))) + len(names.findall(caption))
                if tokens > limit:
                    raise InvalidRequest.for_field(
                        f"captions ({picture.source[:100]})",
                        f"is {tokens} tokens long, over the {limit} model {info.id!r} reads",
                    )
            out.append(caption)
        return out

    # -- read -------------------------------------------------------------------------------
    async def record(self, training_id: str, api_key: str) -> TrainingRecord:
        """The training if it exists and belongs to `api_key` (another key's is a 404 too)."""
        record = (
            await self.store.get_training(training_id)
            if is_valid_training_id(training_id)
            else None
        )
        if record is None or not hmac.compare_digest(record.api_key, api_key):
            shown = training_id if len(training_id) <= 64 else training_id[:64] + "..."
            raise NotFound(f"no training {shown!r} (unknown id, or it expired)")
        return record

    async def document(self, record: TrainingRecord) -> TrainingDocument:
        position = await self.service.lifecycle.queue_position(record)
        return render_training_document(record, position)

    async def get(self, training_id: str, api_key: str) -> TrainingDocument:
        return await self.document(await self.record(training_id, api_key))

    async def read_for_events(self, training_id: str) -> tuple[TrainingRecord, TrainingDocument]:
        record = await self.store.get_training(training_id)
        if record is None:
            raise NotFound(f"no training {training_id!r} (it expired)")
        return record, await self.document(record)

    async def listing(self, api_key: str) -> list[TrainingDocument]:
        """The key's trainings, newest first (expired ones leave the list as it is read)."""
        index = Keys.trainings(api_key)
        newest: list[bytes] = await self.redis.zrevrange(index, 0, LIST_LIMIT - 1)  # type: ignore[assignment]
        ids = [as_text(i) for i in newest]
        out, gone = [], []
        for training_id in ids:
            record = await self.store.get_training(training_id)
            if record is None:
                gone.append(training_id)
            else:
                out.append(await self.document(record))
        if gone:
            await self.redis.zrem(index, *gone)
        return out

    async def cancel(self, training_id: str, api_key: str) -> TrainingDocument:
        """Cancel a queued training at once, a running one at its next step."""
        record = await self.record(training_id, api_key)
        if not record.status.is_terminal:
            await self.service.lifecycle.cancel(record, self.settings.failure_ttl_s)
            record = await self.record(training_id, api_key)
        return await self.document(record)

    # -- adapters ---------------------------------------------------------------------------
    async def owned_adapter(self, adapter_id: str, api_key: str) -> AdapterRecord:
        record = await self.store.get_adapter(adapter_id) if len(adapter_id) <= 64 else None
        if record is None or not hmac.compare_digest(record.owner, api_key):
            raise NotFound(f"no trained adapter {adapter_id[:64]!r} of this API key")
        return record

    async def weights(self, adapter_id: str, api_key: str) -> tuple[Blob, Iterator[bytes]]:
        record = await self.owned_adapter(adapter_id, api_key)
        blob = adapter_blob(record.id)
        chunks = await self.blobs.chunks(blob)
        if chunks is None:
            raise NotFound(f"the weights of adapter {record.id!r} are not stored ({blob.path})")
        return blob, chunks

    async def delete_adapter(self, adapter_id: str, api_key: str) -> AdapterDocument:
        """Unregister the adapter (a job naming it after this is a 422; one queued before fails
        at its worker, which unloads it) and delete its weights."""
        record = await self.owned_adapter(adapter_id, api_key)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(Keys.adapter(record.id))
            pipe.srem(Keys.key_adapters(api_key), record.id)
            await pipe.execute()
        await self.blobs.delete([adapter_blob(record.id)])
        return adapter_document(record, deleted=True)


def adapter_document(record: AdapterRecord, deleted: bool = False) -> AdapterDocument:
    return AdapterDocument(
        id=record.id,
        model=record.model,
        trigger_word=record.trigger_word,
        training_id=record.training_id,
        created_at=rfc3339(record.created_at) or "",
        deleted=deleted,
    )
