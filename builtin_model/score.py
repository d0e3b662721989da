"""Score generated scenes from their pixels alone, and evaluate a pipeline on held-out prompts.

Per image: background = most common palette color on the border; the shape = the largest
connected blob of pixels far from the background; its color = the median of the blob; its
position = the center of its bounding box on a 3×3 grid; its size = the bounding box's longer
side against a threshold between the two size ranges; its kind = the nearest of the rendered
templates after cropping the blob to its box. Each scorer is ~100 % on ground-truth renders.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from builtin_model import data

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

ATTRIBUTES = ("background", "color", "position", "size", "kind")
TARGETS = {"background": 0.95, "color": 0.90, "position": 0.85, "size": 0.85, "kind": 0.80}

_PALETTE = np.array(list(data.PALETTE.values()), dtype=np.float32)
_FAR_FROM_BACKGROUND = 50.0  # RGB distance; the closest palette pair is 87 apart
_MIN_BLOB = 12  # pixels; fewer means "no shape drawn"
_LARGE_EXTENT = 19.5  # px; small shapes span ≤ 16, large ones ≥ 22.5
_TEMPLATE = 16


@dataclass(frozen=True)
class Reading:
    """What the pixels say; ``None`` where no shape was found."""

    background: str
    color: str | None
    position: str | None
    size: str | None
    kind: str | None

    def matches(self, scene: data.Scene) -> dict[str, bool]:
        return {a: getattr(self, a) == getattr(scene, a) for a in ATTRIBUTES}


def nearest_color(rgb: np.ndarray) -> np.ndarray:
    """Palette index of the nearest palette color for each RGB row."""
    d = ((rgb[..., None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)
    nearest: np.ndarray = d.argmin(-1)
    return nearest


def read_image(image: np.ndarray | Image.Image) -> Reading:
    """Read one 64×64 RGB image (uint8 array or PIL image)."""
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(
        np.float32
    )
    h, w, _ = img.shape
    border = np.concatenate(
        [
            img[:2].reshape(-1, 3),
            img[-2:].reshape(-1, 3),
            img[:, :2].reshape(-1, 3),
            img[:, -2:].reshape(-1, 3),
        ]
    )
    labels = nearest_color(border)
    bg_label = int(np.bincount(labels, minlength=len(_PALETTE)).argmax())
    bg_rgb = np.median(border[labels == bg_label], axis=0)
    background = data.COLORS[bg_label]

    far = np.linalg.norm(img - bg_rgb, axis=-1) > _FAR_FROM_BACKGROUND
    blob = _largest_component(far)
    if blob.sum() < _MIN_BLOB:
        return Reading(background, None, None, None, None)
    fg_rgb = np.median(img[blob], axis=0)
    color = data.COLORS[int(nearest_color(fg_rgb[None])[0])]

    # Solid part: at least half-covered, i.e. closer to the shape's color than the background's.
    solid = blob & (np.linalg.norm(img - fg_rgb, axis=-1) < np.linalg.norm(img - bg_rgb, axis=-1))
    if solid.sum() < _MIN_BLOB:
        solid = blob
    ys, xs = np.nonzero(solid)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cell = 64.0 / 3.0
    col = min(int((x0 + x1) / 2 / (w / 64.0) // cell), 2)
    row = min(int((y0 + y1) / 2 / (h / 64.0) // cell), 2)
    position = data.POSITIONS[row * 3 + col]
    size = "large" if max(x1 - x0, y1 - y0) >= _LARGE_EXTENT else "small"
    kind = _nearest_kind(solid[y0:y1, x0:x1])
    return Reading(background, color, position, size, kind)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (an all-False mask if none)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        comp = [(int(y0), int(x0))]
        queue = deque(comp)
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    comp.append((ny, nx))
                    queue.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def _normalise(crop: np.ndarray) -> np.ndarray:
    img = Image.fromarray(crop.astype(np.float32))
    return np.asarray(
        img.resize((_TEMPLATE, _TEMPLATE), Image.Resampling.BILINEAR), dtype=np.float32
    )


@functools.cache
def _templates() -> tuple[np.ndarray, np.ndarray]:
    """Box-normalised masks of every kind, at both sizes, from the renderer itself."""
    scenes = [
        data.Scene(k, "white", "black", s, "center")
        for k in data.SHAPES
        for s in data.SIZES
        for _ in range(4)
    ]
    batch = data.scenes_from_list(scenes, torch.Generator().manual_seed(0))
    masks = data.to_uint8(data.render(batch))[..., 0] >= 128
    out = []
    for m in masks:
        ys, xs = np.nonzero(m)
        out.append(_normalise(m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))
    kinds = np.array([data.SHAPES.index(s.kind) for s in scenes])
    return np.stack(out), kinds


def _nearest_kind(crop: np.ndarray) -> str:
    templates, kinds = _templates()
    d = np.abs(templates - _normalise(crop)[None]).mean(axis=(1, 2))
    return data.SHAPES[int(kinds[d.argmin()])]


# ---- pipeline evaluation ----------------------------------------------------------------------


@dataclass
class Evaluation:
    """Per-attribute accuracy over generated images, with the images and prompts kept."""

    steps: int
    guidance_scale: float
    scenes: list[data.Scene]
    prompts: list[str]
    images: list[Image.Image]
    readings: list[Reading]
    seconds_per_image: float
    accuracy: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        hits = [r.matches(s) for r, s in zip(self.readings, self.scenes, strict=True)]
        self.accuracy = {
            a: float(np.mean([h[a] for h in hits])) if hits else 0.0 for a in ATTRIBUTES
        }


def evaluate_pipeline(
    pipe: StableDiffusionPipeline,
    scenes: Sequence[data.Scene],
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 32,
    scheduler: Any = None,
) -> Evaluation:
    """Generate every scene's canonical prompt once per seed and read the pixels back."""
    if scheduler is not None:
        pipe.scheduler = scheduler
    jobs = [(s, seed) for seed in seeds for s in scenes]
    images: list[Image.Image] = []
    start = time.perf_counter()
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        out = pipe(
            prompt=[s.prompt() for s, _ in chunk],
            negative_prompt=[""] * len(chunk),
            width=data.IMAGE_SIZE,
            height=data.IMAGE_SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
            output_type="pil",
        )
        images.extend(out.images)
    elapsed = (time.perf_counter() - start) / max(len(jobs), 1)
    return Evaluation(
        steps=steps,
        guidance_scale=guidance_scale,
        scenes=[s for s, _ in jobs],
        prompts=[s.prompt() for s, _ in jobs],
        images=images,
        readings=[read_image(im) for im in images],
        seconds_per_image=elapsed,
    )


def format_table(evaluations: Sequence[Evaluation]) -> str:
    """A Markdown table: one row per evaluation, one column per attribute, plus targets."""
    head = "| guidance | steps | images | " + " | ".join(ATTRIBUTES) + " |"
    rule = "|---:|---:|---:|" + "---:|" * len(ATTRIBUTES)
    rows = [head, rule]
    for ev in evaluations:
        cells = " | ".join(f"{100 * ev.accuracy[a]:.1f} %" for a in ATTRIBUTES)
        rows.append(f"| {ev.guidance_scale:g} | {ev.steps} | {len(ev.images)} | {cells} |")
    rows.append(
        "| target | | | " + " | ".join(f"≥ {100 * TARGETS[a]:.0f} %" for a in ATTRIBUTES) + " |"
    )
    return "\n".join(rows)


def sample_grid(
    evaluation: Evaluation, columns: int = 8, limit: int = 48, scale: int = 2
) -> Image.Image:
    """A grid of samples with each prompt written under its image."""
    from PIL import ImageDraw

    images = evaluation.images[:limit]
    prompts = evaluation.prompts[:limit]
    cell_w, img_h, text_h = 64 * scale + 8 * scale, 64 * scale, 40
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * (img_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, prompt) in enumerate(zip(images, prompts, strict=True)):
        x, y = (i % columns) * cell_w, (i // columns) * (img_h + text_h)
        grid.paste(im.resize((img_h, img_h), Image.Resampling.NEAREST), (x + 4 * scale, y))
        lines = _wrap(prompt, 24)
        for j, line in enumerate(lines[:3]):
            draw.text((x + 2, y + img_h + 1 + 12 * j), line, fill="black")
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines
