"""Tool-call and reasoning parsers: whole replies against the calls they hold, and every streamed chunking of
a reply against the whole (the stream must say exactly what the whole reply says)."""

from __future__ import annotations

import json
import random

import pytest

from paged.errors import UserError
from paged.server.chat_replies import ReplyShaper
from paged.server.reasoning import ReasoningParser
from paged.server.tool_parsers import TOOL_PARSERS
from paged.server.tools import ChatTool, NamedToolChoice, resolve_tool_choice, tool_call_constraint

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"zone": "CET"}

# (parser, reply, expected content, expected [(name, arguments)])
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "weather", "arguments": %s}\n</tool_call>' % json.dumps(WEATHER),
     "Let me check.\n", [("weather", WEATHER)]),
    ("hermes", '<tool_call>{"name": "weather", "arguments": %s}</tool_call>\n<tool_call>{"name": "time", '
               '"arguments": %s}</tool_call>' % (json.dumps(WEATHER), json.dumps(TIME)),
     None, [("weather", WEATHER), ("time", TIME)]),
    ("hermes", "No tools needed: 2 < 3.", "No tools needed: 2 < 3.", []),
    ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("llama3_json", '{"name": "weather", "parameters": %s}' % json.dumps(WEATHER), None, [("weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "weather", "parameters": %s}; {"name": "time", "parameters": %s}'
     % (json.dumps(WEATHER), json.dumps(TIME)), None, [("weather", WEATHER), ("time", TIME)]),
    ("llama3_json", 'The answer is {"a": 1}', 'The answer is {"a": 1}', []),
    ("mistral", '[TOOL_CALLS][{"name": "weather", "arguments": %s}, {"name": "time", "arguments": %s}]'
     % (json.dumps(WEATHER), json.dumps(TIME)), None, [("weather", WEATHER), ("time", TIME)]),
    ("mistral", "Sure. [TOOL_CALLS]weather[ARGS]%s[TOOL_CALLS]time[ARGS]%s" % (json.dumps(WEATHER), json.dumps(TIME)),
     "Sure. ", [("weather", WEATHER), ("time", TIME)]),
    ("json", '```json\n[{"name": "weather", "arguments": %s}]\n```' % json.dumps(WEATHER), None,
     [("weather", WEATHER)]),
    ("json", '  {"name": "time", "parameters": %s}' % json.dumps(TIME), None, [("time", TIME)]),
    ("json", "Plain text [not a call]", "Plain text [not a call]", []),
]


def _chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def _assembled(pieces) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of each call a stream sent, as a client puts its deltas together; checks that a
    call's id and name come once, in its first delta, and that calls are numbered in order."""
    calls: dict[int, list[str]] = {}
    for delta in (d for piece in pieces for d in piece.tool_call_deltas):
        if delta.index not in calls:
            assert delta.index == len(calls) and delta.id and delta.function.name
            calls[delta.index] = [delta.id, delta.function.name, delta.function.arguments or ""]
        else:
            assert delta.id is None and delta.function.name is None
            calls[delta.index][2] += delta.function.arguments
    return [tuple(calls[i]) for i in sorted(calls)]


def _streamed(make, reply: str, chunks: list[str]):
    shaper = make(True)
    pieces = [shaper.feed(chunk) for chunk in chunks] + [shaper.finish()]
    return shaper, pieces


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1][:24]}")
def test_tool_calls_whole_and_streamed(case):
    name, reply, content, calls = case

    def make(streaming: bool) -> ReplyShaper:
        return ReplyShaper(None, "auto", TOOL_PARSERS[name](), streaming)

    shaper = make(False)
    whole = shaper.whole(reply)
    assert (whole.content or None) == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.tool_calls] == calls
    assert shaper.finish_reason("stop", whole) == ("tool_calls" if calls else "stop")
    rng = random.Random()
    for chunks in [list(reply)] + [_chunks(reply, rng) for _ in range(20)]:
        streaming, pieces = _streamed(make, reply, chunks)
        assert ("".join(p.content for p in pieces) or None) == content
        sent = _assembled(pieces)
        assert [(n, a) for _, n, a in sent] == [(c.function.name, c.function.arguments) for c in whole.tool_calls]
        assert [(c.id, c.function.name, c.function.arguments) for c in pieces[-1].tool_calls] == sent
        assert streaming.finish_reason("stop", pieces[-1]) == ("tool_calls" if calls else "stop")
    if calls:  # one character at a time, the arguments come in fragments, as the model writes them
        _, pieces = _streamed(make, reply, list(reply))
        fragments = [d for p in pieces for d in p.tool_call_deltas if d.id is None]
        assert len(fragments) > len(calls)


WEATHER_TOOL = ChatTool(function={"name": "weather", "parameters": {"type": "object"}})
TIME_TOOL = ChatTool(function={"name": "time", "parameters": {"type": "object"}})


@pytest.mark.parametrize("choice, reply, calls", [
    ("required", '[{"name": "weather", "parameters": %s}, {"name": "time", "parameters": %s}]'
     % (json.dumps(WEATHER), json.dumps(TIME)), [("weather", WEATHER), ("time", TIME)]),
    (NamedToolChoice(function={"name": "time"}), json.dumps(TIME), [("time", TIME)]),
])
def test_constrained_calls_whole_and_streamed(choice, reply, calls):
    """A required or named tool_choice's grammar output streams as call deltas too, never as content."""

    def make(streaming: bool) -> ReplyShaper:
        return ReplyShaper(None, choice, None, streaming)

    shaper = make(False)
    whole = shaper.whole(reply)
    assert whole.content == "" and [(c.function.name, json.loads(c.function.arguments))
                                    for c in whole.tool_calls] == calls
    expected = "tool_calls" if choice == "required" else "stop"
    assert shaper.finish_reason("stop", whole) == expected
    rng = random.Random()
    for chunks in [list(reply)] + [_chunks(reply, rng) for _ in range(20)]:
        streaming, pieces = _streamed(make, reply, chunks)
        assert "".join(p.content for p in pieces) == ""
        assert [(n, a) for _, n, a in _assembled(pieces)] == [(c.function.name, c.function.arguments)
                                                              for c in whole.tool_calls]
    cut = reply[: len(reply) // 2]  # max_tokens cut the grammar short: the whole reply is that text
    assert make(False).whole(cut).content == cut and not make(False).whole(cut).tool_calls


def test_a_call_that_stops_parsing():
    """A call whose name went out but whose text then breaks: the whole reply is content (as vLLM), the stream
    cannot take back what it sent and ends without calls."""
    reply = '<tool_call>{"name": "weather", "arguments": {"city": "Paris"} oops}</tool_call>'
    whole = ReplyShaper(None, "auto", TOOL_PARSERS["hermes"](), False).whole(reply)
    assert whole.content == reply and not whole.tool_calls
    cut = reply.index(" oops")
    streaming, pieces = _streamed(lambda s: ReplyShaper(None, "auto", TOOL_PARSERS["hermes"](), s), reply,
                                  [reply[:cut], reply[cut:]])
    assert _assembled(pieces)[0][1:] == ("weather", '{"city": "Paris"}') and not pieces[-1].tool_calls
    assert "".join(p.content for p in pieces) == ""
    assert streaming.finish_reason("stop", pieces[-1]) == "stop"


def test_arguments_given_as_a_json_string_are_decoded():
    reply = '{"name": "weather", "arguments": %s}' % json.dumps(json.dumps(WEATHER))
    (call,) = ReplyShaper(None, "auto", TOOL_PARSERS["json"](), False).whole(reply).tool_calls
    assert json.loads(call.function.arguments) == WEATHER


class FakeTokenizer:
    unk_token_id = 0

    def convert_tokens_to_ids(self, token):
        return {"<think>": 7, "</think>": 8}.get(token, 0)


@pytest.mark.parametrize("name, reply, reasoning, content", [
    ("deepseek_r1", "I should add.\n</think>\n\n4", "I should add.\n", "4"),
    ("deepseek_r1", "<think>Hmm</think>Yes", "Hmm", "Yes"),
    ("deepseek_r1", "still thinking, cut short", "still thinking, cut short", None),
    ("qwen3", "<think>\nHmm.\n</think>\n\nAnswer: 4", "\nHmm.\n", "Answer: 4"),
    ("qwen3", "Answer without thinking", None, "Answer without thinking"),
    ("qwen3", "<think>cut short", "cut short", None),
])
def test_reasoning_whole_and_streamed(name, reply, reasoning, content):
    parser = ReasoningParser.load(name, FakeTokenizer())
    assert parser.split(reply) == (reasoning, content)
    rng = random.Random()
    for _ in range(20):
        shaper = ReplyShaper(parser, "none", None, True)
        pieces = [shaper.feed(chunk) for chunk in _chunks(reply, rng)] + [shaper.finish()]
        assert ("".join(p.reasoning for p in pieces) or None) == reasoning
        assert ("".join(p.content for p in pieces) or None) == content


def test_reasoning_parser_knows_when_the_prompt_leaves_the_model_thinking():
    parser = ReasoningParser.load("qwen3", FakeTokenizer())
    assert parser.still_thinking([1, 2, 3])  # the model opens its own block
    assert parser.still_thinking([1, 7, 2])  # the template opened one
    assert not parser.still_thinking([1, 7, 8, 2])  # enable_thinking=False: an empty block, closed
    assert parser.still_thinking([7, 8, 1, 7])  # an earlier turn's block closed, a new one open


def test_reasoning_parser_needs_its_tokens():
    class NoThink(FakeTokenizer):
        def convert_tokens_to_ids(self, token):
            return 0

    with pytest.raises(UserError, match="no <think>"):
        ReasoningParser.load("qwen3", NoThink())


def test_tool_choice_is_checked():
    tools = [ChatTool(function={"name": "weather", "parameters": {"type": "object"}})]
    assert resolve_tool_choice(None, None, False) == "none"
    with pytest.raises(UserError, match="--enable-auto-tool-choice"):
        resolve_tool_choice(tools, None, False)
    assert resolve_tool_choice(tools, None, True) == "auto"
    with pytest.raises(UserError, match="not one of the tools"):
        resolve_tool_choice(tools, NamedToolChoice(function={"name": "time"}), True)
    with pytest.raises(UserError, match="needs tools"):
        resolve_tool_choice(None, "required", True)
    single = json.loads(tool_call_constraint(tools, "required", parallel=False).json)
    assert single["maxItems"] == 1 and single["minItems"] == 1
    assert "maxItems" not in json.loads(tool_call_constraint(tools, "required", parallel=True).json)
    assert tool_call_constraint(tools, "auto", parallel=True) is None
