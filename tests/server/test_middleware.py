"""API key and body-size limit, in-process over a stand-in engine: both act before any engine work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import pytest

from paged.server.app import build_app
from paged.server.settings import ServerSettings


def _call(settings: ServerSettings, method: str, path: str, **kwargs) -> httpx.Response:
    engine_client = SimpleNamespace(max_model_len=128, observer=None, health=lambda: None, core_pid=None,
                                    facts=None)
    app = build_app(engine_client, settings)

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://paged") as http:
            return await http.request(method, path, **kwargs)

    return asyncio.run(main())


@pytest.mark.parametrize(("require", "status"), [(False, 200), (True, 401)])
def test_metrics_key_only_when_asked(require: bool, status: int) -> None:
    settings = ServerSettings(["m"], "m", api_key="k", metrics_require_key=require)
    assert _call(settings, "GET", "/metrics").status_code == status
    assert _call(settings, "GET", "/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
    assert _call(settings, "GET", "/health").status_code == 200


def test_no_key_configured_means_open() -> None:
    assert _call(ServerSettings(["m"], "m"), "GET", "/version").status_code == 200


def test_chunked_body_over_the_limit_is_413() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = _call(ServerSettings(["m"], "m", max_body_bytes=4000), "POST", "/v1/completions", content=chunks(),
                     headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == 413


def test_cors_preflight_gets_the_allowed_origin_before_the_key_check() -> None:
    settings = ServerSettings(["m"], "m", api_key="k", allowed_origins=["https://chat.example"])
    preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    answer = _call(settings, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "https://chat.example"
    refused = _call(settings, "OPTIONS", "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    assert _call(settings, "GET", "/version", headers={"Origin": "https://chat.example"}).headers[
        "access-control-allow-origin"] == "https://chat.example"


def test_request_id_headers_go_out_as_they_came_in() -> None:
    settings = ServerSettings(["m"], "m", api_key="k", enable_request_id_headers=True)
    echoed = _call(settings, "GET", "/version", headers={"X-Request-Id": "trace-42"})
    assert echoed.headers["x-request-id"] == "trace-42"
    made = _call(settings, "GET", "/v1/models")  # a 401: it carries an id too
    assert made.status_code == 401 and len(made.headers["x-request-id"]) == 32
    assert "x-request-id" not in _call(ServerSettings(["m"], "m"), "GET", "/version").headers
