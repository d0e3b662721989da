"""`GET /v1/models`: the models that workers serve, with their defaults."""

from __future__ import annotations

from fastapi import APIRouter

from app.auth import PrincipalDep
from app.deps import RegistryDep
from app.schemas import AdapterEntry, ModelEntry, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
def list_models(registry: RegistryDep, principal: PrincipalDep) -> ModelList:
    """Every model a worker has announced, its defaults, and how many live workers serve it."""
    entries = [
        ModelEntry(
            default=info.id == registry.default_model,
            workers=workers,
            **info.model_dump(exclude={"adapters", "controls"}),
            adapters=[AdapterEntry.of(a) for a in info.adapters],
            controls=[AdapterEntry.of(c) for c in info.controls],
        )
        for info, workers in registry.models()
    ]
    return ModelList(data=entries)
