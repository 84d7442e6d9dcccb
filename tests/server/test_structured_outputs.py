"""Structured output and tool calls through `paged serve`, with the official openai client and LangChain, on
the default model (SmolLM2-135M-Instruct) and a Hermes-style tool template (tests/server/templates)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import start_server, stop_server

TEMPLATE = Path(__file__).parent / "templates" / "hermes_tools.jinja"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}}, "required": ["zone"],
                   "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}]


@pytest.fixture(scope="module")
def served(smollm2_gguf, tmp_path_factory):
    log = tmp_path_factory.mktemp("structured") / "serve.log"
    server = start_server(smollm2_gguf, log, "--max-model-len", "2048", "--kv-cache-memory", "512MiB",
                          "--chat-template", str(TEMPLATE), "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population: int = Field(ge=0)


def test_parse_returns_the_pydantic_object(client, model):
    reply = client.chat.completions.parse(model=model, temperature=0, response_format=City, messages=[
        {"role": "user", "content": "Describe Paris as JSON: name, country, population."}])
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, City) and reply.choices[0].finish_reason == "stop"


def _streamed_chat(client, **kwargs) -> tuple[str, list[dict], str, int]:
    """(content, calls, finish_reason, how many deltas carried the calls) of a streamed chat."""
    content, calls, finish, deltas = "", {}, None, 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
                deltas += 1
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, deltas


@pytest.mark.parametrize("request_kind", ["json_schema", "json_object", "required_tool", "regex_in_structured_outputs"])
def test_streamed_equals_whole_under_greedy(client, model, request_kind):
    kwargs = dict(model=model, temperature=0, max_tokens=150, messages=ASK)
    kwargs.update({
        "json_schema": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "city", "schema": City.model_json_schema(), "strict": True}}},
        "json_object": {"response_format": {"type": "json_object"}, "max_tokens": 60},
        "required_tool": {"tools": TOOLS, "tool_choice": "required"},
        "regex_in_structured_outputs": {"extra_body": {"structured_outputs": {"regex": r"[A-Z][a-z]+ is [a-z]+\."}}},
    }[request_kind])
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish, deltas = _streamed_chat(client, **kwargs)
    assert content == (whole.message.content or "")
    made = whole.message.tool_calls or []
    assert calls == [{"name": c.function.name, "arguments": c.function.arguments} for c in made]
    assert finish == whole.finish_reason
    if made:  # the arguments stream in fragments as they are generated, not as one delta at the end
        assert deltas > len(made)
    if request_kind == "json_schema":
        City.model_validate_json(content)
    if request_kind == "regex_in_structured_outputs":
        assert re.fullmatch(r"[A-Z][a-z]+ is [a-z]+\.", content)


def test_structural_tags_through_response_format_and_structured_outputs(client, model):
    """vLLM's structural_tag: xgrammar's `format` (here a tag around a JSON object the schema fixes) in
    response_format, and the older structures begun by triggers in structured_outputs."""
    schema = WEATHER["function"]["parameters"]
    tag_format = {"type": "sequence", "elements": [
        {"type": "const_string", "value": "<weather>"},
        {"type": "json_schema", "json_schema": schema},
        {"type": "const_string", "value": "</weather>"}]}
    reply = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=80,
                                           response_format={"type": "structural_tag", "format": tag_format})
    text = reply.choices[0].message.content
    inside = re.fullmatch(r"<weather>(.*)</weather>", text, re.DOTALL)
    assert inside and reply.choices[0].finish_reason == "stop", text
    jsonschema.validate(json.loads(inside.group(1)), schema)
    legacy = {"structures": [{"begin": "<weather>", "schema": schema, "end": "</weather>"}], "triggers": ["<weather>"]}
    free = client.completions.create(model=model, prompt="The weather today is", temperature=0, max_tokens=12,
                                     extra_body={"structured_outputs": {"structural_tag": json.dumps(legacy)}})
    assert free.choices[0].text  # text is free until a trigger (tested by the mask in tests/structured)


def _validate(call) -> dict:
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


def test_required_and_named_tool_choices_give_valid_calls(client, model):
    for temperature, seed in ((0, None), (1.0, 1)):
        reply = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                               temperature=temperature, seed=seed, max_tokens=200).choices[0]
        assert reply.finish_reason == "tool_calls" and reply.message.tool_calls and reply.message.content is None
        for call in reply.message.tool_calls:
            _validate(call)
        assert len({call.id for call in reply.message.tool_calls}) == len(reply.message.tool_calls)
    single = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, temperature=0, max_tokens=100).choices[0]
    assert len(single.message.tool_calls) == 1
    named = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=100,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and "zone" in _validate(call)


def test_auto_tool_choice_parses_the_models_calls(client, model):
    """tool_choice "auto" with the hermes parser: the model's reply (held to a Hermes call here by a regex, as
    a tool-trained model would write it) comes back as tool_calls, whole and streamed."""
    call = (r'<tool_call>\n\{"name": "get_weather", "arguments": '
            r'\{"city": "[A-Z][a-z]{2,8}", "unit": "celsius"\}\}\n</tool_call>')
    kwargs = dict(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120,
                  extra_body={"guided_regex": "Checking\\. " + call})
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Checking. "
    (made,) = whole.message.tool_calls
    assert made.function.name == "get_weather" and _validate(made)["unit"] == "celsius"
    content, calls, finish, deltas = _streamed_chat(client, **kwargs)
    assert (content, finish) == ("Checking. ", "tool_calls")
    assert calls == [{"name": "get_weather", "arguments": made.function.arguments}] and deltas > 1
    plain = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=10)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


def test_tool_calls_and_results_in_the_history_reach_the_template(served, client, model):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
    ]
    rendered = httpx.post(f"{served.url}/tokenize", json={"model": model, "messages": history}).json()
    text = httpx.post(f"{served.url}/detokenize", json={"model": model, "tokens": rendered["tokens"]}).json()["prompt"]
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "<tool_response>\n21 degrees, sunny\n</tool_response>" in text
    reply = client.chat.completions.create(model=model, messages=history, tools=TOOLS, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                         "properties": 7}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"guided_grammar": 'root ::= "a" undefined_rule'}, "guided_grammar"),
    ({"structured_outputs": {"grammar": "start: missing"}}, "structured_outputs"),
    ({"guided_regex": "(open"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"schema": {}}}, "structured_outputs.schema"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"response_format": {"type": "structural_tag"}}, "response_format"),
    ({"response_format": {"type": "structural_tag", "format": {"type": "no_such_format"}}}, "response_format"),
    ({"structured_outputs": {"structural_tag": "{not json"}}, "structured_outputs"),
])
def test_bad_constraints_are_400s_and_the_server_keeps_serving(served, model, body, param):
    reply = httpx.post(f"{served.url}/v1/chat/completions", timeout=30,
                       json={"model": model, "messages": ASK, "max_tokens": 4, **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    ok = httpx.post(f"{served.url}/v1/completions", timeout=30,
                    json={"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
                          "guided_choice": ["Paris", "Lyon"]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("Paris", "Lyon")


def test_langchain_structured_output_and_tools(served, model):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool

    llm = langchain_openai.ChatOpenAI(base_url=f"{served.url}/v1", api_key="unused", model=model, temperature=0,
                                      max_tokens=120)
    question = "Describe Paris as JSON: name, country, population."
    for method in ("json_schema", "function_calling"):
        city = llm.with_structured_output(City, method=method).invoke(question)
        assert isinstance(city, City), method

    @tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="any").invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert isinstance(message.tool_calls[0]["args"]["city"], str)


@pytest.fixture(scope="module")
def thinking_server(smollm2_gguf, tmp_path_factory):
    """A tiny random model whose tokenizer (SmolLM2's) has <think> and </think>, served with the deepseek_r1
    reasoning parser (the reply starts inside a think block)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = Path(smollm2_gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    tokenizer.add_tokens(["<think>", "</think>"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    folder = tmp_path_factory.mktemp("thinking")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    server = start_server(str(folder), folder / "serve.log", "--reasoning-parser", "deepseek_r1")
    yield server, tokenizer.convert_tokens_to_ids("</think>")
    stop_server(server)


def test_reasoning_is_split_off_and_the_grammar_waits_for_it(thinking_server):
    server, end_id = thinking_server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    thinking = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=12).choices[0]
    assert thinking.message.reasoning_content and thinking.message.content is None  # never left the block
    # The bias makes </think> the first token; a grammar applied from the start would have masked it.
    digit = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"],
             "additionalProperties": False}
    kwargs = dict(model=model, messages=ASK, temperature=0, max_tokens=40, logprobs=True, logit_bias={str(end_id): 100},
                  response_format={"type": "json_schema", "json_schema": {"name": "digit", "schema": digit}})
    answer = client.chat.completions.create(**kwargs).choices[0]
    assert answer.logprobs.content[0].token == "</think>"
    assert answer.message.reasoning_content is None and json.loads(answer.message.content)["a"] in range(10)
    content, calls, finish, _ = _streamed_chat(client, **kwargs)
    assert (content, calls, finish) == (answer.message.content, [], answer.finish_reason)
