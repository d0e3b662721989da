"""Worker process start-up: list its models, load and warm the first, announce them all, then
take jobs (loading the others on demand, routing by warmth: worker.models, worker.routing)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from types import FrameType
from typing import cast

import redis

from imagegen import __version__
from imagegen.core.blobs import Sweeper, open_blob_store
from imagegen.core.contract import ErrorCode, WorkerHeartbeat
from imagegen.core.lifecycle import Lifecycle
from imagegen.core.logs import configure_logging
from imagegen.core.settings import FaultSettings, WorkerSettings
from worker.catalog import CatalogError
from worker.faults import CrashPoint
from worker.heartbeat import Heartbeat
from worker.inference import Inference, WarmUpOutOfMemory
from worker.loop import WorkLoop
from worker.metrics import WorkerMetrics
from worker.models import ModelManager, ModelUnavailable, UnsupportedModel
from worker.pipeline import LoadedModel, free_gpu_gib
from worker.preprocessors import Preprocessors
from worker.reaper import Reaper
from worker.routing import WarmthRouter
from worker.runner import JobRunner
from worker.state import WorkerState
from worker.training.runner import TrainingSlot

log = logging.getLogger("imagegen.worker")
# Exit status of a worker that had to abandon a hung job (EX_TEMPFAIL: restart me).
HUNG_EXIT_CODE = 75


def default_worker_name() -> str:
    # Unique per process: a restarted worker must not be mistaken for the one it replaces.
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


def batch_max_images(settings: WorkerSettings, model: LoadedModel) -> int:
    """Images one denoising loop may hold: the setting, or `auto` — 1 on CPU, where batching
    buys nothing (bench/batching.py), and on a GPU as many as free memory comfortably holds
    at the model's native size, at most 16 (compiled: at most the largest compiled size)."""
    if settings.batch_max_images:
        return settings.batch_max_images
    free = free_gpu_gib(model.device)
    if free is None:
        return 1
    # SD 1.5 at 512x512 peaks near 2 GiB + 0.13 GiB per image (../shared/anchors); scale by area.
    per_image = 0.13 * (model.info.width * model.info.height) / (512 * 512)
    # Compiled, no batch may outgrow the sizes warmed up at start.
    largest = model.compiled_batches[-1] if model.compiled_batches else 16
    return max(1, min(largest, int((free - 2.0) / max(per_image, 1e-3))))


# Set by a stop signal before the job loop runs. The SystemExit the handler raises can be lost:
# arriving inside safetensors' native read, it comes back as a load error (diffusers turns it
# into an OSError), so start-up checks this flag after loading as well.
_STOP_WHILE_STARTING = threading.Event()


def _exit_at_once(signum: int, _frame: FrameType | None) -> None:
    # Loading and warming up hold no job: a stop request ends the process right away
    # (as PID 1 in a container, no handler would mean waiting out the grace period).
    log.info("signal %d while starting; exiting", signum)
    _STOP_WHILE_STARTING.set()
    raise SystemExit(0)


def run_worker(settings: WorkerSettings) -> int:
    """Run one worker until it is told to stop (SIGTERM/SIGINT: finish the current job, exit)."""
    # Loading and warm-up hold no job: until the loop installs its own handlers (finish the
    # batch, then exit), a stop signal ends the process at once. Without this, PID 1 in a
    # container ignores SIGTERM and `compose stop` waits out the whole stop_grace_period.
    signal.signal(signal.SIGTERM, _exit_at_once)
    signal.signal(signal.SIGINT, _exit_at_once)
    configure_logging(settings.log_level, settings.log_json)
    connection = redis.Redis.from_url(
        settings.redis_url, health_check_interval=30, **settings.redis_options()
    )
    name = settings.worker_name or default_worker_name()
    state = WorkerState()
    started_at = time.time()
    faults = FaultSettings()  # the test suites' switches, off in any deployment
    crash = CrashPoint(faults.fault_crash_at if faults.fault_injection else None)

    # Preprocessor models load before the models announce what they serve: a checkpoint that
    # fails is left out of `preprocessors` (a 422 at the gateway), never a failed job later.
    preprocessors = Preprocessors(settings.depth_model, settings.pose_model)
    for preprocessor, why in preprocessors.load().items():
        log.error("preprocessor %s is unavailable and not served: %s", preprocessor, why)
        settings = settings.model_copy(update={f"{preprocessor}_model": None})
    try:
        models = ModelManager(
            settings,
            # The stock pipeline runs job by job: a batch would only keep jobs waiting as running.
            max_images=lambda m, inf: batch_max_images(settings, m) if inf.batching else 1,
        )
    except CatalogError as exc:  # one line per problem of IMAGEGEN_MODELS_FILE
        for problem in exc.problems:
            log.error("refusing to start: %s", problem)
        return 2
    except UnsupportedModel as exc:
        log.error("refusing to start: %s", exc)
        return 2
    servable = models.servable_ids()
    if not servable:
        # A worker that can serve nothing says why once and exits; one with a servable model
        # serves it, and lists the others unavailable with their reasons.
        reasons = "; ".join(f"{i}: {e.unavailable}" for i, e in models.entries.items())
        log.error("refusing to start: no model of this worker can be served (%s)", reasons)
        return 2
    first = servable[0]
    metrics = WorkerMetrics(first, models.device, exact_steps=bool(settings.metrics_port))
    metrics.watch_models(models.served, models.budget)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    # The first model is loaded (and warmed up) at start; the others when their jobs come.
    inference: Inference | None = None
    try:
        inference = models.acquire(first)
        state.pipelines_loaded += 1
        if settings.warmup:
            fitted = inference.warm_up()
            if fitted is not None:  # a larger warm-up batch ran out of memory
                models.limit_images(first, fitted)
    except ModelUnavailable as exc:
        log.error("model %s is unavailable; its jobs will fail: %s", first, exc)
    except WarmUpOutOfMemory as exc:  # not a crash (a container would restart-loop)
        models.mark_unavailable(first, str(exc))
        log.error("model %s is unavailable; its jobs will fail: %s", first, exc)
    if _STOP_WHILE_STARTING.is_set():  # the signal's SystemExit was swallowed by the load
        return 0
    lifecycle = Lifecycle(connection)
    blobs = open_blob_store(settings, connection)
    runner = JobRunner(
        cast(Inference, inference),
        lifecycle,
        settings,
        state,
        metrics,
        crash,
        inference_for=models.acquire,
        fault_injection=faults.fault_injection,
        blobs=blobs,
        preprocessors=preprocessors,
    )
    router = WarmthRouter(connection, lifecycle, models, settings, name)
    trainings = None
    if "train" in settings.worker_tasks:
        trainings = TrainingSlot(
            lifecycle,
            blobs,
            settings,
            name,
            models=models.servable_ids,
            pipe_of=lambda model: models.acquire(model).model.pipe,
            crash=crash,
        )
    loop = WorkLoop(
        connection,
        lifecycle,
        runner,
        state,
        first,
        name,
        models.max_images(first),
        settings.batch_max_wait_s,
        crash,
        router=router,
        failure_ttl_s=settings.failure_ttl_s,
        between_batches=models.rescan_loras,
        trainings=trainings,
        generate="generate" in settings.worker_tasks,
    )
    loop.install_signal_handlers()

    served = models.served()
    base = WorkerHeartbeat(
        name=name,
        model=served[0].info,
        device=str(models.device),
        dtype=str(models.dtype).removeprefix("torch."),
        version=__version__,
        host=socket.gethostname(),
        pid=os.getpid(),
        started_at=started_at,
        sent_at=started_at,
        state="ready",
        models=served,
        memory_budget_bytes=models.budget,
    )

    def snapshot() -> dict[str, object]:
        jobs = state.job_ids() + (trainings.job_ids() if trainings is not None else [])
        return {
            "state": "busy" if jobs else "ready",
            "current_jobs": jobs,
            "jobs_done": state.jobs_done,
            "pipelines_loaded": models.loads,
            "models": models.served(),
            "memory_used_bytes": models.used_bytes(),
        }

    def watchdog() -> None:
        # The alarm cannot fire while a step is stuck in native code. The heartbeat thread
        # still runs then, so it enforces the hard limit: fail the overdue jobs and exit, for
        # the supervisor (compose `restart`, `imagegen serve`) to restart us; the reaper of
        # another worker takes back the rest of the batch.
        now = time.time()
        overdue = [
            job
            for job in state.running()
            if job.record.deadline and now > job.record.deadline + settings.hard_timeout_grace_s
        ]
        if not overdue:
            return
        for job in overdue:
            log.critical("job %s is stuck past its time limit; failing it and exiting", job.id)
            lifecycle.fail(
                job,
                ErrorCode.TIMEOUT,
                "the job exceeded its time limit (a step hung; the worker was restarted)",
                settings.failure_ttl_s,
            )
        os._exit(HUNG_EXIT_CODE)

    heartbeat = Heartbeat(
        connection,
        base,
        interval_s=settings.heartbeat_interval_s,
        ttl_s=settings.worker_stale_s,
        snapshot=snapshot,
        local_file=settings.heartbeat_file,
        watchdog=watchdog,
    )
    heartbeat.start()
    sweeper = None if blobs.inline else Sweeper(blobs, connection, settings)
    reaper = Reaper(connection, settings, sweeper)
    reaper.start()
    log.info(
        "worker %s ready for model(s) %s (%s, %s; model memory budget %.2f GiB)",
        name,
        ", ".join(models.ids()),
        base.device,
        base.dtype,
        models.budget / 2**30,
    )
    try:
        loop.run()
    finally:
        reaper.stop()
        heartbeat.stop()
    log.info("worker %s stopped after %d job(s)", name, state.jobs_done)
    return 0
