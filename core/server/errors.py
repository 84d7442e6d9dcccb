"""OpenAI error bodies, so every client's error handling sees the shape it already knows.

The body is `{"error": {"message", "type", "param", "code"}}` with vLLM's conventions: `type` is the
OpenAI SDK's exception name for the status and `code` the status itself.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from paged.errors import UserError

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
    """Raised by endpoint code to answer with `status` and an OpenAI error body naming `param`; with
    `retry_after`, a Retry-After header says when to come back (overload, draining)."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after = retry_after


class EngineDeadError(RuntimeError):
    """The engine core failed or is gone; no request can be served any more."""


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


def error_json(status: int, message: str, param: str | None = None) -> str:
    """The body as JSON with every non-ASCII character escaped: an error message quoting the client's text
    (a lone surrogate even) always encodes."""
    return json.dumps(error_body(status, message, param).model_dump(), ensure_ascii=True, separators=(",", ":"))


class _ASCIIJSONResponse(JSONResponse):
    def render(self, content: str) -> bytes:
        return content.encode("ascii")


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return _ASCIIJSONResponse(error_json(status, message, param), status_code=status)


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
