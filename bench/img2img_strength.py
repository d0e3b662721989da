"""The built-in model's image-to-image across strengths, under another scene's caption.

Issue 33's item 8: with Stable Diffusion, strength 0.3 keeps an input's composition and colours
whatever the prompt says, 0.6-0.8 blend, and 1.0 follows the prompt. For each held-out scene A
(the scenes `bench/edit_score.py` uses) and the other scene B it pairs A with, this runs A's
picture under B's caption at each strength, through the worker's own path, and reports:

- `keep A`: the output still has A's shape kind, place, shape colour and background;
- `follow B`: the output has B's place, shape colour and background.

With `--guidance` it also runs every strength at other guidance scales: whether classifier-free
guidance is what overrides the input at low strength (the conditional and unconditional
predictions parting at low noise), or the model itself.

    python bench/img2img_strength.py --limit 48 --guidance 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edit_score import render_scene

from builtin_model import MODEL_DIR, data
from builtin_model.score import read_image

STRENGTHS = (0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--limit", type=int, default=48, help="the first N held-out scenes")
    parser.add_argument(
        "--guidance", type=float, nargs="*", default=[], help="guidance scales besides the card's"
    )
    args = parser.parse_args()

    from imagegen.core.contract import InputRef, JobSpec
    from imagegen.core.settings import Settings
    from worker.batch_loop import BatchItem
    from worker.inference import Inference
    from worker.pipeline import load_model

    defaults = json.loads((args.model_dir / "imagegen.json").read_text())
    model = load_model(Settings(model=str(args.model_dir), model_id=defaults["id"]))
    inference = Inference(model)
    ref = InputRef(sha256="0" * 64, width=64, height=64)
    scenes = list(data.held_out_scenes())[: args.limit]
    n = len(scenes)
    pairs = []
    for i, a in enumerate(scenes):  # B as bench/edit_score.py picks it
        b = scenes[(i + 1 + n // 2) % n]
        if b.background == a.background and b.color == a.color:
            b = scenes[(i + 1) % n]
        pairs.append((a, b, render_scene(a, i)))

    def spec(prompt: str, strength: float, guidance: float) -> JobSpec:
        return JobSpec(
            prompt=prompt,
            negative_prompt="",
            width=64,
            height=64,
            steps=defaults["steps"],
            guidance_scale=guidance,
            seed=0,
            n=1,
            scheduler=defaults["scheduler"],
            model=defaults["id"],
            task="img2img",
            image=ref,
            strength=strength,
        )

    scales = [float(defaults["guidance_scale"]), *args.guidance]
    print(f"{n} held-out scenes, A's picture under B's caption, steps {defaults['steps']}\n")
    print("| guidance | strength | keep A | follow B |")
    print("|---|---|---|---|")
    started = time.perf_counter()
    for guidance in scales:
        for strength in STRENGTHS:
            keep = follow = 0
            for start in range(0, n, BATCH):
                chunk = pairs[start : start + BATCH]
                items = [BatchItem(spec(b.prompt(), strength, guidance), image=im)
                         for _, b, im in chunk]  # fmt: skip
                for (a, b, _), result in zip(chunk, inference.run(items), strict=True):
                    assert not isinstance(result, BaseException), result
                    out = read_image(result[0].convert("RGB"))
                    got = (out.kind, out.position, out.color, out.background)
                    keep += got == (a.kind, a.position, a.color, a.background)
                    follow += got[1:] == (b.position, b.color, b.background)
            print(f"| {guidance:g} | {strength:g} | {keep / n:.0%} ({keep}/{n}) "
                  f"| {follow / n:.0%} ({follow}/{n}) |", flush=True)  # fmt: skip
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
