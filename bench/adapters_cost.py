"""What adapters cost, against the plain batch loop measured in the same process.

    python bench/adapters_cost.py                      # the built-in model and its adapters
    python bench/adapters_cost.py --model-dir DIR      # a model dir with loras/, controlnets/
    python bench/adapters_cost.py --device cuda --model-dir DIR --json figures.jsonl

On cuda the model is loaded as the worker serves it there (float16, not compiled) and every
timed call is bracketed by `torch.cuda.synchronize()`. `bench/gpu_sd15.py --save DIR` builds an
SD 1.5-shaped DIR with a LoRA and a ControlNet (random weights) for it.

Prints, best of `--runs` after a warm-up, each as a ratio to the plain loop:
- a LoRA switch between two batches (`set_adapters` with new scales, then back to none): the
  switch's time against one plain denoising step;
- a denoising step with the LoRA active, and one with the ControlNet, against a plain step
  (the same job, n images, the served defaults; a step is the job's time over its steps, so
  text encoding and the VAE decode are shared out over the steps);
- control sets that differ: a job with the ControlNet and one without it run as the worker
  runs them, as two batches (their adapter keys differ), against the two sharing one batch
  with the ControlNet (what running them together, zero residuals for the second, would cost at
  most), in the batched (GPU) layout.
`--json PATH` appends the figures to PATH as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builtin_model import MODEL_DIR
from imagegen.core.contract import ControlRef, InputRef, JobSpec, LoraRef
from imagegen.core.settings import Settings


def best(fn: Any, runs: int, cuda: bool) -> float:
    """The shortest of `runs` timed calls of `fn`, after one untimed call (warm-up)."""

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, help="also append the figures here as a JSON line")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")

    from worker.batch_loop import BatchItem
    from worker.inference import Inference
    from worker.pipeline import load_model

    # On cuda as the worker serves there: float16, eager.
    settings = Settings(
        model=str(args.model_dir),
        device=args.device,
        dtype="float16" if cuda else "float32",
        compile=False,
    )
    model = load_model(settings)
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
    w, h = info.width, info.height
    control_image.paste((255, 255, 255), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    ref = ControlRef(
        id=control_id,
        scale=1.0,
        start=0.0,
        end=1.0,
        image=InputRef(sha256="0" * 64, width=info.width, height=info.height),
    )
    lora = (LoraRef(id=lora_id, scale=1.0),)

    def job(s: JobSpec, image: Image.Image | None = None) -> Any:
        maps = (image,) if image is not None else ()
        return lambda: inference.run([BatchItem(s, None, control_images=maps)])

    plain = best(job(spec), args.runs, cuda) / spec.steps
    with_lora = best(job(spec.model_copy(update={"loras": lora})), args.runs, cuda) / spec.steps
    with_control = (
        best(job(spec.model_copy(update={"controls": (ref,)}), control_image), args.runs, cuda)
        / spec.steps
    )
    # Different control sets: split into two batches (the worker's way) against one batch.
    from worker.batch_loop import run_batch

    controlled = spec.model_copy(update={"controls": (ref,)})

    def split() -> None:
        run_batch(
            model, [BatchItem(controlled, None, control_images=(control_image,))], invariant=False
        )
        run_batch(model, [BatchItem(spec)], invariant=False)

    def together() -> None:
        items = [BatchItem(controlled, None, control_images=(control_image,))] * 2
        run_batch(model, items, invariant=False)

    split_to_together = best(split, args.runs, cuda) / best(together, args.runs, cuda)
    scales = [0.5, 1.0]

    def switch() -> None:
        for s in scales:
            model.adapters.apply((LoraRef(id=lora_id, scale=s),))
            model.adapters.apply(())

    switch_s = best(switch, args.runs, cuda) / (2 * len(scales))
    if cuda:
        hardware = f"{torch.cuda.get_device_name()} (float16)"
    else:
        threads = torch.get_num_threads()
        hardware = f"CPU ({threads} thread{'s' if threads != 1 else ''})"
    print(
        f"{info.id}, {info.width}x{info.height}, {spec.steps} steps `{spec.scheduler}`, "
        f"guidance {spec.guidance_scale:g}, n={args.n}, {hardware}, best of {args.runs}:"
    )
    print(f"plain loop: {plain * 1000:.1f} ms/step (baseline)")
    print(
        f"LoRA switch between batches: {switch_s * 1000:.2f} ms, "
        f"{switch_s / plain:.3f}× a plain step"
    )
    print(f"step with LoRA `{lora_id}` active: {with_lora / plain:.2f}× a plain step")
    print(f"step with ControlNet `{control_id}`: {with_control / plain:.2f}× a plain step")
    print(
        f"a control job and a plain one as two batches: {split_to_together:.2f}× the two in "
        "one batch with the ControlNet"
    )
    if args.json:
        figures = {
            "what": "adapters_cost",
            "model": info.id,
            "device": hardware,
            "width": info.width,
            "height": info.height,
            "steps": spec.steps,
            "scheduler": spec.scheduler,
            "guidance_scale": spec.guidance_scale,
            "n": args.n,
            "runs": args.runs,
            "lora": lora_id,
            "control": control_id,
            "plain_step_ms": plain * 1000,
            "lora_switch_ms": switch_s * 1000,
            "lora_switch_to_plain_step": switch_s / plain,
            "lora_step_to_plain_step": with_lora / plain,
            "control_step_to_plain_step": with_control / plain,
            "split_control_sets_to_one_batch": split_to_together,
        }
        with args.json.open("a") as out:
            out.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
