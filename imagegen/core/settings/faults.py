"""Switches the test suites turn on in the worker processes they start, and nothing else should:
kept apart from the worker's settings so that no deployment's settings object carries them."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

from imagegen.core.settings.config import CONFIG


class FaultSettings(BaseSettings):
    """Fault injection (worker/faults.py), read by `imagegen worker` on its own."""

    model_config = CONFIG

    fault_injection: bool = Field(
        False, description="Test suites only: honour `__fault__:` prompts (see worker/faults.py)."
    )
    fault_crash_at: str | None = Field(
        None,
        description="Test suites only (with IMAGEGEN_FAULT_INJECTION): die at this named "
        "point of a job's lifecycle, once (see worker/faults.py).",
    )
