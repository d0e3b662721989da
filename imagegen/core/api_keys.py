"""The configured API keys: names, hashes and each key's own limits.

An entry is `name:sha256-hex`, optionally followed by settings of that key alone, separated
by white space (in IMAGEGEN_API_KEYS, entries are separated by commas):

    alice:3f1c...  max_active_jobs=4  daily_quota_megapixel_steps=500
    bob:9a0e...    daily_quota_megapixel_steps=0        # nothing allowed
    ci:77d2...     max_active_jobs=unlimited  webhook_secret=whsec_...

A limit given here overrides the global default for that key; `0` here means nothing is
allowed (while the global defaults' 0 means unlimited), and `unlimited` lifts the limit.
The gateway, the webhook delivery process and `imagegen usage` read the same entries.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path

from imagegen.core.settings import GatewaySettings

_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9._-]{1,64}):(?P<digest>[0-9a-f]{64})$")
_OPTION = re.compile(r"^(?P<option>[a-z_]+)=(?P<value>\S+)$")
UNLIMITED = None
OPTIONS = ("max_active_jobs", "daily_quota_megapixel_steps", "webhook_secret")


@dataclass(frozen=True)
class KeyEntry:
    """One configured key: its name, the sha256 of the key, and its own overrides (None:
    the global default applies)."""

    name: str
    digest: str
    max_active_jobs: int | None = None
    daily_quota: float | None = None
    unlimited_active: bool = False
    unlimited_quota: bool = False
    webhook_secret: str | None = None


@dataclass(frozen=True)
class Limits:
    """What one key may do: None = unlimited."""

    max_active_jobs: int | None
    daily_quota: float | None


def _number(option: str, value: str, number: int) -> float:
    try:
        parsed = float(value)
    except ValueError:
        parsed = -1.0
    if not 0 <= parsed < float("inf"):
        # The value is not echoed: a line may hold a secret by mistake.
        raise ValueError(f"API key entry {number}: {option} must be a number >= 0 or `unlimited`")
    return parsed


def check_webhook_secret(secret: str) -> str:
    """A Standard Webhooks secret: `whsec_` and base64 of at least 24 bytes."""
    raw = secret.removeprefix("whsec_")
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if not secret.startswith("whsec_") or len(decoded) < 24:
        raise ValueError("a webhook secret is `whsec_` + base64 of at least 24 random bytes")
    return secret


def parse_entries(tokens: list[str]) -> list[KeyEntry]:
    """Entries from white-space separated tokens: `name:digest` opens an entry, each
    `option=value` after it belongs to it. Lines are never echoed (a pasted plain key)."""
    entries: list[KeyEntry] = []
    fields: dict[str, object] = {}

    def close() -> None:
        if fields:
            entries.append(KeyEntry(**fields))  # type: ignore[arg-type]
            fields.clear()

    for token in tokens:
        number = len(entries) + 1
        match = _ENTRY.match(token)
        if match is not None:
            close()
            fields.update(name=match["name"], digest=match["digest"])
            continue
        option = _OPTION.match(token)
        if option is None or not fields:
            raise ValueError(
                f"API key entry {number} is not `name:sha256-hex [option=value ...]`; "
                "make entries with `imagegen new-key NAME`"
            )
        name, value = option["option"], option["value"]
        if name not in OPTIONS:
            raise ValueError(
                f"API key entry {number}: unknown option {name!r}; one of {', '.join(OPTIONS)}"
            )
        if name == "webhook_secret":
            try:
                fields["webhook_secret"] = check_webhook_secret(value)
            except ValueError as exc:
                raise ValueError(f"API key entry {number}: {exc}") from None
        elif name == "max_active_jobs":
            if value == "unlimited":
                fields["unlimited_active"] = True
            else:
                fields["max_active_jobs"] = int(_number(name, value, number))
        elif value == "unlimited":
            fields["unlimited_quota"] = True
        else:
            fields["daily_quota"] = _number(name, value, number)
    close()
    return entries


def load_entries(settings: GatewaySettings) -> list[KeyEntry]:
    """IMAGEGEN_API_KEYS (comma-separated entries) and the lines of IMAGEGEN_API_KEYS_FILE
    (`#` starts a comment)."""
    tokens: list[str] = []
    for entry in settings.api_keys:
        tokens += entry.split()
    if settings.api_keys_file is not None:
        for line in Path(settings.api_keys_file).read_text().splitlines():
            tokens += line.split("#", 1)[0].split()
    entries = parse_entries(tokens)
    names = [e.name for e in entries]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"API key name(s) configured twice: {', '.join(duplicated)}")
    return entries


def limits_for(entry: KeyEntry | None, settings: GatewaySettings) -> Limits:
    """A key's limits: its own overrides, else the global defaults (whose 0 = unlimited)."""
    active: int | None = settings.max_active_jobs or None
    quota: float | None = settings.daily_quota_megapixel_steps or None
    if entry is not None:
        if entry.unlimited_active:
            active = None
        elif entry.max_active_jobs is not None:
            active = entry.max_active_jobs
        if entry.unlimited_quota:
            quota = None
        elif entry.daily_quota is not None:
            quota = entry.daily_quota
    return Limits(max_active_jobs=active, daily_quota=quota)
