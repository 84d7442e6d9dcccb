"""Schemathesis against the server's own OpenAPI schema, and hypothesis with any Unicode (lone surrogates too)
and any JSON values: valid and invalid bodies alike, never a 5xx, never a closed connection.

The fuzzed server has a 48-token context, so that whatever `n`, `max_tokens` or prompt the fuzzer picks,
a request generates at most a few dozen tokens per sequence and the run stays quick.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# Any code point, lone surrogates included, as JSON can carry them ("\ud800" is valid JSON).
_any_text = st.text(st.characters(exclude_categories=()), max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | _any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_any_text, inner, max_size=4),
    max_leaves=12,
)
_FIELDS = ["model", "prompt", "messages", "max_tokens", "n", "temperature", "top_p", "stop", "logit_bias", "seed",
           "logprobs", "top_logprobs", "echo", "stream", "stream_options", "user", "tokens", "response_format"]


def _body(fields: st.SearchStrategy) -> st.SearchStrategy:
    return st.dictionaries(st.sampled_from(_FIELDS) | _any_text, fields, max_size=6)


_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]) | _any_text, "content": _json})


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
@given(body=_body(_json) | st.builds(lambda b, m: {**b, "messages": m}, _body(_json), st.lists(_message, max_size=2))
       | st.builds(lambda b, p: {**b, "prompt": p}, _body(_json), _any_text))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_arbitrary_unicode_and_json_never_5xx_nor_a_closed_connection(fuzz_server: Server, path: str,
                                                                      body: dict) -> None:
    with httpx.Client(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        response = http.post(path, content=json.dumps(body, ensure_ascii=True),
                             headers={"Content-Type": "application/json"})
        assert response.status_code < 500, f"{path} {body!r}: {response.text}"
        assert response.headers.get("connection") != "close", f"{path} {body!r}: connection closed"
        assert http.get("/health").status_code == 200  # the same connection, still usable


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "\udfff"]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "\ud800"}, "model"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, "stop"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(fuzz_server: Server, path: str, body: dict, param: str) -> None:
    with httpx.Client(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        response = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and "surrogate" in error["message"], error
        assert http.get("/health").status_code == 200
