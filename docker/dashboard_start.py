"""Start RQ's dashboard on the compose network's Redis, never open to the world.

rq-dashboard takes Redis as one URL, so the password (IMAGEGEN_REDIS_PASSWORD, any characters,
e.g. `/` from `openssl rand -base64`) is percent-encoded into it here; compose cannot encode.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import quote


def redis_url(password: str, address: str) -> str:
    """`redis://:<password>@<address>` with the password percent-encoded (redis-py decodes it)."""
    return f"redis://:{quote(password, safe='')}@{address}"


def main() -> None:
    if not os.environ.get("RQ_DASHBOARD_PASSWORD"):
        print("set RQ_DASHBOARD_PASSWORD", file=sys.stderr)
        sys.exit(1)
    password = os.environ.get("IMAGEGEN_REDIS_PASSWORD", "")
    address = os.environ.get("REDIS_ADDRESS", "redis:6379/0")
    os.environ["RQ_DASHBOARD_REDIS_URL"] = redis_url(password, address)
    os.execvp("rq-dashboard", ["rq-dashboard", "--bind", "0.0.0.0", "--port", "9181"])


if __name__ == "__main__":
    main()
