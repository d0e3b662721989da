"""Process-wide logging: plain lines for people, JSON lines for machines, with request ids.

The gateway sets the request id of the request it is serving (`X-Request-ID`), the job keeps
it, and the worker sets it again while it runs that job, so one grep follows a request from
the HTTP call through the queue into the worker's log lines.
"""

from __future__ import annotations

import contextvars
import logging
import sys

from pythonjsonlogger.json import JsonFormatter

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Log to stderr; called once at process start."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if json_lines:
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
