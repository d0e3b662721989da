"""A model's LoRAs and ControlNets: found beside its pipeline, checked and loaded once at worker
start, switched per batch by weights.

A model directory may hold `loras/<id>/` (diffusers/PEFT LoRA safetensors) and
`controlnets/<id>/` (a diffusers `ControlNetModel`), each with a card `imagegen_adapter.json`
(`description`, `trigger_words`, `default_scale`). Every LoRA is loaded into the pipeline under
its id at start; a batch then sets the adapter set it runs with (`set_adapters` with the jobs'
scales, or none at all), so a switch is a change of scales, never a read from disk. A LoRA whose
modules or ranks do not fit the model is refused at start with one line naming the module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imagegen.core.contract import AdapterInfo, LoraRef

log = logging.getLogger("imagegen.worker")

CARD = "imagegen_adapter.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


class AdapterError(RuntimeError):
    """An adapter that cannot serve with this model; the worker refuses to start."""


def _card(folder: Path, kind: str) -> AdapterInfo:
    card: dict[str, Any] = {}
    if (folder / CARD).is_file():
        card = json.loads((folder / CARD).read_text())
    return AdapterInfo(
        id=folder.name,
        kind=kind,
        description=str(card.get("description", "")),
        trigger_words=[str(w) for w in card.get("trigger_words", [])],
        default_scale=float(card.get("default_scale", 1.0)),
    )


def check_lora(pipe: Any, adapter_id: str, weights: dict[str, torch.Tensor]) -> None:
    """Raise `AdapterError` unless every LoRA pair targets a module of the pipeline with the
    matching input and output sizes (diffusers/PEFT keys: `<component>.<module>.lora_A.weight`)."""
    pairs = [k for k in weights if k.endswith(".lora_A.weight")]
    if not pairs:
        raise AdapterError(f"LoRA {adapter_id!r}: no lora_A/lora_B weights (not PEFT format)")
    for key in pairs:
        component, _, path = key.removesuffix(".lora_A.weight").partition(".")
        module = getattr(pipe, component, None)
        if not isinstance(module, torch.nn.Module):
            raise AdapterError(f"LoRA {adapter_id!r} targets {component!r}, which the model lacks")
        try:
            target = module.get_submodule(path)
        except AttributeError:
            raise AdapterError(
                f"LoRA {adapter_id!r} targets {component}.{path}, which the model lacks"
            ) from None
        a = weights[key]
        b = weights.get(key.replace(".lora_A.", ".lora_B."))
        if b is None or a.shape[0] != b.shape[1]:
            raise AdapterError(f"LoRA {adapter_id!r}: {component}.{path} has no matching lora_B")
        if isinstance(target, torch.nn.Linear):
            sizes = (target.in_features, target.out_features)
        elif isinstance(target, torch.nn.Conv2d):
            sizes = (target.in_channels, target.out_channels)
        else:
            raise AdapterError(
                f"LoRA {adapter_id!r} targets {component}.{path}, a {type(target).__name__}"
            )
        if (a.shape[1], b.shape[0]) != sizes:
            raise AdapterError(
                f"LoRA {adapter_id!r} (rank {a.shape[0]}) does not fit {component}.{path}: "
                f"it maps {a.shape[1]} -> {b.shape[0]} features, the model {sizes[0]} -> "
                f"{sizes[1]}"
            )


@dataclass
class Adapters:
    """The adapters of one warm pipeline, and which LoRA set is active on it now."""

    pipe: Any
    loras: dict[str, AdapterInfo] = field(default_factory=dict)
    controls: dict[str, AdapterInfo] = field(default_factory=dict)
    controlnets: dict[str, Any] = field(default_factory=dict)
    # (id, scale) pairs set on the pipeline now; None = unknown (after a failure: set again).
    active: tuple[tuple[str, float], ...] | None = ()
    switches: int = 0

    def apply(self, loras: tuple[LoraRef, ...]) -> None:
        """Make exactly `loras` (with their scales) active; nothing when already so."""
        want = tuple((lora.id, lora.scale) for lora in loras)
        if want == self.active or not self.loras:
            return
        if not want:
            self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([i for i, _ in want], [s for _, s in want])
        self.active = want
        self.switches += 1

    def reset(self) -> None:
        """After a failed run: whatever state the pipeline is in, no LoRA is active."""
        self.active = None
        self.apply(())


def adapter_cards(source: Path) -> tuple[list[AdapterInfo], list[AdapterInfo]]:
    """The LoRAs and ControlNets beside the pipeline at `source`, from their cards alone (what a
    worker announces for a model it has not loaded; `load_adapters` checks and loads them)."""
    return (
        [_card(p, "lora") for p in sorted((source / "loras").glob("*")) if p.is_dir()],
        [_card(p, "controlnet") for p in sorted((source / "controlnets").glob("*")) if p.is_dir()],
    )


def load_adapters(
    pipe: Any,
    source: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    controls_allowed: bool,
    hotswap: bool = False,
) -> Adapters:
    """Find, check and load the adapters beside the pipeline at `source` (a local directory;
    a hub model has none). Raises `AdapterError` with one line when one does not fit."""
    adapters = Adapters(pipe)
    if source is None or not source.is_dir():
        return adapters
    lora_dirs = sorted(p for p in (source / "loras").glob("*") if p.is_dir())
    control_dirs = sorted(p for p in (source / "controlnets").glob("*") if p.is_dir())
    if lora_dirs:
        if not hasattr(pipe, "load_lora_weights"):
            raise AdapterError(f"model {source} cannot load LoRAs ({type(pipe).__name__})")
        from safetensors.torch import load_file

        weights = {}
        for folder in lora_dirs:
            path = folder / LORA_FILE
            if not path.is_file():
                raise AdapterError(f"LoRA {folder.name!r}: {path} is missing")
            weights[folder.name] = load_file(path)
            check_lora(pipe, folder.name, weights[folder.name])
        if hotswap:
            # Compiled: every adapter padded to the largest rank, so a switch never recompiles.
            rank = max(int(w[k].shape[0]) for w in weights.values() for k in w if "lora_A" in k)
            pipe.enable_lora_hotswap(target_rank=rank)
        for folder in lora_dirs:
            try:
                pipe.load_lora_weights(dict(weights[folder.name]), adapter_name=folder.name)
            except Exception as exc:  # a fit check above should make this rare
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise AdapterError(f"LoRA {folder.name!r} does not load: {first}") from None
            adapters.loras[folder.name] = _card(folder, "lora")
        pipe.disable_lora()
        log.info("loaded LoRAs %s", ", ".join(adapters.loras))
    if control_dirs:
        if not controls_allowed:
            raise AdapterError(
                f"ControlNets ({', '.join(p.name for p in control_dirs)}) need a Stable "
                f"Diffusion 1.x/2.x pipeline; {type(pipe).__name__} is not one"
            )
        from diffusers import ControlNetModel

        for folder in control_dirs:
            try:
                net = ControlNetModel.from_pretrained(folder, torch_dtype=dtype)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise AdapterError(f"ControlNet {folder.name!r} does not load: {first}") from None
            if net.config.cross_attention_dim != pipe.unet.config.cross_attention_dim or (
                tuple(net.config.block_out_channels) != tuple(pipe.unet.config.block_out_channels)
            ):
                raise AdapterError(
                    f"ControlNet {folder.name!r} does not fit the model's UNet (channels "
                    f"{tuple(net.config.block_out_channels)} vs "
                    f"{tuple(pipe.unet.config.block_out_channels)})"
                )
            adapters.controlnets[folder.name] = net.to(device).eval()
            adapters.controls[folder.name] = _card(folder, "controlnet")
        log.info("loaded ControlNets %s", ", ".join(adapters.controls))
    return adapters
