"""The gateway application: `create_app()` wires settings, Redis, the store and the routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from app.auth import KeyStore, RateLimiter
from app.capacity import MemoryGuard
from app.errors import install_error_handlers
from app.events import EventHub
from app.metrics import RequestMetrics, ServiceCollector
from app.metrics import router as metrics_router
from app.middleware import A1111Errors, BodySizeLimit, RequestId
from app.playground import router as playground_router
from app.registry import ModelRegistry
from app.routes import (
    a1111,
    control,
    generations,
    health,
    models,
    openai_edits,
    openai_images,
    trainings,
    usage,
    webhooks,
)
from app.schemas import ErrorEnvelope
from app.service import GenerationService
from app.training_schemas import TrainingRequest
from app.trainings import TrainingService
from imagegen import __version__
from imagegen.core.settings import GatewaySettings
from imagegen.core.webhooks import Secrets

log = logging.getLogger("imagegen.gateway")
# Named connections let an operator (and the tests) tell the gateway's apart in CLIENT LIST.
REDIS_CLIENT_NAME = "imagegen-gateway"


def _operation_id(route: APIRoute) -> str:
    # Stable operation ids (the function names) keep openapi.json and SDK names steady.
    return route.name


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """Build the gateway; nothing is connected until the app starts."""
    settings = settings or GatewaySettings()
    keys = KeyStore.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Bounded pools: a burst of requests waits for a connection instead of opening hundreds.
        # Fail fast while Redis is away: the client answers 503 with Retry-After and retries
        # itself. No command is re-sent after a timeout, when it may have run already (a
        # submit re-sent would queue its job twice).
        pool_options = {
            "max_connections": settings.redis_max_connections,
            # Waiting for a free pooled connection is load, not an outage: wait a while.
            "timeout": 5,
            "socket_timeout": 5,
            "socket_connect_timeout": 0.5,
            "health_check_interval": 30,
            "client_name": REDIS_CLIENT_NAME,
            **settings.redis_options(),  # the password, kept out of the URL
        }
        # One client for the process, on the event loop: every route is async, so no request
        # holds a thread while it waits for Redis.
        connection = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                settings.redis_url, **pool_options
            )
        )
        events = EventHub(connection)
        await events.start()
        app.state.events = events
        registry = ModelRegistry(connection, settings.default_model)
        app.state.keys = keys
        app.state.limiter = RateLimiter(
            connection, settings.rate_limit_per_minute, settings.auth_failures_per_minute
        )
        app.state.settings = settings
        app.state.registry = registry
        app.state.service = GenerationService(connection, registry, settings, keys)
        app.state.trainings = TrainingService(app.state.service)
        app.state.webhook_secrets = Secrets(connection, settings, keys.webhook_secrets())
        app.state.memory = MemoryGuard(connection, settings.redis_high_water)
        app.state.collector = ServiceCollector(events)
        log.info("gateway %s started; redis at %s", __version__, _redact(settings.redis_url))
        if keys.enabled:
            log.info("API keys required on /v1/*: %d key(s) configured", len(keys))
        else:
            log.warning(
                "no API keys configured: the service is OPEN to anyone who can reach it "
                "(set IMAGEGEN_API_KEYS or IMAGEGEN_API_KEYS_FILE)"
            )
        try:
            yield
        finally:
            await events.stop()
            await connection.aclose()

    app = FastAPI(
        title="imagegen",
        version=__version__,
        summary="Text-to-image generation over HTTP: queue, poll, stream, download.",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
        # No 307s to slash-variant paths: an API path either exists or is a 404.
        redirect_slashes=False,
        responses={
            "4XX": {"model": ErrorEnvelope, "description": "Client error (the error envelope)."},
            "5XX": {"model": ErrorEnvelope, "description": "Server error (the error envelope)."},
        },
    )
    install_error_handlers(app)
    _finish_openapi(app, settings)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        image_max_bytes=settings.max_image_body_bytes,
        training_max_bytes=settings.training_max_bytes,
    )
    app.add_middleware(A1111Errors)  # around the size limit: its 413 is reshaped too
    app.add_middleware(RequestMetrics)
    app.add_middleware(RequestId)  # outermost: even a 413 carries the request id
    if settings.cors_origins:
        # Off unless an allow-list is set: browsers then get no CORS headers at all.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
        )
    app.include_router(generations.router)
    app.include_router(openai_images.router)
    app.include_router(control.router)
    app.include_router(a1111.router)
    app.include_router(openai_edits.router)
    app.include_router(models.router)
    app.include_router(trainings.router)
    app.include_router(usage.router)
    app.include_router(webhooks.router)
    app.include_router(health.router)
    app.include_router(metrics_router)
    app.include_router(playground_router)
    return app


# One Server-Sent Event as OpenAPI 3.1 tools read a `text/event-stream` schema: an object per
# event, whose `data` is the job document as JSON text.
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {
            "enum": ["queued", "running", "progress", "preview", "succeeded", "failed", "canceled"]
        },
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/JobDocument"},
        },
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}


# A training's events: the same, each carrying the training document.
TRAINING_EVENT_SCHEMA: dict[str, Any] = {
    **EVENT_SCHEMA,
    "properties": {
        **EVENT_SCHEMA["properties"],
        "event": {"enum": ["queued", "running", "progress", "succeeded", "failed", "canceled"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/TrainingDocument"},
        },
    },
}


# OpenAI's streamed image answer (`stream: true`, app.openai_stream): its own events.
OPENAI_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {
            "enum": [
                "image_generation.partial_image",
                "image_generation.completed",
                "image_edit.partial_image",
                "image_edit.completed",
                "error",
            ]
        },
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"type": "object", "required": ["type"]},
        },
    },
}


def _finish_openapi(app: FastAPI, settings: GatewaySettings) -> None:
    """Post-process the generated document where FastAPI cannot say what the API does.

    - FastAPI describes SSE bodies with OpenAPI 3.2's `itemSchema`; 3.1 tools read the
      media type's `schema` as one event, and a stream's errors are JSON envelopes.
    - The configured caps (prompt length, steps, n) are settings, so they are written into the
      request schema here rather than frozen into the model.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()
        # POST /v1/trainings reads its body itself (JSON or multipart): its JSON schema and
        # those it names are added to the components here.
        components = spec["components"]["schemas"]
        _, named = models_json_schema(
            [(TrainingRequest, "validation")], ref_template="#/components/schemas/{model}"
        )
        for name, schema in named.get("$defs", {}).items():
            components.setdefault(name, schema)
        for path, operations in spec.get("paths", {}).items():
            events = OPENAI_EVENT_SCHEMA if path.startswith("/v1/images/") else EVENT_SCHEMA
            if path.startswith("/v1/trainings/"):
                events = TRAINING_EVENT_SCHEMA
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    stream = response.get("content", {}).get("text/event-stream")
                    if stream is None:
                        continue
                    stream.pop("itemSchema", None)
                    if str(status).startswith("2"):
                        stream["schema"] = events
                    else:
                        response["content"] = {"application/json": stream}
        request = spec["components"]["schemas"]["GenerationRequest"]["properties"]
        no_nul = {"not": {"pattern": "\\u0000"}}  # the regex \u0000: NUL is refused
        request["prompt"].update(
            minLength=1, maxLength=settings.max_prompt_chars, pattern="\\S", **no_nul
        )
        request["negative_prompt"].update(maxLength=settings.max_prompt_chars, **no_nul)
        for field, cap in (("steps", settings.max_steps), ("n", settings.max_n)):
            target = request[field]
            for option in target.get("anyOf", [target]):
                if option.get("type") == "integer":
                    option["maximum"] = cap
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def _redact(url: str) -> str:
    """Hide a password in a redis:// URL before it is logged."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
