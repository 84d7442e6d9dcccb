"""API-key check, body-size limit and request ids as plain ASGI middleware: they act before any route or body
parsing runs."""

from __future__ import annotations

import hashlib
import hmac
import uuid

from fastapi import HTTPException
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from paged.server.errors import error_response


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison's time independent of the lengths as well as of the contents.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every HTTP route except `open_paths`; 401 otherwise."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.expected = _digest(api_key)
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        return hmac.compare_digest(_digest(token.strip()), self.expected) and scheme.lower() == "bearer"


class BodyTooLarge(HTTPException):
    """FastAPI's HTTPException, which its body reading lets through (anything else becomes a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the server's limit of {limit} bytes")


class BodySizeLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413, by Content-Length up front or by counting a chunked body.

    The error is raised from `receive`, so it reaches the app's handlers and gets the OpenAI error body
    (Starlette's own limiter answers in plain text).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if too_large:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


REQUEST_ID_HEADER = "X-Request-Id"


class RequestIdMiddleware:
    """--enable-request-id-headers: every response carries X-Request-Id, the client's own or a new one, and the
    handlers name their engine requests after it (scope state "request_id"), so one id ties a client's
    request to the server's logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
