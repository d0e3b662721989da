"""Single-file checkpoints (`model.safetensors` / `.ckpt`, the format most fine-tunes ship in):
loaded with diffusers' `from_single_file`, their configs (component configs, tokenizer,
scheduler) from a diffusers pipeline of the same family.

Which pipeline: the catalog's `config` (a diffusers directory or hub id), else the catalog's
`family` (sd15, sd2, sdxl), else the family diffusers recognises in the file's weights (its
header alone is read). A hub id's configs come from the local Hugging Face cache when the
worker runs offline (`imagegen prefetch` fetches them); when they are missing the model is
unavailable with that reason, never a download at run time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

SUFFIXES = (".safetensors", ".ckpt")
# The pipelines whose configs a family's single files load with (diffusers' own defaults).
FAMILY_CONFIGS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}


def is_single_file(source: str) -> bool:
    return Path(source).suffix in SUFFIXES


class _Header(Mapping[str, torch.Tensor]):
    """A safetensors file as the mapping diffusers' family detection reads: its keys from the
    header, a tensor read only when asked for (detection reads one or two)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), "pt")
        self._keys = set(self._file.keys())  # type: ignore[no-untyped-call]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        tensor: torch.Tensor = self._file.get_tensor(key)  # type: ignore[no-untyped-call]
        return tensor

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def config_source(path: Path, config: str | None = None, family: str | None = None) -> str:
    """Where the file's pipeline configs come from (a directory or hub id); ValueError with
    the reason when the file cannot be read or its family is not one served here."""
    if config:
        return config
    if family:
        return FAMILY_CONFIGS[family]
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    checkpoint: Mapping[str, Any]
    if path.suffix == ".safetensors":
        checkpoint = _Header(path)
    else:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        checkpoint = checkpoint.get("state_dict", checkpoint)
    try:
        found = fetch_diffusers_config(checkpoint)
    except KeyError:
        found = {}
    repo = str(found.get("pretrained_model_name_or_path", ""))
    if found.get("subfolder") or repo not in {*FAMILY_CONFIGS.values(), *INPAINTING}:
        raise ValueError(
            f"its weights are not a Stable Diffusion 1.x, 2.x or SDXL checkpoint diffusers "
            f"recognises ({repo or 'unknown'}); name its `family` or `config` in the catalog"
        )
    return repo


INPAINTING = {
    "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "stabilityai/stable-diffusion-2-inpainting",
}


def load_single_file(
    path: Path, configs: str, pipeline_class: str, dtype: torch.dtype, **components: Any
) -> Any:
    """The text-to-image pipeline of the checkpoint at `path`, with `configs`' configs."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if "XL" in pipeline_class else StableDiffusionPipeline
    return cls.from_single_file(str(path), config=configs, torch_dtype=dtype, **components)
