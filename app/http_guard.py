"""The gateway's HTTP/1.1 protocol: uvicorn's h11 protocol with a header size cap and read
deadlines, so a slow or oversized client cannot hold a connection (and its buffers) for ever.

uvicorn's own protocols keep a connection that sends its headers one byte a second, or its
body one byte a second, open as long as the client likes, and the httptools one reads
headers of any size. Here:

- the request line and headers must be complete within `header_timeout_s` of their first
  byte, and within `max_header_bytes` (431 past it);
- a body must be complete within `body_timeout_s` of its headers (408 past it).

Either answer is the API's error envelope, and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(
    max_header_bytes: int, header_timeout_s: float, body_timeout_s: float
) -> type[H11Protocol]:
    """The protocol class to give uvicorn (`http=`), with these limits."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "max_header_bytes": max_header_bytes,
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
        },
    )


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head size cap and head and body deadlines."""

    max_header_bytes = 32 * 1024
    header_timeout_s = 10.0
    body_timeout_s = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # "headers" | "body" while a deadline runs

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers", self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self._refuse(431, "the request line and headers exceed the limit of "
                         f"{self.max_header_bytes} bytes")  # fmt: skip
            return
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _head_too_large(self, data: bytes) -> bool:
        pending, _ = self.conn.trailing_data
        if len(pending) + len(data) <= self.max_header_bytes:
            return False  # the common case: no copy, no search
        head = pending + data
        end = head.find(b"\r\n\r\n")
        return end == -1 or end > self.max_header_bytes

    def _follow(self) -> None:
        """Arm, move or drop the deadline by where the client is in its request."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._waiting_for != "body":
                self._arm("body", self.body_timeout_s)
        elif state is h11.IDLE:
            pending, _ = self.conn.trailing_data
            if pending and self._waiting_for != "headers":  # a next request has begun
                self._arm("headers", self.header_timeout_s)
        else:
            self._disarm()

    def _arm(self, what: str, seconds: float) -> None:
        self._disarm()
        self._waiting_for = what
        self._deadline = self.loop.call_later(seconds, self._expired, what, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._waiting_for = None

    def _expired(self, what: str, seconds: float) -> None:
        self._deadline = None
        self._waiting_for = None
        if self.transport.is_closing():
            return
        if what == "headers" and self.conn.their_state is h11.IDLE:
            pending, _ = self.conn.trailing_data
            if not pending and self.cycle is not None:
                return  # between requests: uvicorn's keep-alive timeout governs
        self._refuse(408, f"the request's {what} did not arrive within {seconds:g}s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with the error envelope (if no answer has begun) and close."""
        if self.cycle is not None and not self.cycle.response_complete:
            # The app reading this request learns that its client is gone.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            code = "payload_too_large" if status == 431 else "request_timeout"
            body = json.dumps({"error": {"code": code, "message": message}}).encode()
            try:
                for event in (
                    h11.Response(
                        status_code=status,
                        headers=[
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                    ),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                ):
                    self.transport.write(self.conn.send(event) or b"")
            except h11.LocalProtocolError:
                pass  # the connection's state allows no answer: just close it
        self.transport.close()
