"""GPU benchmark: SD 1.5 architecture (random weights: same speed, nothing downloaded), 512x512,
30 steps, fp16, through the service vs the bare diffusers pipeline, in one run.

Prints, each with its baseline measured here, each as soon as it is measured (so a run cut
short by a time limit still reports what it finished):
  single   one job end to end through the service vs the bare pipeline call (target <= 1.10)
  eager    images/s with 32 concurrent clients, batching on, no compilation  (target >= 5)
  options  the same with fused QKV projections and channels_last (still eager)
  compiled the same with torch.compile as well                                (target >= 7)
  img2img  image-to-image (strength 0.8): one job through the service vs the bare
           StableDiffusionImg2ImgPipeline call, then images/s with 32 clients, eager
  (bare, one at a time, on an H100: 1.18 images/s, ../shared/anchors)

Run on a GPU host from the repo root (see bench/README.md for the device wheels):
    python bench/gpu_sd15.py [--phases single,eager,options,compiled] [--seconds 40]
        [--clients 32] [--compile-batches 8,16] [--max-wait 0] [--json results.jsonl]
`--small` builds a tiny variant so the script itself can be checked on a CPU.

    python bench/gpu_sd15.py --save DIR [--small]

only builds the model into DIR with a LoRA and a ControlNet beside it (`add_sd15_adapters`), for
`bench/adapters_cost.py --model-dir DIR`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _service import generate, median, now, service, throughput
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
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
    if torch.cuda.is_available():
        pipe.to(dtype=torch.float16)  # what the worker loads on a GPU; half the bytes to write
    pipe.save_pretrained(directory, safe_serialization=True)
    card = {  # the tiny variant's defaults are what --small runs it at
        "id": "sd15-random",
        "width": 512 if not small else 64,
        "height": 512 if not small else 64,
        "steps": 30 if not small else 4,
        "guidance_scale": 7.5,
        "scheduler": "euler",
    }
    (directory / "imagegen.json").write_text(json.dumps(card))


LORA_ID = "random-r16"
CONTROL_ID = "random-control"


def add_sd15_adapters(directory: Path, rank: int = 16) -> tuple[str, str]:
    """Give the pipeline `build_sd15` saved at `directory` a LoRA and a ControlNet, random but
    with effect, where the worker finds them: the LoRA `loras/random-r16/` of rank `rank` on the
    UNet's attention projections to_q, to_k, to_v and to_out.0 (what most SD 1.5 LoRAs touch),
    the ControlNet `controlnets/random-control/` made by `ControlNetModel.from_unet` (full size,
    as SD 1.5 ControlNets are), its zero convolutions given weights. Both saved in fp16 with
    their cards (`imagegen_adapter.json`), as builtin_model/train_adapters.py saves its own.
    Returns the two ids."""
    from diffusers import ControlNetModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(directory / "unet", torch_dtype=torch.float32)
    net = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for name, param in net.named_parameters():
            # Trained ControlNets have moved off their zero-initialised output convolutions.
            zero = "controlnet_" in name and "cond_embedding" not in name
            if zero or "cond_embedding.conv_out" in name:
                param.normal_(0.0, 0.02)
    out = directory / "controlnets" / CONTROL_ID
    net.to(dtype=torch.float16).save_pretrained(out, safe_serialization=True)
    del net
    card = {
        "id": CONTROL_ID,
        "kind": "controlnet",
        "description": "Random weights (benchmark): ControlNetModel.from_unet of the SD 1.5 UNet.",
        "default_scale": 1.0,
    }
    (out / "imagegen_adapter.json").write_text(json.dumps(card, indent=2) + "\n")

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:  # PEFT starts lora_B at zero: no effect until trained
                param.normal_(0.0, 0.02)
    layers = {k: v.detach().half() for k, v in get_peft_model_state_dict(unet).items()}
    out = directory / "loras" / LORA_ID
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers)
    card = {
        "id": LORA_ID,
        "kind": "lora",
        "description": f"Random weights (benchmark): rank {rank} on the UNet's attention "
        f"{', '.join(targets)}.",
        "trigger_words": [],
        "default_scale": 1.0,
    }
    (out / "imagegen_adapter.json").write_text(json.dumps(card, indent=2) + "\n")
    return LORA_ID, CONTROL_ID


IMG2IMG_STRENGTH = 0.8


def input_image(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 220, 40))
    image.paste((30, 70, 220), (size // 8, size // 8, size // 2, size // 2))
    return image


def input_b64(size: int) -> str:
    buffer = io.BytesIO()
    input_image(size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bare_latency(directory: Path, runs: int, steps: int, size: int, img2img: bool = False) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    kind: Any = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    extra: dict[str, Any] = (
        {"image": input_image(size), "strength": IMG2IMG_STRENGTH}
        if img2img
        else {"width": size, "height": size}
    )
    pipe = kind.from_pretrained(directory, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    times = []
    for i in range(runs + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        started = now()
        pipe(
            "a prompt",
            **extra,
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
        "prompt": f"a prompt {seed}",  # distinct prompts, as real traffic has
        "model": "sd15-random",
        "width": size,
        "height": size,
        "steps": steps,
        "seed": seed,
    }


PHASES = ("single", "eager", "options", "compiled", "img2img")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default=",".join(PHASES), help="which measurements, in order")
    parser.add_argument("--seconds", type=float, default=40, help="each throughput window")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--compile-batches", default="8,16", help="IMAGEGEN_COMPILE_BATCHES of the compiled run"
    )
    parser.add_argument("--max-wait", default="0", help="IMAGEGEN_BATCH_MAX_WAIT_S (seconds)")
    parser.add_argument("--json", type=Path, help="also append each figure here as a JSON line")
    parser.add_argument("--small", action="store_true", help="tiny model: check on a CPU")
    parser.add_argument(
        "--save",
        type=Path,
        metavar="DIR",
        help="only build the model with a LoRA and a ControlNet into DIR (adapters_cost.py)",
    )
    args = parser.parse_args()
    if args.save:
        started = time.monotonic()
        build_sd15(args.save, args.small)
        built = time.monotonic() - started
        lora, control = add_sd15_adapters(args.save)
        print(
            f"built {args.save}: the model in {built:.1f} s, LoRA `{lora}` and ControlNet "
            f"`{control}` in {time.monotonic() - started - built:.1f} s",
            flush=True,
        )
        return
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"--phases: unknown {sorted(unknown)}; choose from {', '.join(PHASES)}")
    size, steps = (512, 30) if not args.small else (64, 4)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"

    def report(what: str, text: str, **figures: object) -> None:
        print(f"{what:<34} {text}", flush=True)
        if args.json:
            line = {"what": what, **figures, "device": device, "size": size, "steps": steps}
            with args.json.open("a") as out:
                out.write(json.dumps(line) + "\n")

    def rate(gateway: Any) -> float:
        images_per_s, _ = throughput(
            gateway, args.clients, args.seconds, lambda c, k: body(size, steps, c * 10_000 + k)
        )
        return images_per_s

    print(f"SD 1.5 architecture, random weights, {size}x{size}, {steps} steps, on {device}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "sd15-random"
        started = time.monotonic()
        build_sd15(directory, args.small)
        report("built the model", f"{time.monotonic() - started:7.1f} s")
        bare = bare_latency(directory, args.runs, steps, size)
        report("bare pipeline call, one image", f"{bare:7.3f} s", seconds=bare)
        report("bare, one at a time", f"{1 / bare:7.2f} images/s", images_per_s=1 / bare)
        env = {
            "IMAGEGEN_MODEL": str(directory),
            "IMAGEGEN_JOB_TIMEOUT_S_PER_MEGAPIXEL_STEP": "1",
            "IMAGEGEN_BATCH_MAX_WAIT_S": args.max_wait,
        }
        options = {**env, "IMAGEGEN_FUSE_QKV": "true", "IMAGEGEN_CHANNELS_LAST": "true"}
        compiled = {
            **options,
            "IMAGEGEN_COMPILE": "true",
            "IMAGEGEN_COMPILE_BATCHES": args.compile_batches,
        }
        for phase in [p for p in phases if p != "img2img"]:
            worker_env = {"single": env, "eager": env, "options": options}.get(phase, compiled)
            if phase == "single":  # a lone job would wait out the whole max-wait
                worker_env = {**env, "IMAGEGEN_BATCH_MAX_WAIT_S": "0"}
            started = time.monotonic()
            with service(worker_env=worker_env, threads="4") as gateway:
                ready = time.monotonic() - started
                if phase == "single":
                    times = []
                    with gateway.client() as client:
                        for i in range(args.runs + 1):
                            begun = now()
                            generate(client, body(size, steps, i))
                            if i:
                                times.append(now() - begun)
                    single = median(times)
                    report(
                        "through the service, one job",
                        f"{single:7.3f} s (ratio {single / bare:.3f}, target <= 1.10)",
                        seconds=single,
                        ratio=single / bare,
                    )
                    continue
                images_per_s = rate(gateway)
            target = {"eager": " (target >= 5)", "compiled": " (target >= 7)"}.get(phase, "")
            report(
                f"{args.clients} clients, {phase}",
                f"{images_per_s:7.2f} images/s{target}; worker ready in {ready:.0f} s",
                images_per_s=images_per_s,
                ready_s=ready,
                ratio_to_bare=images_per_s * bare,
            )

        if "img2img" in phases:
            # Same figures as text-to-image: one job vs the bare call, then throughput.
            bare_i2i = bare_latency(directory, args.runs, steps, size, img2img=True)
            report("bare img2img call, one image", f"{bare_i2i:7.3f} s", seconds=bare_i2i)
            image = input_b64(size)

            def i2i(seed: int, image: str = image) -> dict[str, object]:
                return {**body(size, steps, seed), "image": image, "strength": IMG2IMG_STRENGTH}

            with service(worker_env={**env, "IMAGEGEN_BATCH_MAX_WAIT_S": "0"}) as gateway:
                times = []
                with gateway.client() as client:
                    for i in range(args.runs + 1):
                        begun = now()
                        generate(client, i2i(i))
                        if i:
                            times.append(now() - begun)
                single = median(times)
                report(
                    "img2img through the service",
                    f"{single:7.3f} s (ratio {single / bare_i2i:.3f}, target <= 1.10)",
                    seconds=single,
                    ratio=single / bare_i2i,
                )
            with service(worker_env=env, threads="4") as gateway:
                images_per_s, _ = throughput(
                    gateway, args.clients, args.seconds, lambda c, k: i2i(c * 10_000 + k)
                )
            report(
                f"{args.clients} clients, img2img",
                f"{images_per_s:7.2f} images/s; ratio to bare one at a time "
                f"{images_per_s * bare_i2i:.2f}",
                images_per_s=images_per_s,
                ratio_to_bare=images_per_s * bare_i2i,
            )


if __name__ == "__main__":
    main()
