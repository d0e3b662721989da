"""`imagegen prefetch`: download the configured hub models into the Hugging Face cache before
the workers start (compose runs it once), so that workers run offline.

One model that cannot be fetched (gated without a token, a typo, no network) is reported and
skipped, never a failure of the whole step: compose starts the workers only once this step
succeeded, and a worker lists such a model unavailable with the reason while serving the rest.
Local paths are never fetched: they are mounted into the workers, not into this container.
"""

from __future__ import annotations

from pathlib import Path

from imagegen.core.settings import WorkerSettings
from worker.models import configured_sources
from worker.pipeline import FP16_VARIANT, has_fp16_variant
from worker.single_file import config_source, is_single_file


def prefetch_model(settings: WorkerSettings) -> list[str]:
    """Download the configured hub model(s) into the Hugging Face cache; one line per model
    saying what was done.

    Compose runs this once before the workers start, so that the workers can run with
    HF_HUB_OFFLINE=1 and several of them never race to download the same files. Where the
    weights will be fp16 (IMAGEGEN_DTYPE float16, or auto: the workers are meant for GPUs)
    and the repository has the fp16 variant, only that is fetched: half the bytes.
    """
    if not settings.models and not settings.model and settings.models_file is None:
        return ["nothing to fetch: the built-in models are on disk"]
    lines = []
    for model in configured_sources(settings):
        if is_single_file(model.source):  # on disk; its family's configs may not be
            lines.append(_prefetch_configs(model.source, model.config, model.family))
            continue
        lines.append(_prefetch(model.source, settings, model.revision))
        if model.vae:  # a swapped VAE of the catalog: a component's repository
            lines.append(_prefetch(model.vae, settings, component=True))
    return lines


def is_local_path(source: str) -> bool:
    """A directory or file path (`/models/mine`, `./mine`, `~/mine`, `C:\\...`), not a hub id
    (`owner/name`)."""
    return Path(source).exists() or source.startswith(("/", ".", "~", "\\")) or ":" in source


def _prefetch_configs(checkpoint: str, config: str | None, family: str | None) -> str:
    """The configs (JSON, tokenizer files; no weights) a single-file checkpoint loads with."""
    try:
        configs = config_source(Path(checkpoint), config, family)
        if is_local_path(configs):
            return f"nothing to fetch: {checkpoint} takes its configs from {configs}"
        from huggingface_hub import snapshot_download

        snapshot_download(configs, allow_patterns=["*.json", "*.txt"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"could not fetch the configs for {checkpoint}: {first}"
    return f"{checkpoint}: the configs of {configs} are in the cache"


def _prefetch(
    source: str, settings: WorkerSettings, revision: str | None = None, component: bool = False
) -> str:
    if is_local_path(source):
        return f"nothing to fetch: {source} is a local path"
    from diffusers import DiffusionPipeline
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        if component:
            path = snapshot_download(source, revision=revision)
            return f"{source} is in the cache at {path}"
        fp16 = settings.dtype in ("auto", "float16")
        files = list_repo_files(source, revision=revision)
        variant = FP16_VARIANT if fp16 and has_fp16_variant(files) else None
        path = DiffusionPipeline.download(source, variant=variant, revision=revision)
    except Exception as exc:  # gated, missing, offline: this model only
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"could not fetch {source} (its workers will list it unavailable): {first}"
    return f"{source} ({variant or 'default'} weights) is in the cache at {path}"
