"""Train the built-in model's adapters on top of the frozen ``shapes-64`` pipeline.

    python -m builtin_model.train_adapters outline --budget-s 3000     # LoRA (PEFT format)
    python -m builtin_model.train_adapters silhouette --budget-s 3000  # ControlNetModel
    python -m builtin_model.train_adapters sketch --init-from <silhouette dir> --budget-s 1800
    python -m builtin_model.train_adapters outline --init-from DIR ...  # continue a saved LoRA

``outline``: a LoRA (rank 8 unless ``--rank``) on the UNet's attention, feed-forward and resnet
convolutions, trained on the same scenes and captions as the base model but rendered hollow (an
outline in the shape's color, background within); base weights frozen. (Hollow shapes also need the
VAE decoder tuned for them: ``builtin_model.tune_decoder``.) ``silhouette``: a ``ControlNetModel``
copied from the UNet's encoder (zero convolutions, conditioning embedding 4× down to the 16×16
latents), trained with the control image = the shape's silhouette, white on black, and captions
whose kind, size and position are replaced at random 30 % of the time each (so the control wins);
UNet, text encoder and VAE frozen. ``sketch``: the same ControlNet recipe with the control image a
thin outline instead (half clean lines of varying width as Canny draws them, half wobbly
scribbles with gaps; half of each binarized), started from the ``silhouette`` ControlNet
(``--init-from``: both map a shape's outline to its place). All: ε-prediction MSE with
min-SNR-5 weighting, 10 % caption dropout, AdamW, warm-up then cosine, step count cut to fit
``--budget-s`` once the speed is known (or ``--steps N`` exactly). Weights are saved in fp16
(the evaluator scores the saved files). Held-out combinations never appear in training.

``--shape-weight W`` weights the latent pixels the shape reaches (grown by one) W× in the loss: a
small shape's hole is a latent pixel or two of 256, which a plain mean barely sees. The shipped
``outline`` was trained plain (rank 8, batch 128, 1227 steps on an H200), then continued twice
with ``--shape-weight 8`` at lr 5e-4 (``builtin_model/gpu_train.sh``, ``gpu_continue.sh``; its
``train_state.json`` holds the chain). On 192 training scenes with the shipped decoder it drew
94.3 % hollow and a new plain rank-8 LoRA trained beside it as long 94.8 %, but the plain one lost
2.1 points of kind against the base (the weighted one none): the weighted one ships.

When the base UNet changed (the ``keep`` stage of ``builtin_model.train``) all three were
continued on it with ``--init-from`` (CPU, batch 64: ``sketch`` 400 steps and ``silhouette`` 300
at lr 1e-4; ``outline`` 500 + 400 at lr 2e-4 with ``--shape-weight 8``). The continued ``outline``
then overshot: on 96 training scenes × 2 seeds it drew hollow 92.2 / 97.4 / 94.3 / 82.8 % at
scale 0.8 / 0.9 / 1.0 / 1.15, so strength 0.9 is folded into its weights
(``builtin_model.lora_strength``). On small diamonds of the training scenes it then kept the
kind 57 % of the time (85 % without it), so it was continued 400 more steps with ``--focus
diamond:small`` (a quarter of each batch) and strength 0.9 folded in again: small diamonds 70 %,
hollow 96.9 %, kind 99.0 % on those 96 × 2 training scenes. The records hold each step.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from builtin_model import MODEL_DIR, adapter_data, build, data
from builtin_model.train import CAPTION_DROPOUT, MIN_SNR_GAMMA, log, lr_factor, provenance

LORA_RANK = 8
LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2",
]  # fmt: skip

CARDS = {
    adapter_data.OUTLINE_ID: {
        "kind": "lora",
        "description": "Draws the shape hollow: an outline a few pixels wide in the shape's "
        "color, the background inside.",
        "trigger_words": [],
        "default_scale": 1.0,
    },
    adapter_data.SKETCH_ID: {
        "kind": "controlnet",
        "description": "Control image: the shape's outline as thin white lines on black (a "
        "drawing, or the `canny` preprocessor's edges of a picture of a shape). The generated "
        "shape follows the lines (kind, place, size); the prompt picks the colors.",
        "default_scale": 1.0,
    },
    adapter_data.SILHOUETTE_ID: {
        "kind": "controlnet",
        "description": "Control image: a white shape on black, the output's size. The generated "
        "shape takes that outline, place and size; the prompt picks the colors.",
        "default_scale": 1.0,
    },
}


def load_base(model_dir: Path) -> tuple[Any, Any, Any, Any, float]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir / "tokenizer")
    text = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").requires_grad_(False)
    return tokenizer, text, vae, unet, float(vae.config.scaling_factor)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("adapter", choices=sorted(CARDS))
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--out", type=Path, help="default: <model-dir>/loras|controlnets/<id>")
    parser.add_argument("--steps", type=int, help="exactly this many steps (default: fit budget)")
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--budget-s", type=float, default=3000.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--rank", type=int, default=LORA_RANK, help="LoRA rank (outline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shape-weight",
        type=float,
        default=1.0,
        help="weight of the latent pixels on and around the shape in the loss (1: none)",
    )
    parser.add_argument(
        "--focus",
        metavar="KIND:SIZE",
        help="draw --focus-share of each batch from training scenes of this kind and size "
        "(e.g. diamond:small: where the LoRA was seen to lose the kind on training scenes)",
    )
    parser.add_argument("--focus-share", type=float, default=0.25)
    parser.add_argument(
        "--init-from",
        type=Path,
        help="continue this saved adapter (a LoRA of the same rank, or a ControlNet to start "
        "from): its record becomes the parent",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.focus:
        kind, _, size = args.focus.partition(":")
        if kind not in data.SHAPES or size not in data.SIZES:
            parser.error(f"--focus: KIND:SIZE with KIND in {data.SHAPES}, SIZE in {data.SIZES}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer, text, vae, unet, scaling = load_base(args.model_dir)
    text, vae, unet = text.to(device), vae.to(device), unet.to(device)
    is_lora = CARDS[args.adapter]["kind"] == "lora"
    if is_lora:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=args.rank,
                lora_alpha=args.rank,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGETS,
            )
        )
        if args.init_from:
            load_lora_into(unet, args.init_from)
        trained: Any = unet
        params = [p for p in unet.parameters() if p.requires_grad]
        lr = args.lr or 1e-3
        unet.train()
    else:
        from diffusers import ControlNetModel

        if args.init_from:
            controlnet = ControlNetModel.from_pretrained(args.init_from, torch_dtype=torch.float32)
        else:
            controlnet = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=(16, 32, 64)
            )
        controlnet.to(device).train().requires_grad_(True)
        trained = controlnet
        params = list(controlnet.parameters())
        lr = args.lr or 3e-4
        unet.eval()
    log(
        f"{args.adapter}: {sum(p.numel() for p in params) / 1e6:.3f} M trained parameters, "
        f"batch {args.batch}, lr {lr:g}",
        start,
    )
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0 if is_lora else 0.01)
    alphas_cumprod = build.train_alphas_cumprod().float().to(device)
    g = torch.Generator().manual_seed(args.seed + 11)
    tok = {"padding": "max_length", "max_length": build.MAX_TOKENS, "truncation": True}
    empty_ids = tokenizer([""], return_tensors="pt", **tok).input_ids.to(device)

    total = args.steps or args.max_steps
    warmup = min(100, max(total // 20, 1))
    deadline = start + args.budget_s
    t0 = time.perf_counter()
    step, loss_avg = 0, 0.0
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, total)
        scenes = draw_scenes(args.batch, g, args.focus, args.focus_share)
        with torch.no_grad():
            target = adapter_data.render_outline(scenes) if is_lora else data.render(scenes)
            post = vae.encode(target.to(device)).latent_dist
            z = (
                post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
            ) * scaling
            texts = (
                data.captions(scenes, args.seed * 1_000_003 + step)
                if is_lora
                else adapter_data.control_captions(scenes, args.seed * 1_000_003 + step)
            )
            ids = tokenizer(texts, return_tensors="pt", **tok).input_ids.to(device)
            drop = (torch.rand(args.batch, generator=g) < CAPTION_DROPOUT).to(device)
            ids = torch.where(drop[:, None], empty_ids, ids)
            cond = text(ids)[0]
        t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
        noise = torch.randn(z.shape, generator=g).to(device)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * z + (1 - ab).sqrt() * noise
        if is_lora:
            pred = unet(zt, t, cond).sample
        else:
            control = (
                adapter_data.training_sketches(scenes, g)
                if args.adapter == adapter_data.SKETCH_ID
                else adapter_data.render_silhouette(scenes)
            ).to(device)
            down, mid = controlnet(zt, t, cond, controlnet_cond=control, return_dict=False)
            pred = unet(
                zt, t, cond, down_block_additional_residuals=down, mid_block_additional_residual=mid
            ).sample
        snr = ab.view(-1) / (1 - ab.view(-1))
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
        err = (pred - noise) ** 2
        if args.shape_weight != 1.0:
            pixels = shape_weights(scenes, args.shape_weight, z.shape[-1]).to(device)
            err = err * pixels / pixels.mean()
        loss = (weight * err.mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        loss_avg = 0.98 * loss_avg + 0.02 * loss.item() if step > 1 else loss.item()
        now = time.perf_counter()
        if args.steps is None and now > deadline - 10:  # leave time to save
            log(f"budget reached at step {step}", start)
            total = step
            break
        if args.steps is None and (step in (20, 100) or (step > 100 and step % 200 == 0)):
            sps = (now - t0) / step
            fits = step + int((deadline - now) / sps)
            if fits < total:
                log(f"{sps:.3f} s/step: the budget allows {fits} of {total} steps", start)
                total = max(fits, step + 1)
        if step % 50 == 0 or step == total:
            log(f"{args.adapter} {step}/{total} loss {loss_avg:.4f}", start)
        if step % 500 == 0 and step < total:
            save(args, trained, is_lora, {"checkpoint_step": step})
    record = {
        "adapter": args.adapter,
        "steps": step,
        "batch": args.batch,
        **({"rank": args.rank} if is_lora else {}),
        "lr": lr,
        **({"shape_weight": args.shape_weight} if args.shape_weight != 1.0 else {}),
        **({"focus": args.focus, "focus_share": args.focus_share} if args.focus else {}),
        "seed": args.seed,
        "final_loss": round(loss_avg, 5),
        "train_s": round(time.perf_counter() - start, 1),
        "s_per_step": round((time.perf_counter() - t0) / max(step, 1), 3),
        **provenance("builtin_model.train_adapters", device, argv),
    }
    if args.init_from:
        record["parent"] = json.loads((args.init_from / "train_state.json").read_text())
    out = save(args, trained, is_lora, record)
    log(f"saved {out}", start)


def draw_scenes(n: int, g: torch.Generator, focus: str | None, share: float) -> data.SceneBatch:
    """``n`` training scenes; with ``focus`` ("kind:size") ``share`` of them of that kind and
    size (held-out combinations excluded either way), the rest drawn as usual."""
    if not focus:
        return data.sample_scenes(n, g)
    kind, size = focus.split(":")
    k = round(share * n)
    focused = data.sample_scenes(k, g, kind_only=kind, size_only=size)
    return data.SceneBatch.cat([data.sample_scenes(n - k, g), focused])


def shape_weights(scenes: data.SceneBatch, weight: float, latent_size: int) -> torch.Tensor:
    """Per latent pixel loss weights, (n, 1, h, w): ``weight`` where the shape's silhouette
    reaches, grown by one latent pixel (what the decoder reads for its edge), 1 elsewhere. Why:
    a small shape's hole is a latent pixel or two of 256, which a plain mean barely sees."""
    cover = adapter_data.render_silhouette(scenes)[:, :1]
    down = cover.shape[-1] // latent_size
    near = torch.nn.functional.max_pool2d((cover > 0).float(), down)
    near = torch.nn.functional.max_pool2d(near, 3, stride=1, padding=1)
    return 1.0 + (weight - 1.0) * near


def load_lora_into(unet: Any, lora_dir: Path) -> None:
    """Put a saved LoRA's weights (diffusers format, keys ``unet.…``) into the UNet's freshly
    added PEFT adapter, in fp32, so training continues from them."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    state = {k.removeprefix("unet."): v.float() for k, v in saved.items()}
    result: Any = set_peft_model_state_dict(unet, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise SystemExit(
            f"{lora_dir} does not fit: {len(missing)} LoRA weights missing, "
            f"{len(result.unexpected_keys)} unexpected (rank and targets must match)"
        )


def save(args: argparse.Namespace, trained: Any, is_lora: bool, record: dict[str, Any]) -> Path:
    """Write the adapter in fp16 with its card (``imagegen_adapter.json``) and training record."""
    if is_lora:
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        out: Path = args.out or args.model_dir / "loras" / args.adapter
        layers = {k: v.detach().cpu().half() for k, v in get_peft_model_state_dict(trained).items()}
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers)
    else:
        out = args.out or args.model_dir / "controlnets" / args.adapter
        copy.deepcopy(trained).to("cpu", torch.float16).save_pretrained(
            out, safe_serialization=True
        )
        config = json.loads((out / "config.json").read_text())
        config.pop("_name_or_path", None)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    card = {"id": args.adapter, **CARDS[args.adapter]}
    (out / "imagegen_adapter.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "train_state.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
