"""GET /health and /version: liveness for load balancers and orchestrators, and what is running."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel

from paged import __version__
from paged.server.deps import Engine
from paged.server.errors import ErrorResponse, error_response

router = APIRouter()


class VersionResponse(BaseModel):
    version: str


@router.get("/health", responses={503: {"model": ErrorResponse}})
async def health(engine: Engine) -> Response:
    """200 while the engine core lives; 503 once it died, so an orchestrator restarts the server."""
    if engine.dead:
        return error_response(503, f"the engine is not running: {engine.error}")
    return Response(status_code=200)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)
