"""GPU benchmark: SD 1.5 architecture (random weights: same speed, nothing downloaded), 512x512,
30 steps, fp16, through the service vs the bare diffusers pipeline, in one run.

Prints, each with its baseline measured here:
  1. single-job end-to-end latency, service vs bare pipeline call   (target <= 1.10)
  2. throughput with 32 concurrent clients, eager, batching on       (target >= 5 images/s)
  3. the same with torch.compile + fused QKV + channels_last         (target >= 7 images/s)
  (bare, one at a time, on an H100: 1.18 images/s — ../shared/anchors)

Run on a GPU host from the repo root (see bench/README.md for the device wheels):
    python bench/gpu_sd15.py [--seconds 60] [--clients 32] [--skip-compiled]
`--small` builds a tiny variant so the script itself can be checked on a CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _service import generate, median, now, service, throughput
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from builtin_model.build import build_tokenizer


def build_sd15(directory: Path, small: bool) -> None:
    """Save a randomly initialised pipeline with SD 1.5's exact architecture (or a tiny one)."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 77
    width = 768 if not small else 32
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=12 if not small else 1,
            num_attention_heads=12 if not small else 2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=width,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    channels = (320, 640, 1280, 1280) if not small else (32, 32, 64, 64)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=channels,
        cross_attention_dim=width,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=32 if not small else 16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        block_out_channels=(128, 256, 512, 512) if not small else (16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32 if not small else 16,
        sample_size=512,
        scaling_factor=0.18215,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    card = {
        "id": "sd15-random",
        "width": 512,
        "height": 512,
        "steps": 30,
        "guidance_scale": 7.5,
        "scheduler": "euler",
    }
    (directory / "imagegen.json").write_text(json.dumps(card))


def bare_latency(directory: Path, runs: int, steps: int, size: int) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(directory, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    times = []
    for i in range(runs + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        started = now()
        pipe(
            "a prompt",
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(i),
        )
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(now() - started)
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    return median(times)


def body(size: int, steps: int, seed: int) -> dict[str, object]:
    return {
        "prompt": "a prompt",
        "model": "sd15-random",
        "width": size,
        "height": size,
        "steps": steps,
        "seed": seed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-compiled", action="store_true")
    parser.add_argument("--small", action="store_true", help="tiny model: check on a CPU")
    args = parser.parse_args()
    size, steps = (512, 30) if not args.small else (64, 4)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "sd15-random"
        build_sd15(directory, args.small)
        bare = bare_latency(directory, args.runs, steps, size)
        env = {"IMAGEGEN_MODEL": str(directory), "IMAGEGEN_JOB_TIMEOUT_S_PER_MEGAPIXEL_STEP": "1"}
        with service(worker_env=env, threads="4") as gateway, gateway.client() as client:
            single = []
            for i in range(args.runs + 1):
                started = now()
                generate(client, body(size, steps, i))
                if i:
                    single.append(now() - started)
            eager, _ = throughput(
                gateway, args.clients, args.seconds, lambda c, k: body(size, steps, c * 10_000 + k)
            )
        compiled = None
        if not args.skip_compiled:
            fast = {
                **env,
                "IMAGEGEN_COMPILE": "true",
                "IMAGEGEN_FUSE_QKV": "true",
                "IMAGEGEN_CHANNELS_LAST": "true",
                "IMAGEGEN_COMPILE_BATCHES": "1,2,4,8,16",
            }
            started = time.monotonic()
            with service(worker_env=fast, threads="4") as gateway:
                warm = time.monotonic() - started
                compiled, _ = throughput(
                    gateway,
                    args.clients,
                    args.seconds,
                    lambda c, k: body(size, steps, c * 10_000 + k),
                )
    print(f"SD 1.5 architecture, random weights, {size}x{size}, {steps} steps, on {device}")
    print(f"bare pipeline call, one image:     {bare:7.3f} s")
    print(
        f"through the service, one job:      {median(single):7.3f} s "
        f"(ratio {median(single) / bare:.3f}, target <= 1.10)"
    )
    print(f"bare, one at a time:               {1 / bare:7.2f} images/s")
    print(f"{args.clients} clients, eager, batching:   {eager:7.2f} images/s (target >= 5)")
    if compiled is not None:
        print(
            f"{args.clients} clients, compiled:          {compiled:7.2f} images/s (target >= 7; "
            f"start-up incl. compile {warm:.0f}s)"
        )


if __name__ == "__main__":
    main()
