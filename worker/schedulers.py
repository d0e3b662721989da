"""The fixed table of scheduler names, each built per job from the pipeline's own config."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from imagegen.contract import SCHEDULER_NAMES

# name -> (class, extra config). Keep the names in step with contract.SCHEDULER_NAMES.
SCHEDULERS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": (UniPCMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {}),
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def build_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler for one job: schedulers keep per-run state, so none is ever shared."""
    cls, extra = SCHEDULERS[name]
    return cls.from_config(base_config, **extra)


def name_of(scheduler: Any) -> str | None:
    """The table name for a loaded pipeline's scheduler, if it has one."""
    config = scheduler.config
    for name, (cls, extra) in SCHEDULERS.items():
        dpm = cls is DPMSolverMultistepScheduler
        wanted = {"use_karras_sigmas": False, **extra} if dpm else extra
        if type(scheduler) is cls and all(config.get(k) == v for k, v in wanted.items()):
            return name
    return None
