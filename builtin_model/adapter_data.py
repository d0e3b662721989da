"""What the built-in model's adapters learn: hollow shapes (LoRA ``outline``) and shapes placed by
a silhouette (ControlNet ``silhouette``), drawn by the same renderer as the base model's scenes,
plus the pixel readers the evaluator scores them with.
"""

from __future__ import annotations

import random
from collections import deque

import numpy as np
import torch

from builtin_model import data
from builtin_model.score import Reading, read_image

OUTLINE_ID = "outline"
SILHOUETTE_ID = "silhouette"
SKETCH_ID = "sketch"
# A sketch line's half-width in pixels: about what OpenCV's Canny draws (one pixel), up to a
# pencil stroke.
SKETCH_HALF_WIDTH = (0.6, 1.4)
# Outline width in pixels: a fraction of the shape's half-extent (small ≈ 2 px, large ≈ 3.5 px),
# never more than 60 % of a cross's arm so a cross stays hollow too.
OUTLINE_FRACTION = 0.27
# Chance that a ControlNet training caption names another kind, size or position than the
# silhouette shows (so the control wins when the two disagree).
CONTROL_CAPTION_MISMATCH = 0.3


def outline_width(batch: data.SceneBatch) -> torch.Tensor:
    width = batch.half * OUTLINE_FRACTION
    cross = batch.kind == data.SHAPES.index("cross")
    return torch.where(cross, torch.minimum(width, 0.6 * batch.half / 3), width)


def render_outline(batch: data.SceneBatch) -> torch.Tensor:
    """The scenes with each shape drawn hollow: a band inside its edge, background within."""
    dist = data.signed_distance(batch)
    width = outline_width(batch).view(-1, 1, 1, 1)
    cover = (0.5 - dist).clamp(0.0, 1.0) - (0.5 - dist - width).clamp(0.0, 1.0)
    return data.paint(batch, cover)


def render_silhouette(batch: data.SceneBatch) -> torch.Tensor:
    """Control images: the shape white on black, (n, 3, 64, 64) in [0, 1] as ControlNets take."""
    cover = (0.5 - data.signed_distance(batch)).clamp(0.0, 1.0)
    return cover.expand(-1, 3, -1, -1).contiguous()


def render_sketch(
    batch: data.SceneBatch,
    g: torch.Generator | None = None,
    wobble_px: float = 0.0,
    gap_share: float = 0.0,
) -> torch.Tensor:
    """Control images: the shape's outline as a thin white line on black (what `canny` or a
    drawing gives), (n, 3, 64, 64) in [0, 1]. With a generator the line's width varies;
    `wobble_px` displaces it by a smooth random field (a hand's unsteadiness) and `gap_share`
    leaves about that share of it undrawn, in runs (a quick scribble's gaps)."""
    dist = data.signed_distance(batch)
    n, size = len(batch), data.IMAGE_SIZE
    rand = (lambda *shape: torch.rand(*shape, generator=g)) if g is not None else torch.rand
    half = torch.full((n, 1, 1, 1), sum(SKETCH_HALF_WIDTH) / 2)
    if g is not None:
        lo, hi = SKETCH_HALF_WIDTH
        half = lo + (hi - lo) * rand(n, 1, 1, 1)
    if wobble_px:
        field = (rand(n, 1, 6, 6) * 2 - 1) * wobble_px
        dist = dist + torch.nn.functional.interpolate(
            field, size=(size, size), mode="bicubic", align_corners=False
        )
    line = (1 - dist.abs() / half.to(dist.device)).clamp(0.0, 1.0)
    if gap_share:
        holes = torch.nn.functional.interpolate(
            rand(n, 1, 10, 10), size=(size, size), mode="bilinear", align_corners=False
        )
        line = line * (holes > gap_share).to(line.dtype)
    return line.expand(-1, 3, -1, -1).contiguous()


def training_sketches(batch: data.SceneBatch, g: torch.Generator) -> torch.Tensor:
    """Sketch ControlNet training controls: half clean lines of varying width (canny-like),
    half wobbly scribbles with gaps, some of each binarized as Canny's are."""
    n = len(batch)
    clean = render_sketch(batch, g)
    rough = render_sketch(batch, g, wobble_px=1.5, gap_share=0.15)
    pick = (torch.rand(n, generator=g) < 0.5).view(n, 1, 1, 1)
    out = torch.where(pick, rough, clean)
    binary = (torch.rand(n, generator=g) < 0.5).view(n, 1, 1, 1)
    return torch.where(binary, (out > 0.5).to(out.dtype), out)


def mismatched_scene(scene: data.Scene, rng: random.Random) -> data.Scene:
    """``scene`` with its position replaced by another one (the prompt a control must beat)."""
    others = [p for p in data.POSITIONS if p != scene.position]
    return data.Scene(scene.kind, scene.color, scene.background, scene.size, rng.choice(others))


def control_captions(batch: data.SceneBatch, seed: int) -> list[str]:
    """Captions for ControlNet training: like the base model's, but kind, size and position are
    each replaced by a random other value with :data:`CONTROL_CAPTION_MISMATCH`."""
    rng = random.Random(seed)
    out = []
    for i in range(len(batch)):
        s = batch.scene(i)
        kind, size, pos = s.kind, s.size, s.position
        if rng.random() < CONTROL_CAPTION_MISMATCH:
            kind = rng.choice(data.SHAPES)
        if rng.random() < CONTROL_CAPTION_MISMATCH:
            size = rng.choice(data.SIZES)
        if rng.random() < CONTROL_CAPTION_MISMATCH:
            pos = rng.choice(data.POSITIONS)
        out.append(data.caption(data.Scene(kind, s.color, s.background, size, pos), rng))
    return out


# ---- reading hollow shapes --------------------------------------------------------------------

_MIN_HOLE_FRACTION = 0.08  # of the filled shape's area
_MIN_HOLE = 3  # pixels


def _enclosed(mask: np.ndarray) -> np.ndarray:
    """Pixels not in ``mask`` that cannot reach the border without crossing it (its holes)."""
    h, w = mask.shape
    outside = np.zeros_like(mask)
    queue: deque[tuple[int, int]] = deque()
    for y in range(h):
        for x in (0, w - 1):
            if not mask[y, x] and not outside[y, x]:
                outside[y, x] = True
                queue.append((y, x))
    for x in range(w):
        for y in (0, h - 1):
            if not mask[y, x] and not outside[y, x]:
                outside[y, x] = True
                queue.append((y, x))
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < h and 0 <= nx < w and not mask[ny, nx] and not outside[ny, nx]:
                outside[ny, nx] = True
                queue.append((ny, nx))
    inside: np.ndarray = ~mask & ~outside
    return inside


def read_outline(image: np.ndarray) -> tuple[Reading, bool]:
    """Read a possibly hollow shape: its attributes (kind from the shape with its hole filled)
    and whether it is hollow (background-colored pixels enclosed by the shape, at least 8 % of
    the filled area)."""
    from builtin_model.score import _largest_component, _nearest_kind, nearest_color

    img = np.asarray(image).astype(np.float32)
    reading = read_image(image)
    if reading.color is None:
        return reading, False
    bg_rgb = np.array(data.PALETTE[reading.background], dtype=np.float32)
    far = np.linalg.norm(img - bg_rgb, axis=-1) > 50.0
    blob = _largest_component(far)
    # A thin band's edge pixels are half background: take the color from the band's core (the
    # half of the blob farthest from the background).
    dist_bg = np.linalg.norm(img - bg_rgb, axis=-1)
    fg_rgb = np.median(img[blob & (dist_bg >= np.median(dist_bg[blob]))], axis=0)
    solid = blob & (np.linalg.norm(img - fg_rgb, axis=-1) < dist_bg)
    if solid.sum() < 12:
        solid = blob
    hole = _enclosed(solid)
    filled = solid | hole
    hollow = int(hole.sum()) >= max(_MIN_HOLE, _MIN_HOLE_FRACTION * int(filled.sum()))
    ys, xs = np.nonzero(filled)
    kind = _nearest_kind(filled[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    color = data.COLORS[int(nearest_color(fg_rgb[None])[0])]
    return (
        Reading(reading.background, color, reading.position, reading.size, kind),
        hollow,
    )
