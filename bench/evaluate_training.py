"""Can a training teach `shapes-64` a shape it has never seen? The fine-tuning recipe
(worker/training) on CPU, scored from the pixels on held-out prompts.

    python bench/evaluate_training.py --threads 2          # star, heart, crescent; the model's
                                                          # training defaults (its imagegen.json)
    python bench/evaluate_training.py --shapes star --steps 300
    python bench/evaluate_training.py --threads 2 --write-card   # and the card's section

Per new shape: 16 training pictures rendered here (the built-in renderer's palette, sizes, 3×3
places and coverage anti-aliasing; a five-pointed star, a heart, a crescent), captioned in the
model's words with the trigger word as the shape's name ("a large red zxq at the top left on a
white background"). Training uses six of the twelve colours and five of the nine places; the 16
held-out prompts name the other colours and places (and sizes in combinations never trained).
The adapter is exported to its kohya file and loaded from it into a fresh pipeline, as a
worker serves it; each held-out prompt is drawn with 20 steps, guidance 4, one seed each.

Scores (targets from the issue):
- shape: IoU of the drawn blob with the ideal mask of the new shape, best over the placements
  the training pictures had (±2 px, the size range), ≥ 0.5 in ≥ 80 % of images, and higher
  than its IoU with every built-in shape (a small square overlaps a small star by half: without
  this a blob would pass);
- colour, place and size as the prompt says (builtin_model.score's reader), ≥ 90 % each;
- no leak: the same prompts without the adapter, on the pipeline the training ran beside, are
  byte-identical before and after the training;
- the training's wall time on this CPU, ≤ 10 minutes for 16 pictures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builtin_model import MODEL_DIR, data  # noqa: E402
from builtin_model.score import _largest_component, read_image  # noqa: E402
from worker.training.export import kohya_weights, load_trained  # noqa: E402
from worker.training.recipe import (  # noqa: E402
    Example,
    LoraTrainer,
    TrainingConfig,
    default_warmup,
)

NEW_SHAPES = ("star", "heart", "crescent")
TRIGGERS = {"star": "zxq", "heart": "vlom", "crescent": "qirb"}
TRAIN_COLORS = ("red", "blue", "yellow", "green", "purple", "black")
HELD_OUT_COLORS = ("orange", "pink", "cyan", "white", "gray", "brown")
TRAIN_POSITIONS = ("top left", "top", "center", "bottom left", "bottom right")
HELD_OUT_POSITIONS = ("top right", "left", "right", "bottom")
SUPERSAMPLE = 8
TARGETS = {"shape_iou_0.5": 0.80, "color": 0.90, "position": 0.90, "size": 0.90}


@dataclass(frozen=True)
class NewScene:
    kind: str
    color: str
    background: str
    size: str
    position: str

    def prompt(self, trigger: str) -> str:
        where = data._POSITION_NATURAL[self.position][0]
        return f"a {self.size} {self.color} {trigger} {where} on a {self.background} background"


def coverage(kind: str, cx: float, cy: float, half: float) -> np.ndarray:
    """The shape's coverage of each pixel of a 64×64 picture, in [0, 1] (8× supersampled)."""
    s = SUPERSAMPLE
    mask = Image.new("L", (64 * s, 64 * s), 0)
    draw = ImageDraw.Draw(mask)
    x, y, r = cx * s, cy * s, half * s
    if kind == "star":  # five points, the top one up; inner radius 0.45 of the outer
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -np.pi / 2 + k * np.pi / 5
            points.append((x + radius * np.cos(angle), y + radius * np.sin(angle) * 1.05))
        draw.polygon(points, fill=255)
    elif kind == "heart":  # the classic parametric heart, fitted to the box
        t = np.linspace(0, 2 * np.pi, 200)
        hx = 16 * np.sin(t) ** 3
        hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        hy = hy - (hy.max() + hy.min()) / 2
        scale = r / 16.5
        draw.polygon(list(zip(x + hx * scale, y + hy * scale, strict=True)), fill=255)
    elif kind == "crescent":  # a disc less a disc shifted up and right
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        ox, oy, inner = x + 0.45 * r, y - 0.2 * r, 0.85 * r
        draw.ellipse((ox - inner, oy - inner, ox + inner, oy + inner), fill=0)
    else:
        raise ValueError(kind)
    big = np.asarray(mask, dtype=np.float32) / 255.0
    cells: np.ndarray = big.reshape(64, s, 64, s).mean(axis=(1, 3))
    return cells


def render(scene: NewScene, cx: float, cy: float, half: float) -> Image.Image:
    cover = coverage(scene.kind, cx, cy, half)[..., None]
    fg = np.array(data.PALETTE[scene.color], dtype=np.float32)
    bg = np.array(data.PALETTE[scene.background], dtype=np.float32)
    return Image.fromarray((bg + (fg - bg) * cover).round().astype(np.uint8))


def placement(scene: NewScene, rng: random.Random) -> tuple[float, float, float]:
    """Where the training renderer puts a shape: its cell's centre ± jitter, a size in range."""
    index = data.POSITIONS.index(scene.position)
    jitter = data.POSITION_JITTER
    cx = data.CELL_CENTERS[index % 3] + rng.uniform(-jitter, jitter)
    cy = data.CELL_CENTERS[index // 3] + rng.uniform(-jitter, jitter)
    return cx, cy, rng.uniform(*data.SIZE_RANGES[scene.size])


def training_set(kind: str, trigger: str, seed: int = 0, count: int = 16) -> list[Example]:
    rng = random.Random(f"train-{kind}-{seed}")
    examples = []
    for i in range(count):
        color = TRAIN_COLORS[i % len(TRAIN_COLORS)]
        background = rng.choice([c for c in data.COLORS if c != color])
        scene = NewScene(kind, color, background, data.SIZES[i % 2], rng.choice(TRAIN_POSITIONS))
        examples.append(Example(render(scene, *placement(scene, rng)), scene.prompt(trigger)))
    return examples


def held_out(kind: str, count: int = 16) -> list[NewScene]:
    """Prompts the training never paired with the new word: an unseen colour or place each."""
    rng = random.Random(f"held-out-{kind}")
    scenes = []
    for i in range(count):
        color = HELD_OUT_COLORS[i % len(HELD_OUT_COLORS)]
        position = (HELD_OUT_POSITIONS + TRAIN_POSITIONS)[i % 9]
        background = rng.choice([c for c in data.COLORS if c not in (color, "gray")])
        scenes.append(NewScene(kind, color, background, data.SIZES[(i // 2) % 2], position))
    return scenes


def builtin_coverage(kind: str, cx: float, cy: float, half: float) -> np.ndarray:
    """A built-in shape's coverage, from the training renderer's own signed distances."""
    one = torch.zeros(1, dtype=torch.long)
    batch = data.SceneBatch(
        torch.tensor([data.SHAPES.index(kind)]), one, one, one, one,
        torch.tensor([cx]), torch.tensor([cy]), torch.tensor([half]),
    )  # fmt: skip
    cover = (0.5 - data.signed_distance(batch)).clamp(0.0, 1.0)
    return cover[0, 0].numpy()


def best_iou(blob: np.ndarray, scene: NewScene, kind: str) -> float:
    """IoU of a drawn blob with `kind`'s ideal mask, best over the training's placements (the
    cell's centre ± 2 px, three sizes across the size's range)."""
    index = data.POSITIONS.index(scene.position)
    lo, hi = data.SIZE_RANGES[scene.size]
    best = 0.0
    for half in np.linspace(lo, hi, 3):
        for dx in range(-2, 3):
            for dy in range(-2, 3):
                cx = data.CELL_CENTERS[index % 3] + dx
                cy = data.CELL_CENTERS[index // 3] + dy
                cover = (
                    coverage(kind, cx, cy, half)
                    if kind in NEW_SHAPES
                    else builtin_coverage(kind, cx, cy, half)
                )
                ideal = cover >= 0.5
                union = (ideal | blob).sum()
                best = max(best, float((ideal & blob).sum() / union) if union else 0.0)
    return best


def shape_reading(image: Image.Image, scene: NewScene) -> tuple[float, bool]:
    """(IoU with the new shape's ideal mask, whether it fits the new shape better than every
    built-in one): a blob that is a square or a circle is not a star, whatever its IoU."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    bg = np.array(data.PALETTE[scene.background], dtype=np.float32)
    blob = _largest_component(np.linalg.norm(pixels - bg, axis=-1) > 50.0)
    if not blob.any():
        return 0.0, False
    iou = best_iou(blob, scene, scene.kind)
    return iou, all(iou > best_iou(blob, scene, other) for other in data.SHAPES)


def load_pipeline() -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe: Any, prompts: list[str], seed: int = 0) -> list[Image.Image]:
    images = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(prompt, num_inference_steps=20, guidance_scale=4.0, generator=g)
        images.append(out.images[0])
    return images


def evaluate_shape(kind: str, config: TrainingConfig, out: Path | None) -> dict[str, Any]:
    trigger = config.trigger_word
    served = load_pipeline()
    scenes = held_out(kind)
    # The held-out prompts on the served pipeline, no adapter: the trigger is an unknown word.
    plain_prompts = [s.prompt(trigger) for s in scenes]
    before = [np.asarray(im) for im in draw(served, plain_prompts)]

    started = time.perf_counter()
    trainer = LoraTrainer(served, training_set(kind, trigger), config)
    losses = []
    while not trainer.done:
        losses.append(trainer.step().loss)
        if len(losses) % 100 == 0:
            elapsed = time.perf_counter() - started
            print(f"{kind}: step {len(losses)} loss {np.mean(losses[-100:]):.4f} {elapsed:.0f}s")
    train_s = time.perf_counter() - started
    weights = kohya_weights(trainer.lora_state(), trigger, trainer.embeddings())

    after = [np.asarray(im) for im in draw(served, plain_prompts)]
    leak_free = all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))

    adapted = load_pipeline()
    load_trained(adapted, weights, trigger, token=trigger, adapter_name="trained")
    images = draw(adapted, [s.prompt(trigger) for s in scenes], seed=100)
    rows: dict[str, list[bool]] = {k: [] for k in TARGETS}
    ious = []
    for scene, image in zip(scenes, images, strict=True):
        iou, nearest = shape_reading(image, scene)
        ious.append(iou)
        reading = read_image(image)
        rows["shape_iou_0.5"].append(iou >= 0.5 and nearest)
        rows["color"].append(reading.color == scene.color)
        rows["position"].append(reading.position == scene.position)
        rows["size"].append(reading.size == scene.size)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        sheet = Image.new("RGB", (64 * len(images), 64 * 2))
        for i, (image, scene) in enumerate(zip(images, scenes, strict=True)):
            sheet.paste(image, (64 * i, 0))
            ideal = render(scene, *placement(scene, random.Random(i)))
            sheet.paste(ideal, (64 * i, 64))
        sheet.save(out / f"{kind}.png")
    return {
        "shape": kind,
        "trigger": trigger,
        "train_s": round(train_s, 1),
        "steps": config.steps,
        "final_loss": round(float(np.mean(losses[-20:])), 5),
        "mean_iou": round(float(np.mean(ious)), 3),
        "rates": {k: sum(v) / len(v) for k, v in rows.items()},
        "leak_free": leak_free,
    }


def main(argv: list[str] | None = None) -> None:
    # What `POST /v1/trainings` uses when a field is left out: the model's card.
    defaults = json.loads((MODEL_DIR / "imagegen.json").read_text())["training"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(NEW_SHAPES), choices=NEW_SHAPES)
    parser.add_argument("--steps", type=int, default=defaults["steps"])
    parser.add_argument("--rank", type=int, default=defaults["rank"])
    parser.add_argument("--lr", type=float, default=defaults["learning_rate"])
    parser.add_argument("--embedding-lr", type=float, default=5e-3)
    parser.add_argument("--batch", type=int, default=defaults["batch_size"])
    parser.add_argument("--text-encoder", action="store_true")
    parser.add_argument("--targets", default=defaults["targets"], choices=["attention", "all"])
    parser.add_argument("--out", type=Path, default=None, help="contact sheets here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--init-word", default=None, help="the trigger's starting embedding")
    parser.add_argument("--min-snr", type=float, default=None, help="min-SNR gamma (else plain)")
    parser.add_argument(
        "--write-card", action="store_true", help="write the table into the model card"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or max(1, min(4, torch.get_num_threads())))
    results = []
    for kind in args.shapes:
        config = TrainingConfig(
            trigger_word=TRIGGERS[kind],
            steps=args.steps,
            rank=args.rank,
            learning_rate=args.lr,
            embedding_learning_rate=args.embedding_lr,
            train_text_encoder=args.text_encoder,
            batch_size=args.batch,
            targets=args.targets,
            initializer_word=args.init_word,
            min_snr_gamma=args.min_snr,
            warmup_steps=default_warmup(args.steps),
        )
        result = evaluate_shape(kind, config, args.out)
        print(json.dumps(result), flush=True)
        results.append(result)
    table = results_table(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.write_card:
        from builtin_model import card

        command = "python bench/evaluate_training.py " + " ".join(argv or sys.argv[1:])
        card.write_section(MODEL_DIR, "trainings", card_section(table, config, command.strip()))


def results_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| shape | shape drawn (IoU ≥ 0.5) | colour | place | size | no leak | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rates = r["rates"]
        lines.append(
            f"| {r['shape']} | {rates['shape_iou_0.5']:.0%} | {rates['color']:.0%} | "
            f"{rates['position']:.0%} | {rates['size']:.0%} | "
            f"{'yes' if r['leak_free'] else 'NO'} | {r['train_s']} s |"
        )
    return "\n".join(lines)


def _layers(config: TrainingConfig) -> str:
    return "every UNet layer" if config.targets == "all" else "the UNet's attention"


def card_section(table: str, config: TrainingConfig, command: str) -> str:
    return f"""## Fine-tuning through the API

`POST /v1/trainings` teaches this model a shape it has never seen from 16 pictures
(docs/trainings.md). With its training defaults ({config.steps} steps, rank {config.rank},
learning rate {config.learning_rate:g}, LoRA on {_layers(config)}, {config.batch_size} pictures a
step, the trigger word a new token), `{command}` printed, on held-out colours and places never
paired with the new word (targets: shape ≥ 80 %, colour/place/size ≥ 90 %, no leak, ≤ 10 min):

{table}

The star is capped by the VAE: its round trip alone keeps 4 of 8 small stars."""


if __name__ == "__main__":
    main()
