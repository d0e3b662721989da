"""Cost of live previews: a batch of jobs through the worker's denoising loop with every job
watched (a preview each IMAGEGEN_PREVIEW_INTERVAL_S: clean-latent estimate, linear projection,
JPEG, Redis publish) against the same batch with nobody watching.

Runs in one process against a private redis-server, alternating the two variants so that
drift in machine speed hits both alike, and prints the median time of each and their ratio.
It also checks that the images are byte-identical either way. Target (issue 20): <= 1.05.

    python bench/preview_overhead.py [--jobs 4] [--steps 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    settings = Settings(model=args.model)
    model = load_model(settings)
    inference = Inference(model)  # fits the model's preview projection, as a worker does
    inference.warm_up()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp), appendonly=False) as server:
        connection = redis.Redis.from_url(server.url)
        reporter = ProgressReporter(
            Lifecycle(connection),
            settings.progress_interval_s,
            preview_interval_s=settings.preview_interval_s,
        )
        specs = [
            JobSpec(
                prompt=f"a small {color} circle at the top left on a white background",
                negative_prompt="",
                width=model.info.width,
                height=model.info.height,
                steps=args.steps,
                guidance_scale=model.info.guidance_scale,
                seed=i,
                n=1,
                scheduler=model.info.scheduler,
                model=model.info.id,
            )
            for i, color in zip(
                range(args.jobs), ["red", "blue", "green", "pink"] * 8, strict=False
            )
        ]
        jobs = [
            Claimed(
                JobRecord(
                    id=f"bench-{i}",
                    status=JobStatus.RUNNING,
                    spec=spec,
                    created_at=time.time(),
                    owner=f"bench-{i}#1",
                )
            )
            for i, spec in enumerate(specs)
        ]

        def batch(watched: bool) -> tuple[float, list[bytes], int]:
            for job in jobs:
                connection.hset(
                    Keys.job(job.id),
                    mapping={"status": "running", "owner": job.owner, "progress_step": 0},
                )
                if watched:
                    connection.set(Keys.previews_wanted(job.id), 1, ex=600)
                else:
                    connection.delete(Keys.previews_wanted(job.id))
            progress = [reporter.for_job(job, inference.previews) for job in jobs]
            items = [BatchItem(spec, p, preview=p) for spec, p in zip(specs, progress, strict=True)]
            started = time.perf_counter()
            results = run_batch(model, items, invariant=model.batch_invariant)
            elapsed = time.perf_counter() - started
            pixels = [image.tobytes() for result in results for image in result]  # type: ignore[union-attr]
            return elapsed, pixels, sum(p.previews for p in progress)

        off: list[float] = []
        on: list[float] = []
        made = 0
        reference: list[bytes] | None = None
        for _ in range(args.repeats):
            for watched in (False, True):
                elapsed, pixels, previews = batch(watched)
                (on if watched else off).append(elapsed)
                made += previews
                if reference is None:
                    reference = pixels
                assert pixels == reference, "previews changed the images"
    a, b = statistics.median(off), statistics.median(on)
    print(f"batch of {args.jobs} jobs x {args.steps} steps, {model.info.id}, {model.device}")
    print(f"previews off: {a * 1000:.1f} ms (median of {args.repeats})")
    print(
        f"previews on:  {b * 1000:.1f} ms ({made / args.repeats:.1f} previews a batch, "
        f"every {settings.preview_interval_s}s per job)"
    )
    print("images byte-identical with and without previews: yes")
    print(f"ratio {b / a:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
