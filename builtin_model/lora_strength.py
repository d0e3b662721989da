"""Fold a strength into a saved LoRA, so that scale 1 draws what scale S drew.

    python -m builtin_model.lora_strength builtin_model/shapes-64/loras/outline 0.9

A LoRA's update is ``B @ A`` times the scale, so multiplying every ``lora_B`` by S is the same
LoRA at scale S, up to the fp16 rounding of the saved weights. Why fold it rather than change the
card's ``default_scale``: users send scale 1 (A1111's ``<lora:outline:1>``, our default), and the
exported kohya file carries the weights, not our card.

Where S comes from: a LoRA continued on a changed base model can overshoot, and the strength is
then chosen on *training* scenes (``bench/evaluate_adapters.py --validation 96 --only outline
--outline-scale S``), never on the held-out ones. The saved record keeps the chain:
``{"strength": S, "parent": <the record before>}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

WEIGHTS = "pytorch_lora_weights.safetensors"
RECORD = "train_state.json"


def fold_strength(lora_dir: Path, strength: float) -> dict[str, object]:
    """Scale every ``lora_B`` tensor of ``lora_dir``'s weights by ``strength`` in place and
    record it; returns the new record."""
    if not strength > 0.0:  # (also refuses NaN)
        raise ValueError(f"strength must be > 0, got {strength}")
    path = lora_dir / WEIGHTS
    tensors = load_file(path)
    ups = [k for k in tensors if ".lora_B." in k]
    if not ups:
        raise ValueError(f"{path} holds no lora_B tensors (PEFT naming)")
    for key in ups:
        dtype = tensors[key].dtype
        tensors[key] = (tensors[key].float() * strength).to(dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    record: dict[str, object] = {"strength": strength}
    parent = lora_dir / RECORD
    if parent.is_file():
        record["parent"] = json.loads(parent.read_text())
    parent.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lora_dir", type=Path, help="a saved LoRA (PEFT naming), changed in place")
    parser.add_argument("strength", type=float, help="the scale to fold in, > 0")
    args = parser.parse_args(argv)
    record = fold_strength(args.lora_dir, args.strength)
    print(f"{args.lora_dir}: lora_B × {record['strength']}")


if __name__ == "__main__":
    main()
