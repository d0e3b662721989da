"""Switch cost of a worker serving several models (worker.models.ModelManager), in one process.

    OMP_NUM_THREADS=1 python bench/model_switch.py [--jobs 24] [--steps 8]

Models: the built-in shapes-64, and a "fine-tune" of it (its own UNet, re-initialised; the VAE,
text encoder and tokenizer files identical), so the second load can share components.

- cold load: a model's first load in this process (files in the page cache after the first
  read: what a worker restart sees; a truly cold disk is slower);
- warm switch: `acquire` of a model already held warm (what routing by warmth buys);
- reload: a model unloaded by the LRU and loaded again, sharing the other's identical parts;
- mixed workload: jobs alternating between the two models at random, run (1) on one worker
  whose budget holds both, (2) on one worker whose budget holds one (a switch per change of
  model), against (3) two dedicated workers, one per model, each running only its own jobs
  (same jobs, run one after the other here: images/s per worker busy). Ratios are against (3).
"""

from __future__ import annotations

import argparse
import itertools
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from builtin_model import MODEL_DIR
from imagegen.core.contract import JobSpec
from imagegen.core.settings import Settings
from worker.batch_loop import BatchItem
from worker.models import ModelManager


def make_tune(root: Path) -> Path:
    from diffusers import UNet2DConditionModel

    tune = root / "shapes-64-tune"
    shutil.copytree(MODEL_DIR, tune)
    unet = UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    shutil.rmtree(tune / "unet")
    unet.save_pretrained(tune / "unet", safe_serialization=True)
    (tune / "imagegen.json").unlink()
    return tune


def spec(model: str, seed: int, steps: int) -> JobSpec:
    return JobSpec(
        prompt="a small red circle in the center on a blue background",
        negative_prompt="",
        width=64,
        height=64,
        steps=steps,
        guidance_scale=4.0,
        seed=seed,
        n=1,
        scheduler="dpmpp_2m",
        model=model,
    )


def run_jobs(manager: ModelManager, jobs: list[JobSpec]) -> float:
    """Images/s over `jobs`, each run on its model's warm pipeline (loaded on demand)."""
    started = time.perf_counter()
    for job in jobs:
        manager.acquire(job.model).run([BatchItem(job)])
    return len(jobs) / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tune = make_tune(Path(tmp))
        settings = Settings(models=f"base={MODEL_DIR},tune={tune}", device="cpu", warmup=False)
        both = ModelManager(settings)
        t = time.perf_counter()
        both.acquire("base")
        cold = time.perf_counter() - t
        t = time.perf_counter()
        both.acquire("tune")
        shared_load = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(100):
            both.acquire("base")
            both.acquire("tune")
        warm_switch = (time.perf_counter() - t) / 200

        one = ModelManager(settings, budget_bytes=int(both.entries["base"].estimate * 1.3))
        one.acquire("base")
        t = time.perf_counter()
        one.acquire("tune")  # unloads base: nothing to share
        reload_alone = time.perf_counter() - t

        rng = random.Random(0)
        jobs = [spec(rng.choice(["base", "tune"]), i, args.steps) for i in range(args.jobs)]
        switches = sum(a.model != b.model for a, b in itertools.pairwise(jobs))
        for manager in (both, one):  # warm up each pipeline once
            run_jobs(manager, [spec("base", 0, 2), spec("tune", 0, 2)])
        base_jobs = [j for j in jobs if j.model == "base"]
        tune_jobs = [j for j in jobs if j.model == "tune"]
        # Rounds interleave the three set-ups, best of each: a shared machine's load shifts
        # during a run, and an interleaved best-of compares them under the same conditions.
        best = {"warm": 0.0, "switching": 0.0, "dedicated": 0.0}
        reloads = 0
        for _ in range(args.rounds):
            best["warm"] = max(best["warm"], run_jobs(both, jobs))
            loads_before = one.loads
            best["switching"] = max(best["switching"], run_jobs(one, jobs))
            reloads = one.loads - loads_before
            t = time.perf_counter()
            run_jobs(both, base_jobs)  # dedicated: each model's jobs on its own warm worker
            run_jobs(both, tune_jobs)
            best["dedicated"] = max(best["dedicated"], len(jobs) / (time.perf_counter() - t))
        mixed_warm, mixed_switching, dedicated = (
            best["warm"],
            best["switching"],
            best["dedicated"],
        )

    print(f"cold load (shapes-64, page cache warm): {cold:.3f} s")
    print(f"load of a second model sharing vae + text encoder: {shared_load:.3f} s")
    print(f"load of that model with nothing to share (after an LRU unload): {reload_alone:.3f} s")
    print(f"warm switch (acquire of a model held warm): {warm_switch * 1e6:.1f} us")
    print(
        f"mixed workload, {len(jobs)} jobs, {switches} model changes, {args.steps} steps, "
        f"best of {args.rounds} interleaved rounds: "
        f"dedicated workers {dedicated:.2f} images/s per worker busy"
    )
    print(
        f"  one worker holding both warm: {mixed_warm:.2f} images/s, "
        f"ratio {mixed_warm / dedicated:.2f}"
    )
    print(
        f"  one worker with room for one ({reloads} reloads): {mixed_switching:.2f} images/s, "
        f"ratio {mixed_switching / dedicated:.2f}"
    )


if __name__ == "__main__":
    main()
