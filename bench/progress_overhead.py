"""Cost of progress reporting: the same job with and without the worker's progress reporter,
through the denoising loop the worker runs (worker.batch_loop).

Runs in one process against a private redis-server, alternating the two variants so that
drift in machine speed hits both alike, and prints the median run time of each and their
ratio. Target (issue 4): reporting costs < 5 % (ratio < 1.05).

    python bench/progress_overhead.py [--model DIR] [--steps 30] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import redis

from imagegen.cli.redis_server import RedisServer
from imagegen.core.contract import JobRecord, JobSpec, JobStatus, Keys
from imagegen.core.lifecycle import Claimed, Lifecycle
from imagegen.core.settings import Settings
from worker.batch_loop import BatchItem, run_batch
from worker.inference import Inference
from worker.pipeline import load_model
from worker.progress import ProgressReporter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: built-in)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    settings = Settings(model=args.model)
    model = load_model(settings)
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp), appendonly=False) as server:
        connection = redis.Redis.from_url(server.url)
        Inference(model).warm_up()
        progress = ProgressReporter(Lifecycle(connection), settings.progress_interval_s)
        spec = JobSpec(
            prompt="a small red circle at the top left on a white background",
            negative_prompt="",
            width=model.info.width,
            height=model.info.height,
            steps=args.steps,
            guidance_scale=model.info.guidance_scale,
            seed=1,
            n=1,
            scheduler=model.info.scheduler,
            model=model.info.id,
        )
        # A job record in state `running`, so each progress write does its real work.
        connection.hset(
            Keys.job("bench"), mapping={"status": JobStatus.RUNNING.value, "owner": "bench#1"}
        )
        off: list[float] = []
        on: list[float] = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            run_batch(model, [BatchItem(spec)], invariant=model.batch_invariant)
            off.append(time.perf_counter() - started)
            connection.hset(Keys.job("bench"), "progress_step", 0)
            started = time.perf_counter()
            job = Claimed(
                JobRecord(
                    id="bench",
                    status=JobStatus.RUNNING,
                    spec=spec,
                    created_at=time.time(),
                    owner="bench#1",
                )
            )
            reporter = progress.for_job(job)
            run_batch(model, [BatchItem(spec, reporter)], invariant=model.batch_invariant)
            on.append(time.perf_counter() - started)
        writes = int(connection.hget(Keys.job("bench"), "progress_step") or 0)
    med_off, med_on = statistics.median(off), statistics.median(on)
    print(f"model {model.info.id}, {args.steps} steps, {args.repeats} runs each (median)")
    print(f"progress off: {med_off * 1000:.1f} ms")
    print(f"progress on:  {med_on * 1000:.1f} ms (last step recorded: {writes})")
    print(f"ratio on/off: {med_on / med_off:.3f}  (target < 1.05)")


if __name__ == "__main__":
    main()
