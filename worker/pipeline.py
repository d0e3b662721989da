"""Loading a model's pipeline, through diffusers' auto pipeline: weights onto the device, its
adapters, the speed-ups, and the record the worker publishes for it."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoPipelineForText2Image

from imagegen.core.contract import SCHEDULER_NAMES, ModelInfo, TrainingDefaults
from imagegen.core.settings import WorkerSettings
from worker.adapters import AdapterCards, Adapters, load_adapters
from worker.families import supports_batching
from worker.preprocessors import preprocessor_names
from worker.prompts import PromptEncoder
from worker.schedulers import OWN, name_of
from worker.single_file import config_source, is_single_file, load_single_file
from worker.sources import read_json

log = logging.getLogger("imagegen.worker")

# Defaults for a model that ships no imagegen.json (e.g. a hub Stable Diffusion checkpoint).
FALLBACK_STEPS = 30
FALLBACK_GUIDANCE = 7.5
FALLBACK_SCHEDULER = "euler"
# Hub repositories such as SD 1.5 and SDXL ship half-size fp16 weights under this variant
# (`unet/diffusion_pytorch_model.fp16.safetensors`).
FP16_VARIANT = "fp16"


@dataclass
class LoadedModel:
    """A pipeline ready to run, and what the worker announces about it."""

    pipe: Any
    info: ModelInfo
    device: torch.device
    dtype: torch.dtype
    scheduler_config: Any
    attention_slicing: bool
    vae_tiling: bool
    batch_invariant: bool
    # Batch sizes (images) the UNet and VAE decoder were compiled for; () when not compiled.
    # The batch loop pads to the next of them, so serving never compiles.
    compiled_batches: tuple[int, ...] = ()
    # The model's LoRAs and ControlNets (none: an empty set).
    adapters: Adapters = field(default_factory=lambda: Adapters(None))
    # Weighted and long prompts (worker.prompts); None for a pipeline without a tokenizer.
    prompts: PromptEncoder | None = None


def default_model_dir() -> Path:
    from builtin_model import MODEL_DIR

    return MODEL_DIR


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[setting]


def free_gpu_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free / 2**30


def _toggle(setting: str, short_of_memory: bool) -> bool:
    return setting == "on" or (setting == "auto" and short_of_memory)


def read_card(source: str) -> dict[str, Any]:
    card = Path(source) / "imagegen.json"
    if card.is_file():
        data: dict[str, Any] = json.loads(card.read_text())
        return data
    return {}


def model_id_for(
    source: str, settings: WorkerSettings, card: dict[str, Any], model_id: str | None = None
) -> str:
    if model_id:
        return model_id
    if settings.model_id and not settings.models:
        return settings.model_id
    if "id" in card:
        return str(card["id"])
    path = Path(source)
    return path.name if path.is_dir() else source


def _speed_up(pipe: Any, settings: WorkerSettings) -> None:
    """The warm-start options: fused QKV, channels_last, torch.compile (warm-up happens in the
    worker's first generations, one per batch size in IMAGEGEN_COMPILE_BATCHES)."""
    if settings.fuse_qkv and hasattr(pipe, "fuse_qkv_projections"):
        pipe.fuse_qkv_projections()
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.compile:
        # One static graph per batch size (dynamic=False: a dynamic-shape graph autotunes
        # worse), and the batch loop pads every call to one of the warmed sizes.
        # "max-autotune-no-cudagraphs" keeps memory predictable across those sizes.
        mode = "max-autotune-no-cudagraphs"
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True, dynamic=False)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=mode, dynamic=False)


# The tokenizers of the models this process announced, by sha256 of their JSON: the
# heartbeat writes each to Redis (`Keys.tokenizer`) for the gateway to count prompt tokens.
TOKENIZERS: dict[str, str] = {}


def tokenizer_of(source: str, tokenizer: Any = None) -> Any:
    """The model's (first) tokenizer: the loaded one, else read from its files (no weights);
    None when it cannot be read."""
    if tokenizer is not None:
        return tokenizer
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
    except Exception as exc:  # an offline hub id, a model without a tokenizer folder
        log.warning("cannot read the tokenizer of %s (%s): prompts are not counted", source, exc)
        return None


def prompt_fields(settings: WorkerSettings, tokenizer: Any) -> dict[str, Any]:
    """`max_prompt_tokens`, `prompt_weighting` and `tokenizer` of a model's announcement."""
    if tokenizer is None:
        return {}
    from imagegen.core.prompts import max_prompt_tokens

    window = int(tokenizer.model_max_length)
    fields: dict[str, Any] = {
        "max_prompt_tokens": max_prompt_tokens(window, settings.max_prompt_chunks),
        "prompt_weighting": settings.prompt_weighting,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
        digest = hashlib.sha256(text.encode()).hexdigest()
        TOKENIZERS[digest] = text
        fields["tokenizer"] = digest
    return fields


def controls_allowed(pipeline_class: str) -> bool:
    """ControlNet residuals run in the batch loop for SD 1.x/2.x and SDXL (its ControlNets
    get the pooled embedding and micro-conditioning the UNet gets)."""
    return pipeline_class in ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def model_info(
    model_id: str,
    card: dict[str, Any],
    native: int,
    scheduler: str | None,
    settings: WorkerSettings,
    tokenizer: Any = None,
    adapters: AdapterCards | None = None,
    kind: dict[str, Any] | None = None,
) -> ModelInfo:
    """What a worker announces about a model: its card's defaults and caps over the
    pipeline's own (native size, scheduler), the settings' caps for a model without a card,
    and its prompt limit from its tokenizer."""
    max_pixels = card.get("max_pixels", settings.model_max_pixels)
    max_steps = card.get("max_steps", settings.model_max_steps)
    return ModelInfo(
        id=model_id,
        width=int(card.get("width", native)),
        height=int(card.get("height", native)),
        steps=int(card.get("steps", FALLBACK_STEPS)),
        guidance_scale=float(card.get("guidance_scale", FALLBACK_GUIDANCE)),
        scheduler=str(card.get("scheduler") or scheduler or FALLBACK_SCHEDULER),
        schedulers=list(SCHEDULER_NAMES) + ([OWN] if scheduler == OWN else []),
        max_pixels=int(max_pixels) if max_pixels is not None else None,
        max_steps=int(max_steps) if max_steps is not None else None,
        adapters=adapters.loras if adapters else [],
        controls=adapters.controls if adapters else [],
        # Preprocessors serve ControlNets: listed for a model that has some.
        preprocessors=(
            preprocessor_names(settings.depth_model, settings.pose_model)
            if adapters and adapters.controls
            else []
        ),
        unavailable_adapters=adapters.unavailable if adapters else [],
        **(kind or {}),
        **prompt_fields(settings, tokenizer),
        **training_fields(card, kind, tokenizer),
    )


def training_fields(
    card: dict[str, Any], kind: dict[str, Any] | None, tokenizer: Any = None
) -> dict[str, Any]:
    """`training` (the defaults of `POST /v1/trainings`: the card's `training` section over the
    family's) or `not_trainable` (why not). The recipe (worker.training) trains the UNet and
    text encoders of Stable Diffusion 1.x/2.x and SDXL text-to-image models."""
    family = (kind or {}).get("family", "")
    section = card.get("training", {})
    if section is False:
        return {"not_trainable": "its card turns trainings off (`training: false`)"}
    if family not in ("sd15", "sd2", "sdxl"):
        reason = (
            "the trainer fine-tunes Stable Diffusion 1.x/2.x and SDXL models; "
            f"this is {family or 'an unknown family'}"
        )
        return {"not_trainable": reason}
    if family == "sdxl" and tokenizer is None:
        return {"not_trainable": "it has no first text encoder (an SDXL refiner)"}
    if (kind or {}).get("inpainting"):
        return {"not_trainable": "it is an inpainting model; train its text-to-image base"}
    defaults = TrainingDefaults.model_validate(section)
    if tokenizer is not None:
        window = int(tokenizer.model_max_length) - 2
        defaults = defaults.model_copy(update={"max_caption_tokens": window})
    return {"training": defaults}


def model_kind(pipeline_class: str, unet_config: Any, source: str) -> dict[str, Any]:
    """`family`, `source_format` and `inpainting` of a model, from its configs."""
    config = dict(unet_config)
    cross = config.get("cross_attention_dim")
    family = "sdxl" if "XL" in pipeline_class else "sd2" if cross == 1024 else "sd15"
    form = "single_file" if is_single_file(source) else "diffusers"
    return {
        "family": family,
        "source_format": form if form == "single_file" or Path(source).is_dir() else "hub",
        "inpainting": config.get("in_channels") == 9,
    }


def has_fp16_variant(files: Iterable[str]) -> bool:
    """Whether a pipeline's files (paths relative to its root) hold fp16-variant weights in a
    component folder, the way diffusers recognises a variant (`name.fp16[-shard].ext`)."""
    for file in files:
        parts = file.split("/")
        names = parts[-1].split(".")
        if len(parts) == 2 and len(names) > 2 and names[1].startswith(FP16_VARIANT):
            return True
    return False


def _has_plain_weights(files: Iterable[str]) -> bool:
    weights = (".safetensors", ".bin")
    return any(
        file.count("/") == 1 and file.endswith(weights) and len(file.split("/")[1].split(".")) == 2
        for file in files
    )


def weights_variant(files: Iterable[str], dtype: torch.dtype) -> str | None:
    """The variant to load: fp16 when the weights are loaded as fp16 and the model has it (half
    the bytes to read), or when the model holds only fp16 weights (a prefetch for a GPU)."""
    files = list(files)
    if not has_fp16_variant(files):
        return None
    if dtype == torch.float16 or not _has_plain_weights(files):
        return FP16_VARIANT
    return None


def _local_files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _model_files(source: str) -> list[str]:
    """The files of a local pipeline, of a hub model's cached snapshot (what prefetch fetched),
    or, when nothing is cached, of the hub repository."""
    if Path(source).is_dir():
        return _local_files(Path(source))
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return _local_files(Path(snapshot_download(source, local_files_only=True)))
    except LocalEntryNotFoundError:
        return list_repo_files(source)


def load_model(
    settings: WorkerSettings,
    source: str | None = None,
    model_id: str | None = None,
    components: dict[str, Any] | None = None,
    *,
    revision: str | None = None,
    vae: str | None = None,
    dtype: str | None = None,
    card: dict[str, Any] | None = None,
    config: str | None = None,
    family: str | None = None,
    controlnets: dict[str, str] | None = None,
) -> LoadedModel:
    """Load a pipeline onto its device (default: the configured one); the only place weights
    are loaded. Safetensors weights are memory-mapped by diffusers while loading: a second
    load of a model from the page cache reads no disk. `components` are modules already in
    memory (another loaded model's identical VAE, text encoder, ...) used instead of loading
    those again. A catalog entry (worker.catalog) adds a hub `revision`, a swapped `vae` (a
    hub id or diffusers directory), its own `dtype` and `card` (defaults and caps)."""
    source = source or settings.model or str(default_model_dir())
    device = resolve_device(settings.device)
    weights = resolve_dtype(dtype or settings.dtype, device)
    components = dict(components or {})
    if vae is not None and "vae" not in components:
        from diffusers import AutoencoderKL

        if is_single_file(vae):  # e.g. vae-ft-mse-840000-ema-pruned.safetensors
            configs = (
                config_source(Path(source), config, family) if is_single_file(source) else source
            )
            components["vae"] = AutoencoderKL.from_single_file(
                vae, config=configs, subfolder="vae", torch_dtype=weights
            )
        else:
            components["vae"] = AutoencoderKL.from_pretrained(vae, torch_dtype=weights)
    if is_single_file(source):
        configs = config_source(Path(source), config, family)
        log.info("loading %s on %s as %s (configs of %s)", source, device, weights, configs)
        index = read_json(configs, "model_index.json")
        pipe = load_single_file(
            Path(source), configs, str(index["_class_name"]), weights, **components
        )
    else:
        hub = {} if Path(source).is_dir() or revision is None else {"revision": revision}
        variant = weights_variant(_model_files(source), weights)
        log.info(
            "loading %s on %s as %s (%s weights)", source, device, weights, variant or "default"
        )
        pipe = AutoPipelineForText2Image.from_pretrained(
            source, dtype=weights, variant=variant, **hub, **components
        )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if settings.safety_checker == "off" and getattr(pipe, "safety_checker", None) is not None:
        pipe.register_modules(safety_checker=None)  # IMAGEGEN_SAFETY_CHECKER=off
    # Stable Diffusion safety checkers are optional components; we load what the model ships.

    free = free_gpu_gib(device)
    short = free is not None and free < settings.low_memory_gib
    slicing = _toggle(settings.attention_slicing, short)
    tiling = _toggle(settings.vae_tiling, short)
    if slicing:
        pipe.enable_attention_slicing()
    if tiling and hasattr(pipe, "vae"):
        pipe.vae.enable_tiling()
    # Otherwise attention uses torch's scaled_dot_product_attention, diffusers' default.
    # Adapters before the speed-ups: a LoRA targets the unfused projections, and a compiled
    # UNet must already hold every adapter (padded to one rank: switching never recompiles).
    adapters = load_adapters(
        pipe,
        Path(source) if Path(source).is_dir() else None,
        settings.lora_dir,
        device,
        weights,
        # ControlNet residuals run in the batch loop for SD 1.x/2.x (not SDXL: its ControlNets
        # take the micro-conditioning too, which the loop does not pass them).
        controls_allowed=controls_allowed(type(pipe).__name__) and supports_batching(pipe),
        hotswap=settings.compile,
        controlnets=controlnets,
    )
    if adapters.loras and settings.fuse_qkv:
        log.warning("fused QKV projections are off: the model's LoRAs target the unfused ones")
        settings = settings.model_copy(update={"fuse_qkv": False})
    _speed_up(pipe, settings)

    card = {**read_card(source), **(card or {})}
    vae_scale = getattr(pipe, "vae_scale_factor", 8)
    sample_size = pipe.unet.config.sample_size
    native = int(sample_size if isinstance(sample_size, int) else sample_size[0]) * vae_scale
    info = model_info(
        model_id_for(source, settings, card, model_id),
        card,
        native,
        name_of(pipe.scheduler),
        settings,
        getattr(pipe, "tokenizer", None),
        adapters=adapters.cards(),
        kind=model_kind(type(pipe).__name__, pipe.unet.config, source),
    )
    prompts = (
        PromptEncoder(pipe, settings.prompt_weighting, settings.max_prompt_chunks)
        if getattr(pipe, "tokenizer", None) is not None
        else None
    )
    log.info(
        "loaded %s: native %dx%d, attention slicing %s, vae tiling %s, free gpu %s GiB",
        info.id,
        info.width,
        info.height,
        slicing,
        tiling,
        f"{free:.1f}" if free is not None else "n/a",
    )
    return LoadedModel(
        pipe=pipe,
        info=info,
        device=device,
        dtype=weights,
        scheduler_config=dict(pipe.scheduler.config),
        attention_slicing=slicing,
        vae_tiling=tiling,
        batch_invariant=settings.batch_invariant == "on"
        or (settings.batch_invariant == "auto" and device.type == "cpu"),
        compiled_batches=settings.compile_batches if settings.compile else (),
        adapters=adapters,
        prompts=prompts,
    )
