"""Procedural 64×64 scenes with captions: one flat-colored shape on a flat background.

Scenes are drawn as attribute tensors (kind, color, background, size, position) and rendered in
one vectorised pass from signed distances, so a GPU makes hundreds of thousands a second and a
CPU tens of thousands. Captions vary in phrasing and order and may leave attributes out; an
attribute left out is free. A fixed, seeded set of full attribute combinations never appears in
training and is what the evaluator scores.

Why one module of 510 lines: sampling, rendering and captioning read the same attribute
tensors and vocabularies; the held-out set is defined beside what it is held out of.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Well separated in RGB (closest pair, yellow/orange, is 87 apart) so pixels map back to names.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 40),
    "orange": (245, 135, 20),
    "purple": (130, 40, 170),
    "pink": (245, 140, 200),
    "cyan": (40, 210, 225),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (115, 65, 25),
}
COLORS = tuple(PALETTE)
SIZES = ("small", "large")
# Row-major 3×3 grid: index = row * 3 + col.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
CELL_CENTERS = (17.0, 32.0, 47.0)
# Half-extent of a shape in pixels, drawn uniformly in these ranges.
SIZE_RANGES = {"small": (6.5, 8.0), "large": (12.5, 14.0)}
POSITION_JITTER = 1.5

HELD_OUT_SEED = 1234
HELD_OUT_COUNT = 48


@dataclass(frozen=True)
class Scene:
    """One scene's attributes by name."""

    kind: str
    color: str
    background: str
    size: str
    position: str

    def prompt(self) -> str:
        """The canonical full caption, as the evaluator asks for it."""
        where = _POSITION_NATURAL[self.position][0]
        return f"a {self.size} {self.color} {self.kind} {where} on a {self.background} background"


def combo_index(
    kind: torch.Tensor, color: torch.Tensor, bg: torch.Tensor, size: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """A unique integer per full attribute combination (tensors of indices)."""
    return (((kind * len(COLORS) + color) * len(COLORS) + bg) * len(SIZES) + size) * len(
        POSITIONS
    ) + pos


@functools.cache
def held_out_scenes() -> tuple[Scene, ...]:
    """The fixed evaluation combinations, excluded from training; every kind, color, size and
    position appears among them, each only in combinations the model never saw."""
    rng = random.Random(HELD_OUT_SEED)
    scenes: list[Scene] = []
    seen: set[Scene] = set()
    i = 0
    while len(scenes) < HELD_OUT_COUNT:
        # Cycle through kinds, positions and colors so the set is balanced, not merely random.
        kind = SHAPES[i % len(SHAPES)]
        position = POSITIONS[i % len(POSITIONS)]
        color = COLORS[i % len(COLORS)]
        size = SIZES[(i // len(SHAPES)) % len(SIZES)]
        background = rng.choice([c for c in COLORS if c != color])
        scene = Scene(kind, color, background, size, position)
        if scene not in seen:
            seen.add(scene)
            scenes.append(scene)
        i += 1
    return tuple(scenes)


@functools.cache
def _held_out_mask_cpu() -> torch.Tensor:
    total = len(SHAPES) * len(COLORS) * len(COLORS) * len(SIZES) * len(POSITIONS)
    mask = torch.zeros(total, dtype=torch.bool)
    for s in held_out_scenes():
        mask[combo_index(*(torch.tensor(v) for v in scene_indices(s)))] = True
    return mask


def held_out_mask(device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean lookup over :func:`combo_index`: True for held-out combinations."""
    return _held_out_mask_cpu().to(device)


def scene_indices(scene: Scene) -> tuple[int, int, int, int, int]:
    return (
        SHAPES.index(scene.kind),
        COLORS.index(scene.color),
        COLORS.index(scene.background),
        SIZES.index(scene.size),
        POSITIONS.index(scene.position),
    )


@dataclass
class SceneBatch:
    """Attributes as index tensors plus the continuous geometry, all of length ``n``."""

    kind: torch.Tensor
    color: torch.Tensor
    bg: torch.Tensor
    size: torch.Tensor
    pos: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    half: torch.Tensor

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def rows(self, start: int, stop: int) -> SceneBatch:
        """Scenes ``start`` to ``stop`` (a chunk to render at once)."""
        return SceneBatch(**{k: v[start:stop] for k, v in vars(self).items()})

    @staticmethod
    def cat(batches: list[SceneBatch]) -> SceneBatch:
        """The scenes of ``batches``, one after another."""
        return SceneBatch(**{k: torch.cat([vars(b)[k] for b in batches]) for k in vars(batches[0])})

    def scene(self, i: int) -> Scene:
        return Scene(
            SHAPES[int(self.kind[i])],
            COLORS[int(self.color[i])],
            COLORS[int(self.bg[i])],
            SIZES[int(self.size[i])],
            POSITIONS[int(self.pos[i])],
        )


def sample_scenes(
    n: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    exclude_held_out: bool = True,
    kind_only: str | None = None,
    size_only: str | None = None,
) -> SceneBatch:
    """Draw ``n`` random scenes (shape color never equal to background), skipping held-out
    combinations when asked. Drawn on the CPU generator for reproducibility, then moved.
    ``kind_only``/``size_only`` fix that attribute (the same numbers are drawn either way)."""
    kind = torch.randint(len(SHAPES), (n,), generator=generator)
    color = torch.randint(len(COLORS), (n,), generator=generator)
    # A background different from the shape color: offset by 1..11 modulo 12.
    bg = (color + 1 + torch.randint(len(COLORS) - 1, (n,), generator=generator)) % len(COLORS)
    size = torch.randint(len(SIZES), (n,), generator=generator)
    pos = torch.randint(len(POSITIONS), (n,), generator=generator)
    if kind_only is not None:
        kind.fill_(SHAPES.index(kind_only))
    if size_only is not None:
        size.fill_(SIZES.index(size_only))
    if exclude_held_out:
        bad = held_out_mask()[combo_index(kind, color, bg, size, pos)]
        # Re-draw the position of the few held-out hits; a different position leaves the set.
        while bool(bad.any()):
            pos[bad] = torch.randint(len(POSITIONS), (int(bad.sum()),), generator=generator)
            bad = held_out_mask()[combo_index(kind, color, bg, size, pos)]
    return _geometry(kind, color, bg, size, pos, generator, device)


def scenes_from_list(
    scenes: list[Scene], generator: torch.Generator, device: torch.device | str = "cpu"
) -> SceneBatch:
    """A batch with the given attributes and random geometry within them."""
    idx = torch.tensor([scene_indices(s) for s in scenes], dtype=torch.long)
    return _geometry(idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3], idx[:, 4], generator, device)


def _geometry(
    kind: torch.Tensor,
    color: torch.Tensor,
    bg: torch.Tensor,
    size: torch.Tensor,
    pos: torch.Tensor,
    generator: torch.Generator,
    device: torch.device | str,
) -> SceneBatch:
    n = kind.shape[0]
    centers = torch.tensor(CELL_CENTERS)
    jitter = (torch.rand(2, n, generator=generator) * 2 - 1) * POSITION_JITTER
    cx = centers[pos % 3] + jitter[0]
    cy = centers[pos // 3] + jitter[1]
    lo = torch.tensor([SIZE_RANGES[s][0] for s in SIZES])
    hi = torch.tensor([SIZE_RANGES[s][1] for s in SIZES])
    half = lo[size] + (hi[size] - lo[size]) * torch.rand(n, generator=generator)
    return SceneBatch(*(t.to(device) for t in (kind, color, bg, size, pos, cx, cy, half)))


def render(batch: SceneBatch, chunk: int = 8192) -> torch.Tensor:
    """Render to float images in [-1, 1], shape (n, 3, 64, 64), anti-aliased by coverage."""
    if len(batch) > chunk:
        parts = []
        for i in range(0, len(batch), chunk):
            parts.append(_render(batch.rows(i, i + chunk)))
        return torch.cat(parts)
    return _render(batch)


def _render(batch: SceneBatch) -> torch.Tensor:
    cover = (0.5 - signed_distance(batch)).clamp(0.0, 1.0)  # (n, 1, H, W)
    return paint(batch, cover)


def paint(batch: SceneBatch, cover: torch.Tensor) -> torch.Tensor:
    """Blend each scene's shape color over its background by ``cover`` (n, 1, H, W) in [0, 1]."""
    n = len(batch)
    palette = palette_tensor(batch.kind.device)
    fg = palette[batch.color].view(n, 3, 1, 1)
    bg = palette[batch.bg].view(n, 3, 1, 1)
    return bg + (fg - bg) * cover


def signed_distance(batch: SceneBatch) -> torch.Tensor:
    """Each scene's signed distance to its shape's edge (negative inside), (n, 1, H, W) pixels."""
    device = batch.kind.device
    n = len(batch)
    coords = torch.arange(IMAGE_SIZE, device=device, dtype=torch.float32) + 0.5
    x = coords.view(1, 1, -1) - batch.cx.view(n, 1, 1)
    y = coords.view(1, -1, 1) - batch.cy.view(n, 1, 1)
    s = batch.half.view(n, 1, 1)
    ax, ay = x.abs(), y.abs()

    # Signed distance (negative inside) in pixels for every kind; pick each sample's own.
    circle = torch.sqrt(x * x + y * y) - s
    square = torch.maximum(ax, ay) - 0.9 * s
    # Triangle pointing up: apex (0, -s), base at y = 0.85 s with half-width s.
    slope = 1.85
    norm = (slope * slope + 1.0) ** 0.5
    triangle = torch.maximum((slope * ax - (y + s)) / norm, y - 0.85 * s)
    diamond = (ax + ay - s) / 2**0.5
    arm = s / 3
    cross = torch.minimum(torch.maximum(ax - arm, ay - s), torch.maximum(ay - arm, ax - s))
    dist = torch.stack([circle, square, triangle, diamond, cross], dim=1)
    return dist.gather(1, batch.kind.view(n, 1, 1, 1).expand(n, 1, IMAGE_SIZE, IMAGE_SIZE))


def second_shapes(scenes: SceneBatch, generator: torch.Generator) -> SceneBatch:
    """For each scene, a small shape in another cell, of a colour that is neither the scene's
    shape's nor its background, on the same background: what an inpainting prompt names when it
    adds a shape to a picture. Drawn on the CPU generator, then moved to the scenes' device."""
    n = len(scenes)
    first, bg = scenes.color.cpu(), scenes.bg.cpu()
    kind = torch.randint(len(SHAPES), (n,), generator=generator)
    color = torch.randint(len(COLORS), (n,), generator=generator)
    bad = (color == first) | (color == bg)
    while bool(bad.any()):
        color[bad] = torch.randint(len(COLORS), (int(bad.sum()),), generator=generator)
        bad = (color == first) | (color == bg)
    pos = (
        scenes.pos.cpu() + 1 + torch.randint(len(POSITIONS) - 1, (n,), generator=generator)
    ) % len(POSITIONS)
    size = torch.full((n,), SIZES.index("small"), dtype=torch.long)
    return _geometry(kind, color, bg, size, pos, generator, scenes.kind.device)


def render_with_second(scenes: SceneBatch, second: SceneBatch) -> torch.Tensor:
    """``scenes`` rendered, then each of ``second``'s shapes painted over it (on top where
    they touch): a picture with two shapes, as an inpainted one is."""
    images = render(scenes)
    cover = (0.5 - signed_distance(second)).clamp(0.0, 1.0)
    fg = palette_tensor(second.kind.device)[second.color].view(len(second), 3, 1, 1)
    return images + (fg - images) * cover


def palette_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    """The palette as (12, 3) floats in [-1, 1], indexed like :data:`COLORS`."""
    return torch.tensor(list(PALETTE.values()), device=device, dtype=torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) in [-1, 1] → (n, H, W, 3) uint8."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


# ---- captions ---------------------------------------------------------------------------------

# Each position has natural phrasings ("at the top left") and bare ones ("top left").
_POSITION_NATURAL: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle", "at the center"),
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "on the top", "at the top edge"),
    "bottom": ("at the bottom", "on the bottom", "at the bottom edge"),
}
for _v in ("top", "bottom"):
    for _h in ("left", "right"):
        _POSITION_NATURAL[f"{_v} {_h}"] = (
            f"at the {_v} {_h}",
            f"in the {_v} {_h} corner",
            f"in the {_v} {_h}",
        )
_POSITION_BARE: dict[str, tuple[str, ...]] = {p: (p,) for p in POSITIONS}
_POSITION_BARE["center"] = ("center", "middle", "centered")

_BACKGROUND_NATURAL = (
    "on a {} background",
    "against a {} background",
    "with a {} background",
    "over a {} background",
)
_BACKGROUND_BARE = ("{} background", "background {}")
_GENERIC_KIND = ("shape", "object")

# Chance that a caption leaves each attribute out (the image still has one).
_DROP = {"size": 0.2, "color": 0.05, "kind": 0.05, "position": 0.1, "background": 0.1}


def caption(scene: Scene, rng: random.Random, drop: bool = True) -> str:
    """A random caption for ``scene``: varied phrasing and order, some attributes left out
    (none with ``drop=False``; the default draws exactly what it always has)."""
    keep = {k: rng.random() >= p or not drop for k, p in _DROP.items()}
    words = []
    if keep["size"]:
        words.append(
            rng.choice((scene.size, scene.size, "big" if scene.size == "large" else "little"))
        )
    if keep["color"]:
        words.append(scene.color)
    words.append(scene.kind if keep["kind"] else rng.choice(_GENERIC_KIND))
    obj = " ".join(words)

    style = rng.random()
    if style < 0.45:  # "a small red circle at the top left on a white background"
        parts = [rng.choice(("a ", "one ", "")) + obj]
        if keep["position"]:
            parts.append(rng.choice(_POSITION_NATURAL[scene.position]))
        if keep["background"]:
            parts.append(rng.choice(_BACKGROUND_NATURAL).format(scene.background))
        if len(parts) == 3 and rng.random() < 0.3:
            parts[1], parts[2] = parts[2], parts[1]
        return " ".join(parts)
    if style < 0.8:  # "red circle, top left, white background", in any order
        parts = [obj]
        if keep["position"]:
            parts.append(rng.choice(_POSITION_BARE[scene.position]))
        if keep["background"]:
            parts.append(rng.choice(_BACKGROUND_BARE).format(scene.background))
        rng.shuffle(parts)
        return ", ".join(parts)
    # "a white background with a small red circle at the top left"
    text = f"a {scene.background} background with a {obj}" if keep["background"] else f"a {obj}"
    if keep["position"]:
        text += " " + rng.choice(_POSITION_NATURAL[scene.position])
    return text


def captions(batch: SceneBatch, seed: int, phrasing: float = 0.0) -> list[str]:
    """One caption per scene; a share ``phrasing`` of them as people write prompts
    (:func:`user_caption`), the rest as :func:`caption`. With ``phrasing = 0`` the captions are
    exactly those of the original recipe (the same generator draws)."""
    rng = random.Random(seed)
    kind, color, bg, size, pos = (
        t.tolist() for t in (batch.kind, batch.color, batch.bg, batch.size, batch.pos)
    )
    out = []
    for k, c, b, s, p in zip(kind, color, bg, size, pos, strict=True):
        scene = Scene(SHAPES[k], COLORS[c], COLORS[b], SIZES[s], POSITIONS[p])
        if phrasing > 0 and rng.random() < phrasing:
            out.append(user_caption(scene, rng))
        else:
            out.append(caption(scene, rng))
    return out


# ---- prompts as people write them -----------------------------------------------------------
#
# Tags in any order, synonyms ("big", "tiny", "upper left", "bg"), a leading article or none,
# capitals, punctuation, filler words. The tokenizer lower-cases (NFKC + Lowercase) and splits
# every punctuation mark off, so "Upper-left," is "upper - left ,". Words outside the
# vocabulary (the fillers below) become <unk>: training on them teaches the model to ignore them.

SIZE_WORDS = {"large": ("large", "big", "huge", "giant"), "small": ("small", "little", "tiny")}
_VERTICAL = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
_MID = ("center", "centre", "middle")


def _user_positions() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for v, vs in _VERTICAL.items():
        for h in ("left", "right"):
            forms: list[str] = []
            for w in vs:
                forms += [f"{w} {h}", f"{w}-{h}", f"{w} {h} corner", f"{h} {w}"]
            out[f"{v} {h}"] = tuple(forms)
        forms = []
        for w in vs:
            forms += [w, f"{w} edge", f"{w} middle", f"{w} center", f"{w} centre", f"{w} side"]
        out[v] = tuple(forms)
    for h in ("left", "right"):
        out[h] = (h, f"{h} side", f"{h} edge", f"middle {h}", f"center {h}", f"{h} middle")
    out["center"] = (*_MID, "centered", "central", "dead center", "middle center")
    return out


USER_POSITIONS = _user_positions()
_POSITION_LEAD = ("", "", "", "at the ", "in the ", "on the ", "at ", "in ", "on ")
_USER_BACKGROUND = (
    "{} background", "{} background", "{} bg", "{} bg", "background {}", "bg {}",
    "background: {}", "bg: {}", "on {}", "on a {} background", "on {} bg", "on a {} bg",
    "with a {} background", "with {} bg", "against {}", "over {}", "{} backdrop",
    "on a {} backdrop", "{} colored background", "background color {}", "in front of {}",
)  # fmt: skip
_USER_LEAD = ("", "", "", "", "a ", "a ", "an ", "the ", "one ", "single ")
_USER_PREFIX = ("a picture of ", "an image of ", "draw ", "picture of ", "image: ", "icon of ")
_USER_END = ("", "", "", ".", ".", "!", "!!", "...", ";", "?", ",")
_USER_SEP = (", ", ", ", ", ", "; ", " | ", " / ", " - ", ". ", " ", " and ")
# Not in the vocabulary on purpose (→ <unk>): the model learns such words change nothing.
UNKNOWN_FILLERS = ("simple", "flat", "nice", "cute", "minimal", "vector", "style", "please", "4k")
_USER_DROP = {"size": 0.1, "color": 0.03, "kind": 0.03, "position": 0.05, "background": 0.05}
COLOR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLORS}
COLOR_WORDS["gray"] = ("gray", "grey")


def _case(text: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.55:
        return text
    if r < 0.75:
        return text[:1].upper() + text[1:]
    if r < 0.85:
        return text.title()
    if r < 0.9:
        return text.upper()
    return " ".join(w.capitalize() if rng.random() < 0.3 else w for w in text.split(" "))


def user_caption(scene: Scene, rng: random.Random, drop: bool = True) -> str:
    """A caption the way users write prompts: as tags in any order, as a loose sentence, or as
    "X on Y"; synonyms, capitals, punctuation; some attributes left out (left free; none with
    ``drop=False``; the default draws exactly what it always has)."""
    keep = {k: rng.random() >= p or not drop for k, p in _USER_DROP.items()}
    size = rng.choice(SIZE_WORDS[scene.size]) if keep["size"] else None
    color = rng.choice(COLOR_WORDS[scene.color]) if keep["color"] else None
    kind = scene.kind if keep["kind"] else rng.choice(("shape", "object", "thing"))
    if rng.random() < 0.08:
        kind += " shape"
    bg_color = rng.choice(COLOR_WORDS[scene.background])
    bg = rng.choice(_USER_BACKGROUND).format(bg_color) if keep["background"] else None
    where = rng.choice(USER_POSITIONS[scene.position]) if keep["position"] else None

    style = rng.random()
    if style < 0.45:  # tags: "red circle, large, left, blue background", any order and grouping
        split = rng.random()
        if split < 0.45:
            items = [" ".join(w for w in (size, color, kind) if w)]
        elif split < 0.8:
            items = [" ".join(w for w in (color, kind) if w), *([size] if size else [])]
        else:
            items = [kind, *(w for w in (color, size) if w)]
        items += [w for w in (where, bg) if w]
        rng.shuffle(items)
        sep = rng.choice(_USER_SEP)
        text = sep.join(items)
    elif style < 0.8:  # a loose sentence: "A big Red circle upper left, blue bg."
        obj = rng.choice(_USER_LEAD) + " ".join(w for w in (size, color, kind) if w)
        placed = [rng.choice(_POSITION_LEAD) + where if where else None, bg]
        rest = [w for w in placed if w]
        if len(rest) == 2 and rng.random() < 0.3:
            rest.reverse()
        if rest and rng.random() < 0.15:  # background or position first
            text = rest[0] + rng.choice((", ", " ", " with ")) + obj
            text += "".join(rng.choice((", ", " ")) + w for w in rest[1:])
        else:
            text = obj + "".join(rng.choice((", ", " ", ", ")) + w for w in rest)
    else:  # "X on Y": "big red circle on blue, upper left"
        obj = rng.choice(_USER_LEAD) + " ".join(w for w in (size, color, kind) if w)
        text = f"{obj} on {bg_color}" if keep["background"] else obj
        if where:
            text += rng.choice((", ", " ", " ")) + rng.choice(_POSITION_LEAD) + where
    if rng.random() < 0.08:
        text = rng.choice(_USER_PREFIX) + text
    if rng.random() < 0.12:
        filler = rng.choice(UNKNOWN_FILLERS)
        text = f"{filler} {text}" if rng.random() < 0.5 else f"{text}, {filler}"
    return _case(text, rng) + rng.choice(_USER_END)


def _words(texts: list[str]) -> list[str]:
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation("isolated")]
    )
    words: list[str] = []
    for text in texts:
        for word, _ in split.pre_tokenize_str(text.lower()):
            if word != "x" and word not in words:
                words.append(word)
    return words


# Punctuation people type; each mark is one token of its own.
PUNCTUATION = (",", ".", "!", ";", ":", "?", "-", "(", ")", "'", '"', "/", "|", "&", "+", "*")


def legacy_vocabulary() -> list[str]:
    """The 44 words of the original captions, in the order their token ids were given."""
    texts = [*SHAPES, *COLORS, *SIZES, "big", "little", *_GENERIC_KIND, "a", "one", "with", ","]
    for group in (_POSITION_NATURAL, _POSITION_BARE):
        for phrases in group.values():
            texts.extend(phrases)
    texts.extend(t.format("x") for t in (*_BACKGROUND_NATURAL, *_BACKGROUND_BARE))
    return _words(texts)


def vocabulary() -> list[str]:
    """Every word any caption can use, in a stable order (punctuation included): the original
    words first, so their token ids stay those of weights trained before the vocabulary grew."""
    texts = [*legacy_vocabulary(), *PUNCTUATION, *(w for ws in SIZE_WORDS.values() for w in ws)]
    texts += [w for ws in COLOR_WORDS.values() for w in ws] + ["shape", "object", "thing"]
    texts += [p for ps in USER_POSITIONS.values() for p in ps] + list(_POSITION_LEAD)
    texts += [t.format("x") for t in _USER_BACKGROUND] + list(_USER_LEAD) + list(_USER_PREFIX)
    texts += ["and", "with", "on"]
    words = _words(texts)
    assert not set(words) & set(UNKNOWN_FILLERS)
    return words


# New words → the known word whose embedding row a refined text encoder starts from.
SYNONYM_OF = {
    "huge": "large", "giant": "large", "tiny": "small", "upper": "top", "lower": "bottom",
    "centre": "center", "central": "center", "dead": "center", "grey": "gray", "bg": "background",
    "backdrop": "background", "colored": "background", "color": "background", "an": "a",
    "single": "one", "thing": "object", "front": "against", "of": "with", "and": "with",
}  # fmt: skip
