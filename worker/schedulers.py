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


def build_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler for one job: schedulers keep per-run state, so none is ever shared."""
    cls, extra = scheduler_class(name)
    return cls.from_config(base_config, **extra)


def name_of(scheduler: Any) -> str | None:
    """The table name for a loaded pipeline's scheduler, if it has one."""
    config = scheduler.config
    for name in SCHEDULERS:
        cls, extra = scheduler_class(name)
        dpm = cls is diffusers.DPMSolverMultistepScheduler
        wanted = {"use_karras_sigmas": False, **extra} if dpm else extra
        if type(scheduler) is cls and all(config.get(k) == v for k, v in wanted.items()):
            return name
    return None
