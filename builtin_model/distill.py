"""Distil ``shapes-64`` into ``shapes-64-fast``: 4 DDIM steps, no classifier-free guidance.

    python -m builtin_model.distill --out builtin_model/shapes-64-fast --pairs 1536 --steps 1200

Recipe (knowledge distillation on deterministic teacher pairs, Luhman & Luhman 2021, sampled
with DDIM): the teacher (shapes-64, DPM++ 2M, 20 steps, guidance 4) turns starting noise ``z``
into a latent ``x0`` for training prompts (never the held-out scenes). The student starts as
the teacher's UNet and learns, at the 4 timesteps t_k of a trailing DDIM schedule, the ε that
keeps the deterministic DDIM path on the line from ``z`` to ``x0``:

    ε* = (z − √ᾱ_{t_0} x0) / √(1 − ᾱ_{t_0}),   x_{t_k} = √ᾱ_{t_k} x0 + √(1 − ᾱ_{t_k}) ε*

so x_{t_0} = z exactly, and a perfect student lands on the teacher's image in 4 UNet calls
(guidance baked in: no unconditional half), against the teacher's 40. The text encoder, VAE
and tokenizer are the teacher's, unchanged: a worker serving both models shares them.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from builtin_model import MODEL_DIR, build, data

FAST_ID = "shapes-64-fast"
FAST_STEPS = 4
FAST_SCHEDULER = "ddim"
TEACHER_STEPS = 20
TEACHER_GUIDANCE = 4.0


def log(msg: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)


def fast_defaults() -> dict[str, object]:
    return {
        "id": FAST_ID,
        "width": data.IMAGE_SIZE,
        "height": data.IMAGE_SIZE,
        "steps": FAST_STEPS,
        "guidance_scale": 1.0,
        "scheduler": FAST_SCHEDULER,
        "max_pixels": (2 * data.IMAGE_SIZE) ** 2,
        "max_steps": 8,
        "distilled_from": "shapes-64",
    }


@torch.no_grad()
def teacher_pairs(
    pipe: object, n: int, seed: int, batch: int, start: float, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt embeddings, starting noise z, teacher latent x0) for n training prompts."""
    g = torch.Generator().manual_seed(seed)
    scenes = data.sample_scenes(n, g)  # held-out combinations excluded
    texts = data.captions(scenes, seed + 1)
    # Half the prompts in the canonical form the service's users (and the evaluator) write.
    attrs = [
        data.Scene(*(names[int(i)] for names, i in zip(_NAMES, row, strict=True)))
        for row in zip(scenes.kind, scenes.color, scenes.bg, scenes.size, scenes.pos, strict=True)
    ]
    texts = [a.prompt() if i % 2 else t for i, (a, t) in enumerate(zip(attrs, texts, strict=True))]
    embeds, zs, x0s = [], [], []
    latent = data.IMAGE_SIZE // 4
    for i in range(0, n, batch):
        chunk = texts[i : i + batch]
        z = torch.randn((len(chunk), 4, latent, latent), generator=g).to(device)
        emb, _ = pipe.encode_prompt(chunk, device, 1, False)  # type: ignore[attr-defined]
        out = pipe(  # type: ignore[operator]
            prompt=chunk,
            negative_prompt=[""] * len(chunk),
            num_inference_steps=TEACHER_STEPS,
            guidance_scale=TEACHER_GUIDANCE,
            latents=z.clone(),
            output_type="latent",
        )
        embeds.append(emb)
        zs.append(z)
        x0s.append(out.images.float())
        log(f"teacher pairs {i + len(chunk)}/{n}", start)
    return torch.cat(embeds), torch.cat(zs), torch.cat(x0s)


_NAMES = (data.SHAPES, data.COLORS, data.COLORS, data.SIZES, data.POSITIONS)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, default=MODEL_DIR)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=1536)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--budget-s", type=float, default=2400)
    ap.add_argument("--teacher-batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = args.device
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    from builtin_model.card import load

    pipe = load(args.teacher).to(device)
    pipe.set_progress_bar_config(disable=True)
    embeds, zs, x0s = teacher_pairs(pipe, args.pairs, args.seed, args.teacher_batch, start, device)

    sched = build.make_scheduler(FAST_SCHEDULER, pipe.scheduler.config)
    sched.set_timesteps(FAST_STEPS)
    timesteps = sched.timesteps.clone()
    ab_all = sched.alphas_cumprod.float().to(device)
    timesteps = timesteps.to(device)
    log(f"student timesteps {timesteps.tolist()}", start)
    ab0 = ab_all[timesteps[0]]
    eps_star = (zs - ab0.sqrt() * x0s) / (1 - ab0).sqrt()

    teacher_unet = pipe.unet
    student = copy.deepcopy(teacher_unet).train()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 2)
    deadline = time.perf_counter() + args.budget_s
    loss_avg = 0.0
    step = 0
    while step < args.steps and time.perf_counter() < deadline:
        idx = torch.randint(args.pairs, (args.batch,), generator=g).to(device)
        k = torch.randint(FAST_STEPS, (args.batch,), generator=g).to(device)
        t = timesteps[k]
        ab = ab_all[t].view(-1, 1, 1, 1)
        eps = eps_star[idx]
        xt = ab.sqrt() * x0s[idx] + (1 - ab).sqrt() * eps
        pred = student(xt, t, embeds[idx]).sample
        # ε error plus the x0 error it causes (1/SNR times as large, capped at 20).
        w = 1 + ((1 - ab) / ab).clamp(max=20.0).view(-1)
        loss = (w * F.mse_loss(pred, eps, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        step += 1
        loss_avg = loss.item() if step == 1 else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 200 == 0:
            log(f"student {step}/{args.steps} loss {loss_avg:.4f}", start)
    log(f"trained {step} steps", start)

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    pipe.unet = student.eval()
    build.save(pipe.to("cpu"), out)
    (out / "imagegen.json").write_text(json.dumps(fast_defaults(), indent=2) + "\n")
    record = {
        "recipe": "knowledge distillation on deterministic teacher pairs (DDIM, 4 steps)",
        "teacher": "shapes-64",
        "teacher_steps": TEACHER_STEPS,
        "teacher_guidance": TEACHER_GUIDANCE,
        "pairs": args.pairs,
        "student_steps": step,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "final_loss": loss_avg,
        "train_s": time.perf_counter() - start,
    }
    (out / "train_state.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {out}", start)


if __name__ == "__main__":
    main()
