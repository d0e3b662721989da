"""Liveness and readiness probes."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import RegistryDep
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """200 while the process lives."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(registry: RegistryDep) -> Health | JSONResponse:
    """200 when Redis answers and a warm worker serves the default model; else 503 and why."""
    try:
        await registry.redis.ping()
        workers = await registry.live_workers(registry.default_model)
    except redis.exceptions.RedisError:
        # In our words: the exception's class or text would tell a caller about internals.
        return _not_ready("redis is unavailable")
    ready = [w for w in workers if w.state in ("ready", "busy")]
    if not ready:
        return _not_ready(f"no warm worker serves the default model {registry.default_model!r}")
    return Health(status="ready", detail=f"{len(ready)} worker(s) serve {registry.default_model}")


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse(
        Health(status="unavailable", detail=reason).model_dump(),
        status_code=503,
        headers={"Retry-After": "5"},
    )
