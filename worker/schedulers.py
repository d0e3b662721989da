"""The scheduler table (`imagegen.core.contract.SCHEDULERS`), each built per job from the
pipeline's own config."""

from __future__ import annotations

from typing import Any

import diffusers

from imagegen.core.contract import SCHEDULERS


def scheduler_class(name: str) -> tuple[type[Any], dict[str, Any]]:
    """The diffusers class of table entry `name`, and the config it overrides."""
    class_name, extra = SCHEDULERS[name]
    cls: type[Any] = getattr(diffusers, class_name)
    return cls, extra


# The model's own scheduler, as its config names it: the default of a model whose scheduler
# the table lacks (a TCD or Heun model runs as it was made, not as Euler).
OWN = "default"


def build_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler for one job: schedulers keep per-run state, so none is ever shared."""
    if name == OWN:
        own: type[Any] = getattr(diffusers, str(dict(base_config)["_class_name"]))
        return own.from_config(base_config)
    cls, extra = scheduler_class(name)
    return cls.from_config(base_config, **extra)


def name_of(scheduler: Any) -> str:
    """The table name for a loaded pipeline's scheduler; `OWN` when the table lacks it."""
    config = scheduler.config
    for name in SCHEDULERS:
        cls, extra = scheduler_class(name)
        dpm = cls is diffusers.DPMSolverMultistepScheduler
        wanted = {"use_karras_sigmas": False, **extra} if dpm else extra
        if type(scheduler) is cls and all(config.get(k) == v for k, v in wanted.items()):
            return name
    return OWN
