"""`imagegen usage`: every API key's use of its limits, as a table, read from Redis.

An operator's view (the API's `GET /v1/usage` shows each caller its own): the configured keys
(IMAGEGEN_API_KEYS, IMAGEGEN_API_KEYS_FILE) and any other name Redis holds books for.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

COLUMNS = (
    "key",
    "active",
    "max active",
    "megapixel-steps",
    "quota",
    "succeeded",
    "failed",
    "canceled",
    "webhooks ok",
    "webhooks failed",
)


def register(app: typer.Typer) -> None:
    """Add the `usage` command to the `imagegen` command line."""

    @app.command("usage")
    def usage(
        day: Annotated[
            str | None, typer.Option(help="The UTC day, YYYY-MM-DD; default: today.")
        ] = None,
    ) -> None:
        """Print each API key's jobs (queued or running, and ended on DAY by status), its
        megapixel-steps charged on DAY against its quota, and its webhook deliveries (all
        time). Reads Redis at IMAGEGEN_REDIS_URL; names keys, never their secrets."""
        import redis

        from imagegen.cli.startup import load_settings
        from imagegen.core.api_keys import limits_for, load_entries
        from imagegen.core.contract import utc_day
        from imagegen.core.settings import GatewaySettings
        from imagegen.core.store import JobStore

        settings = load_settings(GatewaySettings)
        entries = {entry.name: entry for entry in load_entries(settings)}
        connection = redis.Redis.from_url(settings.redis_url, **settings.redis_options())
        store = JobStore(connection)
        day = day or utc_day(time.time())
        stats = store.key_stats()
        names = sorted(set(entries) | set(stats) or {""})
        active = store.active_jobs(names)
        rows = []
        for name, now in zip(names, active, strict=True):
            books = store.usage(name, day)
            limits = limits_for(entries.get(name), settings)
            totals = stats.get(name, {})
            rows.append(
                (
                    name or "(open)",
                    str(now),
                    _limit(limits.max_active_jobs),
                    f"{books.megapixel_steps:g}",
                    _limit(limits.daily_quota),
                    str(books.jobs["succeeded"]),
                    str(books.jobs["failed"]),
                    str(books.jobs["canceled"]),
                    f"{totals.get('webhook_delivered', 0):g}",
                    f"{totals.get('webhook_failed', 0):g}",
                )
            )
        typer.echo(f"usage on {day} (UTC)")
        widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
        for row in [COLUMNS, *rows]:
            typer.echo(
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            )


def _limit(value: float | None) -> str:
    return "unlimited" if value is None else f"{value:g}"
