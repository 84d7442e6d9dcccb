"""Every bad request is a 4xx with an OpenAI error body naming the field; the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import API_KEY, MAX_BODY

C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (endpoint, body (dict) or raw text, status, param named in the error)
CASES = [
    (C, '{"prompt": "a", ', 400, None),
    (C, "[1, 2]", 400, None),
    (C, '{"prompt": "a", "temperature": NaN}', 400, "temperature"),
    (C, {}, 400, "prompt"),
    (C, {"prompt": 5}, 400, "prompt"),
    (C, {"prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    (C, {"prompt": "a", "stream": "sometimes"}, 400, "stream"),
    (C, {"prompt": "a", "stop": [1, 2]}, 400, "stop"),
    (C, {"prompt": "a", "temperature": -1}, 400, "temperature"),
    (C, {"prompt": "a", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    (C, {"prompt": "a", "top_k": -5}, 400, "top_k"),
    (C, {"prompt": "a", "min_p": 2}, 400, "min_p"),
    (C, {"prompt": "a", "n": 0}, 400, "n"),
    (C, {"prompt": "a", "n": 100000}, 400, "n"),
    (C, {"prompt": "a", "presence_penalty": 5}, 400, "presence_penalty"),
    (C, {"prompt": "a", "frequency_penalty": -3}, 400, "frequency_penalty"),
    (C, {"prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (C, {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "a", "max_tokens": 4, "min_tokens": 9}, 400, "min_tokens"),
    (C, {"prompt": "a", "max_tokens": 100000}, 400, "max_tokens"),
    (C, {"prompt": "word " * 400, "max_tokens": 1}, 400, "prompt"),
    (C, {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    (C, {"prompt": [1, 10**6]}, 400, "prompt"),
    (C, {"prompt": [[5, 6], [-1]]}, 400, "prompt"),
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    (C, {"prompt": "a", "logprobs": -1}, 400, "logprobs"),
    (C, {"prompt": "a", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    (C, {"prompt": "a", "logit_bias": {"token": 1}}, 400, "logit_bias"),
    (C, {"prompt": "a", "logit_bias": {"5": 1000}}, 400, "logit_bias"),
    (C, {"prompt": "a", "seed": 2**70}, 400, "seed"),
    (C, {"prompt": "a", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (C, {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": "a", "suffix": "z"}, 400, "suffix"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content"),
    (CHAT, {"messages": USER, "max_completion_tokens": 100000}, 400, "max_completion_tokens"),
    (CHAT, {"messages": USER, "max_tokens": 100000}, 400, "max_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "temperature": -0.5}, 400, "temperature"),
    (CHAT, {"messages": USER, "model": "nope"}, 404, "model"),
    ("/tokenize", {"prompt": 3}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 10**7]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
]


def assert_error_body(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] and error["code"] == status
    assert error["param"] == param, error


@pytest.mark.parametrize(("path", "body", "status", "param"), CASES, ids=[f"{c[0]}:{str(c[1])[:40]}" for c in CASES])
def test_bad_request(http: httpx.Client, path: str, body: dict | str, status: int, param: str | None) -> None:
    if isinstance(body, str):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert_error_body(response, status, param)


def test_streaming_request_errors_before_the_stream(http: httpx.Client) -> None:
    response = http.post(C, json={"prompt": "a", "stream": True, "temperature": -1})
    assert_error_body(response, 400, "temperature")


def test_context_error_is_worded_as_vllm(http: httpx.Client) -> None:
    message = http.post(C, json={"prompt": "a", "max_tokens": 100000}).json()["error"]["message"]
    assert message.startswith("This model's maximum context length is 256 tokens.")


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error_body(http.get("/v1/nothing"), 404, None)
    assert_error_body(http.delete("/v1/models"), 405, None)


def test_body_without_json_content_type(http: httpx.Client) -> None:
    response = http.post(C, content='{"prompt": "a"}', headers={"Content-Type": "text/plain"})
    assert_error_body(response, 400, None)
    assert "Content-Type: application/json" in response.json()["error"]["message"]


def test_body_too_large(http: httpx.Client) -> None:
    big = {"prompt": "x" * (MAX_BODY + 1)}
    assert_error_body(http.post(C, json=big), 413, None)


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="a", temperature=-1)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=USER)


def test_api_key(server, http: httpx.Client) -> None:
    with httpx.Client(base_url=server.url) as anonymous:
        for method, path in [("GET", "/v1/models"), ("POST", C), ("POST", CHAT), ("POST", "/tokenize"),
                             ("GET", "/version"), ("GET", "/openapi.json")]:
            assert_error_body(anonymous.request(method, path, json={"prompt": "a"}), 401, None)
        wrong = {"Authorization": f"Bearer {API_KEY}x"}
        assert_error_body(anonymous.get("/v1/models", headers=wrong), 401, None)
        assert anonymous.get("/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
    bad_client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()


def test_a_request_is_named_after_its_x_request_id(client: openai.OpenAI, server) -> None:
    raw = client.completions.with_raw_response.create(model="tiny", prompt=[1023, 1234, 2000, 3001, 42],
                                                      max_tokens=2, extra_headers={"X-Request-Id": "trace-7f3"})
    assert raw.headers["x-request-id"] == "trace-7f3" and raw.parse().id == "cmpl-trace-7f3"
    # The log names it too, with its prompt cut to --max-log-len 3 tokens.
    logged = next(line for line in server.log_text().splitlines() if "received request cmpl-trace-7f3-0:" in line)
    assert "5 prompt tokens, prompt: '" in logged and "prompt_token_ids: [1023, 1234, 2000]," in logged
    chat = client.chat.completions.with_raw_response.create(model="tiny", max_tokens=2,
                                                            messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().id != chat.parse().id == f"chatcmpl-{chat.headers['x-request-id']}"


def test_still_serving_after_errors(client: openai.OpenAI) -> None:
    out = client.completions.create(model="tiny", prompt="still here", max_tokens=3)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_models_and_version(client: openai.OpenAI, http: httpx.Client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny-alias"]
    assert models.data[0].model_extra["max_model_len"] == 256
    alias = client.models.retrieve("tiny-alias")
    assert (alias.id, alias.object, alias.model_extra["max_model_len"]) == ("tiny-alias", "model", 256)
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist"):
        client.models.retrieve("gpt-4o")
    assert http.get("/version").json()["version"]


@pytest.mark.parametrize(("field", "value"), [
    ("functions", [{"name": "f", "parameters": {}}]),
    ("guided_decoding_backend", "outlines"),
    ("bad_words", ["hi"]),
    ("best_of", 3),
])
def test_an_unimplemented_output_changing_field_is_a_400_naming_it(client: openai.OpenAI, field: str,
                                                                   value: object) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={field: value})
    assert raised.value.body["param"] == field and field in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError, match=field):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={field: value})


def test_neutral_values_and_harmless_unknown_fields_are_accepted(server, client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                         response_format={"type": "text"}, tools=[],
                                         extra_body={"metadata_of_mine": {"k": "v"}})
    assert out.choices[0].message.content is not None
    assert "request fields ignored (not part of the API this server implements): metadata_of_mine" in \
        server.log_text()
