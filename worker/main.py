"""Worker process start-up: load the pipeline once, warm it, announce it, then take jobs."""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import signal
import socket
import time

import redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from imagegen import __version__
from imagegen.contract import ErrorCode, WorkerHeartbeat, queue_name
from imagegen.logs import configure_logging
from imagegen.settings import Settings
from worker import jobs
from worker.batching import Batcher
from worker.heartbeat import Heartbeat
from worker.metrics import WorkerMetrics
from worker.pipeline import LoadedModel, free_gpu_gib, load_model
from worker.recovery import Reaper
from worker.runtime import Counters, Runtime

log = logging.getLogger("imagegen.worker")
# Exit status of a worker that had to abandon a hung job (EX_TEMPFAIL: restart me).
HUNG_EXIT_CODE = 75


class ImagegenWorker(SimpleWorker):
    """RQ's in-process worker: no fork per job, because CUDA and the warm pipeline live here."""


def default_worker_name() -> str:
    # Unique per process: RQ refuses a name whose previous holder's key has not yet expired.
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


def batch_max_images(settings: Settings, model: LoadedModel) -> int:
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


def _work_until_stopped(
    connection: redis.Redis,
    queue: str,
    name: str,
    settings: Settings,
    batcher: Batcher | None,
) -> None:
    """Run RQ's work loop; if Redis goes away, wait for it and start a fresh loop.

    RQ's loop gives up on errors outside its dequeue; the warm pipeline is worth keeping, so
    instead of exiting we reconnect here. Each loop registers under a fresh RQ name, since the
    old one's key may survive the outage.
    """
    for incarnation in itertools.count():
        rq_name = name if incarnation == 0 else f"{name}.{incarnation}"
        worker = ImagegenWorker(
            [queue], connection=connection, name=rq_name, serializer=JSONSerializer
        )
        if batcher is not None:
            batcher.rq_worker = worker  # claimed jobs go through this loop's RQ bookkeeping
        try:
            worker.work(logging_level=settings.log_level, with_scheduler=False)
        except redis.exceptions.RedisError as exc:
            log.warning("work loop lost redis: %s", exc)
        if worker._shutdown_requested_date is not None:
            return  # SIGTERM/SIGINT: the current job was finished, nothing new was taken
        _wait_for_redis(connection)
        log.warning("redis is back; restarting the work loop")


def _wait_for_redis(connection: redis.Redis, max_wait_s: float = 10.0) -> None:
    wait = 0.5
    while True:
        try:
            connection.ping()
            return
        except redis.exceptions.RedisError:
            time.sleep(wait)
            wait = min(wait * 2, max_wait_s)


def _exit_on_stop_signals_while_starting() -> None:
    """SIGTERM/SIGINT before the work loop: exit 0 at once. Loading and warm-up hold no job,
    so there is nothing to finish; RQ's loop installs its own handlers (finish the job, then
    exit) when it starts. Without this, PID 1 in a container ignores SIGTERM and `compose stop`
    waits the whole stop_grace_period."""

    def stop(signum: int, _frame: object) -> None:
        log.info("worker got %s while starting; exiting", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def run_worker(settings: Settings) -> int:
    """Run one worker until it is told to stop (SIGTERM/SIGINT: finish the current job, exit)."""
    _exit_on_stop_signals_while_starting()
    configure_logging(settings.log_level, settings.log_json)
    connection = redis.Redis.from_url(
        settings.redis_url, health_check_interval=30, **settings.redis_options()
    )
    name = settings.worker_name or default_worker_name()
    counters = Counters()
    started_at = time.time()

    model = load_model(settings)
    counters.pipelines_loaded += 1
    metrics = WorkerMetrics(model.info.id, model.device)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    queue = queue_name(model.info.id)
    max_images = batch_max_images(settings, model)
    batcher = (
        Batcher(connection, queue, max_images, settings.batch_max_wait_s)
        if max_images > 1
        else None
    )
    runtime = Runtime(model, connection, settings, name, counters, metrics, batcher)
    if settings.warmup:
        runtime.warm_up()
    jobs.install(runtime)

    base = WorkerHeartbeat(
        name=name,
        model=model.info,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        version=__version__,
        host=socket.gethostname(),
        pid=os.getpid(),
        started_at=started_at,
        sent_at=started_at,
        state="ready",
    )

    def snapshot() -> dict[str, object]:
        return {
            "state": "busy" if counters.current_job else "ready",
            "current_job": counters.current_job,
            "current_jobs": list(counters.current_jobs),
            "jobs_done": counters.jobs_done,
            "pipelines_loaded": counters.pipelines_loaded,
        }

    def watchdog() -> None:
        # RQ's timeout is a SIGALRM, which cannot fire while a step is stuck in native code.
        # The heartbeat thread still runs then, so it enforces the hard limit: fail the job
        # and exit, for the supervisor (compose `restart`, `imagegen serve`) to restart us.
        job, owner, deadline = counters.current_job, counters.current_owner, counters.deadline
        if job and owner and deadline and time.time() > deadline + settings.hard_timeout_grace_s:
            log.critical("job %s is stuck past its time limit; failing it and exiting", job)
            runtime.fail(
                job,
                owner,
                ErrorCode.TIMEOUT,
                "the job exceeded its time limit (a step hung; the worker was restarted)",
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
    reaper = Reaper(connection, queue, settings)
    reaper.start()
    log.info("worker %s ready on queue %s (%s, %s)", name, queue, base.device, base.dtype)
    try:
        _work_until_stopped(connection, queue, name, settings, batcher)
    finally:
        reaper.stop()
        heartbeat.stop()
    log.info("worker %s stopped after %d job(s)", name, counters.jobs_done)
    return 0
