"""A worker's list of models: what each is (read from its configs, no weights), which are warm,
and loading on demand within a memory budget, the least recently used unloaded first.

A model that cannot be loaded (missing, corrupt, larger than the budget) is marked unavailable
with the reason; its jobs fail `model_unavailable` and the worker tries again only after
IMAGEGEN_MODEL_RETRY_S — never a reload loop, never a crash. A job only ever runs on the
pipeline loaded for its own model id: the manager hands out pipelines by id and nothing else.

Switch cost: diffusers memory-maps safetensors while loading (a second load from the page cache
reads no disk), and a component whose files are identical to one a loaded model already holds
(the same VAE or text encoder in two fine-tunes of one base, the built-in shapes-64 and its
distilled shapes-64-fast) is passed to the new pipeline instead of being loaded again — the
`from_pipe` idea, for pipelines that share some components rather than all of them.

Why one module of 480 lines: reading configs, the memory budget and sharing components are
the one decision of what is loaded; split, each part would need the others' state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from imagegen.core.contract import ModelInfo, ServedModel
from imagegen.core.settings import WorkerSettings
from worker.adapters import AdapterCards, ModelShape, adapter_cards, refresh_loras
from worker.catalog import CatalogEntry, load_catalog
from worker.inference import Inference
from worker.pipeline import (
    FP16_VARIANT,
    LoadedModel,
    controls_allowed,
    free_gpu_gib,
    load_model,
    model_id_for,
    model_info,
    model_kind,
    read_card,
    resolve_device,
    resolve_dtype,
    tokenizer_of,
    weights_variant,
)
from worker.single_file import config_source, is_single_file
from worker.sources import local_root, read_json

log = logging.getLogger("imagegen.worker")

# Pipeline families the worker runs (the `_class_name` of model_index.json). SD 1.x/2.x covers
# guidance-distilled few-step UNets (LCM/Turbo style, `time_cond_proj_dim`) too.
# Inpainting checkpoints (9-channel UNets) load as the text-to-image pipeline over
# the same components, and the batch loop feeds them the mask and the masked image.
SUPPORTED_FAMILIES = (
    "StableDiffusionPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLInpaintPipeline",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# The components a LoRA injects layers into.
LORA_TARGETS = frozenset({"unet", "text_encoder", "text_encoder_2"})


class UnsupportedModel(Exception):
    """The worker's list of models cannot be served as written (an id listed twice)."""


class ModelUnavailable(Exception):
    """The job's model cannot be loaded on this worker (the message says why)."""


@dataclass(frozen=True)
class ModelSource:
    """One model of the list: `source` (hub id or directory), served as `model_id`, with what
    a catalog entry adds (IMAGEGEN_MODELS_FILE: worker.catalog)."""

    model_id: str | None
    source: str
    revision: str | None = None
    vae: str | None = None
    dtype: str | None = None
    card: dict[str, Any] = field(default_factory=dict, compare=False)
    config: str | None = None  # a single file's pipeline configs (worker.single_file)
    family: str | None = None
    controlnets: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, entry: CatalogEntry) -> ModelSource:
        return cls(
            entry.id,
            entry.source,
            entry.revision,
            entry.vae,
            entry.dtype,
            entry.card(),
            entry.config,
            entry.family,
            dict(entry.controlnets),
        )


def parse_models(entries: list[str]) -> list[ModelSource]:
    """IMAGEGEN_MODELS' entries (`a=/models/a`, `stabilityai/sdxl-turbo`) → sources; ids and
    sources stripped."""
    out = []
    for part in entries:
        part = part.strip()
        if not part:
            continue
        model_id, sep, source = part.partition("=")
        entry = ModelSource(model_id.strip(), source.strip()) if sep else ModelSource(None, part)
        out.append(entry)
    return out


def builtin_sources(first_id: str | None = None) -> list[ModelSource]:
    """The built-in models that are on disk: shapes-64 (served as `first_id` if given), then
    shapes-64-fast."""
    from builtin_model import MODEL_DIR, MODEL_ID

    fast = MODEL_DIR.parent / "shapes-64-fast"
    out = [ModelSource(first_id or MODEL_ID, str(MODEL_DIR))]
    if (fast / "model_index.json").is_file():
        out.append(ModelSource(fast.name, str(fast)))
    return out


def configured_sources(settings: WorkerSettings) -> list[ModelSource]:
    """The worker's models: the catalog's, then IMAGEGEN_MODELS' (both may be set); else
    IMAGEGEN_MODEL; else the built-in models. `CatalogError` if the catalog is wrong."""
    if settings.models_file is not None or settings.models:
        catalog = load_catalog(settings.models_file) if settings.models_file else []
        return [ModelSource.of(entry) for entry in catalog] + parse_models(settings.models)
    if settings.model:
        return [ModelSource(settings.model_id, settings.model)]
    return builtin_sources(settings.model_id)


def _component_files(root: Path, component: str) -> list[Path]:
    folder = root / component
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


_HUB_BLOB = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")


def _file_digest(path: Path) -> str:
    """What a file holds: its size and content hash. A link into a Hugging Face cache's
    `blobs/` folder is named by that hash already (sha256 for weights), so it is not read;
    any other link (`ln -s`, `cp -rs`) is followed and its target read: two links to
    different files are different files whatever they are called."""
    target = path.resolve()
    size = target.stat().st_size
    if path.is_symlink() and target.parent.name == "blobs" and _HUB_BLOB.fullmatch(target.name):
        return f"{size}:{target.name}"
    digest = hashlib.sha256()
    with target.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{size}:{digest.hexdigest()}"


def folder_fingerprint(folder: Path) -> str:
    """A digest of the files directly in `folder` (a component's: config and weights)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f.name.encode() + b"\0" + _file_digest(f).encode() + b"\n")
    return digest.hexdigest()


def component_fingerprints(root: Path, index: dict[str, Any]) -> dict[str, str]:
    """A digest per model component of its config and weights: equal digests, equal modules."""
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        files = _component_files(root, name)
        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in files):
            continue
        out[name] = folder_fingerprint(root / name)
    return out


def module_bytes(modules: list[torch.nn.Module]) -> int:
    """Bytes of the parameters and buffers of `modules`, each module counted once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def _modules(model: LoadedModel) -> list[torch.nn.Module]:
    components = [c for c in model.pipe.components.values() if isinstance(c, torch.nn.Module)]
    return components + list(model.adapters.controlnets.values())


def memory_budget_bytes(settings: WorkerSettings, device: torch.device) -> int:
    """IMAGEGEN_MODEL_MEMORY_GIB, or the memory fraction of free GPU memory / available RAM."""
    if settings.model_memory_gib is not None:
        return int(settings.model_memory_gib * 2**30)
    free = free_gpu_gib(device)
    if free is not None:
        return int(settings.model_memory_fraction * free * 2**30)
    available = _available_ram()
    return int(settings.model_memory_fraction * available)


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass
class Entry:
    """One model of the list and what is known of it."""

    source: str
    info: ModelInfo
    estimate: int = 0  # bytes loading it takes (from its weight files), before it is loaded
    fingerprints: dict[str, str] = field(default_factory=dict)
    unavailable: str | None = None
    failed_at: float = 0.0
    loads: int = 0
    spec: ModelSource | None = None  # as listed (None: the source alone)
    # What decides which LoRA files fit it, and whether it takes ControlNets (for rescans).
    shape: ModelShape | None = None
    takes_controls: bool = False


@dataclass
class Warm:
    """A loaded model: its pipeline and the runner of its batches."""

    model: LoadedModel
    inference: Inference
    max_images: int = 1
    last_used: float = field(default_factory=time.monotonic)


Loader = Callable[[WorkerSettings, "ModelSource", dict[str, Any]], LoadedModel]


def _load(settings: WorkerSettings, src: ModelSource, components: dict[str, Any]) -> LoadedModel:
    return load_model(
        settings,
        src.source,
        src.model_id,
        components,
        revision=src.revision,
        vae=src.vae,
        dtype=src.dtype,
        card=src.card,
        config=src.config,
        family=src.family,
        controlnets=src.controlnets,
    )


class ModelManager:
    """The worker's models by id; `acquire(id)` returns the model's warm `Inference`, loading
    it (and unloading the least recently used ones past the budget) when it is cold."""

    def __init__(
        self,
        settings: WorkerSettings,
        sources: list[ModelSource] | None = None,
        budget_bytes: int | None = None,
        max_images: Callable[[LoadedModel, Inference], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.budget = (
            budget_bytes if budget_bytes is not None else memory_budget_bytes(settings, self.device)
        )
        self.clock = clock
        self._max_images = max_images or (lambda _m, _i: 1)
        self._lock = threading.RLock()
        self.entries: dict[str, Entry] = {}
        self.warm: OrderedDict[str, Warm] = OrderedDict()  # least recently used first
        self.loads = 0
        self._scanned_at = clock()
        for src in sources if sources is not None else configured_sources(settings):
            entry = self._probe(src)
            if entry.info.id in self.entries:
                raise UnsupportedModel(f"model id {entry.info.id!r} is listed twice")
            self.entries[entry.info.id] = entry

    # -- what the models are ----------------------------------------------------------------------
    def _probe(self, src: ModelSource) -> Entry:
        """The model's announced info from its configs alone; a model whose configs cannot be
        read is listed unavailable (never a crash), one of another family is refused."""
        source, revision = src.source, src.revision
        card = {**(read_card(source) if Path(source).is_dir() else {}), **src.card}
        model_id = model_id_for(source, self.settings, card, src.model_id)
        # Where the configs are: the model itself, or for a single file a pipeline of its
        # family (worker.single_file).
        configs = source
        try:
            if is_single_file(source):
                if not Path(source).is_file():
                    raise FileNotFoundError(f"no checkpoint file at {source}")
                configs, revision = config_source(Path(source), src.config, src.family), None
            try:
                index = read_json(configs, "model_index.json", revision)
            except Exception as exc:
                if configs == source:
                    raise
                raise FileNotFoundError(
                    f"it needs the configs of {configs} (component configs, tokenizer, "
                    "scheduler), which are not in the local Hugging Face cache: run `imagegen "
                    "prefetch` once with network, or name a diffusers directory as its "
                    f"`config` in the catalog ({type(exc).__name__})"
                ) from None
        except Exception as exc:  # missing directory, offline hub id, unreadable json
            reason = f"cannot read the model at {source}: {exc}"
            log.error("model %s unavailable: %s", model_id, reason)
            info = model_info(model_id, card, int(card.get("width", 512)), None, self.settings)
            return Entry(source, info, unavailable=reason, failed_at=self.clock(), spec=src)
        family = str(index.get("_class_name", "?"))
        if family not in SUPPORTED_FAMILIES:
            # Listed unavailable, not refused: one model of another kind never keeps a worker
            # from serving the rest of its list (worker.main exits only when none can serve).
            reason = (
                f"it is a {family}; this worker runs text-to-image "
                f"{' and '.join(SUPPORTED_FAMILIES)} models"
            )
            log.error("model %s unavailable: %s", model_id, reason)
            info = model_info(model_id, card, int(card.get("width", 512)), None, self.settings)
            return Entry(source, info, unavailable=reason, failed_at=self.clock(), spec=src)
        try:
            unet = read_json(configs, "unet/config.json", revision)
            swapped = src.vae is not None and not is_single_file(src.vae)
            vae = (
                read_json(src.vae, "config.json")
                if src.vae is not None and swapped
                else read_json(configs, "vae/config.json", revision)
            )
            sample = unet.get("sample_size", 64)
            sample = int(sample if isinstance(sample, int) else sample[0])
            native = sample * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
            scheduler = self._scheduler_name(configs, revision)
            cross = unet.get("cross_attention_dim")
            shape = ModelShape(
                int(cross) if isinstance(cross, int) else None, "text_encoder_2" in index
            )
            cards, loras = adapter_cards(
                Path(source) if Path(source).is_dir() else None,
                self.settings.lora_dir,
                shape,
                controls_allowed(family),
                src.controlnets,
            )
            info = model_info(
                model_id,
                card,
                native,
                scheduler,
                self.settings,
                tokenizer_of(configs),
                cards,
                model_kind(family, unet, source),
            )
            entry = Entry(
                source, info, spec=src, shape=shape, takes_controls=controls_allowed(family)
            )
            root = local_root(source, revision)  # a hub model: its snapshot in the cache, if any
            if is_single_file(source):  # its weights are one file; nothing is shared
                entry.estimate = Path(source).stat().st_size
            elif root is not None:
                entry.estimate = self._estimate(root)
                entry.fingerprints = component_fingerprints(root, index)
            if src.vae:  # swapped: the VAE is what is at `vae`, not what the model ships
                entry.fingerprints.pop("vae", None)
                if is_single_file(src.vae):
                    entry.fingerprints["vae"] = _file_digest(Path(src.vae))
                elif (vae_root := local_root(src.vae)) is not None:
                    entry.fingerprints["vae"] = folder_fingerprint(vae_root)
            # The library's LoRAs it would load weigh too (its own are in the estimate).
            entry.estimate += sum(
                lora.path.stat().st_size for lora in loras if lora.path and not lora.own
            )
            return entry
        except Exception as exc:
            reason = f"cannot read the model's configs: {type(exc).__name__}: {exc}"
            info = model_info(model_id, card, 512, None, self.settings)
            return Entry(source, info, unavailable=reason, failed_at=self.clock(), spec=src)

    @staticmethod
    def _scheduler_name(source: str, revision: str | None) -> str | None:
        import diffusers

        from worker.schedulers import name_of

        config = read_json(source, "scheduler/scheduler_config.json", revision)
        cls = getattr(diffusers, str(config.get("_class_name")), None)
        return name_of(cls.from_config(config)) if cls is not None else None

    def _estimate(self, root: Path) -> int:
        """Bytes the model's weights take loaded: its components' files of the variant that
        loads, and its adapters' (ControlNets, LoRAs beside it)."""
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        variant = weights_variant(files, self.dtype)
        total = 0
        for rel in files:
            if not rel.endswith(WEIGHT_SUFFIXES):
                continue
            if rel.startswith(("controlnets/", "loras/")):
                size = (root / rel).stat().st_size
                total += size // 2 if self.dtype in (torch.float16, torch.bfloat16) else size
                continue
            if rel.count("/") != 1:
                continue
            parts = rel.split("/")[1].split(".")
            is_variant = len(parts) > 2 and parts[1].startswith(FP16_VARIANT)
            if is_variant != (variant is not None):
                continue
            size = (root / rel).stat().st_size
            if variant is None and self.dtype in (torch.float16, torch.bfloat16):
                size //= 2  # fp32 files, loaded as half
            total += size
        return total

    # -- warmth -----------------------------------------------------------------------------------
    def rescan_loras(self, force: bool = False) -> None:
        """Between batches, every IMAGEGEN_LORA_RESCAN_S (or now, on SIGHUP): LoRA files added
        to or removed from a model's `loras/` and the library show up without a restart. A
        warm model loads and unloads them (a compiled one keeps what it was compiled with);
        a cold one announces the new list, loaded with it."""
        now = self.clock()
        if not force and (
            self.settings.lora_rescan_s <= 0 or now - self._scanned_at < self.settings.lora_rescan_s
        ):
            return
        self._scanned_at = now
        library = self.settings.lora_dir
        for model_id, entry in list(self.entries.items()):
            folder = Path(entry.source) if Path(entry.source).is_dir() else None
            warm = self.warm.get(model_id)
            if warm is not None:
                model = warm.model
                refreshed = not model.compiled_batches and refresh_loras(
                    model.adapters, folder, library, entry.takes_controls
                )
                if not refreshed:
                    continue
                cards = model.adapters.cards()
                model.info = _with_adapters(model.info, cards)
            elif entry.shape is not None and not entry.unavailable:
                controls = entry.spec.controlnets if entry.spec else {}
                cards, _ = adapter_cards(
                    folder, library, entry.shape, entry.takes_controls, controls
                )
                entry.info = _with_adapters(entry.info, cards)

    def ids(self) -> list[str]:
        return list(self.entries)

    def servable_ids(self) -> list[str]:
        """The models not known to be unavailable, in list order."""
        return [model_id for model_id, entry in self.entries.items() if not entry.unavailable]

    def warm_ids(self) -> list[str]:
        """Models held warm, the most recently used first."""
        with self._lock:
            return list(reversed(self.warm))

    def is_warm(self, model_id: str) -> bool:
        return model_id in self.warm

    def limit_images(self, model_id: str, images: int) -> None:
        """At most `images` per batch for the warm model (what its warm-up fitted)."""
        with self._lock:
            warm = self.warm.get(model_id)
            if warm is not None and images > 0:
                warm.max_images = min(warm.max_images, images)

    def mark_unavailable(self, model_id: str, reason: str) -> None:
        """The model cannot serve here (unloaded; tried again after IMAGEGEN_MODEL_RETRY_S)."""
        self.unload(model_id)
        entry = self.entries[model_id]
        entry.unavailable, entry.failed_at = reason, self.clock()

    def max_images(self, model_id: str) -> int:
        warm = self.warm.get(model_id)
        return warm.max_images if warm is not None else 1

    def used_bytes(self) -> int:
        """Bytes the warm models hold: their pipelines' modules (LoRA layers included) and
        their ControlNets, each tensor counted once."""
        with self._lock:
            return module_bytes([m for w in self.warm.values() for m in _modules(w.model)])

    def unavailable(self, model_id: str) -> str | None:
        """Why the model cannot be loaded now (None: it can be, or is loaded)."""
        entry = self.entries[model_id]
        retry = self.clock() - entry.failed_at >= self.settings.model_retry_s
        if entry.unavailable and retry and self._probe_again(model_id):
            return None
        return entry.unavailable

    def _probe_again(self, model_id: str) -> bool:
        entry = self.entries[model_id]
        fresh = self._probe(entry.spec or ModelSource(model_id, entry.source))
        fresh.loads = entry.loads
        self.entries[model_id] = fresh
        return fresh.unavailable is None

    # -- loading ----------------------------------------------------------------------------------
    def acquire(self, model_id: str, loader: Loader = _load) -> Inference:
        """The model's warm `Inference`, loaded now if it is cold; `ModelUnavailable` if it
        cannot be loaded (the reason is remembered for IMAGEGEN_MODEL_RETRY_S).

        Called by the work loop only. The lock guards the bookkeeping the heartbeat thread
        reads, never a load: a load of minutes must not hold up the heartbeat."""
        with self._lock:
            warm = self.warm.get(model_id)
            if warm is not None:
                self.warm.move_to_end(model_id)
                warm.last_used = self.clock()
                return warm.inference
        reason = self.unavailable(model_id)
        if reason:
            raise ModelUnavailable(reason)
        entry = self.entries[model_id]
        with self._lock:
            shared = self._shared_components(entry)
            need = max(entry.estimate - module_bytes(list(shared.values())), 0)
            if need > self.budget:
                self._mark(entry, f"needs {_gib(need)} GiB, more than the worker's model "
                           f"memory budget of {_gib(self.budget)} GiB")  # fmt: skip
            while self.warm and self.used_bytes() + need > self.budget:
                self.unload(next(iter(self.warm)))
                # An unloaded model may have been the one sharing components.
                shared = self._shared_components(entry)
                need = max(entry.estimate - module_bytes(list(shared.values())), 0)
        started = time.perf_counter()
        try:
            model = self._load(loader, entry, model_id, shared)
        except Exception as exc:
            self._mark(entry, f"loading failed: {type(exc).__name__}: {exc}"[:500])
        inference = Inference(model)
        with self._lock:
            self.loads += 1
            entry.loads += 1
            warm = Warm(model, inference, self._max_images(model, inference), self.clock())
            self.warm[model_id] = warm
            used = self.used_bytes()
        log.info(
            "loaded %s in %.2fs (shared %s); warm: %s; %s of %s GiB",
            model_id,
            time.perf_counter() - started,
            ", ".join(shared) or "nothing",
            ", ".join(self.warm),
            _gib(used),
            _gib(self.budget),
        )
        if used > self.budget:
            log.warning("model %s: more than the memory budget is held (low estimate)", model_id)
        return inference

    def _load(
        self, loader: Loader, entry: Entry, model_id: str, shared: dict[str, torch.nn.Module]
    ) -> LoadedModel:
        return loader(self.settings, entry.spec or ModelSource(model_id, entry.source), shared)

    def _shared_components(self, entry: Entry) -> dict[str, torch.nn.Module]:
        """Components of warm models whose files are identical to this model's own. A module
        that carries LoRA layers, or would, is never shared: another model's runs would hold
        its adapters."""
        out: dict[str, torch.nn.Module] = {}
        for warm_id, warm in self.warm.items():
            other = self.entries[warm_id].fingerprints
            with_loras = bool(entry.info.adapters) or bool(warm.model.adapters.loras)
            for name, digest in entry.fingerprints.items():
                if with_loras and name in LORA_TARGETS:
                    continue
                module = getattr(warm.model.pipe, name, None)
                if name not in out and other.get(name) == digest and module is not None:
                    out[name] = module
        return out

    def _mark(self, entry: Entry, reason: str) -> NoReturn:
        entry.unavailable = reason
        entry.failed_at = self.clock()
        log.error("model %s unavailable: %s", entry.info.id, reason)
        raise ModelUnavailable(reason)

    def unload(self, model_id: str) -> None:
        with self._lock:
            warm = self.warm.pop(model_id, None)
            if warm is None:
                return
            log.info("unloading %s (least recently used)", model_id)
            warm.model.pipe = None
            warm.inference.model = None  # type: ignore[assignment]
            del warm
            import gc

            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- announcing ------------------------------------------------------------------------------
    def served(self) -> list[ServedModel]:
        with self._lock:
            out = []
            for model_id, entry in self.entries.items():
                warm = self.warm.get(model_id)
                out.append(
                    ServedModel(
                        info=warm.model.info if warm is not None else entry.info,
                        loaded=warm is not None,
                        unavailable=entry.unavailable if warm is None else None,
                        memory_bytes=(
                            module_bytes(_modules(warm.model))
                            if warm is not None
                            else entry.estimate
                        ),
                    )
                )
            return out


def _with_adapters(info: ModelInfo, cards: AdapterCards) -> ModelInfo:
    return info.model_copy(
        update={
            "adapters": cards.loras,
            "controls": cards.controls,
            "unavailable_adapters": cards.unavailable,
        }
    )


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f}"
