"""`imagegen prefetch`: download the configured hub models into the Hugging Face cache before
the workers start (compose runs it once), so that workers run offline."""

from __future__ import annotations

from pathlib import Path

from imagegen.core.settings import WorkerSettings
from worker.models import parse_models
from worker.pipeline import FP16_VARIANT, has_fp16_variant


def prefetch_model(settings: WorkerSettings) -> str:
    """Download the configured hub model(s) into the Hugging Face cache; returns what it did.

    Compose runs this once before the workers start, so that the workers can run with
    HF_HUB_OFFLINE=1 and several of them never race to download the same files. Where the
    weights will be fp16 (IMAGEGEN_DTYPE float16, or auto: the workers are meant for GPUs)
    and the repository has the fp16 variant, only that is fetched: half the bytes. With
    IMAGEGEN_MODELS, every hub id of the list is fetched.
    """
    if settings.models:
        sources = [m.source for m in parse_models(settings.models)]
        return "; ".join(_prefetch(source, settings) for source in sources)
    return _prefetch(settings.model, settings)


def _prefetch(source: str | None, settings: WorkerSettings) -> str:
    if not source or Path(source).is_dir():
        return f"nothing to fetch: {source or 'the built-in model'} is on disk"
    from diffusers import DiffusionPipeline
    from huggingface_hub import list_repo_files

    fp16 = settings.dtype in ("auto", "float16")
    variant = FP16_VARIANT if fp16 and has_fp16_variant(list_repo_files(source)) else None
    path = DiffusionPipeline.download(source, variant=variant)
    return f"{source} ({variant or 'default'} weights) is in the cache at {path}"
