"""Batched denoising: how far a job's images move when batched, and what batching saves.

For each scheduler, a mix of jobs (different prompts, negative prompts, guidance with and
without CFG, n of 1 and 2) runs alone and then as one batch, in both modes of
worker/batch_loop.py; it prints the largest and mean pixel difference (of 255) and the share of
pixels that differ. Then it times the same jobs run one after another as the worker runs them
without batching (stock pipeline calls) against one batch in each mode, alternating the variants
so that drift in machine speed hits all alike, and prints median times and ratios.

    python bench/batch_equivalence.py [--model DIR | --sd-shaped] [--device auto] [--steps 20]

Without --model it uses the tiny random pipeline; --sd-shaped builds a random pipeline with
Stable Diffusion 1.5's UNet and VAE shapes at 512x512 (random weights: the numbers say how
kernels round at the real sizes, not how a trained model amplifies that).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagegen.core.contract import JobSpec
from imagegen.core.settings import Settings
from worker.batch_loop import BatchItem, BatchResult, run_batch
from worker.families import supports_batching
from worker.pipeline import LoadedModel, load_model
from worker.schedulers import build_scheduler


def build_sd_shaped(directory: Path) -> Path:
    """A random pipeline with SD 1.5's exact architecture (the GPU benchmark's builder)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_sd15 import build_sd15

    build_sd15(directory, small=False)
    return directory


def mixed_jobs(model: LoadedModel, scheduler: str, steps: int) -> list[JobSpec]:
    info = model.info
    base = JobSpec(
        prompt="a red circle",
        negative_prompt="blue",
        width=info.width,
        height=info.height,
        steps=steps,
        guidance_scale=7.5,
        seed=11,
        n=2,
        scheduler=scheduler,
        model=info.id,
    )
    return [
        base,
        base.model_copy(update={"prompt": "a green square", "guidance_scale": 1.0, "n": 1}),
        base.model_copy(update={"prompt": "blue", "guidance_scale": 0.0, "n": 1, "seed": 5}),
        base.model_copy(update={"prompt": "a small triangle", "guidance_scale": 4.0, "n": 1}),
    ]


def stock_generate(model: LoadedModel, spec: JobSpec) -> list[Any]:
    """The worker's path without batching (Inference.generate/_call): stock pipeline calls."""
    pipe = model.pipe
    groups = [[i] for i in range(spec.n)] if model.batch_invariant else [list(range(spec.n))]
    images: list[Any] = []
    for indices in groups:
        pipe.scheduler = build_scheduler(spec.scheduler, model.scheduler_config)
        with torch.inference_mode():
            images += pipe(
                prompt=[spec.prompt] * len(indices),
                negative_prompt=[spec.negative_prompt] * len(indices),
                width=spec.width,
                height=spec.height,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(spec.image_seed(i)) for i in indices],
                output_type="pil",
            ).images
    return images


def pixels(result: BatchResult | list[Any]) -> list[np.ndarray]:
    assert not isinstance(result, BaseException), result
    return [np.asarray(image).astype(np.int16) for image in result]


def compare(got: list[list[np.ndarray]], expected: list[list[np.ndarray]]) -> str:
    pairs = [pair for g, e in zip(got, expected, strict=True) for pair in zip(g, e, strict=True)]
    flat = np.concatenate([np.abs(a - b).ravel() for a, b in pairs])
    share = 100 * (flat > 0).mean()
    return f"max {int(flat.max())}, mean {flat.mean():.4f}, differing {share:.3f}%"


def sync(model: LoadedModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: the tiny pipeline)")
    parser.add_argument("--sd-shaped", action="store_true", help="random SD-1.5-shaped model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schedulers", default="euler,euler_a,dpmpp_2m,unipc")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source = args.model
        if source is None and args.sd_shaped:
            source = str(build_sd_shaped(Path(tmp) / "sd-shaped"))
        elif source is None:
            from builtin_model.tiny import save_tiny_pipeline

            source = str(save_tiny_pipeline(Path(tmp) / "tiny"))
        model = load_model(Settings(model=source, device=args.device, dtype=args.dtype))
    assert supports_batching(model.pipe), "not a StableDiffusionPipeline"
    print(
        f"model {model.info.id} {model.info.width}x{model.info.height} on {model.device} "
        f"({model.dtype}), {args.steps} steps, torch threads {torch.get_num_threads()}"
    )
    if model.device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(model.device)}")

    for scheduler in args.schedulers.split(","):
        specs = mixed_jobs(model, scheduler, args.steps)
        stock = [pixels(stock_generate(model, spec)) for spec in specs]
        for invariant in (True, False):
            solo = [run_batch(model, [BatchItem(s)], invariant=invariant)[0] for s in specs]
            alone = [pixels(result) for result in solo]
            items = [BatchItem(spec) for spec in specs]
            batched = [pixels(r) for r in run_batch(model, items, invariant=invariant)]
            mode = "invariant" if invariant else "one call "
            # A spread near 0 would mean degenerate (flat) images, which hide every difference.
            spread = float(np.mean([image.std() for images in alone for image in images]))
            print(
                f"{scheduler:16} {mode}  batched vs alone: {compare(batched, alone)}"
                f" | alone vs stock: {compare(alone, stock)} | pixel std {spread:.1f}"
            )

    specs = mixed_jobs(model, args.schedulers.split(",")[0], args.steps)
    variants: dict[str, Callable[[], object]] = {
        "sequential (stock calls)": lambda: [stock_generate(model, spec) for spec in specs],
        "batch, invariant": lambda: run_batch(model, [BatchItem(s) for s in specs], invariant=True),
        "batch, one call": lambda: run_batch(model, [BatchItem(s) for s in specs], invariant=False),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up
        run()
    for _ in range(args.repeats):
        for name, run in variants.items():
            sync(model)
            started = time.perf_counter()
            run()
            sync(model)
            times[name].append(time.perf_counter() - started)
    images = sum(spec.n for spec in specs)
    base = statistics.median(times["sequential (stock calls)"])
    print(f"{len(specs)} jobs, {images} images, median of {args.repeats}:")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"  {name:26} {median:8.3f} s   ratio to sequential {median / base:.2f}")


if __name__ == "__main__":
    main()
