"""GPU benchmark: the fine-tuning recipe (`POST /v1/trainings`) on Stable Diffusion 1.5's
architecture (random weights: the same speed, nothing downloaded), 512x512, rank 16.

For each variant it trains 16 pictures for a few warm-up steps, then times `--steps` steps and
reads the peak GPU memory (`torch.cuda.max_memory_allocated`), after the serving pipeline was
loaded in fp16 as a worker holds it:

  fp16       frozen UNet in fp16 under autocast, LoRA and trigger rows in fp32, loss scaler
  bf16       the same in bf16 (no scaler): what IMAGEGEN_TRAINING_PRECISION=auto picks on an H100
  +ckpt      the same with gradient checkpointing (IMAGEGEN_TRAINING_GRADIENT_CHECKPOINTING)
  fp32       every trained copy in fp32: the baseline

Run on a GPU host from the repo root (the device wheels of bench/gpu_wheels.sh):
    python bench/gpu_training.py [--steps 20] [--batch 4] [--json results.jsonl]
`--small` builds a tiny variant so the script itself can be checked on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_sd15 import build_sd15

from worker.training.recipe import Example, LoraTrainer, TrainingConfig

VARIANTS = {
    "fp32": {"precision": "fp32"},
    "fp16": {"precision": "fp16"},
    "bf16": {"precision": "bf16"},
    "fp16+ckpt": {"precision": "fp16", "gradient_checkpointing": True},
    "bf16+ckpt": {"precision": "bf16", "gradient_checkpointing": True},
}


def pictures(count: int, size: int) -> list[Example]:
    """`count` pictures of a coloured block on a plain ground, captioned with the trigger."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        pixels = np.full((size, size, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        pixels[y : y + size // 3, x : x + size // 3] = rng.integers(0, 255, 3)
        out.append(Example(Image.fromarray(pixels), f"a zxq picture {i}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which, in order")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also append each figure here as a JSON line")
    parser.add_argument("--small", action="store_true", help="tiny model: check on a CPU")
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "CPU"
    size = 512 if not args.small else 64
    print(f"training recipe, SD 1.5 architecture, {size}x{size}, rank {args.rank}, "
          f"batch {args.batch}, on {name}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "sd15-random"
        build_sd15(directory, args.small)
        dtype = torch.float16 if cuda else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(
            directory, torch_dtype=dtype, safety_checker=None
        ).to(device)
        examples = pictures(16, size)
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            config = TrainingConfig(
                trigger_word="zxq",
                steps=args.warmup + args.steps,
                rank=args.rank,
                learning_rate=1e-4,
                batch_size=args.batch,
                **VARIANTS[variant],  # type: ignore[arg-type]
            )
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer = LoraTrainer(pipe, examples, config)
            for _ in range(args.warmup):
                trainer.step()
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            losses = [trainer.step().loss for _ in range(args.steps)]
            if cuda:
                torch.cuda.synchronize()
            steps_per_s = args.steps / (time.perf_counter() - started)
            peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            finite = bool(np.isfinite(losses).all())
            print(f"{variant:<10} {steps_per_s:7.2f} steps/s  peak {peak_gib:6.2f} GiB  "
                  f"loss {np.mean(losses):.4f}{'' if finite else ' (not finite!)'}",
                  flush=True)  # fmt: skip
            if args.json:
                line = {"what": f"training {variant}", "steps_per_s": steps_per_s,
                        "peak_gib": peak_gib, "finite": finite, "device": name, "size": size,
                        "rank": args.rank, "batch": args.batch}  # fmt: skip
                with args.json.open("a") as out:
                    out.write(json.dumps(line) + "\n")
            del trainer


if __name__ == "__main__":
    main()
