"""Where a model's files are: a local directory, or a hub repository's snapshot in the local
Hugging Face cache (downloaded on demand only when the worker is online)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def local_root(source: str, revision: str | None = None) -> Path | None:
    """The directory holding the model's files: a local model's own, a hub model's snapshot
    in the Hugging Face cache (None when it is not there: nothing is downloaded here)."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception:  # not cached, or not a hub id
        return None


def config_file(source: str, name: str, revision: str | None = None) -> Path:
    if Path(source).is_dir():
        return Path(source) / name
    if source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no model directory at {source}")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source, name, revision=revision))


def read_json(source: str, name: str, revision: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(config_file(source, name, revision).read_text())
    return data
