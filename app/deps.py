"""Dependency aliases: the serving objects are built once at start-up and held on app.state.

They are `async def` on purpose: FastAPI runs a sync dependency in its thread pool, and a hop
there per dependency per request costs more than the lookup itself.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.capacity import MemoryGuard
from app.registry import ModelRegistry
from app.service import GenerationService
from imagegen.core.settings import GatewaySettings


async def _service(request: Request) -> GenerationService:
    service: GenerationService = request.app.state.service
    return service


async def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


async def _settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


async def _memory(request: Request) -> MemoryGuard:
    guard: MemoryGuard = request.app.state.memory
    return guard


MemoryDep = Annotated[MemoryGuard, Depends(_memory)]
ServiceDep = Annotated[GenerationService, Depends(_service)]
RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
SettingsDep = Annotated[GatewaySettings, Depends(_settings)]
