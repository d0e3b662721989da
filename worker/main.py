"""Worker process start-up: load the pipeline once, warm it, announce it, then take jobs."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time

import redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from imagegen import __version__
from imagegen.contract import WorkerHeartbeat, queue_name
from imagegen.logs import configure_logging
from imagegen.settings import Settings
from worker import jobs
from worker.heartbeat import Heartbeat
from worker.pipeline import load_model
from worker.runtime import Counters, Runtime

log = logging.getLogger("imagegen.worker")


class ImagegenWorker(SimpleWorker):
    """RQ's in-process worker: no fork per job, because CUDA and the warm pipeline live here."""


def default_worker_name() -> str:
    # Unique per process: RQ refuses a name whose previous holder's key has not yet expired.
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


def run_worker(settings: Settings) -> int:
    """Run one worker until it is told to stop (SIGTERM/SIGINT: finish the current job, exit)."""
    configure_logging(settings.log_level)
    connection = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    name = settings.worker_name or default_worker_name()
    counters = Counters()
    started_at = time.time()

    model = load_model(settings)
    counters.pipelines_loaded += 1
    runtime = Runtime(model, connection, settings, name, counters)
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
            "jobs_done": counters.jobs_done,
            "pipelines_loaded": counters.pipelines_loaded,
        }

    heartbeat = Heartbeat(
        connection,
        base,
        interval_s=settings.heartbeat_interval_s,
        ttl_s=settings.worker_stale_s,
        snapshot=snapshot,
        local_file=settings.heartbeat_file,
    )
    heartbeat.start()
    queue = queue_name(model.info.id)
    log.info("worker %s ready on queue %s (%s, %s)", name, queue, base.device, base.dtype)
    worker = ImagegenWorker([queue], connection=connection, name=name, serializer=JSONSerializer)
    try:
        worker.work(logging_level=settings.log_level, with_scheduler=False)
    finally:
        heartbeat.stop()
    log.info("worker %s stopped after %d job(s)", name, counters.jobs_done)
    return 0
