"""/v1/chat/completions through the official openai client."""

from __future__ import annotations

import httpx
import openai

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
GREEDY = dict(model="tiny", temperature=0, extra_body={"ignore_eos": True})


def test_chat_basic_and_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    out = client.chat.completions.create(messages=MESSAGES, max_completion_tokens=6, **GREEDY)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    [choice] = out.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    rendered = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert out.usage.prompt_tokens == rendered["count"]
    assert out.usage.completion_tokens == 6


def test_text_parts_equal_string_content(client: openai.OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "colour."}]}]
    joined = [{"role": "user", "content": "Name a\ncolour."}]
    a = client.chat.completions.create(messages=parts, max_tokens=5, **GREEDY)
    b = client.chat.completions.create(messages=joined, max_tokens=5, **GREEDY)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy
        assert token.top_logprobs[0].logprob == token.logprob
        assert bytes(token.bytes).decode() == token.token
    plain = client.chat.completions.create(messages=MESSAGES, max_tokens=2, logprobs=True, **GREEDY)
    assert all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)


def test_chat_streaming(client: openai.OpenAI) -> None:
    kwargs = dict(messages=MESSAGES, max_tokens=16, n=2, **GREEDY)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first = chunks[0]
    assert [(c.index, c.delta.role) for c in first.choices] == [(0, "assistant"), (1, "assistant")]
    texts = {0: "", 1: ""}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index].append(c.finish_reason)
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finishes == {0: ["length"], 1: ["length"]}
    assert chunks[-1].usage == full.usage


def test_chat_stop_and_seed(client: openai.OpenAI) -> None:
    free = client.chat.completions.create(messages=MESSAGES, max_tokens=20, **GREEDY).choices[0].message.content
    stop = free[5:9]
    out = client.chat.completions.create(messages=MESSAGES, max_tokens=20, stop=stop, **GREEDY)
    assert out.choices[0].message.content == free[: free.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    seeded = dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=7,
                  extra_body={"ignore_eos": True})
    assert (client.chat.completions.create(**seeded).choices[0].message.content
            == client.chat.completions.create(**seeded).choices[0].message.content)


def test_chat_streaming_logprobs(client: openai.OpenAI) -> None:
    kwargs = dict(messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2, **GREEDY)
    full = client.chat.completions.create(**kwargs)
    streamed = [t for c in client.chat.completions.create(stream=True, **kwargs)
                for choice in c.choices if choice.logprobs for t in choice.logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in full.choices[0].logprobs.content]
