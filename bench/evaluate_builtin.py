"""Score the built-in ``shapes-64`` model on its held-out prompts, from the pixels alone.

    python bench/evaluate_builtin.py                 # 48 held-out combinations × 3 seeds, CPU
    python bench/evaluate_builtin.py --write-card    # also refresh the card, scores, samples

Prints the score table at the served default guidance and at ``guidance_scale = 1``, then the
latency of one 64×64 image at the served defaults, as a ratio to the unguided image measured in
the same run and to the 1.0 s budget, and the same image end to end through the service
(redis-server, gateway and a worker started for the run; HTTP submit → PNG downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builtin_model import MODEL_DIR, card, data
from builtin_model.score import format_table

LATENCY_BUDGET_S = 1.0


def latency(pipe: object, steps: int, guidance_scale: float, runs: int) -> float:
    """Best-of-``runs`` seconds for one image, batch 1, after a warm-up run (the minimum, since
    on a shared machine every other statistic measures the neighbours)."""
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        pipe(  # type: ignore[operator]
            prompt="a large blue square in the center on a yellow background",
            width=data.IMAGE_SIZE,
            height=data.IMAGE_SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(i),
        )
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def service_latency(runs: int, steps: int, guidance_scale: float) -> float:
    """Best-of-``runs`` seconds from the HTTP submit to the downloaded PNG, one job at a time,
    through a private service whose worker serves the shipped model (after a warm-up job)."""
    from _service import generate, now, service

    body = {
        "prompt": "a large blue square in the center on a yellow background",
        "steps": steps,
        "guidance_scale": guidance_scale,
    }
    times = []
    with service() as gateway, gateway.client() as client:
        for i in range(runs + 1):
            started = now()
            generate(client, {**body, "seed": i})
            if i:
                times.append(now() - started)
    return min(times)


def edits_card(scores: object, scenes: int) -> str:
    """The model card's "Images in" section from `edit_score` results."""
    from edit_score import TARGETS, EditScores, other_prompt_curve

    assert isinstance(scores, EditScores)
    curve = other_prompt_curve(scores)
    strengths = " | ".join(f"{s:g}" for s, _, _ in curve)
    keeps = " | ".join(f"{k:.0%}" for _, k, _ in curve)
    follows = " | ".join(f"{f:.0%}" for _, _, f in curve)
    keep_target = "img2img_keep_0.3_other_prompt"
    behind = (
        ""
        if scores.rate(keep_target) >= TARGETS[keep_target]
        else "\nThis one does not yet: under another caption it repaints the input's colours at "
        "low\nstrengths too. The recipe's `keep` stage (`--profile keep`, run after the others) "
        "is\nwhat teaches it to; its figures are in `bench/README.md`."
    )
    return f"""## Images in: image-to-image, inpainting, outpainting

Scored by `python bench/evaluate_builtin.py --edits` on the {scenes} held-out scenes (seed 0),
through the worker's own path (the batch loop, then the exact composite of kept pixels), at
the served defaults. The UNet is the 4-channel text-to-image one: inpainting and outpainting
blend latents as diffusers' `StableDiffusionInpaintPipeline` does with such a UNet (no
9-channel variant was trained: blending meets every target). See `bench/edit_score.py`
for each test.

{scores.table()}

Image-to-image of scene A's picture under another scene B's caption, by strength. Stable
Diffusion keeps its input at a low strength whatever the prompt says, draws the prompt at 1.0
and blends between; the targets above ask the same of this model.{behind}

| strength | {strengths} |
|---|{"---|" * len(curve)}
| keeps A (kind, place, color, background) | {keeps} |
| follows B (place, color, background) | {follows} |

- `img2img_keep_0.3`: input scene A under its own caption at strength 0.3; kind, place, shape
  color and background all read back as A's. `img2img_keep_0.3_other_prompt`: the same under B's
  caption.
- `img2img_follow_1.0`: strength 1.0, B's caption: background, color and place read back as
  B's (kind reported apart).
- `img2img_other_prompt_monotone_blend`: along the strengths above, keeping A never rises and
  following B never falls.
- `inpaint_color`: a 22×22 mask on a cell the first shape does not touch (one scene has no
  such cell), a caption naming a small second shape of another color there: the masked
  area's dominant non-background color is the caption's. `inpaint_untouched`: every pixel
  outside the mask is the input's, exactly.
- `outpaint_background`: 64×64 → +32 px on the right (96×64), the scene's own caption: the new
  area's dominant color is the caption's background. `outpaint_canvas_exact`: the original
  64×64 canvas is the input's, exactly.
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--limit", type=int, help="score only the first N held-out combinations")
    parser.add_argument("--latency-runs", type=int, default=5)
    parser.add_argument(
        "--service-runs", type=int, default=5, help="jobs timed through the service (0: skip)"
    )
    parser.add_argument("--write-card", action="store_true")
    parser.add_argument(
        "--edits",
        action="store_true",
        help="score image-to-image, inpainting and outpainting instead (builtin_model/edit_score)",
    )
    args = parser.parse_args()
    if args.edits:
        from edit_score import evaluate_edits

        edit_scenes = list(data.held_out_scenes())[: args.limit]
        started = time.perf_counter()
        scores = evaluate_edits(str(args.model_dir), args.device, edit_scenes)
        took = time.perf_counter() - started
        print(f"images in, {len(edit_scenes)} held-out scenes, seed 0 ({took:.0f} s)\n")
        print(scores.table())
        if args.write_card:
            card.write_section(args.model_dir, "images-in", edits_card(scores, len(edit_scenes)))
            print(f"wrote the images-in section of {args.model_dir}/README.md")
        return

    device = torch.device(args.device)
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    scenes = list(data.held_out_scenes())[: args.limit]
    evaluations = card.evaluate_dir(args.model_dir, device, seeds=range(args.seeds), scenes=scenes)
    print(f"{len(scenes)} held-out combinations × {args.seeds} seeds on {hardware}\n")
    print(format_table(evaluations))

    defaults = json.loads((args.model_dir / "imagegen.json").read_text())
    pipe = card.load(args.model_dir, device)
    guided = latency(pipe, defaults["steps"], defaults["guidance_scale"], args.latency_runs)
    unguided = latency(pipe, defaults["steps"], 1.0, args.latency_runs)
    print(
        f"\nlatency, one 64×64 image, {defaults['steps']} steps `{defaults['scheduler']}`: "
        f"guidance {defaults['guidance_scale']:g} {guided * 1000:.0f} ms, "
        f"guidance 1 {unguided * 1000:.0f} ms (ratio {guided / unguided:.2f}); "
        f"{guided / LATENCY_BUDGET_S:.2f}× the {LATENCY_BUDGET_S:g} s budget"
    )
    served = None
    if args.service_runs and args.model_dir.resolve() == MODEL_DIR.resolve():
        served = service_latency(args.service_runs, defaults["steps"], defaults["guidance_scale"])
        print(
            f"through the service (submit → PNG downloaded, best of {args.service_runs}): "
            f"{served * 1000:.0f} ms, ratio {served / guided:.2f} to the pipeline call"
        )
    elif args.service_runs:
        print(f"through the service: skipped (the service serves {MODEL_DIR}, not this model)")

    if args.write_card:
        record = json.loads((args.model_dir / "train_state.json").read_text())
        measured = {
            "seconds": guided,
            "steps": defaults["steps"],
            "guidance_scale": defaults["guidance_scale"],
            "runs": args.latency_runs,
            "hardware": hardware,
            "service_seconds": served,
            "service_runs": args.service_runs,
        }
        card.write(args.model_dir, record, evaluations, hardware, measured)
        print(f"wrote {args.model_dir}/README.md, scores.json, samples.png")


if __name__ == "__main__":
    main()
