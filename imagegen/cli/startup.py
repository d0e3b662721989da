"""What every command that runs a process does first: read the settings, or exit naming each
invalid one."""

from __future__ import annotations

from typing import TypeVar

import typer

from imagegen.core.settings import CommonSettings

S = TypeVar("S", bound=CommonSettings)


def load_settings(kind: type[S]) -> S:
    """The process's IMAGEGEN_* settings (`kind`: GatewaySettings, WorkerSettings, or Settings for
    all); if one is invalid, a line per problem naming the variable and the rule, then exit
    status 2 (no traceback; the values are not echoed: some are secrets)."""
    from pydantic import ValidationError

    try:
        return kind()
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            where = f"IMAGEGEN_{field.upper()}: " if field else ""
            message = str(error["msg"]).removeprefix("Value error, ")
            typer.echo(f"invalid setting: {where}{message}", err=True)
        raise typer.Exit(2) from None
