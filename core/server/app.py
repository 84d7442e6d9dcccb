"""The FastAPI app: routes, API-key check, body-size limit, and every error as an OpenAI error body.

No bad request may become a 500: validation errors (malformed JSON, wrong types, missing fields),
UserErrors from the engine's checks and HTTP errors (404 route, 405, 413) all map to a 4xx with
`{"error": {"message", "type", "param", "code"}}` naming the field at fault.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException

from paged import __version__
from paged.errors import UserError
from paged.server import chat, completions, metrics, misc, models, tokenize
from paged.server.engine_client import EngineClient
from paged.server.errors import APIError, ClientDisconnected, EngineDeadError, describe_error, error_response
from paged.server.metrics import EngineMetrics
from paged.server.middleware import APIKeyMiddleware, BodySizeLimitMiddleware, RequestIdMiddleware
from paged.server.settings import ServerSettings
from paged.server.stats_log import StatsLogger

logger = logging.getLogger(__name__)

# Nginx's code for "client closed the request": logged, never seen by anyone.
_CLIENT_CLOSED = 499
_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def build_app(engine_client: EngineClient, settings: ServerSettings, log_stats: bool = False) -> FastAPI:
    """The app over `engine_client`, which it connects on start-up and disconnects on shutdown; with
    `log_stats`, it also logs the core's stats every few seconds."""
    engine_metrics = EngineMetrics(settings.model_name, engine_client.max_model_len, core_pid=engine_client.core_pid,
                                   facts=lambda: engine_client.facts)
    engine_client.observer = engine_metrics
    stats_logger = StatsLogger(lambda: engine_client.stats) if log_stats else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine_client.start()
        if stats_logger is not None:
            stats_logger.start()
        try:
            yield
        finally:
            if stats_logger is not None:
                stats_logger.stop()
            await engine_client.shutdown()

    # strict_content_type=False: clients that send JSON without a Content-Type header still work, as with vLLM.
    app = FastAPI(title="paged", version=__version__, lifespan=lifespan, strict_content_type=False)
    app.state.engine = engine_client
    app.state.settings = settings
    app.state.metrics = engine_metrics
    for module in (completions, chat, models, tokenize, misc, metrics):
        app.include_router(module.router)
    _add_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:  # added late, so it runs early: no body is read for an unauthenticated request
        open_paths = {"/health"} | (set() if settings.metrics_require_key else {"/metrics"})
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key, open_paths=frozenset(open_paths))
    if settings.enable_request_id_headers:  # before the key check, so a 401 carries the id too
        app.add_middleware(RequestIdMiddleware)
    # Outermost: a browser's preflight (OPTIONS, never with the key) is answered before anything else runs.
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=settings.allowed_methods,
                       allow_headers=settings.allowed_headers, allow_credentials=settings.allow_credentials)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> Response:
        problems = error.errors()
        first = problems[0] if problems else None
        param = _param(first["loc"]) if first and first["type"] != "json_invalid" else None
        messages = list(dict.fromkeys(_describe(p) for p in problems))  # a union repeats itself per member
        return error_response(400, "; ".join(messages[:3]) or "invalid request", param)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> Response:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(ClientDisconnected)
    async def client_disconnected(_request: Request, _error: ClientDisconnected) -> Response:
        return Response(status_code=_CLIENT_CLOSED)

    async def described(request: Request, error: Exception) -> Response:
        status, message, param = describe_error(error)
        if status >= 500 and not isinstance(error, (APIError, EngineDeadError)):
            logger.error("%s %s failed: %s", request.method, request.url.path, message, exc_info=error)
        response = error_response(status, message, param)
        if isinstance(error, APIError) and error.retry_after is not None:
            response.headers["Retry-After"] = str(error.retry_after)
        return response

    # The expected errors by class, so they are answered in place; Exception catches the rest last.
    for error_class in (APIError, UserError, EngineDeadError, Exception):
        app.add_exception_handler(error_class, described)


def _describe(problem: dict) -> str:
    """One validation problem in words, prefixed by the field it is about."""
    if problem["type"] == "json_invalid":
        return f"invalid JSON at character {problem['loc'][-1]}: {problem.get('ctx', {}).get('error', '')}"
    where = _param(problem["loc"])
    if where is None and problem["type"] == "model_attributes_type":
        # FastAPI leaves a body it did not parse as JSON as bytes.
        hint = " (send it with Content-Type: application/json)" if isinstance(problem.get("input"), bytes) else ""
        return f"the request body must be a JSON object{hint}"
    return f"{where}: {problem['msg']}" if where else problem["msg"]


def _param(loc: tuple) -> str | None:
    """The body field a validation error is about, e.g. `messages[0].content`; None for the body itself.

    Pydantic appends the tried type to the path of a union member (`prompt.list[int]`): that tail is cut.
    """
    if not loc or loc[0] != "body":
        return None
    parts = list(loc[1:])
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_NAMES:
            path += f".{part}" if path else part
        else:
            break
    return path or None
