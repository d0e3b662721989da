"""Dependency aliases: the serving objects are built once at start-up and held on app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.registry import ModelRegistry
from app.service import GenerationService
from imagegen.settings import Settings


def _service(request: Request) -> GenerationService:
    service: GenerationService = request.app.state.service
    return service


def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServiceDep = Annotated[GenerationService, Depends(_service)]
RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
SettingsDep = Annotated[Settings, Depends(_settings)]
