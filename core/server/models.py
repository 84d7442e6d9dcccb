"""GET /v1/models: the names this server answers to, each with its context length as vLLM reports it."""

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
    return ModelList(data=[
        ModelCard(id=name, created=created, root=settings.model_root, max_model_len=engine.max_model_len)
        for name in settings.served_model_names
    ])
