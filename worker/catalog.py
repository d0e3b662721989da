"""The model catalog, IMAGEGEN_MODELS_FILE: a YAML list of the models a worker serves, each with
what a hub model cannot carry itself (its defaults and caps), a pinned revision, a swapped VAE
and a dtype. IMAGEGEN_MODELS stays the short form (`id=source`, comma-separated).

    models:
      - id: sd15
        source: stable-diffusion-v1-5/stable-diffusion-v1-5   # hub id | diffusers directory
        revision: main                                         # hub only
        vae: stabilityai/sd-vae-ft-mse                 # hub id | diffusers directory | one file
        dtype: float16
        defaults: {steps: 30, guidance_scale: 7.5, scheduler: dpmpp_2m_karras}
        max_pixels: 1048576
        max_steps: 150

The file is read once, when the worker starts, and checked whole: every problem is one line
naming the entry and the field, and a worker with any refuses to start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imagegen.core.contract import SCHEDULER_NAMES


class CatalogError(ValueError):
    """The catalog cannot be served as written; `problems` are its lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Defaults(BaseModel):
    """What a request that leaves a field out gets (the model's imagegen.json, for a hub
    model that cannot carry one)."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    scheduler: str | None = None
    width: int | None = Field(None, ge=64, multiple_of=8)
    height: int | None = Field(None, ge=64, multiple_of=8)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        names = (*SCHEDULER_NAMES, "default")  # default: the model's own (worker.schedulers)
        if value is not None and value not in names:
            raise ValueError(f"must be one of {', '.join(names)}")
        return value


class CatalogEntry(BaseModel):
    """One model of the catalog."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: str = Field(min_length=1)
    revision: str | None = None
    family: Literal["sd15", "sd2", "sdxl"] | None = None
    # A single file's pipeline configs, a diffusers directory or hub id (default: the family's).
    config: str | None = None
    # ControlNets served with it, by id: a diffusers directory or hub id (a hub model's way to
    # have them; a local model's `controlnets/<id>/` come first).
    controlnets: dict[str, str] = Field(default_factory=dict)
    vae: str | None = None
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    max_pixels: int | None = Field(None, ge=64 * 64)
    max_steps: int | None = Field(None, ge=1)

    def card(self) -> dict[str, Any]:
        """The entry as an imagegen.json card: defaults and caps, over the model's own."""
        card: dict[str, Any] = self.defaults.model_dump(exclude_none=True)
        if self.max_pixels is not None:
            card["max_pixels"] = self.max_pixels
        if self.max_steps is not None:
            card["max_steps"] = self.max_steps
        return card


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[CatalogEntry] = Field(min_length=1)


def load_catalog(path: Path) -> list[CatalogEntry]:
    """The catalog's entries; `CatalogError` with a line per problem."""
    import yaml

    where = f"IMAGEGEN_MODELS_FILE {path}"
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CatalogError([f"{where}: cannot be read ({exc.strerror})"]) from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CatalogError([f"{where}: not YAML: {first}"]) from None
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as exc:
        raise CatalogError([_line(where, data, error) for error in exc.errors()]) from None
    ids = [entry.id for entry in catalog.models]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise CatalogError([f"{where}: model id {i!r} is listed twice" for i in twice])
    return catalog.models


def _line(where: str, data: Any, error: Any) -> str:
    """`... models[1] (sd15): defaults.steps: Input should be ...`: the entry by its index
    and id, then the field."""
    loc = list(error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        index = loc[1]
        entries = data.get("models") if isinstance(data, dict) else None
        entry = entries[index] if isinstance(entries, list) and index < len(entries) else None
        name = f" ({entry['id']})" if isinstance(entry, dict) and "id" in entry else ""
        field = ".".join(str(part) for part in loc[2:]) or "entry"
        return f"{where}: models[{index}]{name}: {field}: {message}"
    field = ".".join(str(part) for part in loc) or "file"
    return f"{where}: {field}: {message}"
