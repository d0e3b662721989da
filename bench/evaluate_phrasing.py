"""Score ``shapes-64`` per phrasing style: the same held-out scenes asked for as the canonical
sentence, as tags in a shuffled order, and in words users write.

    python bench/evaluate_phrasing.py                          # the shipped model, CPU, 3 seeds
    python bench/evaluate_phrasing.py --model-dir /tmp/shapes-64-phrasing --write-card

Styles (each prompt drawn from a seeded generator per scene and seed, so runs repeat):

- ``canonical``: ``Scene.prompt()``, "a large red circle at the left on a blue background";
- ``tags``: "red circle, large, left, blue background" with the four tags in a random order;
- ``user``: "A big Red circle upper left, blue bg." — size synonyms (big, huge, tiny, little),
  "upper/lower/middle" positions, "bg", "on blue", capitals, trailing punctuation, a leading
  "a"/"the" or none.

The held-out scenes (``data.held_out_scenes()``) never appear in training; this file's
phrasings are written here, apart from the training captions (``data.user_caption``). Every
attribute is read from the pixels by ``builtin_model/score.py``; ``all`` is the share of images
with all five right. Runs at the model's served defaults (steps, guidance, scheduler).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builtin_model import MODEL_DIR, card, data
from builtin_model.score import ATTRIBUTES, read_image

STYLES = ("canonical", "tags", "user")

_USER_SIZE = {"large": ("big", "huge", "Large", "big"), "small": ("tiny", "small", "little")}
_UPPER = {"top": "upper", "bottom": "lower"}
_USER_BG = ("{} bg", "{} background", "{} bg", "bg {}")
_USER_END = (".", "!", "", ";", ".")
_USER_LEAD = ("A ", "The ", "", "a ")


def _user_position(position: str, rng: random.Random) -> str:
    words = position.split()
    if position == "center":
        return rng.choice(("middle", "centre", "center", "in the middle"))
    if len(words) == 2:  # a corner
        v, h = words
        return rng.choice((f"{_UPPER[v]} {h}", f"{v}-{h}", f"{_UPPER[v]} {h} corner"))
    if position in _UPPER:
        return rng.choice((f"{_UPPER[position]} middle", position, f"{position} center"))
    return rng.choice((f"middle {position}", f"{position} side", position))


def phrase(scene: data.Scene, style: str, rng: random.Random) -> str:
    """The prompt for ``scene`` in ``style``."""
    if style == "canonical":
        return scene.prompt()
    if style == "tags":
        tags = [f"{scene.color} {scene.kind}", scene.size, scene.position]
        tags.append(f"{scene.background} background")
        rng.shuffle(tags)
        return ", ".join(tags)
    assert style == "user", style
    size = rng.choice(_USER_SIZE[scene.size])
    color = scene.color.capitalize() if rng.random() < 0.5 else scene.color
    obj = f"{rng.choice(_USER_LEAD)}{size} {color} {scene.kind}"
    where = _user_position(scene.position, rng)
    end = rng.choice(_USER_END)
    if rng.random() < 0.3:  # "X on Y"
        return f"{obj} on {scene.background}, {where}{end}"
    return f"{obj} {where}, {rng.choice(_USER_BG).format(scene.background)}{end}"


def prompts_for(scenes: list[data.Scene], style: str, seed: int) -> list[str]:
    rng = random.Random(f"{style}-{seed}")
    return [phrase(s, style, rng) for s in scenes]


def evaluate(
    pipe: object, scenes: list[data.Scene], seeds: int, steps: int, guidance: float, batch: int
) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    for style in STYLES:
        jobs = [
            (s, p, seed)
            for seed in range(seeds)
            for s, p in zip(scenes, prompts_for(scenes, style, seed), strict=True)
        ]
        hits: list[dict[str, bool]] = []
        started = time.perf_counter()
        for i in range(0, len(jobs), batch):
            chunk = jobs[i : i + batch]
            out = pipe(  # type: ignore[operator]
                prompt=[p for _, p, _ in chunk],
                negative_prompt=[""] * len(chunk),
                width=data.IMAGE_SIZE,
                height=data.IMAGE_SIZE,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(seed) for _, _, seed in chunk],
                output_type="pil",
            )
            hits += [
                read_image(im).matches(s) for im, (s, _, _) in zip(out.images, chunk, strict=True)
            ]
        acc = {a: sum(h[a] for h in hits) / len(hits) for a in ATTRIBUTES}
        acc["all"] = sum(all(h.values()) for h in hits) / len(hits)
        results[style] = {
            "images": len(hits),
            "accuracy": acc,
            "examples": [p for _, p, _ in jobs[:4]],
            "seconds": round(time.perf_counter() - started, 1),
        }
    return results


def table(results: dict[str, dict[str, object]]) -> str:
    cols = (*ATTRIBUTES, "all")
    rows = [
        "| style | images | " + " | ".join(cols) + " | worst gap to canonical |",
        "|---|---:|" + "---:|" * len(cols) + "---:|",
    ]
    base = results["canonical"]["accuracy"]
    assert isinstance(base, dict)
    for style, r in results.items():
        acc = r["accuracy"]
        assert isinstance(acc, dict)
        gap = max(base[a] - acc[a] for a in ATTRIBUTES)
        cells = " | ".join(f"{100 * acc[a]:.1f} %" for a in cols)
        rows.append(f"| {style} | {r['images']} | {cells} | {100 * gap:+.1f} pts |")
    return "\n".join(rows)


def examples(results: dict[str, dict[str, object]]) -> str:
    lines = []
    for style, r in results.items():
        ex = r["examples"]
        assert isinstance(ex, list)
        lines.append(f"- `{style}`: " + "; ".join(f'"{p}"' for p in ex[:3]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--limit", type=int, help="score only the first N held-out scenes")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--write-card", action="store_true", help="put the table in the card")
    parser.add_argument(
        "--results", type=Path, help="print (and --write-card) a --json file of an earlier run"
    )
    args = parser.parse_args()
    if args.results:
        saved = json.loads(args.results.read_text())
        report(saved["setup"], saved["results"], args.model_dir, args.write_card)
        return

    device = torch.device(args.device)
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    defaults = json.loads((args.model_dir / "imagegen.json").read_text())
    pipe = card.load(args.model_dir, device)
    scenes = list(data.held_out_scenes())[: args.limit]
    results = evaluate(
        pipe, scenes, args.seeds, defaults["steps"], defaults["guidance_scale"], args.batch
    )
    head = (
        f"{len(scenes)} held-out scenes × {args.seeds} seeds per style, "
        f"{defaults['steps']} steps `{defaults['scheduler']}`, guidance "
        f"{defaults['guidance_scale']:g}, on {hardware}; model {args.model_dir}"
    )
    if args.json:
        args.json.write_text(json.dumps({"setup": head, "results": results}, indent=2) + "\n")
    report(head, results, args.model_dir, args.write_card)


def report(
    head: str, results: dict[str, dict[str, object]], model_dir: Path, to_card: bool
) -> None:
    print(head + "\n")
    print(table(results))
    print("\nexamples:\n" + examples(results))
    if to_card:
        body = f"""## Phrasing (held-out scenes, per prompt style)

Scored by `python bench/evaluate_phrasing.py --write-card`: {head.split("; model")[0]}.
Every attribute read from the pixels; `all` = all five right; the last column is the largest
drop of any attribute against the canonical sentences.

{table(results)}

{examples(results)}
"""
        card.write_section(model_dir, "phrasing", body)
        print(f"wrote the phrasing section of {model_dir}/README.md")


if __name__ == "__main__":
    main()
