"""`GET /v1/usage`: the calling key's use of its limits today (../shared/API.md "Fair use")."""

from __future__ import annotations

import time

from fastapi import APIRouter

from app.auth import PrincipalDep
from app.deps import ServiceDep
from app.schemas import JobCounts, UsageDocument
from imagegen.core.contract import utc_day

router = APIRouter(prefix="/v1", tags=["usage"])


@router.get("/usage", response_model=UsageDocument)
async def get_usage(service: ServiceDep, principal: PrincipalDep) -> UsageDocument:
    """The caller's megapixel-steps today (UTC) against its daily quota, its jobs queued or
    running against `max_active_jobs` (null: unlimited), and its jobs that ended today."""
    usage = await service.store.usage(principal.name, utc_day(time.time()))
    limits = service.api_keys.limits(principal.name)
    return UsageDocument(
        day=usage.day,
        megapixel_steps=usage.megapixel_steps,
        quota=limits.daily_quota,
        active_jobs=usage.active_jobs,
        max_active_jobs=limits.max_active_jobs,
        jobs=JobCounts(**usage.jobs),
    )
