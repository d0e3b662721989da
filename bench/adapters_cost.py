"""What adapters cost on this CPU, against the plain batch loop measured in the same process.

    python bench/adapters_cost.py                      # the built-in model and its adapters
    python bench/adapters_cost.py --model-dir DIR      # a model dir with loras/, controlnets/

Prints, best of `--runs` after a warm-up, each as a ratio to the plain loop:
- a LoRA switch between two batches (`set_adapters` with new scales, then back to none): the
  switch's time against one plain denoising step;
- a denoising step with the LoRA active, and one with the ControlNet, against a plain step
  (the same job, n images, the served defaults).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builtin_model import MODEL_DIR
from imagegen.contract import ControlRef, InputRef, JobSpec, LoraRef
from imagegen.settings import Settings


def best(fn: Any, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args()

    from worker.batch_loop import BatchItem
    from worker.inference import Inference
    from worker.pipeline import load_model

    model = load_model(Settings(model=str(args.model_dir), device="cpu"))
    info = model.info
    if not info.adapters or not info.controls:
        sys.exit(f"{args.model_dir} has no LoRA or no ControlNet")
    lora_id, control_id = info.adapters[0].id, info.controls[0].id
    inference = Inference(model)
    spec = JobSpec(
        prompt="a large blue square in the center on a yellow background",
        negative_prompt="",
        width=info.width,
        height=info.height,
        steps=info.steps,
        guidance_scale=info.guidance_scale,
        seed=1,
        n=args.n,
        scheduler=info.scheduler,
        model=info.id,
    )
    control_image = Image.new("RGB", (info.width, info.height), "black")
    control_image.paste((255, 255, 255), (16, 16, 48, 48))
    ref = ControlRef(
        id=control_id,
        scale=1.0,
        start=0.0,
        end=1.0,
        image=InputRef(sha256="0" * 64, width=info.width, height=info.height),
    )
    lora = (LoraRef(id=lora_id, scale=1.0),)

    def job(s: JobSpec, image: Image.Image | None = None) -> Any:
        return lambda: inference.run([BatchItem(s, None, control_image=image)])

    plain = best(job(spec), args.runs) / spec.steps
    with_lora = best(job(spec.model_copy(update={"loras": lora})), args.runs) / spec.steps
    with_control = (
        best(job(spec.model_copy(update={"control": ref}), control_image), args.runs) / spec.steps
    )
    scales = [0.5, 1.0]

    def switch() -> None:
        for s in scales:
            model.adapters.apply((LoraRef(id=lora_id, scale=s),))
            model.adapters.apply(())

    switch_s = best(switch, args.runs) / (2 * len(scales))
    threads = torch.get_num_threads()
    print(
        f"{info.id}, {spec.steps} steps `{spec.scheduler}`, guidance {spec.guidance_scale:g}, "
        f"n={args.n}, CPU ({threads} threads), best of {args.runs}:"
    )
    print(f"plain loop: {plain * 1000:.1f} ms/step (baseline)")
    print(
        f"LoRA switch between batches: {switch_s * 1000:.2f} ms, "
        f"{switch_s / plain:.3f}× a plain step"
    )
    print(f"step with LoRA `{lora_id}` active: {with_lora / plain:.2f}× a plain step")
    print(f"step with ControlNet `{control_id}`: {with_control / plain:.2f}× a plain step")


if __name__ == "__main__":
    main()
