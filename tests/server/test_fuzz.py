"""Schemathesis against the server's own OpenAPI schema: valid and invalid bodies alike, never a 5xx.

The fuzzed server has a 48-token context, so that whatever `n`, `max_tokens` or prompt the fuzzer picks,
a request generates at most a few dozen tokens per sequence and the run stays quick.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from .conftest import API_KEY, Server, start_server, stop_server


@pytest.fixture(scope="module")
def fuzz_server(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    server = start_server(str(tiny_chat_model), log, "--api-key", API_KEY, "--max-model-len", "48",
                          "--kv-cache-memory", "64MiB")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json",
                                         headers={"Authorization": f"Bearer {API_KEY}"})


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, fuzz_server: Server) -> None:
    response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.text}"
    assert fuzz_server.process.poll() is None, "the server died"
