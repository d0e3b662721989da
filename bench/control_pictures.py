"""The pictures of docs/control.md: for each preprocessor the built-in model serves, a user's
picture, the map the worker makes of it, and what `shapes-64` draws from that map.

    python bench/control_pictures.py            # writes docs/control.png

Rows: `canny` of a picture of a shape (noisy, as a photo is) into the `sketch` ControlNet under
a prompt naming other colours; a wobbly hand-drawn scribble (`none`: the drawing is the map)
into `sketch`; `scribble` (XDoG) of a pencil drawing into `sketch`; a white shape on black into
`silhouette`. Each output is one job through the worker's batch loop with the served defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluate_adapters import generate, spec_for

from builtin_model import MODEL_DIR, adapter_data, data
from imagegen.core.contract import ControlRef, InputRef
from imagegen.core.settings import Settings

SCALE = 4  # each 64-pixel tile drawn 4x, nearest


def photo_of(scene: data.Scene, seed: int) -> Image.Image:
    """The scene rendered, with sensor-like noise: what a user's picture of a shape looks like."""
    batch = data.scenes_from_list([scene], torch.Generator().manual_seed(seed))
    pixels = data.to_uint8(data.render(batch))[0].astype(np.int16)
    noise = np.random.default_rng(seed).normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def scribble_of(scene: data.Scene, seed: int) -> Image.Image:
    """A hand-drawn-looking outline: wobbly, with gaps, white on black."""
    batch = data.scenes_from_list([scene], torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    line = adapter_data.render_sketch(batch, g, wobble_px=1.5, gap_share=0.15)
    return Image.fromarray(data.to_uint8(line * 2 - 1)[0])


def pencil_drawing(seed: int) -> Image.Image:
    """Dark pencil lines on white paper: a triangle drawn by hand (what `scribble` reads)."""
    rng = np.random.default_rng(seed)
    paper = Image.new("RGB", (64, 64), (235, 232, 225))
    draw = ImageDraw.Draw(paper)
    corners = [(44, 16), (58, 50), (30, 50)]
    for a, b in zip(corners, corners[1:] + corners[:1], strict=True):
        jitter = rng.normal(0, 0.8, 4)
        draw.line([a[0] + jitter[0], a[1] + jitter[1], b[0] + jitter[2], b[1] + jitter[3]],
                  fill=(40, 40, 45), width=2)  # fmt: skip
    return paper


def silhouette_of(scene: data.Scene, seed: int) -> Image.Image:
    batch = data.scenes_from_list([scene], torch.Generator().manual_seed(seed))
    return Image.fromarray(data.to_uint8(adapter_data.render_silhouette(batch) * 2 - 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--out", type=Path, default=Path("docs/control.png"))
    args = parser.parse_args()
    from worker.pipeline import load_model
    from worker.preprocessors import canny, scribble

    model = load_model(Settings(model=str(args.model_dir), device="cpu", compile=False))
    circle = data.Scene("circle", "red", "white", "large", "top left")
    square = data.Scene("square", "green", "black", "large", "center")
    cross = data.Scene("cross", "yellow", "blue", "large", "bottom right")
    photo = photo_of(circle, 1)
    drawing = pencil_drawing(3)
    prompts = [
        "a large blue circle on a yellow background",
        "a large purple square on a white background",
        "a large orange triangle on a black background",
        "a large red cross on a white background",
    ]
    rows = [
        ("canny", "sketch", photo, canny(photo), prompts[0]),
        ("none", "sketch", scribble_of(square, 2), None, prompts[1]),
        ("scribble", "sketch", drawing, scribble(drawing), prompts[2]),
        ("none", "silhouette", silhouette_of(cross, 4), None, prompts[3]),
    ]
    ref = InputRef(sha256="0" * 64, width=64, height=64)
    tiles = []
    for preprocess, control_id, picture, made, prompt in rows:
        control_map = made if made is not None else picture
        control = ControlRef(id=control_id, scale=1.0, start=0.0, end=1.0, image=ref)
        spec = spec_for(model, prompt, 7, controls=(control,))
        (output,) = generate(model, [spec], [control_map])
        tiles.append([picture, control_map, output])
        print(f"{preprocess:>8} -> {control_id}: {prompt}")
    side = 64 * SCALE
    sheet = Image.new("RGB", (3 * side + 4 * 8, len(tiles) * side + (len(tiles) + 1) * 8), "white")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            big = tile.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(big, (8 + c * (side + 8), 8 + r * (side + 8)))
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
