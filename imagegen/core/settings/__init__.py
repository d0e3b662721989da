"""Service settings, read from `IMAGEGEN_*` environment variables (or a `.env` file).

Each process reads its own class: the gateway `GatewaySettings`, a worker `WorkerSettings`, both
over `CommonSettings`; a setting of another process is ignored, never validated, so a worker
does not refuse to start over a gateway's setting. `Settings` is every one of them at once, for
the local runner (`imagegen serve`, which starts all the processes from one environment) and the
docs' settings page. Test-only switches are `FaultSettings`, apart from all of these.
"""

from __future__ import annotations

import inspect

from pydantic_settings import BaseSettings

from imagegen.core.settings.base import CommaList, CommonSettings
from imagegen.core.settings.faults import FaultSettings
from imagegen.core.settings.gateway import GatewaySettings
from imagegen.core.settings.storage import StorageSettings
from imagegen.core.settings.worker import Toggle, WorkerSettings

__all__ = [
    "CommaList",
    "CommonSettings",
    "FaultSettings",
    "GatewaySettings",
    "Settings",
    "StorageSettings",
    "Toggle",
    "WorkerSettings",
    "markdown_table",
]


class Settings(GatewaySettings, WorkerSettings):
    """Every process's settings together: the local runner's, which starts them all."""


SECTIONS: tuple[tuple[str, type[BaseSettings]], ...] = (
    ("Every process", CommonSettings),
    ("Blob storage (the gateway and the workers)", StorageSettings),
    ("Gateway and webhook delivery (`imagegen api`, `imagegen webhooks`)", GatewaySettings),
    ("Worker (`imagegen worker`)", WorkerSettings),
    ("Test suites only", FaultSettings),
)


def _default(value: object) -> str:
    if value is None or value == []:
        return "unset"
    if isinstance(value, list | tuple):
        return "`" + ",".join(str(item) for item in value) + "`"
    return f"`{value}`"


def markdown_table() -> str:
    """Every setting as a Markdown table row (variable, default, meaning), a table per process."""
    out: list[str] = []
    for title, cls in SECTIONS:
        own = inspect.get_annotations(cls)  # the class's own fields, not its base's
        out += ["", f"### {title}", "", "| variable | default | meaning |", "|---|---|---|"]
        for name, field in cls.model_fields.items():
            if name in own:
                default = _default(field.default)
                out.append(f"| `IMAGEGEN_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(out[1:])
