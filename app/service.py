"""The generation service: turns validated requests into queued jobs and jobs into documents."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterator

import anyio
import redis.asyncio as aioredis

from app import images_in, resolve
from app.auth import KeyStore
from app.documents import render_document, rfc3339
from app.errors import (
    Conflict,
    ContentFiltered,
    ImageMissing,
    InvalidRequest,
    NotFound,
    QueueFull,
    QuotaExceeded,
    TooManyAdapters,
    TooManyJobs,
)
from app.prompt_tokens import TokenCounters
from app.registry import ModelRegistry
from app.schemas import GenerationRequest, JobDocument, PreprocessRequest
from imagegen.core.blobs import Blob, image_blob, input_blob, open_async_blob_store
from imagegen.core.contract import (
    JOB_ID_PREFIX,
    AdapterInfo,
    JobRecord,
    JobSpec,
    JobStatus,
    Keys,
    WebhookTarget,
    is_valid_job_id,
)
from imagegen.core.destinations import Refused, check_destination
from imagegen.core.lifecycle import Admission, AsyncLifecycle
from imagegen.core.lifecycle.submit import Run
from imagegen.core.logs import request_id
from imagegen.core.settings import GatewaySettings
from imagegen.core.store import AsyncJobStore
from imagegen.core.trainings import TrainingRecord

IDEMPOTENCY_TTL_S = 24 * 3600
# How long a submit waits for a webhook host's name to resolve before letting it through.
WEBHOOK_RESOLVE_S = 2.0
# What a key at its max_active_jobs is told to wait (a job of this service takes seconds).
TOO_MANY_JOBS_RETRY_S = 5


def seconds_to_utc_midnight(now: float) -> int:
    """Whole seconds until the next UTC midnight (at least 1): when a daily quota resets."""
    return max(1, 86400 - int(now) % 86400)


def _cost_rule(record: Run) -> str:
    cost = f"{record.spec.megapixel_steps:g} megapixel-steps"
    if isinstance(record, TrainingRecord):
        return f"training costs {cost} (width*height/1e6 * steps * pictures per step)"
    return f"job costs {cost} (width*height/1e6 * steps * n)"


def new_job_id() -> str:
    return JOB_ID_PREFIX + secrets.token_urlsafe(16)


class GenerationService:
    """Submit, read and cancel generation jobs, on the event loop and the gateway's one Redis
    client."""

    def __init__(
        self,
        connection: aioredis.Redis,
        registry: ModelRegistry,
        settings: GatewaySettings,
        api_keys: KeyStore | None = None,
    ) -> None:
        self.api_keys = api_keys or KeyStore([], settings)
        self.webhook_allow = settings.webhook_allow_list
        self.redis = connection
        self.store = AsyncJobStore(connection)
        self.registry = registry
        self.settings = settings
        self.lifecycle = AsyncLifecycle(connection)
        # Images and input images: in Redis (written by the lifecycle's scripts) or S3.
        self.blobs = open_async_blob_store(settings, connection)
        self.presign_s = settings.storage_presign_expires_s
        self.token_counters = TokenCounters(connection)

    # -- submit ---------------------------------------------------------------------------------
    async def target(
        self, request: GenerationRequest | PreprocessRequest, api_key: str = ""
    ) -> resolve.Target:
        """The model the request names, as workers published it (one lookup per submit), with
        the adapters `api_key` trained for it when the request names LoRAs."""
        model_id = request.model or self.settings.default_model
        info = await self.registry.get(model_id)
        if info is not None and getattr(request, "loras", None):
            own = await self.private_adapters(api_key, model_id)
            if own:
                info = info.model_copy(update={"adapters": [*info.adapters, *own]})
        known = await self.registry.model_ids() if info is None else []
        return resolve.Target(model_id, info, tuple(known))

    async def resolve_with_blobs(
        self,
        request: GenerationRequest,
        target: resolve.Target,
        inputs: images_in.PreparedInputs | None = None,
    ) -> tuple[JobSpec, dict[str, bytes]]:
        """The job's spec (the model's defaults filled in, the configured limits applied, any
        field named) and its input blobs by name (`inputs`' and the control image's)."""
        info = target.info
        encode = await self.token_counters.encoder(info) if info is not None else None
        if not request.control_list():
            return resolve.resolve_request(request, self.settings, target, inputs, encode)
        # Decoding an image is CPU work: off the event loop.
        return await anyio.to_thread.run_sync(
            resolve.resolve_request, request, self.settings, target, inputs, encode
        )

    def prepare_inputs(
        self, request: GenerationRequest, max_pixels: int | None = None
    ) -> images_in.PreparedInputs | None:
        """Decode, check and normalize the request's images (None: text-to-image); the output
        size is checked against `max_pixels` (default: the service's cap) before any resize.
        Blocking: the gateway runs it in a worker thread."""
        if request.image is None:
            for field in ("mask", "outpaint"):
                if getattr(request, field) is not None:
                    raise InvalidRequest.for_field(field, "needs `image`")
            return None
        if request.mask is None:
            for field in ("mask_blur", "padding_mask_crop"):
                if getattr(request, field) is not None:
                    raise InvalidRequest.for_field(field, "needs `mask` (it is for inpainting)")
        if request.outpaint is not None and request.mask is not None:
            raise InvalidRequest.for_field("outpaint", "excludes `mask` (the new area is the mask)")
        s = self.settings
        image = images_in.load_image(
            images_in.decode_base64(request.image, "image", s.max_input_image_bytes),
            "image",
            s.max_input_image_bytes,
            s.max_pixels,
        )
        mask = None
        if request.mask is not None:
            mask = images_in.load_image(
                images_in.decode_base64(request.mask, "mask", s.max_input_image_bytes),
                "mask",
                s.max_input_image_bytes,
                s.max_pixels,
            )
        outpaint = request.outpaint.to_contract().sides() if request.outpaint else None
        return images_in.prepare(
            image=image,
            mask=mask,
            outpaint=outpaint,
            width=request.width,
            height=request.height,
            max_pixels=max_pixels if max_pixels is not None else s.max_pixels,
        )

    def job_timeout_s(self, spec: JobSpec) -> int:
        """A hard limit that grows with the work: steps x megapixels x images."""
        work = spec.steps * spec.width * spec.height * spec.n / 1e6
        return int(
            self.settings.job_timeout_base_s + work * self.settings.job_timeout_s_per_megapixel_step
        )

    async def submit(
        self, request: GenerationRequest, api_key: str = "", idempotency_key: str | None = None
    ) -> tuple[JobDocument, bool]:
        """Queue a job for `api_key`; returns its document and whether it was created (False:
        an Idempotency-Key replay).

        One round trip to Redis, on the event loop: a script checks the Idempotency-Key and
        the queue's depth and, only if both allow it, writes the job (see the lifecycle's
        lua/submit.lua).
        """
        if request.webhook is not None:
            await self.check_webhook(request.webhook.url)
        # The model is looked up once, before any pixel work: its own pixel cap bounds the
        # inputs' resizing (an unknown model: resolve names it, after the inputs were checked
        # against the service's cap).
        target = await self.target(request, api_key)
        inputs = None
        if request.image is not None or request.mask is not None or request.outpaint is not None:
            cap = resolve.pixel_cap(self.settings, target.info)
            inputs = await anyio.to_thread.run_sync(self.prepare_inputs, request, cap)
        else:
            for field in ("strength", "mask_blur", "padding_mask_crop"):
                if getattr(request, field) is not None:
                    raise InvalidRequest.for_field(field, "needs `image`")
        # A bad request never consumes an idempotency key.
        spec, blobs = await self.resolve_with_blobs(request, target, inputs)
        body_hash = ""
        if idempotency_key is not None:
            body_hash = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        webhook = request.webhook.to_contract() if request.webhook is not None else None
        return await self.enqueue(spec, blobs, api_key, webhook, idempotency_key, body_hash)

    async def preprocess(self, request: PreprocessRequest, api_key: str = "") -> JobDocument:
        """Queue the control-preview job of `request` (a worker of its model makes the map),
        under the same admission as any job."""
        target = await self.target(request)
        spec, blobs = await anyio.to_thread.run_sync(
            resolve.resolve_preprocess, request, self.settings, target
        )
        job, _ = await self.enqueue(spec, blobs, api_key)
        return job

    async def enqueue(
        self,
        spec: JobSpec,
        blobs: dict[str, bytes],
        api_key: str,
        webhook: WebhookTarget | None = None,
        idempotency_key: str | None = None,
        body_hash: str = "",
    ) -> tuple[JobDocument, bool]:
        """Write a resolved job through the lifecycle's submit script (admission, queue depth
        and idempotency in the same step); its document and whether it was created."""
        record = JobRecord(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            spec=spec,
            created_at=time.time(),
            api_key=api_key,
            request_id=request_id.get(),
            timeout_s=self.job_timeout_s(spec),
            webhook=webhook,
        )
        limits = self.api_keys.limits(api_key)
        admission = Admission(limits.max_active_jobs, limits.daily_quota)
        created, value = await self.admit(record, blobs, admission, idempotency_key, body_hash)
        if created:
            return render_document(record, int(value)), True
        return await self.get(str(value), api_key), False

    async def admit(
        self,
        record: Run,
        blobs: dict[str, bytes],
        admission: Admission,
        idempotency_key: str | None = None,
        body_hash: str = "",
    ) -> tuple[bool, int | str]:
        """Queue `record` (a job or a training) with its input blobs through the lifecycle's
        submit script: (True, its queue position), or (False, the id an Idempotency-Key replay
        names); every refusal is its API error."""
        api_key = record.api_key
        idempotency = None
        if idempotency_key is not None:
            owner_key = hashlib.sha256(f"{api_key}\n{idempotency_key}".encode()).hexdigest()
            idempotency = (
                Keys.idempotency(owner_key),
                f"{record.id} {body_hash}",
                IDEMPOTENCY_TTL_S,
            )
        in_store = [(input_blob(record.id, name), data) for name, data in blobs.items()]
        if not self.blobs.inline:
            # Stored before the job exists: a worker never sees a job without its inputs. A
            # store that is down is a 503 here (StorageUnavailable), before anything is queued.
            await self.blobs.put_many(in_store, self.settings.result_ttl_s)
        result = await self.lifecycle.submit(
            record,
            self.settings.max_queue_depth,
            idempotency,
            blobs if self.blobs.inline else None,
            admission,
            inputs_in_store=not self.blobs.inline,
        )
        if result.outcome == "created":
            return True, int(result.value)
        if not self.blobs.inline:
            # Refused: its inputs are orphans now (the sweeper would delete them later).
            await self.blobs.delete([blob for blob, _ in in_store])
        if result.outcome == "too_many_jobs":
            raise TooManyJobs(
                f"this API key has {int(result.value)} jobs queued or running, its limit "
                f"(max_active_jobs = {admission.max_active_jobs}); retry when one has finished",
                headers={"Retry-After": str(TOO_MANY_JOBS_RETRY_S)},
            )
        if result.outcome == "quota_exceeded":
            used = float(result.value)
            raise QuotaExceeded(
                f"this {_cost_rule(record)} and this API key used "
                f"{used:g} of its daily quota of {admission.daily_quota:g} today (UTC); the "
                "quota resets at the next UTC midnight",
                headers={"Retry-After": str(seconds_to_utc_midnight(record.created_at))},
            )
        if result.outcome == "too_many_adapters":
            raise TooManyAdapters(
                f"this API key holds {int(result.value)} trained adapters, its limit "
                f"(IMAGEGEN_MAX_ADAPTERS_PER_KEY = {admission.max_adapters}); delete one with "
                "DELETE /v1/adapters/{id}"
            )
        if result.outcome == "full":
            raise QueueFull(
                f"the queue of {record.spec.lane!r} holds {int(result.value)} jobs, its limit; "
                "retry later",
                headers={"Retry-After": "10"},
            )
        run_id, stored_hash = str(result.value).split(" ", 1)  # outcome "exists": a replay
        if stored_hash != body_hash:
            raise Conflict("Idempotency-Key was already used with a different request body")
        return False, run_id

    async def check_webhook(self, url: str) -> None:
        """A 422 naming `webhook.url` when its destination is refused (see
        imagegen.core.webhooks); a name that does not resolve now is let through, and checked
        again, like every destination, at each delivery."""
        try:
            with anyio.fail_after(WEBHOOK_RESOLVE_S):
                await anyio.to_thread.run_sync(
                    check_destination, url, self.webhook_allow, abandon_on_cancel=True
                )
        except Refused as exc:
            raise InvalidRequest.for_field("webhook.url", str(exc)) from None
        except (OSError, TimeoutError, UnicodeError):
            return

    async def private_adapters(
        self, api_key: str, model_id: str | None = None
    ) -> list[AdapterInfo]:
        """The adapters `api_key` trained (for `model_id`, if named), as its listings show
        them (`owner` "you"); nobody else's."""
        return [record.info() for record in await self.store.key_adapters(api_key, model_id)]

    # -- read -----------------------------------------------------------------------------------
    async def get_record(self, job_id: str, api_key: str) -> JobRecord:
        """The job, if it exists and belongs to `api_key`; another key's job is a 404 too."""
        # Ids are checked before any Redis access: nothing user-made reaches a key unchecked.
        record = await self.store.get(job_id) if is_valid_job_id(job_id) else None
        if record is None or not hmac.compare_digest(record.api_key, api_key):
            shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."
            raise NotFound(f"no generation job {shown!r} (unknown id, or it expired)")
        return record

    async def get(self, job_id: str, api_key: str = "") -> JobDocument:
        return await self.document(await self.get_record(job_id, api_key))

    async def read_for_events(self, job_id: str) -> tuple[JobRecord, JobDocument]:
        """The job's record and document for its event feed (its stream checked the owner
        when it opened)."""
        record = await self.store.get(job_id)
        if record is None:
            raise NotFound(f"no generation job {job_id!r} (it expired)")
        return record, await self.document(record)

    async def image(self, job_id: str, index: int, api_key: str = "") -> bytes:
        """Image `index` of a succeeded job, whole (for answers that embed it: base64)."""
        record = await self.get_record(job_id, api_key)
        self._check_image(record, index)
        blob = image_blob(job_id, index, record.spec.output_format)
        png = await self.blobs.get(blob)
        if png is None:
            raise self._gone(record, index, blob)
        return png

    async def image_download(
        self, job_id: str, index: int, api_key: str = ""
    ) -> tuple[Blob, Iterator[bytes] | str]:
        """Image `index` as the route sends it: a presigned URL of the store (with
        IMAGEGEN_STORAGE_PRESIGN) or its chunks, streamed from the store."""
        record = await self.get_record(job_id, api_key)
        self._check_image(record, index)
        blob = image_blob(job_id, index, record.spec.output_format)
        if self.settings.storage_presign and (url := self.blobs.url(blob, self.presign_s)):
            return blob, url
        chunks = await self.blobs.chunks(blob)
        if chunks is None:
            raise self._gone(record, index, blob)
        return blob, chunks

    @staticmethod
    def _check_image(record: JobRecord, index: int) -> None:
        """A 404 unless image `index` of `record` exists and was not withheld."""
        job_id = record.id
        if index < 0 or index >= record.spec.n:
            raise NotFound(f"job {job_id} has images 0..{record.spec.n - 1}, not {index}")
        if record.status != JobStatus.SUCCEEDED:
            raise NotFound(
                f"image {index} of job {job_id} does not exist yet (job is {record.status})"
            )
        if any(i.index == index and i.filtered for i in record.images):
            raise ContentFiltered(
                f"image {index} of job {job_id} was withheld by the model's safety checker"
            )

    def _gone(self, record: JobRecord, index: int, blob: Blob) -> NotFound:
        """Why a succeeded job's image is not stored: it expired, or (within its time) the
        store lost it."""
        ttl_s = self.settings.result_ttl_s
        expires_at = record.images_expire_at or (record.finished_at or 0.0) + ttl_s
        if time.time() < expires_at:
            return ImageMissing(
                f"image {index} of job {record.id} should be stored until "
                f"{rfc3339(expires_at)} but the result store does not hold it "
                f"({self.blobs.where(blob)})"
            )
        return NotFound(
            f"image {index} of job {record.id} has expired (results are kept {ttl_s}s after "
            "a job finishes)"
        )

    async def queue_depth(self, model_id: str) -> int:
        return int(await self.redis.zcard(Keys.queue(model_id)))

    async def document(self, record: JobRecord) -> JobDocument:
        """The job's document, for its owner: with IMAGEGEN_STORAGE_PRESIGN its images' `url`s
        are presigned URLs of the store (signed here, no round trip)."""
        document = render_document(record, await self.lifecycle.queue_position(record))
        if self.settings.storage_presign and record.status == JobStatus.SUCCEEDED:
            for link in document.images:
                if not link.filtered:
                    blob = image_blob(record.id, link.index, record.spec.output_format)
                    link.url = self.blobs.url(blob, self.presign_s) or link.url
        return document

    # -- cancel ---------------------------------------------------------------------------------
    async def cancel(self, job_id: str, api_key: str = "") -> JobDocument:
        """Cancel a queued or running job; a finished job is returned unchanged.

        The record turns `canceled` at once. A queued job leaves its queue (and a worker that
        pops it anyway sees `canceled` and skips it); a running job's worker learns of it at
        its next progress write and stops at that step boundary.
        """
        record = await self.get_record(job_id, api_key)
        if not record.status.is_terminal:
            await self.lifecycle.cancel(record, self.settings.failure_ttl_s)
            record = await self.get_record(job_id, api_key)
        return await self.document(record)
