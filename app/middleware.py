"""ASGI middleware: request ids, and the request body size limit (chunked bodies too)."""

from __future__ import annotations

import json
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge
from imagegen.core.logs import request_id

_CLIENT_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


class RequestId:
    """Adopt a sane client `X-Request-ID` or make one; log lines and the job carry it, and
    every answer echoes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        rid = given.decode() if _CLIENT_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


# Where a body may carry images (POST only): these get `image_max_bytes`; the route then
# holds a body past `max_bytes` that turned out to carry no image to the small limit
# (`app.images_in.check_body_size`), so the larger limit serves only requests with images.
IMAGE_PATHS = frozenset(
    {
        "/v1/generations",
        "/v1/control/preprocess",
        "/v1/images/generations",
        "/v1/images/edits",
        "/sdapi/v1/img2img",
        "/sdapi/v1/png-info",
    }
)
# A training's pictures (a zip, files or base64) have a limit of their own.
TRAINING_PATH = "/v1/trainings"
# The bytes received, for the route: scope["state"][BODY_BYTES].
BODY_BYTES = "imagegen_body_bytes"


class BodySizeLimit:
    """Answer 413 past the limit: at once when Content-Length says so, else as soon as the
    bytes received (chunked, or a lying Content-Length) pass the limit — the body is never
    buffered past it."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        image_max_bytes: int | None = None,
        training_max_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.image_max_bytes = max(image_max_bytes or max_bytes, max_bytes)
        self.training_max_bytes = max(training_max_bytes or max_bytes, max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if scope.get("method") == "POST" and scope.get("path") in IMAGE_PATHS:
            limit = self.image_max_bytes
        elif scope.get("method") == "POST" and scope.get("path") == TRAINING_PATH:
            limit = self.training_max_bytes
        message = f"the request body exceeds the limit of {limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, message)
            return
        received = 0
        started = False
        state = scope.setdefault("state", {})

        async def limited_receive() -> Message:
            nonlocal received
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                state[BODY_BYTES] = received
                if received > limit:
                    # An ApiError, so the app's own handler answers if it is reading the body.
                    raise PayloadTooLarge(message)
            return incoming

        async def tracking_send(outgoing: Message) -> None:
            nonlocal started
            started = started or outgoing["type"] == "http.response.start"
            await send(outgoing)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge:
            if not started:
                await _send_413(send, message)


async def _send_413(send: Send, message: str) -> None:
    body = json.dumps({"error": {"code": "payload_too_large", "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class A1111Errors:
    """Errors of `/sdapi/v1` in AUTOMATIC1111's shape, which its clients read:
    `{"error": <code>, "detail": <message naming the field>, "body": "", "errors": <details>}`
    (this service's envelope elsewhere). Only error answers are buffered and rewritten."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/sdapi/"):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def reshape(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            try:
                error = json.loads(body)["error"]
                body = json.dumps(
                    {
                        "error": error["code"],
                        "detail": error["message"],
                        "body": "",
                        "errors": error.get("details", []),
                    }
                ).encode()
            except (ValueError, KeyError, TypeError):
                pass  # not an envelope: passed on as it is
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshape)
