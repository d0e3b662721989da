"""`GET /v1/models`: the models that workers serve, with their defaults."""

from __future__ import annotations

from fastapi import APIRouter

from app.auth import PrincipalDep
from app.deps import RegistryDep, ServiceDep, SettingsDep
from app.schemas import (
    AdapterEntry,
    ModelEntry,
    ModelList,
    TrainingDefaultsEntry,
    UnavailableAdapterEntry,
)

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
async def list_models(
    registry: RegistryDep, settings: SettingsDep, principal: PrincipalDep, service: ServiceDep
) -> ModelList:
    """Every model a live worker can serve: its defaults and limits, how many live workers
    can load it (`workers`) and how many hold it warm now (`loaded`); among its adapters, the
    ones this API key trained (`owner` "you")."""
    own: dict[str, list[AdapterEntry]] = {}
    for adapter in await service.store.key_adapters(principal.name):
        own.setdefault(adapter.model, []).append(AdapterEntry.of(adapter.info()))
    entries = []
    for status in await registry.statuses():
        info = status.info
        fields = info.model_dump(
            exclude={
                "max_pixels",
                "max_steps",
                "adapters",
                "controls",
                "unavailable_adapters",
                "tokenizer",
                "training",
            }
        )
        entries.append(
            ModelEntry(
                **fields,
                default=info.id == registry.default_model,
                max_pixels=min(settings.max_pixels, info.max_pixels or settings.max_pixels),
                max_steps=min(settings.max_steps, info.max_steps or settings.max_steps),
                workers=status.workers,
                loaded=status.loaded,
                available=status.unavailable is None,
                unavailable_reason=status.unavailable,
                adapters=[AdapterEntry.of(a) for a in info.adapters] + own.get(info.id, []),
                training=TrainingDefaultsEntry(**info.training.model_dump())
                if info.training
                else None,
                controls=[AdapterEntry.of(c) for c in info.controls],
                unavailable_adapters=[
                    UnavailableAdapterEntry(id=u.id, reason=u.reason)
                    for u in info.unavailable_adapters
                ],
            )
        )
    return ModelList(data=entries)
