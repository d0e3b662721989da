"""The lifecycle's Lua scripts: read from `lua/*.lua` (package data), called by name.

Every script starts with the same prelude: ARGV[1] is one JSON object of named arguments
(`A.max_depth`, `A.owner`, ...) whose `keys` lists the names of KEYS in order, so a script
reads its keys by name too (`K.queue`, `K.job`). Bytes (images, inputs) follow as ARGV[2],
ARGV[3], ... in the order a named argument lists them. Every key name is made by
`imagegen.core.contract.Keys`; the few a script makes itself (from ids it finds in a queue)
say so where they are made.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import Any

from imagegen.core.contract import Keys

# Fair order: a queue score is round * ROUND + submit order (see lua/submit.lua).
ROUND = 1_000_000
# A key's daily usage record outlives its day by two, for /v1/usage and `imagegen usage`.
USAGE_TTL_S = 3 * 86400
# A key's list of its trainings outlives the key's last training by this (GET /v1/trainings
# drops the entries whose records expired).
INDEX_TTL_S = 30 * 86400
# A webhook delivery no delivery process took is dropped after this (retries end far sooner).
OUTBOX_TTL_S = 7 * 86400

_PRELUDE = """\
local A = cjson.decode(ARGV[1])
local K = {}
for i, name in ipairs(A.keys) do K[name] = KEYS[i] end
"""


def source(name: str, uses: tuple[str, ...] = ()) -> str:
    """The text Redis runs for script `name`: the prelude, the helpers, the `uses` functions
    (e.g. the outbox), then the script, with the key prefix and constants filled in."""
    parts = [_PRELUDE, _read("common"), *(_read(used) for used in uses), _read(name)]
    return (
        "".join(parts)
        .replace("{P}", Keys.PREFIX)
        .replace("{ROUND}", str(ROUND))
        .replace("{USAGE_TTL}", str(USAGE_TTL_S))
        .replace("{OUTBOX_TTL}", str(OUTBOX_TTL_S))
        .replace("{INDEX_TTL}", str(INDEX_TTL_S))
    )


def _read(name: str) -> str:
    return (files(__package__) / "lua" / f"{name}.lua").read_text() + "\n"


def call(
    keys: Mapping[str, str], args: Mapping[str, Any], blobs: Sequence[bytes] = ()
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV for a script: the keys by name, the named arguments as one JSON object,
    then the blobs."""
    names = list(keys)
    payload = json.dumps({"keys": names, **args}, separators=(",", ":"))
    return [keys[name] for name in names], [payload, *blobs]


def decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
