"""FastAPI dependencies: the engine client and settings that `build_app` stores on the app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from paged.server.engine_client import EngineClient
from paged.server.settings import ServerSettings


def _engine(request: Request) -> EngineClient:
    return request.app.state.engine


def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


Engine = Annotated[EngineClient, Depends(_engine)]
Settings = Annotated[ServerSettings, Depends(_settings)]
