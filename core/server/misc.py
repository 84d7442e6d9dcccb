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
    """200 while the server can serve; 503 with the reason while the model loads, while it drains, and once
    the core died or went silent (an orchestrator restarts it). Never waits on the core."""
    reason = engine.health()
    if reason is not None:
        return error_response(503, reason)
    return Response(status_code=200)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)
