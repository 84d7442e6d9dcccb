"""FastAPI dependencies: the engine client and settings that `build_app` stores on the app."""

from __future__ import annotations

import uuid
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


def engine_request_id(prefix: str, request: Request) -> str:
    """The id of a response and its engine requests: the client's X-Request-Id under --enable-request-id-headers
    (RequestIdMiddleware), else a new one."""
    return f"{prefix}-{getattr(request.state, 'request_id', None) or uuid.uuid4().hex}"
