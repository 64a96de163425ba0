"""GET /models: the registered models and their shapes, loaded or not."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CatalogDep, GenerationDep, ReadAccess, SettingsDep
from app.api.errors import ApiError
from app.api.schemas import ModelList, error_responses

router = APIRouter(tags=["models"], responses=error_responses(401, 403))


@router.get("/models", response_model=ModelList, summary="Registered models (architecture, layers, hidden size)")
def list_models(_: ReadAccess, catalog: CatalogDep, generation: GenerationDep, settings: SettingsDep) -> dict:
    models = []
    for name in catalog.names():
        entry = {"name": name, "loaded": generation.is_loaded(name), "default": name == settings.default_model}
        try:
            info = catalog.describe(name)
            entry.update(
                architecture=info.architecture,
                num_layers=info.num_layers,
                hidden_size=info.hidden_size,
                vocab_size=info.vocab_size,
                kind=info.kind,
                description=info.description,
            )
        except ApiError as exc:
            entry["error"] = exc.message
        models.append(entry)
    return {"models": models}
