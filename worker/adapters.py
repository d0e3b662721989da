"""A model's LoRAs and ControlNets: found on disk, loaded once when the model loads, switched per
batch by weights.

Where a model's LoRAs come from (a model's own id wins over the library's):
- beside a local pipeline: `loras/<id>/` (one `.safetensors` file inside, with a card
  `imagegen_adapter.json`) or `loras/<id>.safetensors` (card `<id>.json`);
- the LoRA library, IMAGEGEN_LORA_DIR: `<id>.safetensors` with an optional `<id>.json`, for every
  model (a hub model's too) whose family the file fits, judged from its header alone.
A file is whatever diffusers' `load_lora_weights` reads (kohya/civitai, diffusers, PEFT; text
encoder parts too) and is loaded by path, so its alphas and metadata count exactly as in
diffusers. ControlNets are `controlnets/<id>/` (a diffusers `ControlNetModel`).

Every LoRA is loaded into the pipeline under its id; a batch then sets the adapter set it runs
with (`set_adapters` with the jobs' scales, or none at all), so a switch is a change of scales,
never a read from disk. An adapter that cannot serve (unreadable, another family's, a module
that does not fit) is listed unavailable with one line why; the model serves the others.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imagegen.core.contract import AdapterInfo, LoraRef, UnavailableAdapter

log = logging.getLogger("imagegen.worker")

CARD = "imagegen_adapter.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class ModelShape:
    """What decides whether a LoRA file fits a model, known from the model's configs alone."""

    cross_attention_dim: int | None
    has_text_encoder_2: bool


@dataclass(frozen=True)
class LoraHeader:
    """What a LoRA file's safetensors header says, read without loading a tensor."""

    format: str  # "kohya" | "diffusers" | "peft"
    rank: int
    cross_attention_dim: int | None  # in-features of its cross-attention key/value pairs
    text_encoder_2: bool  # it has parts for SDXL's second text encoder

    def misfit(self, shape: ModelShape) -> str | None:
        """Why the file cannot fit a model of `shape` (None: it may; loading decides)."""
        if self.text_encoder_2 and not shape.has_text_encoder_2:
            return "it has parts for a second text encoder (an SDXL LoRA); this model has none"
        theirs, wanted = self.cross_attention_dim, shape.cross_attention_dim
        if theirs is not None and wanted is not None and theirs != wanted:
            return (
                f"its cross-attention takes {theirs} features, this model's {wanted} (a LoRA "
                "of another model family)"
            )
        return None


@dataclass(frozen=True)
class LoraFile:
    """A LoRA on disk: its weights, its card, and its header (or why it cannot be read)."""

    id: str
    path: Path | None
    card: Path | None
    own: bool  # the model's own (beside its pipeline), not the library's
    header: LoraHeader | None = None
    problem: str | None = None


_DOWN = re.compile(r"(lora_down|lora_A|lora\.down|lora_linear_layer\.down)\.weight$")


def read_header(path: Path) -> LoraHeader:
    """The format, rank and family markers of a LoRA file, from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys if _DOWN.search(k)}
    if not shapes:
        raise ValueError("no LoRA weights in it (no lora_down / lora_A tensors)")
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        form = "kohya"
    elif any(k.startswith("base_model.model.") for k in keys):
        form = "peft"
    else:
        form = "diffusers"
    cross = [
        int(shape[1])
        for key, shape in shapes.items()
        if "attn2" in key and ("to_k" in key or "to_v" in key) and len(shape) >= 2
    ]
    return LoraHeader(
        format=form,
        rank=max(int(shape[0]) for shape in shapes.values()),
        cross_attention_dim=max(set(cross), key=cross.count) if cross else None,
        text_encoder_2=any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys),
    )


def _lora_file(adapter_id: str, path: Path | None, card: Path | None, own: bool) -> LoraFile:
    if path is None:
        problem = "no single .safetensors file in its folder"
        return LoraFile(adapter_id, None, card, own, problem=problem)
    try:
        return LoraFile(adapter_id, path, card, own, read_header(path))
    except Exception as exc:
        problem = f"{path.name} is unreadable: {_line(exc)}"
        return LoraFile(adapter_id, path, card, own, problem=problem)


def _weights_in(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.safetensors"))
    named = folder / LORA_FILE
    if named.is_file():
        return named
    return files[0] if len(files) == 1 else None


def find_loras(model_dir: Path | None, library: Path | None) -> list[LoraFile]:
    """The LoRA files of a model: its own (`loras/` beside a local pipeline), then the
    library's whose ids it does not have; by id."""
    found: dict[str, LoraFile] = {}
    if model_dir is not None and (model_dir / "loras").is_dir():
        for entry in sorted((model_dir / "loras").iterdir()):
            if entry.is_dir():
                found[entry.name] = _lora_file(entry.name, _weights_in(entry), entry / CARD, True)
            elif entry.suffix == ".safetensors":
                card = entry.with_suffix(".json")
                found[entry.stem] = _lora_file(entry.stem, entry, card, True)
    if library is not None and library.is_dir():
        for entry in sorted(library.glob("*.safetensors")):
            if entry.stem not in found:
                card = entry.with_suffix(".json")
                found[entry.stem] = _lora_file(entry.stem, entry, card, False)
    return [found[key] for key in sorted(found)]


def _card(adapter_id: str, card: Path | None, kind: str, form: str) -> AdapterInfo:
    data: dict[str, Any] = {}
    if card is not None and card.is_file():
        try:
            data = json.loads(card.read_text())
        except (OSError, ValueError) as exc:
            log.warning("adapter %s: its card %s is unreadable (%s)", adapter_id, card, exc)
    return AdapterInfo(
        id=adapter_id,
        kind=kind,
        description=str(data.get("description", "")),
        trigger_words=[str(w) for w in data.get("trigger_words", [])],
        default_scale=float(data.get("default_scale", 1.0)),
        format=form,
    )


@dataclass
class AdapterCards:
    """What a model announces of its adapters: those it serves and those it cannot."""

    loras: list[AdapterInfo] = field(default_factory=list)
    controls: list[AdapterInfo] = field(default_factory=list)
    unavailable: list[UnavailableAdapter] = field(default_factory=list)

    def controls_ids(self) -> set[str]:
        return {card.id for card in self.controls}


def adapter_cards(
    model_dir: Path | None,
    library: Path | None,
    shape: ModelShape,
    controls_allowed: bool,
    controlnets: Mapping[str, str] | None = None,
) -> tuple[AdapterCards, list[LoraFile]]:
    """The adapters a model would serve, from headers and cards alone (what a worker announces
    for a model it has not loaded), and the LoRA files worth loading. `controlnets` are the
    catalog's for the model (id: diffusers directory or hub id), a hub model's way to them."""
    cards = AdapterCards()
    loadable = []
    for lora in find_loras(model_dir, library):
        problem = lora.problem or (lora.header.misfit(shape) if lora.header else None)
        if problem is not None:
            if lora.own or lora.header is None:  # the library's of other families are not ours
                cards.unavailable.append(UnavailableAdapter(id=lora.id, reason=problem))
            continue
        assert lora.header is not None
        cards.loras.append(_card(lora.id, lora.card, "lora", lora.header.format))
        loadable.append(lora)
    for adapter_id, where in control_sources(model_dir, controlnets).items():
        if controls_allowed:
            card = Path(where) / CARD if Path(where).is_dir() else None
            cards.controls.append(_card(adapter_id, card, "controlnet", "diffusers"))
        else:
            reason = (
                "ControlNets run with Stable Diffusion 1.x/2.x and SDXL text-to-image pipelines"
            )
            cards.unavailable.append(UnavailableAdapter(id=adapter_id, reason=reason))
    return cards, loadable


def control_sources(
    model_dir: Path | None, controlnets: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A model's ControlNets by id: `controlnets/<id>/` beside it, then the catalog's."""
    found: dict[str, str] = {}
    if _has(model_dir, "controlnets"):
        assert model_dir is not None
        for folder in sorted(p for p in (model_dir / "controlnets").iterdir() if p.is_dir()):
            found[folder.name] = str(folder)
    for adapter_id, where in (controlnets or {}).items():
        found.setdefault(adapter_id, where)
    return dict(sorted(found.items()))


def _has(model_dir: Path | None, folder: str) -> bool:
    return model_dir is not None and (model_dir / folder).is_dir()


@dataclass
class Adapters:
    """The adapters of one warm pipeline, and which LoRA set is active on it now."""

    pipe: Any
    loras: dict[str, AdapterInfo] = field(default_factory=dict)
    controls: dict[str, AdapterInfo] = field(default_factory=dict)
    controlnets: dict[str, Any] = field(default_factory=dict)
    unavailable: list[UnavailableAdapter] = field(default_factory=list)
    # Trained adapters loaded for their owners' jobs (worker.private_adapters): never listed.
    private: dict[str, AdapterInfo] = field(default_factory=dict)
    # (id, scale) pairs set on the pipeline now; None = unknown (after a failure: set again).
    active: tuple[tuple[str, float], ...] | None = ()
    switches: int = 0
    # Each loaded LoRA's file as it was when loaded (path, size, mtime): a rescan reloads
    # what changed.
    files: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    # The catalog's ControlNets of the model (id: directory or hub id), for rescans.
    control_sources: dict[str, str] = field(default_factory=dict)
    # The LoRA files that failed to load, as they were, and why: not tried again unchanged.
    failures: dict[str, tuple[tuple[str, int, int], str]] = field(default_factory=dict)

    def apply(self, loras: tuple[LoraRef, ...]) -> None:
        """Make exactly `loras` (with their scales) active; nothing when already so."""
        want = tuple((lora.id, lora.scale) for lora in loras)
        if want == self.active or not (self.loras or self.private):
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

    def cards(self) -> AdapterCards:
        return AdapterCards(
            list(self.loras.values()), list(self.controls.values()), list(self.unavailable)
        )


def model_shape(pipe: Any) -> ModelShape:
    unet = getattr(pipe, "unet", None)
    cross = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    return ModelShape(
        int(cross) if isinstance(cross, int) else None,
        getattr(pipe, "text_encoder_2", None) is not None,
    )


def load_adapters(
    pipe: Any,
    source: Path | None,
    library: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    controls_allowed: bool,
    hotswap: bool = False,
    controlnets: Mapping[str, str] | None = None,
) -> Adapters:
    """Find, check and load the adapters of the pipeline at `source` (a local directory, or
    None for a hub model) and of the LoRA library. One that cannot serve is listed in
    `unavailable` with its reason; nothing here raises for an adapter."""
    adapters = Adapters(pipe, control_sources=dict(controlnets or {}))
    shape = model_shape(pipe)
    cards, loras = adapter_cards(source, library, shape, controls_allowed, controlnets)
    adapters.unavailable = list(cards.unavailable)
    if loras and not hasattr(pipe, "load_lora_weights"):
        reason = f"{type(pipe).__name__} cannot load LoRAs"
        adapters.unavailable += [UnavailableAdapter(id=lora.id, reason=reason) for lora in loras]
        loras = []
    if loras and hotswap:
        # Compiled: every adapter padded to the largest rank, so a switch never recompiles.
        pipe.enable_lora_hotswap(target_rank=max(lora.header.rank for lora in loras if lora.header))
    by_id = {card.id: card for card in cards.loras}
    for lora in loras:
        failure = _load_lora(pipe, lora)
        if failure is None:
            adapters.loras[lora.id] = by_id[lora.id]
            adapters.files[lora.id] = _signature(lora)
        else:
            log.error("LoRA %s is unavailable: %s", lora.id, failure)
            adapters.unavailable.append(UnavailableAdapter(id=lora.id, reason=failure))
            adapters.failures[lora.id] = (_signature(lora), failure)
    if adapters.loras:
        pipe.disable_lora()
        log.info("loaded LoRAs %s", ", ".join(adapters.loras))
    where = control_sources(source, controlnets)
    for card in cards.controls:
        failure = _load_controlnet(pipe, adapters, card.id, where[card.id], dtype, device)
        if failure is None:
            adapters.controls[card.id] = card
        else:
            log.error("ControlNet %s is unavailable: %s", card.id, failure)
            adapters.unavailable.append(UnavailableAdapter(id=card.id, reason=failure))
    if adapters.controls:
        log.info("loaded ControlNets %s", ", ".join(adapters.controls))
    return adapters


def refresh_loras(
    adapters: Adapters, source: Path | None, library: Path | None, controls_allowed: bool
) -> bool:
    """Bring a warm pipeline's LoRAs in line with the files on disk now: load the added and
    changed ones, remove the deleted ones (between batches: no job runs meanwhile). Whether
    anything changed."""
    pipe = adapters.pipe
    cards, loras = adapter_cards(
        source, library, model_shape(pipe), controls_allowed, adapters.control_sources
    )
    wanted = {lora.id: lora for lora in loras}
    changed = False
    for adapter_id in [i for i in adapters.loras if i not in wanted or
                       _signature(wanted[i]) != adapters.files.get(i)]:  # fmt: skip
        log.info("LoRA %s removed: its file is gone or changed", adapter_id)
        _forget(pipe, adapter_id)
        del adapters.loras[adapter_id]
        adapters.files.pop(adapter_id, None)
        changed = True
    by_id = {card.id: card for card in cards.loras}
    failed = []
    for adapter_id, lora in wanted.items():
        if adapter_id in adapters.loras:
            continue
        earlier = adapters.failures.get(adapter_id)
        if earlier is not None and earlier[0] == _signature(lora):
            failed.append(UnavailableAdapter(id=adapter_id, reason=earlier[1]))
            continue
        failure = _load_lora(pipe, lora)
        changed = True
        if failure is None:
            log.info("LoRA %s loaded from %s", adapter_id, lora.path)
            adapters.loras[adapter_id] = by_id[adapter_id]
            adapters.files[adapter_id] = _signature(lora)
            adapters.failures.pop(adapter_id, None)
        else:
            log.error("LoRA %s is unavailable: %s", adapter_id, failure)
            failed.append(UnavailableAdapter(id=adapter_id, reason=failure))
            adapters.failures[adapter_id] = (_signature(lora), failure)
    controls = set(adapters.controls)
    unavailable = [u for u in cards.unavailable if u.id not in controls] + failed
    unavailable += [u for u in adapters.unavailable if u.id in {*controls, *cards.controls_ids()}]
    if unavailable != adapters.unavailable:
        adapters.unavailable = unavailable
        changed = True
    if changed:
        adapters.active = None  # set again before the next batch
        if adapters.loras:
            adapters.apply(())
    return changed


def _signature(lora: LoraFile) -> tuple[str, int, int]:
    assert lora.path is not None
    stat = lora.path.stat()
    return (str(lora.path), stat.st_size, stat.st_mtime_ns)


def _load_lora(pipe: Any, lora: LoraFile) -> str | None:
    """Load one LoRA file under its id, as diffusers reads it (by path: alphas and metadata
    count); None, or why it cannot serve (then nothing of it stays in the pipeline)."""
    assert lora.path is not None
    try:
        pipe.load_lora_weights(
            str(lora.path.parent), weight_name=lora.path.name, adapter_name=lora.id
        )
    except Exception as exc:
        _forget(pipe, lora.id)
        return _lora_failure(exc)
    if not any(lora.id in names for names in pipe.get_list_adapters().values()):
        return "none of its weights targets a module of this model"
    return None


def _forget(pipe: Any, adapter_id: str) -> None:
    try:
        if any(adapter_id in names for names in pipe.get_list_adapters().values()):
            pipe.delete_adapters(adapter_id)
    except Exception:  # a half-loaded adapter that cannot be listed: nothing more to undo
        log.warning("could not remove what LoRA %s left behind", adapter_id, exc_info=True)


_MISMATCH = re.compile(
    r"size mismatch for (\S+?)(?:\.\w+)?\.weight: copying a param with shape "
    r"torch\.Size\(\[([\d, ]+)\]\) from checkpoint, the shape in current model is "
    r"torch\.Size\(\[([\d, ]+)\]\)"
)


def _lora_failure(exc: Exception) -> str:
    text = str(exc)
    mismatch = _MISMATCH.search(text)
    if mismatch:
        module, theirs, ours = mismatch.groups()
        return f"does not fit {module}: the file has [{theirs}], the model [{ours}]"
    if "not found in the base model" in text:
        return "targets modules this model lacks (a LoRA of another model family)"
    return _line(exc)


def _load_controlnet(
    pipe: Any,
    adapters: Adapters,
    adapter_id: str,
    where: str,
    dtype: torch.dtype,
    device: torch.device,
) -> str | None:
    from diffusers import ControlNetModel

    try:
        net = ControlNetModel.from_pretrained(where, torch_dtype=dtype)
    except Exception as exc:
        return f"does not load: {_line(exc)}"
    ours = (pipe.unet.config.cross_attention_dim, tuple(pipe.unet.config.block_out_channels))
    theirs = (net.config.cross_attention_dim, tuple(net.config.block_out_channels))
    if theirs != ours:
        return (
            f"does not fit the model's UNet (text width {theirs[0]} vs {ours[0]}, channels "
            f"{theirs[1]} vs {ours[1]}: a ControlNet of another model family)"
        )
    if net.config.addition_embed_type != pipe.unet.config.addition_embed_type:
        return (
            f"does not fit the model's UNet (its added conditioning is "
            f"{net.config.addition_embed_type!r}, the model's "
            f"{pipe.unet.config.addition_embed_type!r}: a ControlNet of another family)"
        )
    adapters.controlnets[adapter_id] = net.to(device).eval()
    return None


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
