"""GET /v1/models and /v1/models/{id}: the names this server answers to, each with its context length as vLLM reports it."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from paged.server.deps import Engine, Settings
from paged.server.errors import ERROR_RESPONSES
from paged.server.protocol import created_now

router = APIRouter()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "paged"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(engine: Engine, settings: Settings) -> ModelList:
    created = created_now()
    return ModelList(data=[_card(name, created, engine, settings) for name in settings.served_model_names])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model: str, engine: Engine, settings: Settings) -> ModelCard:
    """One served name (any alias of --served-model-name; a name with slashes too); 404 for another."""
    return _card(settings.resolve_model(model), created_now(), engine, settings)


def _card(name: str, created: int, engine, settings) -> ModelCard:
    return ModelCard(id=name, created=created, root=settings.model_root, max_model_len=engine.max_model_len)
