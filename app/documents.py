"""The job document (API.md "GET /v1/generations/{id}") rendered from a job record: by the
gateway, and by the webhook delivery process from the record as it was at a transition."""

from __future__ import annotations

from datetime import UTC, datetime

from app.schemas import (
    ErrorInfo,
    GenerationParams,
    ImageLink,
    JobDocument,
    Progress,
    Timings,
    WebhookAttempt,
    WebhookInfo,
)
from app.training_schemas import AdapterRef, TrainingDocument, TrainingProgress
from imagegen.core.contract import JobRecord, JobSpec, JobStatus, RunRecord
from imagegen.core.trainings import TrainingRecord


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def render_document(record: JobRecord, queue_position: int | None) -> JobDocument:
    """The document of `record`; `queue_position` as the queue says (None: not queued)."""
    spec = record.spec
    images = [
        ImageLink(
            index=i.index,
            seed=i.seed,
            width=i.width,
            height=i.height,
            url=f"/v1/generations/{record.id}/images/{i.index}",
            filtered=i.filtered,
        )
        for i in record.images
    ]
    return JobDocument(
        id=record.id,
        status=record.status.value,
        created_at=rfc3339(record.created_at) or "",
        started_at=rfc3339(record.started_at),
        finished_at=rfc3339(record.finished_at),
        queue_position=queue_position if record.status == JobStatus.QUEUED else None,
        progress=Progress(
            step=record.progress_step,
            total_steps=spec.steps,
            eta_s=_eta_s(record, record.spec.steps),
        ),
        request=_params(spec),
        images=images,
        error=ErrorInfo(**record.error.model_dump()) if record.error else None,
        timings=_timings(record),
        webhook=_webhook(record),
    )


def render_training_document(
    record: TrainingRecord, queue_position: int | None
) -> TrainingDocument:
    """The document of a training (`GET /v1/trainings/{id}`)."""
    spec = record.spec
    adapter = record.adapter
    return TrainingDocument(
        id=record.id,
        status=record.status.value,
        model=spec.model,
        name=spec.name,
        trigger_word=spec.trigger_word,
        images=spec.images,
        steps=spec.steps,
        rank=spec.rank,
        learning_rate=spec.learning_rate,
        train_text_encoder=spec.train_text_encoder,
        queue_position=queue_position if record.status == JobStatus.QUEUED else None,
        progress=TrainingProgress(
            step=record.progress_step,
            total_steps=spec.steps,
            loss=record.loss,
            eta_s=_eta_s(record, spec.steps, record.resumed_from_step),
        ),
        checkpoint_step=record.checkpoint_step,
        resumed_from_step=record.resumed_from_step,
        adapter=AdapterRef(**adapter.model_dump()) if adapter is not None else None,
        error=ErrorInfo(**record.error.model_dump()) if record.error else None,
        created_at=rfc3339(record.created_at) or "",
        started_at=rfc3339(record.started_at),
        finished_at=rfc3339(record.finished_at),
        timings=_timings(record),
        webhook=_webhook(record),
    )


def _timings(record: RunRecord) -> Timings:
    queued_s = run_s = None
    if record.started_at is not None:
        queued_s = round(record.started_at - record.created_at, 3)
        if record.finished_at is not None:
            run_s = round(record.finished_at - record.started_at, 3)
    elif record.finished_at is not None:
        queued_s = round(record.finished_at - record.created_at, 3)
    return Timings(queued_s=queued_s, run_s=run_s)


def _webhook(record: RunRecord) -> WebhookInfo | None:
    webhook = None
    if record.webhook is not None:
        webhook = WebhookInfo(
            url=record.webhook.url,
            events=list(record.webhook.events),
            deliveries=[
                WebhookAttempt(
                    event=d.event,
                    webhook_id=d.webhook_id,
                    attempt=d.attempt,
                    at=rfc3339(d.at) or "",
                    status_code=d.status_code,
                    error=d.error,
                    outcome=d.outcome,
                )
                for d in record.webhook_deliveries
            ],
        )
    return webhook


def _eta_s(record: RunRecord, total: int, first_step: int = 0) -> float | None:
    """Seconds left at the step rate seen so far (a resumed run counts from the step it
    resumed at); None until a step rate is known."""
    done = record.progress_step - first_step
    if record.status != JobStatus.RUNNING or done <= 0:
        return None
    if record.started_at is None or record.progress_at is None:
        return None
    per_step = (record.progress_at - record.started_at) / done
    return round(per_step * (total - record.progress_step), 2)


def _params(spec: JobSpec) -> GenerationParams:
    params = spec.model_dump()
    return GenerationParams(**params, control=params["controls"][0] if params["controls"] else None)
