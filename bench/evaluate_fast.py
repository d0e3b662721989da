"""shapes-64-fast against shapes-64: held-out prompt-following rates and speed per image on CPU.

    OMP_NUM_THREADS=1 python bench/evaluate_fast.py [--rescore-base] [--write-card]

Both models are scored by the built-in evaluator (builtin_model.score) on the 48 held-out
attribute combinations (never trained on, by either model), 3 seeds each, at their served
defaults. The base model's rates come from its scores.json (measured by
bench/evaluate_builtin.py on the same scenes and seeds) unless --rescore-base. Speed is measured
here, in one process, for both: the best of 5 single-image pipeline calls each. Targets: the fast
model's every rate ≥ 90 % of the base model's, and ≥ 3× faster per image.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from builtin_model import MODEL_DIR, card, data
from builtin_model.score import evaluate_pipeline, format_table

FAST_DIR = MODEL_DIR.parent / "shapes-64-fast"


def latency(pipe: object, defaults: dict[str, object], runs: int) -> float:
    times = []
    for i in range(runs + 1):
        started = time.perf_counter()
        pipe(  # type: ignore[operator]
            prompt="a large red circle in the center on a blue background",
            num_inference_steps=defaults["steps"],
            guidance_scale=defaults["guidance_scale"],
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(i),
        )
        if i:
            times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast-dir", type=Path, default=FAST_DIR)
    ap.add_argument("--rescore-base", action="store_true")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--base-dir", type=Path, default=MODEL_DIR, help="the teacher")
    ap.add_argument("--device", default="cpu", help="cuda: a quick figure on a lent GPU")
    ap.add_argument("--write-card", action="store_true")
    args = ap.parse_args()
    hardware = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    scenes = list(data.held_out_scenes())
    fast_defaults = json.loads((args.fast_dir / "imagegen.json").read_text())
    base_defaults = json.loads((args.base_dir / "imagegen.json").read_text())

    fast_pipe = card.load(args.fast_dir, args.device)
    fast = evaluate_pipeline(
        fast_pipe,
        scenes,
        (0, 1, 2),
        fast_defaults["steps"],
        fast_defaults["guidance_scale"],
        24,
    )
    base_pipe = card.load(args.base_dir, args.device)
    if args.rescore_base:
        base_eval = evaluate_pipeline(
            base_pipe, scenes, (0, 1, 2), base_defaults["steps"], base_defaults["guidance_scale"]
        )
        base_rates = base_eval.accuracy
    else:
        stored = json.loads((args.base_dir / "scores.json").read_text())["evaluations"][0]
        base_rates = stored["accuracy"]
    print(f"{len(scenes)} held-out combinations x 3 seeds on {hardware}\n")
    print(format_table([fast]))
    ratios = {a: fast.accuracy[a] / base_rates[a] for a in base_rates}
    for attribute, ratio in ratios.items():
        print(
            f"{attribute}: fast {fast.accuracy[attribute]:.1%} / base {base_rates[attribute]:.1%}"
            f" = {ratio:.2f} of the base rate"
        )
    t_fast = latency(fast_pipe, fast_defaults, args.runs)
    t_base = latency(base_pipe, base_defaults, args.runs)
    speedup = t_base / t_fast
    print(
        f"one 64x64 image: base ({base_defaults['steps']} steps, guidance "
        f"{base_defaults['guidance_scale']:g}) {t_base * 1000:.0f} ms, fast "
        f"({fast_defaults['steps']} steps, guidance {fast_defaults['guidance_scale']:g}) "
        f"{t_fast * 1000:.0f} ms: {speedup:.2f}x faster"
    )
    met = min(ratios.values()) >= 0.9 and speedup >= 3
    print(f"targets (every rate >= 0.90 of the base, >= 3x faster): {'met' if met else 'NOT met'}")
    if args.write_card:
        record = json.loads((args.fast_dir / "train_state.json").read_text())
        scores = {
            "eval_hardware": hardware,
            "held_out_combinations": len(scenes),
            "evaluations": [
                {
                    "guidance_scale": fast.guidance_scale,
                    "steps": fast.steps,
                    "images": len(fast.images),
                    "accuracy": fast.accuracy,
                    "seconds_per_image_batched": fast.seconds_per_image,
                }
            ],
            "base_accuracy": base_rates,
            "rate_ratios": ratios,
            "latency": {"fast_seconds": t_fast, "base_seconds": t_base, "speedup": speedup},
            "targets_met": met,
        }
        (args.fast_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        refined = (args.fast_dir / "text_encoder" / "text_refine.json").is_file()
        refine_note = (
            " The text encoder was refined after the distillation (`builtin_model.refine_text`,\n"
            "shapes-64's card): other phrasings now read like the canonical sentence, which keeps"
            "\nits encoding, as does the empty prompt; the figures below are with it."
            if refined
            else ""
        )
        rows = "\n".join(
            f"| {a} | {fast.accuracy[a]:.1%} | {base_rates[a]:.1%} | {r:.2f} |"
            for a, r in ratios.items()
        )
        (args.fast_dir / "README.md").write_text(
            f"""# shapes-64-fast

A few-step model distilled from [shapes-64](../shapes-64/README.md) by
`python -m builtin_model.distill` (step distillation on the teacher's own trajectories,
sampled with DDIM; recipe in that module's docstring): {fast_defaults["steps"]} steps of
`{fast_defaults["scheduler"]}`, guidance baked in (served at guidance
{fast_defaults["guidance_scale"]:g}: one UNet call per step). Its VAE, text encoder and tokenizer
are shapes-64's, byte for byte: a worker serving both loads them once.{refine_note}

Training: {record["trajectories"]} teacher trajectories (training prompts only; the held-out
combinations are never drawn), {record["student_steps"]} student steps of batch
{record["batch"]}, lr {record["lr"]:g}, seed {record["seed"]}, {record["train_s"]:.0f} s on
{record.get("hardware", "a shared 2-core CPU")}.

Evaluation (`python bench/evaluate_fast.py`, {hardware}, {len(scenes)} held-out combinations x 3
seeds, the same evaluator and scenes as shapes-64's card):

| attribute | shapes-64-fast | shapes-64 | ratio |
|---|---:|---:|---:|
{rows}

One 64x64 image: {t_fast * 1000:.0f} ms against {t_base * 1000:.0f} ms for shapes-64 at its
defaults, {speedup:.2f}x faster (best of {args.runs}, same process).
Targets (every rate at least 0.90 of the base's, at least 3x faster): {"met" if met else "NOT met"}.

Limits: as shapes-64 (64x64 scenes of one shape on a flat background); `max_steps` 8 — the
model was trained for its 4 DDIM timesteps, more steps do not help.
"""
        )
        print(f"wrote {args.fast_dir}/scores.json and README.md")


if __name__ == "__main__":
    main()
