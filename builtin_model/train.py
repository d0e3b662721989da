"""Train ``shapes-64`` from a seed: VAE, then cached latents, then text encoder + UNet.

    python -m builtin_model.train --profile gpu --device cuda --out /tmp/shapes-64
    python -m builtin_model.train --profile cpu --out builtin_model/shapes-64
    python -m builtin_model.train --profile refine --init-from /tmp/shapes-64 --steps 4000 \
        --out builtin_model/shapes-64          # continue a trained model (on a CPU)
    python -m builtin_model.train --profile phrasing --init-from builtin_model/shapes-64 \
        --device cuda --budget-s 160 --no-eval --out /tmp/shapes-64-phrasing
                                               # teach a trained model the words users write
    python -m builtin_model.train --profile keep --init-from builtin_model/shapes-64 \
        --steps 2000 --no-eval --out /tmp/keep # image-to-image keeps its input at low strength

Each profile has a wall-clock budget; once the UNet's speed is known, its step count is cut to
fit, so a run always ends with a saved, evaluated model. ``--steps N`` instead runs exactly N
steps whatever the budget: the way to repeat a run. Checkpoints (EMA weights, full
pipeline) are written along the way, so even a killed run leaves one behind.

Why one module of 620 lines: a recipe reads top to bottom — the stages, their losses and the
budget that cuts their steps — as the model card's training section describes it.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from builtin_model import build, data

CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.999
KL_WEIGHT = 1e-5
SHAPE_WEIGHT = 8.0


@dataclass(frozen=True)
class Profile:
    """A training recipe; step counts are scaled by ``--max-steps-scale`` for smoke runs."""

    vae_steps: int
    vae_batch: int
    vae_crop: int  # train on random crops this size first (0: full 64×64 throughout)
    vae_full_steps: int  # then this many steps at full size
    vae_lr: float
    images: int  # training scenes rendered, encoded and cached
    steps: int
    batch: int
    unet_lr: float
    text_lr: float
    warmup: int
    budget_s: float  # the whole run, training + saving + evaluation
    eval_reserve_s: float  # kept free at the end for saving and evaluation
    checkpoint_s: float
    eval_batch: int
    # Share of captions written the way users write prompts (data.user_caption); 0 keeps the
    # original captions draw for draw.
    phrasing: float = 0.0
    captions_per_image: int = 1  # captions cached per scene; each step picks one at random
    embed_lr: float = 0.0  # the text encoder's token embeddings (0: text_lr)
    # Share of captions swapped for another scene's at low noise (see `mismatched`): full
    # below `mismatch_from`, falling linearly to none at `mismatch_to`. 0 keeps the draws.
    mismatch: float = 0.0
    mismatch_from: int = 300
    mismatch_to: int = 600
    # Share of rows, at low noise on the same ramp, drawn from pictures with a second, small
    # shape that only the caption names (the first goes unmentioned): what an inpainting job
    # asks, so that captions that may be false do not teach the model to leave a masked region
    # empty. 0 keeps the draws. `second_shape_images` such pictures are cached.
    second_shape: float = 0.0
    second_shape_images: int = 0


PROFILES = {
    # H100: ~6 minutes wall in all.
    "gpu": Profile(
        vae_steps=2000, vae_batch=256, vae_crop=0, vae_full_steps=0, vae_lr=1e-3,
        images=300_000, steps=12_000, batch=512, unet_lr=8e-4, text_lr=4e-4, warmup=300,
        budget_s=310, eval_reserve_s=40, checkpoint_s=60, eval_batch=144,
    ),
    # 2-core CPU: ~2 hours wall in all.
    "cpu": Profile(
        vae_steps=1500, vae_batch=32, vae_crop=32, vae_full_steps=250, vae_lr=1e-3,
        images=40_000, steps=7_000, batch=64, unet_lr=5e-4, text_lr=3e-4, warmup=200,
        budget_s=7000, eval_reserve_s=240, checkpoint_s=600, eval_batch=24,
    ),
    # Continue a trained pipeline (``--init-from``, its VAE and scaling kept) at a lower rate:
    # what a CPU can add to a GPU run in about an hour and a half.
    "refine": Profile(
        vae_steps=0, vae_batch=0, vae_crop=0, vae_full_steps=0, vae_lr=0.0,
        images=60_000, steps=4_000, batch=64, unet_lr=1.5e-4, text_lr=1.5e-4, warmup=100,
        budget_s=5700, eval_reserve_s=300, checkpoint_s=600, eval_batch=24,
    ),
    # Continue a trained pipeline (``--init-from``) on prompts as users write them: the
    # tokenizer's vocabulary grows (new words start from a synonym's embedding row), 60 % of
    # the captions are tags, synonyms, capitals and punctuation, 40 % the original ones so the
    # canonical sentences keep their scores. Sized for a ~160 s GPU budget (H100/H200).
    "phrasing": Profile(
        vae_steps=0, vae_batch=0, vae_crop=0, vae_full_steps=0, vae_lr=0.0,
        images=150_000, steps=6_000, batch=256, unet_lr=1e-4, text_lr=3e-4, warmup=150,
        budget_s=160, eval_reserve_s=12, checkpoint_s=60, eval_batch=144,
        phrasing=0.6, captions_per_image=2, embed_lr=5e-4,
    ),
}  # fmt: skip
# Continue a trained pipeline (``--init-from``) so that image-to-image keeps its input at low
# strength, as Stable Diffusion's does (issue 33, item 8). With every caption true, the model
# learned to read a shape's colour and place from the caption even when the picture, barely
# noised, already shows them; under another prompt at strength 0.3 it repainted the input. Below
# t = 300 (fewer up to t = 600) most captions now belong to another scene, so at low noise the
# picture decides and the caption only where the noise hides it. Swaps alone cost inpainting:
# a masked region holds a faint new shape at those timesteps, next to a shape the caption does
# not name, and a model taught that captions are often false erased it (inpainting colour 94 ->
# 70 %; swapping only for scenes with the shape at the same place did not help: 64 %). So on the
# same ramp 30 % of the rows are pictures with a second, small shape that only the caption names:
# the inpainting case, with a caption that is true. The text encoder is kept as it is (its
# phrasing refine stands); captions are drawn as the phrasing stage drew them.
#
# Run on the previous model (2000 steps, 36 min on the 2-core CPU), shipped as its last stage: at
# 0.3 under another scene's caption 83 % kept (8 % before), inpainting colour 94 % (held), 1.0
# followed 92 %, a monotone blend; text to image at guidance 4, phrasing and shapes-64-fast held.
# The adapters were continued on the new UNet (`sketch`, `silhouette`, `outline`), and the
# `outline` LoRA, which then overshot, had strength 0.9 folded in (builtin_model.lora_strength,
# chosen on training scenes) and was continued on small diamonds (`--focus`, recipe in
# builtin_model/train_adapters.py). The figures and commands are in bench/README.md.
#     python -m builtin_model.train --profile keep --init-from builtin_model/shapes-64 \
#         --steps 2000 --no-eval --out /tmp/keep
PROFILES["keep"] = replace(
    PROFILES["phrasing"],
    images=30_000, steps=2_000, batch=64, unet_lr=1.5e-4, text_lr=0.0, embed_lr=0.0, warmup=100,
    budget_s=3000, eval_reserve_s=300, checkpoint_s=600, eval_batch=24,
    mismatch=0.7, mismatch_from=300, mismatch_to=600,
    second_shape=0.3, second_shape_images=10_000,
)  # fmt: skip
CONTINUING = ("refine", "phrasing", "keep")


def at_low_noise(
    profile: Profile, share: float, t: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """Rows of a batch at timesteps ``t`` drawn with probability ``share`` below
    ``mismatch_from``, falling linearly to none at ``mismatch_to``."""
    if not share:
        return torch.zeros_like(t, dtype=torch.bool)
    span = max(profile.mismatch_to - profile.mismatch_from, 1)
    ramp = share * ((profile.mismatch_to - t).float() / span).clamp(0.0, 1.0)
    return torch.rand(t.shape, device=t.device, generator=g) < ramp


def mismatched(profile: Profile, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Which rows of a batch at timesteps ``t`` get another scene's caption."""
    return at_low_noise(profile, profile.mismatch, t, g)


def log(msg: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)


def hardware_name(device: torch.device | str) -> str:
    """What a training record says it ran on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def provenance(module: str, device: torch.device | str, argv: list[str] | None) -> dict[str, str]:
    """A record's ``hardware`` and the ``command`` that reproduces it."""
    args = argv if argv is not None else sys.argv[1:]
    return {"hardware": hardware_name(device), "command": f"python -m {module} " + " ".join(args)}


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ---- stage 1: VAE -----------------------------------------------------------------------------


def train_vae(profile: Profile, device: torch.device, seed: int, start: float) -> Any:
    vae = build.build_vae().to(device)
    opt = torch.optim.AdamW(
        vae.parameters(), lr=profile.vae_lr, weight_decay=0.0, fused=device.type == "cuda"
    )
    g = torch.Generator().manual_seed(seed + 1)
    total = profile.vae_steps + profile.vae_full_steps
    warmup = max(min(100, total // 10), 1)
    t0 = time.perf_counter()
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = profile.vae_lr * lr_factor(step, warmup, total)
        scenes = data.sample_scenes(profile.vae_batch, g, device)
        x = data.render(scenes)
        # Shapes cover a few % of the pixels; weight them up so small ones keep their outline.
        bg = data.palette_tensor(device)[scenes.bg].view(-1, 3, 1, 1)
        weight = 1.0 + (SHAPE_WEIGHT - 1.0) * ((x - bg).abs().sum(1, keepdim=True) > 1e-3).float()
        crop = profile.vae_crop if step < profile.vae_steps else 0
        if crop:
            oy, ox = (
                int(v) for v in torch.randint(0, data.IMAGE_SIZE - crop + 1, (2,), generator=g)
            )
            x = x[:, :, oy : oy + crop, ox : ox + crop]
            weight = weight[:, :, oy : oy + crop, ox : ox + crop]
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample.float()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        err = rec - x
        loss = (weight * (err**2 + 0.5 * err.abs())).mean() / weight.mean() + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % max(total // 10, 1) == 0 or step == total - 1:
            sps = (time.perf_counter() - t0) / (step + 1)
            log(
                f"vae {step + 1}/{total} loss {loss.item():.5f} kl {kl.item():.2f} "
                f"({sps:.3f} s/step)",
                start,
            )
    return vae.eval()


@torch.no_grad()
def check_vae(vae: Any, device: torch.device, n: int = 256) -> dict[str, float]:
    """Score VAE round trips of fresh scenes: the ceiling on what the UNet can reach."""
    from builtin_model.score import ATTRIBUTES, read_image

    batch = data.sample_scenes(n, torch.Generator().manual_seed(999), device)
    x = data.render(batch)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
    images = data.to_uint8(rec)
    hits = [read_image(images[i]).matches(batch.scene(i)) for i in range(n)]
    stats = {a: sum(h[a] for h in hits) / n for a in ATTRIBUTES}
    stats["mse"] = float(F.mse_loss(rec, x))
    return stats


# ---- stage 2: cached latents ------------------------------------------------------------------


@dataclass
class Cache:
    mean: torch.Tensor  # (n, 4, 16, 16)
    std: torch.Tensor
    ids: torch.Tensor  # (n, captions_per_image, MAX_TOKENS)
    empty_ids: torch.Tensor  # (MAX_TOKENS,), the unconditional caption ""


@torch.no_grad()
def build_cache(
    vae: Any,
    tokenizer: Any,
    n: int,
    device: torch.device,
    seed: int,
    chunk: int,
    phrasing: float = 0.0,
    captions_per_image: int = 1,
    second_shape: bool = False,
) -> Cache:
    """``n`` scenes encoded, with their captions; with ``second_shape``, pictures with a
    second small shape added (data.second_shapes) and captions naming that shape only."""
    g = torch.Generator().manual_seed(seed + 2)
    scenes = data.sample_scenes(n, g, device)
    second = data.second_shapes(scenes, g) if second_shape else None
    named = second if second is not None else scenes
    tok = {
        "padding": "max_length",
        "max_length": build.MAX_TOKENS,
        "truncation": True,
        "return_tensors": "pt",
    }
    ids = torch.stack(
        [
            tokenizer(data.captions(named, seed + 3 + 1000 * k, phrasing), **tok).input_ids
            for k in range(captions_per_image)
        ],
        dim=1,
    ).to(device)
    empty = tokenizer([""], **tok).input_ids[0].to(device)
    means, stds = [], []
    for i in range(0, n, chunk):
        part = scenes.rows(i, i + chunk)
        if second is not None:
            images = data.render_with_second(part, second.rows(i, i + chunk))
        else:
            images = data.render(part)
        with autocast(device):
            post = vae.encode(images).latent_dist
        means.append(post.mean.float())
        stds.append(post.std.float())
    return Cache(torch.cat(means), torch.cat(stds), ids, empty)


# ---- stage 3: text encoder + UNet -------------------------------------------------------------


def train_unet(
    profile: Profile, cache: Cache, tokenizer: Any, vae: torch.nn.Module, scaling: float,
    device: torch.device, seed: int, start: float, deadline: float, out: Path, pack: Path | None,
    init: Path | None = None, fixed_steps: bool = False, second: Cache | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:  # fmt: skip
    torch.manual_seed(seed + 4)
    added: list[str] = []
    if init is None:
        text = build.build_text_encoder(len(tokenizer)).to(device)
        unet = build.build_unet(text.config.hidden_size).to(device)
    else:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        text = CLIPTextModel.from_pretrained(init / "text_encoder")
        added = grow_vocabulary(text, init, tokenizer)
        text = text.to(device)
        unet = UNet2DConditionModel.from_pretrained(init / "unet").to(device)
    # A text learning rate of 0 freezes the encoder: no gradients, no optimizer state, no drift.
    frozen_text = not profile.text_lr and not profile.embed_lr
    text.train(not frozen_text).requires_grad_(not frozen_text)
    unet.train()
    ema_text, ema_unet = copy.deepcopy(text).eval(), copy.deepcopy(unet).eval()
    params = list(unet.parameters()) if frozen_text else [*text.parameters(), *unet.parameters()]
    ema_params = (
        list(ema_unet.parameters())
        if frozen_text
        else [*ema_text.parameters(), *ema_unet.parameters()]
    )
    groups = [
        {"params": list(unet.parameters()), "lr": profile.unet_lr, "base": profile.unet_lr},
    ]
    if not frozen_text:
        groups.append(
            {"params": list(text.parameters()), "lr": profile.text_lr, "base": profile.text_lr}
        )
    if profile.embed_lr:
        embed = text.get_input_embeddings().weight
        groups[1]["params"] = [p for p in text.parameters() if p is not embed]
        groups.append({"params": [embed], "lr": profile.embed_lr, "base": profile.embed_lr})
    opt = torch.optim.AdamW(
        groups,
        weight_decay=0.01,
        fused=device.type == "cuda",
    )
    alphas_cumprod = build.train_alphas_cumprod().float().to(device)
    n = cache.mean.shape[0]
    g = torch.Generator(device=device).manual_seed(seed + 5)

    total = profile.steps
    t0 = time.perf_counter()
    last_ckpt = t0
    window: list[float] = []
    step = 0
    loss_avg = 0.0
    while step < total:
        ts = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = group["base"] * lr_factor(step, profile.warmup, total)
        idx = torch.randint(n, (profile.batch,), device=device, generator=g)
        z = (
            cache.mean[idx]
            + cache.std[idx] * torch.randn(cache.mean[idx].shape, device=device, generator=g)
        ) * scaling
        if cache.ids.shape[1] == 1:
            ids = cache.ids[idx, 0]
        else:
            pick = torch.randint(cache.ids.shape[1], (profile.batch,), device=device, generator=g)
            ids = cache.ids[idx, pick]
        drop = torch.rand(profile.batch, device=device, generator=g) < CAPTION_DROPOUT
        ids = torch.where(drop[:, None], cache.empty_ids[None], ids)
        t = torch.randint(0, 1000, (profile.batch,), device=device, generator=g)
        if second is not None:  # drawn only then, so other profiles keep their draws
            use = at_low_noise(profile, profile.second_shape, t, g)
            rows = torch.randint(second.mean.shape[0], (profile.batch,), device=device, generator=g)
            z2 = (
                second.mean[rows]
                + second.std[rows] * torch.randn(z.shape, device=device, generator=g)
            ) * scaling
            pick = torch.randint(second.ids.shape[1], (profile.batch,), device=device, generator=g)
            z = torch.where(use.view(-1, 1, 1, 1), z2, z)
            ids = torch.where((use & ~drop)[:, None], second.ids[rows, pick], ids)
        else:
            use = torch.zeros_like(drop)
        if profile.mismatch:  # drawn only then, so other profiles keep their draws
            swap = mismatched(profile, t, g) & ~drop & ~use
            other = cache.ids[torch.randint(n, (profile.batch,), device=device, generator=g), 0]
            ids = torch.where(swap[:, None], other, ids)
        noise = torch.randn(z.shape, device=device, generator=g)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * z + (1 - ab).sqrt() * noise
        with autocast(device):
            cond = text(ids)[0]
            pred = unet(zt, t, cond).sample.float()
        snr = ab.view(-1) / (1 - ab.view(-1))
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        step += 1
        loss_avg = 0.98 * loss_avg + 0.02 * loss.item() if step > 1 else loss.item()

        now = time.perf_counter()
        window = [*window, now - ts][-50:]
        if not fixed_steps and (step == 100 or (step > 100 and step % 200 == 0)):
            # Fit the step count to the budget (only ever down), keeping the schedule's shape.
            # Not with --steps: a fixed count is what makes a run repeatable.
            sps = sum(window) / len(window)
            fits = step + int((deadline - now) / sps)
            if fits < total:
                log(f"unet: {sps:.3f} s/step, budget allows {fits} of {total} steps", start)
                total = max(fits, step + 1)
        if step % max(total // 20, 1) == 0 or step == total:
            sps = (now - t0) / step
            log(
                f"unet {step}/{total} loss {loss_avg:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({sps:.3f} s/step)",
                start,
            )
        if now - last_ckpt > profile.checkpoint_s and step < total:
            save_pipeline(
                tokenizer, ema_text, vae, ema_unet, scaling, out, pack, {"checkpoint_step": step}
            )
            last_ckpt = time.perf_counter()
            log(f"checkpoint at step {step} → {out}", start)
    stats = {
        "unet_steps": step,
        "unet_s_per_step": (time.perf_counter() - t0) / max(step, 1),
        "final_loss": loss_avg,
        "vocabulary_added": added,
    }
    return ema_text, ema_unet, stats


def grow_vocabulary(text: torch.nn.Module, init: Path, tokenizer: Any) -> list[str]:
    """Give ``text`` (trained with ``init``'s tokenizer) a row for each word ``tokenizer`` adds,
    started from the row of the word's synonym (``data.SYNONYM_OF``: "bg" from "background",
    "tiny" from "small"; punctuation from ","; others from "a"). The old words must keep their
    ids. Returns the words added."""
    from transformers import PreTrainedTokenizerFast

    old = PreTrainedTokenizerFast.from_pretrained(init / "tokenizer").get_vocab()
    new = tokenizer.get_vocab()
    moved = [w for w, i in old.items() if new.get(w) != i]
    if moved:
        raise ValueError(f"{init}: words whose token id would change: {moved[:10]}")
    rows = int(text.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    if len(tokenizer) <= rows:
        return []
    text.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # type: ignore[operator]
    weight = text.get_input_embeddings().weight  # type: ignore[operator]
    added = sorted((i, w) for w, i in new.items() if i >= rows)
    with torch.no_grad():
        for i, word in added:
            source = data.SYNONYM_OF.get(word) or ("," if word in data.PUNCTUATION else "a")
            weight[i] = weight[old[source]]
    return [w for _, w in added]


# ---- saving -----------------------------------------------------------------------------------


def save_pipeline(
    tokenizer: Any,
    text: torch.nn.Module,
    vae: Any,
    unet: torch.nn.Module,
    scaling: float,
    out: Path,
    pack: Path | None,
    extra: dict[str, Any],
) -> None:
    """Write a loadable pipeline (fp32, CPU copies) and, if asked, a packed copy of it."""
    vae_cpu = copy.deepcopy(vae).to("cpu").float()
    vae_cpu.register_to_config(scaling_factor=scaling)
    pipe = build.assemble(
        tokenizer,
        copy.deepcopy(text).to("cpu").float(),
        vae_cpu,
        copy.deepcopy(unet).to("cpu").float(),
    )
    build.save(pipe, out)
    (out / "train_state.json").write_text(json.dumps(extra, indent=2) + "\n")
    if pack is not None:
        pack_dir(out, pack)


def pack_dir(src: Path, dest: Path, part_bytes: int = 15 * 2**20) -> list[Path]:
    """Tar ``src`` into ``dest/<name>.tar.NN`` parts of at most ``part_bytes`` (few, flat files
    travel better than a tree). Restore with ``cat <name>.tar.* | tar -x``."""
    dest.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src, arcname=src.name)
    blob = buf.getvalue()
    for old in dest.glob(f"{src.name}.tar.*"):
        old.unlink()
    parts = []
    for i in range(0, len(blob), part_bytes):
        path = dest / f"{src.name}.tar.{i // part_bytes:02d}"
        path.write_bytes(blob[i : i + part_bytes])
        parts.append(path)
    return parts


# ---- main -------------------------------------------------------------------------------------


def scaled(profile: Profile, scale: float) -> Profile:
    if scale == 1.0:
        return profile
    return replace(
        profile,
        vae_steps=max(int(profile.vae_steps * scale), 2),
        vae_full_steps=max(int(profile.vae_full_steps * scale), 1 if profile.vae_full_steps else 0),
        images=max(int(profile.images * scale), 512),
        second_shape_images=(
            max(int(profile.second_shape_images * scale), 256) if profile.second_shape_images else 0
        ),
        steps=max(int(profile.steps * scale), 2),
        warmup=max(int(profile.warmup * scale), 1),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="pipeline directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-steps-scale", type=float, default=1.0, help="scale all step counts (smoke runs)"
    )
    parser.add_argument("--vae-from", type=Path, help="reuse this pipeline's VAE (skip stage 1)")
    parser.add_argument(
        "--init-from",
        type=Path,
        help="continue this trained pipeline: its VAE and scaling are kept, its text encoder "
        "and UNet are trained further (the `refine` profile)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="text encoder + UNet steps (default: the profile's, cut to fit the time budget); "
        "a count given here is run in full, whatever the budget, so a run can be repeated",
    )
    parser.add_argument("--max-batch", type=int, help="cap every batch size (smoke runs on a CPU)")
    parser.add_argument("--budget-s", type=float, help="override the profile's wall-clock budget")
    parser.add_argument(
        "--pack", type=Path, help="also write the pipeline as tar parts here at each checkpoint"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    parser.add_argument("--eval-seeds", type=int, default=3)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    profile = scaled(PROFILES[args.profile], args.max_steps_scale)
    if args.max_batch is not None:
        cap = args.max_batch
        profile = replace(
            profile,
            vae_batch=min(profile.vae_batch, cap),
            batch=min(profile.batch, cap),
            eval_batch=min(profile.eval_batch, cap),
        )
    if args.budget_s is not None:
        profile = replace(profile, budget_s=args.budget_s)
    if args.steps is not None:
        profile = replace(profile, steps=args.steps)
    if args.init_from is not None and args.vae_from is None:
        args.vae_from = args.init_from
    if args.profile in CONTINUING and args.init_from is None:
        parser.error(f"--profile {args.profile} continues a trained pipeline: give --init-from")
    # Read now: --out may be the --init-from directory, and checkpoints overwrite it.
    parent = _parent_record(args.init_from)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    hardware = hardware_name(device)
    log(f"profile {args.profile} on {hardware}: {asdict(profile)}", start)

    tokenizer = build.build_tokenizer()
    if args.vae_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from / "vae").to(device).eval()
        log(f"vae from {args.vae_from}", start)
    else:
        vae = train_vae(profile, device, args.seed, start)
    t_vae = time.perf_counter() - start
    vae_scores = check_vae(vae, device)
    log("vae round trip: " + ", ".join(f"{k} {v:.3f}" for k, v in vae_scores.items()), start)
    cache = build_cache(
        vae,
        tokenizer,
        profile.images,
        device,
        args.seed,
        chunk=4096 if device.type == "cuda" else 512,
        phrasing=profile.phrasing,
        captions_per_image=profile.captions_per_image,
    )
    second = (
        build_cache(
            vae,
            tokenizer,
            profile.second_shape_images,
            device,
            args.seed + 10,
            chunk=4096 if device.type == "cuda" else 512,
            phrasing=profile.phrasing,
            captions_per_image=profile.captions_per_image,
            second_shape=True,
        )
        if profile.second_shape
        else None
    )
    # A continued model keeps the latent scale its UNet was trained with.
    scaling = (
        float(vae.config.scaling_factor)
        if args.init_from is not None
        else 1.0 / float(cache.mean[:8192].std())
    )
    log(
        f"cached {profile.images} latents {tuple(cache.mean.shape[1:])}, "
        f"scaling factor {scaling:.4f}",
        start,
    )
    t_cache = time.perf_counter() - start - t_vae

    deadline = start + profile.budget_s - profile.eval_reserve_s
    text, unet, stats = train_unet(
        profile,
        cache,
        tokenizer,
        vae,
        scaling,
        device,
        args.seed,
        start,
        deadline,
        args.out,
        args.pack,
        args.init_from,
        fixed_steps=args.steps is not None,
        second=second,
    )
    t_unet = time.perf_counter() - start - t_vae - t_cache
    record = {
        "profile": args.profile,
        "hardware": hardware,
        "seed": args.seed,
        "vae_from": str(args.vae_from) if args.vae_from else None,
        "init_from": str(args.init_from) if args.init_from else None,
        # The run this one continued, as its own record said (the card shows both stages).
        "parent": parent,
        "scaling_factor": round(scaling, 6),
        "max_steps_scale": args.max_steps_scale,
        "recipe": asdict(profile),
        "vae_s": round(t_vae, 1),
        "vae_round_trip": vae_scores,
        "cache_s": round(t_cache, 1),
        "unet_s": round(t_unet, 1),
        **stats,
        "train_s": round(time.perf_counter() - start, 1),
    }
    save_pipeline(tokenizer, text, vae, unet, scaling, args.out, None, record)
    log(f"saved {args.out} ({_size_mb(args.out):.1f} MB of weights)", start)

    if not args.no_eval:
        from builtin_model import card

        evaluations = card.evaluate_dir(
            args.out, device, seeds=range(args.eval_seeds), batch_size=profile.eval_batch
        )
        for ev in evaluations:
            log(
                f"guidance {ev.guidance_scale:g}: "
                f"{ev.seconds_per_image * 1000:.1f} ms/image on {hardware}",
                start,
            )
        card.write(args.out, record, evaluations, hardware)
        from builtin_model.score import format_table

        print(format_table(evaluations), flush=True)
    if args.pack is not None:
        pack_dir(args.out, args.pack)
    log("done", start)


def _parent_record(init: Path | None) -> dict[str, Any] | None:
    if init is None:
        return None
    record: dict[str, Any] = json.loads((init / "train_state.json").read_text())
    return record


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 1e6


if __name__ == "__main__":
    main()
