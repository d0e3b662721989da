"""Running trainings in a worker started with IMAGEGEN_WORKER_TASKS=generate,train.

A training runs between generation batches, never beside them: the work loop asks
`TrainingSlot.work()` for a slice (a few steps, at most `SLICE_S`) only when no generation
waits, so a queued generation waits at most one slice. The slot claims a training from the
training lane of a model this worker holds warm, trains on copies of that pipeline's parts (the
pipeline keeps serving byte for byte), writes progress with the loss, stores a checkpoint every
IMAGEGEN_TRAINING_CHECKPOINT_STEPS steps (then records its step), and at the end stores the
adapter's `.safetensors` and registers it in the one succeed transition. A rerun after a lost
worker resumes from the checkpoint, and goes on exactly as the lost run would have
(worker.training.recipe's checkpoint holds the optimizer and the random state).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from PIL import Image

from imagegen.core.blobs import BlobStore, StorageUnavailable, adapter_blob, checkpoint_blob
from imagegen.core.blobs import input_blob as input_blob_of
from imagegen.core.contract import ErrorCode, Keys
from imagegen.core.lifecycle import Lifecycle
from imagegen.core.settings import WorkerSettings
from imagegen.core.trainings import (
    AdapterRecord,
    TrainingRecord,
    adapter_id_for,
    private_token,
    training_lane,
)
from worker.faults import CrashPoint
from worker.training.export import kohya_weights
from worker.training.recipe import Example, LoraTrainer, TrainingConfig, default_warmup

log = logging.getLogger("imagegen.worker")

# A slice of training between two looks at the generation queues.
SLICE_S = 0.25


def training_precision(setting: str, device: Any) -> Literal["fp32", "fp16", "bf16"]:
    """IMAGEGEN_TRAINING_PRECISION on `device`: `auto` is bf16 on a GPU that has it (no loss
    scaling, fp32's range), else fp16; fp32 on a CPU, where half is no faster."""
    if setting == "auto":
        if device.type != "cuda":
            return "fp32"
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cast(Literal["fp32", "fp16", "bf16"], setting)


def _toggle(setting: str, auto: bool) -> bool:
    return auto if setting == "auto" else setting == "on"


@dataclass
class TrainingRun:
    """One claimed training on this worker: its trainer and how far it got."""

    record: TrainingRecord
    trainer: LoraTrainer
    started: float
    resumed_from: int = 0
    reported_at: float = 0.0

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def owner(self) -> str:
        return self.record.owner or ""


class TrainingSlot:
    """The one training this worker runs at a time, advanced in slices by the work loop.

    `pipe_of(model)` is a model's warm pipeline (loaded first if it is cold: the same memory
    budget as a generation's load), `models()` the models whose lanes it serves."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        blobs: BlobStore,
        settings: WorkerSettings,
        worker_name: str,
        models: Callable[[], list[str]],
        pipe_of: Callable[[str], Any],
        clock: Callable[[], float] = time.monotonic,
        crash: CrashPoint | None = None,
    ) -> None:
        self.crash = crash or CrashPoint(None)
        self.lifecycle = lifecycle
        self.blobs = blobs
        self.settings = settings
        self.worker_name = worker_name
        self.models = models
        self.pipe_of = pipe_of
        self.clock = clock
        self.run: TrainingRun | None = None

    def bells(self) -> list[str]:
        """What an idle worker also waits on: its models' training lanes."""
        return [Keys.bell(training_lane(model)) for model in self.models()]

    def job_ids(self) -> list[str]:
        return [self.run.id] if self.run is not None else []

    def work(self) -> bool:
        """Advance the running training by one slice, or claim one; whether there was any."""
        if self.run is None:
            self.run = self._claim()
            if self.run is None:
                return False
        run = self.run
        try:
            finished = self._advance(run)
        except StorageUnavailable as exc:
            self._fail(run, ErrorCode.STORAGE_UNAVAILABLE, f"the result store failed: {exc}")
            return True
        except Exception as exc:  # a bad step must fail its training, never the worker
            log.exception("training %s failed", run.id)
            self._fail(run, ErrorCode.INTERNAL, f"the training failed: {type(exc).__name__}")
            return True
        if finished:
            self.run = None
        return True

    def hand_back(self) -> None:
        """On a stop: the running training goes back to the front of its lane at once (its
        next run resumes from the last checkpoint), not after the heartbeat expires."""
        run, self.run = self.run, None
        if run is not None and self.lifecycle.requeue(run.record):
            log.info("training %s handed back at step %d", run.id, run.trainer.step_count)

    # -- claiming ---------------------------------------------------------------------------
    def _claim(self) -> TrainingRun | None:
        lanes = {model: training_lane(model) for model in self.models()}
        waiting = self.lifecycle.queue_heads(list(lanes.values()))
        for model, lane in lanes.items():
            if waiting.get(lane) is None:
                continue
            try:
                pipe = self.pipe_of(model)  # loaded now if it is cold here
            except Exception as exc:  # ModelUnavailable: another worker may hold it
                log.warning("trainings of %s wait: the model cannot be loaded: %s", model, exc)
                continue
            record = self.lifecycle.claim_training(model, self.worker_name)
            if record is None:
                continue
            try:
                return self._start(record, pipe)
            except StorageUnavailable as exc:
                self._fail_record(record, ErrorCode.STORAGE_UNAVAILABLE, f"{exc}")
            except ValueError as exc:  # the recipe refused the pictures or the trigger word
                self._fail_record(record, ErrorCode.INVALID_REQUEST, str(exc))
        return None

    def _start(self, record: TrainingRecord, pipe: Any) -> TrainingRun:
        spec = record.spec
        examples = []
        for name, caption in zip(spec.input_names, spec.captions, strict=True):
            data = self.blobs.get(input_blob_of(record.id, name))
            if data is None:
                raise StorageUnavailable(f"picture {name} of training {record.id} is not stored")
            examples.append(Example(Image.open(io.BytesIO(data)), caption))
        config = TrainingConfig(
            trigger_word=spec.trigger_word,
            steps=spec.steps,
            rank=spec.rank,
            learning_rate=spec.learning_rate,
            train_text_encoder=spec.train_text_encoder,
            batch_size=spec.batch_size,
            targets=spec.targets,
            warmup_steps=default_warmup(spec.steps),
            seed=spec.seed,
            precision=training_precision(self.settings.training_precision, pipe.unet.device),
            gradient_checkpointing=_toggle(
                self.settings.training_gradient_checkpointing, pipe.unet.device.type == "cuda"
            ),
        )
        trainer = LoraTrainer(pipe, examples, config)
        saved = self.blobs.get(checkpoint_blob(record.id))
        run = TrainingRun(record, trainer, time.perf_counter())
        if saved is not None:
            trainer.resume(saved)
            run.resumed_from = trainer.step_count
            log.info(
                "training %s resumes from its checkpoint at step %d", record.id, run.resumed_from
            )
        else:
            log.info(
                "training %s starts: %d steps on %d pictures", record.id, spec.steps, len(examples)
            )
        return run

    # -- stepping ---------------------------------------------------------------------------
    def _advance(self, run: TrainingRun) -> bool:
        """Steps for one slice; True when the run is over (finished, canceled or lost)."""
        trainer, every = run.trainer, self.settings.training_checkpoint_steps
        until = self.clock() + SLICE_S
        while not trainer.done and self.clock() < until:
            report = trainer.step()
            fields: dict[str, Any] = {"loss": report.loss}
            if run.resumed_from and report.step == run.resumed_from + 1:
                fields["resumed_from_step"] = run.resumed_from
            checkpoint = report.step % every == 0 and not trainer.done
            if checkpoint:
                # Stored before its step is recorded: a recorded step always has its checkpoint.
                self.blobs.put(checkpoint_blob(run.id), trainer.checkpoint(), self._blob_ttl(run))
                fields["checkpoint_step"] = report.step
                fields["checkpoint_attempt"] = run.record.attempts
            due = self.clock() - run.reported_at >= self.settings.progress_interval_s
            if checkpoint or due or len(fields) > 1 or trainer.done:
                run.reported_at = self.clock()
                status, _ = self.lifecycle.progress(run.id, report.step, run.owner, fields)
                if status != "running":
                    log.info("training %s stopped at step %d: %s", run.id, report.step, status)
                    return True
                if checkpoint:
                    self.crash.reached("after_checkpoint")
            if self.record_deadline_passed(run):
                self._fail(run, ErrorCode.TIMEOUT, "the training exceeded its time limit")
                return True
        if trainer.done:
            self._finish(run)
            return True
        return False

    @staticmethod
    def record_deadline_passed(run: TrainingRun) -> bool:
        deadline = run.record.deadline
        return bool(deadline) and time.time() > float(deadline or 0)

    def _blob_ttl(self, run: TrainingRun) -> int:
        # A checkpoint outlives its training's time limit (the Redis store expires it then).
        return int(max(run.record.timeout_s, 3600)) + self.settings.result_ttl_s

    def _finish(self, run: TrainingRun) -> None:
        from safetensors.torch import save

        spec, trainer = run.record.spec, run.trainer
        adapter_id = adapter_id_for(spec.name, run.id)
        weights = kohya_weights(trainer.lora_state(), spec.trigger_word, trainer.embeddings())
        blob = adapter_blob(adapter_id)
        self.blobs.put(blob, save(weights, metadata={"ss_output_name": adapter_id}), 0)
        adapter = AdapterRecord(
            id=adapter_id,
            owner=run.record.api_key,
            model=spec.model,
            trigger_word=spec.trigger_word,
            token=private_token(adapter_id),
            training_id=run.id,
            created_at=time.time(),
            rank=spec.rank,
            description=f"trained from {spec.images} picture(s), {spec.steps} steps",
        )
        run_s = time.perf_counter() - run.started
        if self.lifecycle.succeed_training(run.record, adapter, self.settings.result_ttl_s, run_s):
            log.info("training %s succeeded: adapter %s (%.1f s)", run.id, adapter_id, run_s)
            self.blobs.delete([checkpoint_blob(run.id)])
        else:
            # Canceled or taken back meanwhile: nothing names these weights.
            self.blobs.delete([blob])

    def _fail(self, run: TrainingRun, code: str, message: str) -> None:
        self.run = None
        self._fail_record(run.record, code, message)

    def _fail_record(self, record: TrainingRecord, code: str, message: str) -> None:
        log.error("training %s failed: %s: %s", record.id, code, message)
        self.lifecycle.fail_run(record, code, message, self.settings.failure_ttl_s)
