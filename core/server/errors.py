"""OpenAI error bodies, so every client's error handling sees the shape it already knows.

The body is `{"error": {"message", "type", "param", "code"}}` with vLLM's conventions: `type` is the
OpenAI SDK's exception name for the status and `code` the status itself.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from paged.errors import UserError
from paged.server.engine_client import EngineDeadError

# The OpenAI SDK's exception class per status; others fall back to the status phrase.
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """Raised by endpoint code to answer with `status` and an OpenAI error body naming `param`."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nobody is left to read a response."""


def _error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    try:
        return HTTPStatus(status).phrase.replace(" ", "").replace("-", "") + "Error"
    except ValueError:
        return "Error"


def error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=_error_type(status), param=param, code=status))


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param).model_dump(), status_code=status)


# What the OpenAPI schema says error statuses return, for routes to declare.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


def describe_error(error: Exception) -> tuple[int, str, str | None]:
    """(status, message, param) to answer an exception with: the client's fault is a 4xx, ours a 5xx."""
    if isinstance(error, APIError):
        return error.status, error.message, error.param
    if isinstance(error, UserError):
        return 400, str(error), error.param
    if isinstance(error, EngineDeadError):
        return 503, str(error), None
    return 500, f"internal error: {type(error).__name__}: {error}", None
