"""Evaluate a saved ``shapes-64`` directory and write its model card, scores and sample grid.

Why one module of 430 lines: most of it is the card's Markdown template, whose sections the
evaluators in ``bench/`` rewrite in place (``write_section``).
"""

# ruff: noqa: E501  (the card is a Markdown template)

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from builtin_model import build, data
from builtin_model.score import ATTRIBUTES, Evaluation, evaluate_pipeline, format_table, sample_grid


def load(model_dir: Path, device: torch.device | str = "cpu") -> Any:
    """Load the pipeline the way the worker does, with the served default scheduler."""
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(model_dir, torch_dtype=torch.float32)
    defaults = json.loads((model_dir / "imagegen.json").read_text())
    pipe.scheduler = build.make_scheduler(defaults["scheduler"], pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def evaluate_dir(
    model_dir: Path,
    device: torch.device | str = "cpu",
    seeds: Iterable[int] = (0, 1, 2),
    batch_size: int = 24,
    scenes: list[data.Scene] | None = None,
) -> list[Evaluation]:
    """Held-out scores at the served defaults and at ``guidance_scale = 1``."""
    pipe = load(model_dir, device)
    defaults = json.loads((model_dir / "imagegen.json").read_text())
    scenes = list(data.held_out_scenes()) if scenes is None else scenes
    return [
        evaluate_pipeline(pipe, scenes, tuple(seeds), defaults["steps"], g, batch_size)
        for g in (defaults["guidance_scale"], 1.0)
    ]


def write(
    model_dir: Path,
    record: dict[str, Any],
    evaluations: list[Evaluation],
    eval_hardware: str,
    latency: dict[str, Any] | None = None,
) -> None:
    """Write ``scores.json``, ``samples.png`` and the model card ``README.md``."""
    scores = {
        "eval_hardware": eval_hardware,
        "held_out_combinations": len(data.held_out_scenes()),
        "evaluations": [
            {
                "guidance_scale": e.guidance_scale,
                "steps": e.steps,
                "images": len(e.images),
                "accuracy": e.accuracy,
                "seconds_per_image_batched": e.seconds_per_image,
            }
            for e in evaluations
        ],
        "latency": latency,
    }
    (model_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    sample_grid(evaluations[0]).save(model_dir / "samples.png", optimize=True)
    card = _card(model_dir, record, evaluations, eval_hardware, latency)
    kept = "".join(section(model_dir, name) for name in SECTIONS)
    (model_dir / "README.md").write_text(card.rstrip("\n") + "\n" + kept)


# Sections other tools write into the card, each between its markers; rewriting the rest of the
# card (``write``) keeps them, in this order.
SECTIONS = {
    "phrasing": (
        "<!-- phrasing: written by bench/evaluate_phrasing.py --write-card -->",
        "<!-- /phrasing -->",
    ),
    "images-in": (
        "<!-- images-in: written by bench/evaluate_builtin.py --edits --write-card -->",
        "<!-- /images-in -->",
    ),
    "adapters": ("<!-- adapters:begin -->", "<!-- adapters:end -->"),
    "trainings": (
        "<!-- trainings: written by bench/evaluate_training.py --write-card -->",
        "<!-- /trainings -->",
    ),
}


def section(model_dir: Path, name: str) -> str:
    """The card's section ``name`` as it stands, markers included ("" when it has none)."""
    begin, end = SECTIONS[name]
    path = model_dir / "README.md"
    text = path.read_text() if path.exists() else ""
    if begin not in text:
        return ""
    return "\n" + text[text.index(begin) : text.index(end) + len(end)] + "\n"


def write_section(model_dir: Path, name: str, body: str) -> None:
    """Put ``body`` as the card's section ``name``, in place of an earlier one or at the end."""
    begin, end = SECTIONS[name]
    path = model_dir / "README.md"
    text = path.read_text() if path.exists() else ""
    block = begin + "\n" + body.strip() + "\n" + end
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def tokenizer_size(model_dir: Path) -> int:
    """Tokens in the saved tokenizer (the shipped one, not what `build` would make today)."""
    config = json.loads((model_dir / "tokenizer" / "tokenizer.json").read_text())
    return len(config["model"]["vocab"])


def _params(model_dir: Path) -> dict[str, float]:
    from safetensors import safe_open

    out = {}
    for f in sorted(model_dir.rglob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out[f.parent.name] = sum(_numel(st.get_slice(k).get_shape()) for k in st.keys()) / 1e6  # noqa: SIM118
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _card(
    model_dir: Path,
    record: dict[str, Any],
    evaluations: list[Evaluation],
    eval_hardware: str,
    latency: dict[str, Any] | None,
) -> str:
    d = build.served_defaults()
    params = _params(model_dir)
    weights_mb = (
        sum(
            f.stat().st_size
            for f in model_dir.rglob("*.safetensors")
            if f.relative_to(model_dir).parts[0] not in ("loras", "controlnets")
        )
        / 1e6
    )  # the pipeline's own; the adapters' are in their section
    best = evaluations[0]
    latency_line = (
        f"{latency['seconds'] * 1000:.0f} ms per 64×64 image ({latency['steps']} steps, guidance {latency['guidance_scale']:g}, "
        f"batch 1, best of {latency['runs']}) on {latency['hardware']}"
        + (
            f"; {latency['service_seconds'] * 1000:.0f} ms end to end through the service "
            f"(HTTP submit → PNG downloaded, best of {latency.get('service_runs')})"
            if latency.get("service_seconds")
            else ""
        )
        if latency
        else "not measured yet: run `python bench/evaluate_builtin.py --write-card`"
    )
    misses = _common_misses(best)
    return f"""---
license: apache-2.0
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, tiny, procedural, offline]
---

# shapes-64 — imagegen's built-in model

A tiny text-to-image model with the architecture of Stable Diffusion (CLIP-style text encoder,
`AutoencoderKL`, cross-attention `UNet2DConditionModel`, DDPM-family scheduler), trained from
scratch on procedural scenes so the service can turn a prompt into the *right* image on a
machine with no GPU and no download. It draws one flat-colored shape on a flat background.

It loads like any hub model:

```python
pipe = AutoPipelineForText2Image.from_pretrained(
    "builtin_model/shapes-64", torch_dtype=torch.float32
)
image = pipe(
    "a small red circle at the top left on a white background",
    width=64,
    height=64,
    num_inference_steps={d["steps"]},
    guidance_scale={d["guidance_scale"]:g},
).images[0]
```

Served defaults (`imagegen.json`): {d["width"]}×{d["height"]}, {d["steps"]} steps, guidance
{d["guidance_scale"]:g}, scheduler `{d["scheduler"]}`. Latency: {latency_line}.

## Data

`builtin_model/data.py` renders 64×64 scenes from signed distances (anti-aliased edges):
shapes {", ".join(data.SHAPES)}; shape and background colors {", ".join(data.COLORS)}
(never the same); sizes small (half-extent 6.5–8 px) and large (12.5–14 px); positions
{", ".join(data.POSITIONS)} on a 3×3 grid, ±{data.POSITION_JITTER:g} px jitter. Captions vary
in phrasing and order ("a small red circle at the top left on a white background",
"red circle, top left, white background", "a white background with a red circle in the top
left corner") and leave attributes out at random (size 20 %, position 10 %, background 10 %,
color 5 %, kind 5 %); an attribute left out is free. {len(data.held_out_scenes())} full
combinations (kind × color × background × size × position, seeded, balanced over every value)
never appear in training, neither for the VAE nor the UNet; they are what is scored below.

## Architecture

| component | class | parameters |
|---|---|---:|
| tokenizer | `PreTrainedTokenizerFast` (word level, {tokenizer_size(model_dir)} tokens, max {build.MAX_TOKENS}) | — |
| text encoder | `CLIPTextModel`, 3 layers, width 128, absolute position embeddings | {params.get("text_encoder", 0):.2f} M |
| VAE | `AutoencoderKL`, channels 16/32/64, 4× down → 16×16×4 latents, no attention | {params.get("vae", 0):.2f} M |
| UNet | `UNet2DConditionModel`, 16×16 → 8×8 → 4×4, channels 64/128/128, cross-attention at 16×16, 8×8 and the middle | {params.get("unet", 0):.2f} M |
| scheduler | Stable Diffusion's scaled-linear betas 0.00085…0.012, ε-prediction, trailing timesteps | — |

Weights: {weights_mb:.1f} MB (fp32 safetensors).

## Training recipe

{_recipe(record)}{_decoder_tune(model_dir)}{_text_refine(model_dir)}

## Scores (held-out combinations)

{len(best.images) // max(len(data.held_out_scenes()), 1)} seeds × {len(data.held_out_scenes())} held-out prompts, `{d["scheduler"]}`, read from the pixels by
`builtin_model/score.py` (background: most common palette color on the border; shape: largest
blob far from the background; color: its median; position: its box center on a 3×3 grid; size: its
box's longer side; kind: nearest rendered template). The scorers read 100 % of ground-truth renders.
Evaluated on {eval_hardware}.

{format_table(evaluations)}

Most common misses at the default guidance: {misses}.

![samples](samples.png)

The first 48 samples at the default settings, prompt under each.

## Limits

- One shape per scene, five kinds, twelve colors, two sizes, nine positions; nothing else. Words
  outside the vocabulary map to `<unk>` and are ignored; the model has no notion of them.
- 64×64 only (other sizes run but leave the training distribution).
- Trained on procedural data only: no people, no photographs, no text; it is a test fixture and a
  demonstration, not a general image model.
- The scores above are for the canonical sentences; the "Phrasing" section below (when present)
  scores the same scenes written as tags and in users' words.
- The `outline` LoRA's band is about 2 px on a small shape and 1.4 px on a small cross, whose
  hole the 16×16 latents barely hold: small crosses come out hollow least often (the "Adapters"
  section below has the rates by size and kind).
"""


def lineage(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A training record and the records of the runs it continued (each names the one before
    as its ``parent``), oldest first; empty for no record."""
    chain: list[dict[str, Any]] = []
    while record:
        chain.insert(0, record)
        record = record.get("parent")
    return chain


def _recorded_runs(path: Path) -> list[dict[str, Any]]:
    """The lineage of the record a tuning step leaves beside its weights (none: empty)."""
    return lineage(json.loads(path.read_text())) if path.is_file() else []


def _recipe(record: dict[str, Any]) -> str:
    """The training section: one stage from scratch, then each stage that continued it (a
    `refine` or `phrasing` run), oldest first, as their records say."""
    chain = lineage(record)
    root = chain[0]
    if len(chain) == 1:
        return (
            f"`python -m builtin_model.train --profile {root.get('profile', '?')}` (seed {root.get('seed', 0)}) "
            f"reproduces these weights; this copy was trained on {_trained_on(root)}.\n\n"
            + _from_scratch(root)
        )
    parts = [
        f"{len(chain)} stages, seed {record.get('seed', 0)}:",
        f"**Stage 1** — `python -m builtin_model.train --profile {root.get('profile', '?')} --steps {root.get('unet_steps', '?')} --out stage1`,\n"
        f"on {_trained_on(root)}:\n\n{_from_scratch(root)}",
    ]
    for n, stage in enumerate(chain[1:], start=2):
        out = "builtin_model/shapes-64" if n == len(chain) else f"stage{n}"
        parts.append(
            f"**Stage {n}** — `python -m builtin_model.train --profile {stage.get('profile', '?')} --init-from stage{n - 1} "
            f"--steps {stage.get('unet_steps', '?')} --out {out}`,\n"
            f"on {_trained_on(stage)}:\n{_continued(stage, n - 1)}"
        )
    parts.append(
        "Stages run on a GPU were fitted to their time budget, which recomputed the schedule's length as\n"
        "they ran; `--steps` lays the same schedule over that many steps from the start, so it reproduces\n"
        "the recipe but not bit for bit (GPU kernels are not bitwise deterministic either). CPU stages ran\n"
        "from seeded generators with a fixed step count."
    )
    return "\n\n".join(parts)


def _decoder_tune(model_dir: Path) -> str:
    """The VAE decoder's tune for thin structures (``builtin_model.tune_decoder``), its runs
    oldest first, when the VAE carries its record."""
    runs = _recorded_runs(model_dir / "vae" / "decoder_tune.json")
    if not runs:
        return ""
    first, last = runs[0]["before"], runs[-1]["after"]
    listed = "; ".join(
        f"{r['steps']} steps of batch {r['batch']}, lr {r['lr']:g}{_decoder_options(r)}, "
        f"{r['train_s'] / 60:.0f} min on {r.get('hardware', 'CPU')}, hollow "
        f"{100 * r['before']['hollow']:.1f} → {100 * r['after']['hollow']:.1f} % "
        f"({r.get('score_n', 256)} scenes)"
        for r in runs
    )
    others = [
        k for k in first if k.startswith("filled_") and k not in ("filled_kind", "filled_mse")
    ]
    return (
        "\n\n**VAE decoder tune** — `python -m builtin_model.tune_decoder`, "
        f"{len(runs)} run(s), each continuing the last ({listed}): the encoder frozen (every latent "
        "the UNet, the adapters and the latent cache saw is unchanged), the decoder trained on "
        "filled and hollow scenes with the VAE's loss, so thin outlines survive decoding. Round "
        f"trips of fresh training scenes, first run's before → last run's after: hollow shapes still hollow "
        f"{100 * first['hollow']:.1f} % → {100 * last['hollow']:.1f} %, their color read right "
        f"{100 * first['hollow_color']:.1f} % → {100 * last['hollow_color']:.1f} %; filled "
        f"scenes' kind {100 * first['filled_kind']:.1f} % → {100 * last['filled_kind']:.1f} %, "
        f"their other attributes {min(100 * first[k] for k in others):.0f} % → "
        f"{min(100 * last[k] for k in others):.0f} %."
    )


def _decoder_options(run: dict[str, Any]) -> str:
    share = run.get("hollow_share", 0.5)
    return (f", {100 * share:.0f} % hollow" if share != 0.5 else "") + (
        ", loss per scene" if run.get("per_scene") else ""
    )


def _text_refine(model_dir: Path) -> str:
    """The text encoder's phrasing refine (``builtin_model.refine_text``), its runs oldest
    first, when the encoder carries its record."""
    runs = _recorded_runs(model_dir / "text_encoder" / "text_refine.json")
    if not runs:
        return ""
    first, last = runs[0]["validation_before"], runs[-1]["validation_after"]
    listed = "; ".join(
        f"`{r['command']}`: {r['steps']} steps of batch {r['batch']}, lr {r['lr']:g}, keep "
        f"weight {r['keep_weight']:g}, {r['train_s'] / 60:.0f} min on {r.get('hardware', 'CPU')}"
        for r in runs
    )
    return (
        "\n\n**Text encoder phrasing refine** — `python -m builtin_model.refine_text`, "
        f"{len(runs)} run(s){', each continuing the last' if len(runs) > 1 else ''} ({listed}): "
        "the text encoder alone "
        "learns (UNet, VAE and tokenizer unchanged), distilled from its own starting weights. "
        "For a training scene written another way (tags in any order, synonyms, capitals, "
        "punctuation; every attribute named), the UNet's cross-attention outputs, for the queries "
        "of its own pass on the canonical sentence, are pulled towards those of the canonical "
        "sentence; the canonical sentence and the empty prompt are held where they were (so "
        "the adapters and `shapes-64-fast`, which share this encoder, keep their inputs). On "
        f"{runs[-1]['validation_scenes']} fixed training scenes (a validation set, not the "
        "held-out scenes): the UNet's ε for the other phrasing against the canonical sentence's, "
        f"mean squared gap {first['eps_gap']:.2e} → {last['eps_gap']:.2e}; the canonical "
        f"sentence's own gap {last['eps_gap_canonical']:.1e} after."
    )


def _continued(record: dict[str, Any], previous: int) -> str:
    r = record.get("recipe", {})
    words = record.get("vocabulary_added") or []
    grew = (
        f"the tokenizer grew by {len(words)} words people write ({', '.join(f'`{w}`' for w in words[:12])}"
        f"{', ...' if len(words) > 12 else ''}), each new embedding row started from a synonym's (`bg` from\n"
        f"`background`, `tiny` from `small`, `upper` from `top`, punctuation from `,`); "
        if words
        else f"stage {previous}'s vocabulary; "
    )
    phrasing = (
        grew
        + f"{r.get('captions_per_image', 1)} captions cached per scene, {100 * r.get('phrasing', 0):.0f} % of them "
        "written as users write prompts (`data.user_caption`: tags in any order, synonyms, capitals,\n"
        "punctuation, a few unknown filler words), the rest the original captions; token embeddings at lr "
        f"{r.get('embed_lr', '?')};\n"
        if r.get("phrasing")
        else ""
    )
    if r.get("mismatch"):
        # The image-to-image stage: it continued the shipped pipeline, decoder tune and text
        # refine (below) included, with the text encoder frozen.
        second = (
            f" on the same ramp {100 * r['second_shape']:.0f} % of the rows (before any swap) drawn from"
            f" {r.get('second_shape_images', '?')} pictures with a second, small shape that only the caption names, the first"
            " unmentioned, as an inpainting job asks (so that doubtful captions do not teach the model to leave a masked region empty);\n"
            if r.get("second_shape")
            else " "
        )
        return f"""the pipeline as shipped before it (stage {previous}, then the VAE decoder tune and the text refine below) continued:
{r.get("images", "?")} fresh scenes encoded ({record.get("cache_s", 0):.0f} s), captions as stage {previous} drew them; the text encoder frozen;
below t = {r.get("mismatch_from")} {100 * r["mismatch"]:.0f} % of the captions swapped for another scene's, falling linearly to none at
t = {r.get("mismatch_to")}, so that at low noise the picture decides and the caption only where the noise hides it (image-to-image
at low strength keeps its input, as Stable Diffusion's does);{second}UNet continued for {record.get("unet_steps", "?")} steps of batch {r.get("batch", "?")},
AdamW lr {r.get("unet_lr", "?")}, {r.get("warmup", "?")} warm-up steps then cosine to 10 %, the same loss, caption dropout and EMA
({record.get("unet_s", 0) / 60:.1f} min, {record.get("unet_s_per_step", 0):.3f} s/step). Final loss {record.get("final_loss", float("nan")):.4f}."""
    return f"""stage {previous}'s VAE and `scaling_factor` kept; {r.get("images", "?")} fresh scenes encoded ({record.get("cache_s", 0):.0f} s);
{phrasing}text encoder + UNet continued for {record.get("unet_steps", "?")} steps of batch {r.get("batch", "?")}, AdamW lr {r.get("unet_lr", "?")} (UNet) /
{r.get("text_lr", "?")} (text), {r.get("warmup", "?")} warm-up steps then cosine to 10 %, the same loss, caption dropout and EMA
({record.get("unet_s", 0) / 60:.1f} min, {record.get("unet_s_per_step", 0):.3f} s/step). Final loss {record.get("final_loss", float("nan")):.4f}."""


def _trained_on(record: dict[str, Any]) -> str:
    vae = f"VAE {record.get('vae_s', 0):.0f} s, " if record.get("vae_from") is None else ""
    return (
        f"**{record.get('hardware', '?')}** in **{record.get('train_s', 0) / 60:.1f} minutes** wall "
        f"({vae}latent cache {record.get('cache_s', 0):.0f} s, "
        f"text encoder + UNet {record.get('unet_s', 0):.0f} s)"
    )


def _from_scratch(record: dict[str, Any]) -> str:
    r = record.get("recipe", {})
    crop = (
        f" on random {r['vae_crop']}×{r['vae_crop']} crops, then {r['vae_full_steps']} at 64×64"
        if r.get("vae_crop")
        else ""
    )
    return f"""1. VAE: {r.get("vae_steps", "?")} steps of batch {r.get("vae_batch", "?")}{crop},
   AdamW lr {r.get("vae_lr", "?")}, loss MSE + ½ L1 (shape pixels weighted 8×) + 1e-5 KL, on freshly rendered scenes each step.
2. Latent cache: {r.get("images", "?")} scenes with one caption each, encoded once (posterior mean and std);
   latents scaled to unit spread (`scaling_factor` = {record.get("scaling_factor", 0):.4f}).
3. Text encoder + UNet, jointly: {record.get("unet_steps", "?")} steps of batch {r.get("batch", "?")}, AdamW lr {r.get("unet_lr", "?")} (UNet) /
   {r.get("text_lr", "?")} (text), {r.get("warmup", "?")} warm-up steps then cosine to 10 %, ε-prediction MSE with min-SNR-5 weighting,
   10 % caption dropout (to the empty prompt) for classifier-free guidance, EMA 0.999 (the saved weights),
   bf16 autocast on GPU. Final loss {record.get("final_loss", float("nan")):.4f}."""


def _common_misses(ev: Evaluation) -> str:
    from collections import Counter

    c: Counter[str] = Counter()
    for reading, scene in zip(ev.readings, ev.scenes, strict=True):
        for a in ATTRIBUTES:
            got = getattr(reading, a)
            if got != getattr(scene, a):
                c[f"{a} {getattr(scene, a)} → {got or 'none'}"] += 1
    return ", ".join(f"{k} ({v})" for k, v in c.most_common(6)) or "none"
