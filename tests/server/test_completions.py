"""/v1/completions through the official openai client: the shapes, parameters and numbers scripts rely on."""

from __future__ import annotations

import httpx
import openai

PROMPT = "The quick brown fox"


def count_tokens(http: httpx.Client, text: str) -> int:
    return http.post("/tokenize", json={"prompt": text}).json()["count"]


def test_completion_basic_and_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    [choice] = out.choices
    assert choice.finish_reason == "length" and choice.text
    assert out.usage.prompt_tokens == count_tokens(http, PROMPT)
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7


def test_alias_and_default_model(client: openai.OpenAI, http: httpx.Client) -> None:
    assert client.completions.create(model="tiny-alias", prompt="a", max_tokens=1).model == "tiny-alias"
    body = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).json()
    assert body["model"] == "tiny"


def test_prompt_forms_and_n(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    greedy = dict(model="tiny", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(prompt=PROMPT, **greedy).choices[0].text
    assert client.completions.create(prompt=ids, **greedy).choices[0].text == text
    batch = client.completions.create(prompt=[PROMPT, "Hello"], n=2, **greedy)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == text  # greedy samples agree
    ids_batch = client.completions.create(prompt=[ids, ids], **greedy)
    assert [c.text for c in ids_batch.choices] == [text, text]
    assert ids_batch.usage.prompt_tokens == 2 * len(ids)
    assert batch.usage.completion_tokens == 4 * 5


def test_seed_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed, n=2,
                                        extra_body={"ignore_eos": True})
        return [c.text for c in out.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert first[0] != first[1]  # n samples of one seeded request differ
    assert sample(99) != first


def test_stop_string(client: openai.OpenAI) -> None:
    free = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[len(free) // 2: len(free) // 2 + 3]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    assert choice.text == free[: free.index(stop)]
    kept = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == free[: free.index(stop) + len(stop)]


def test_logprobs_and_echo(client: openai.OpenAI, http: httpx.Client) -> None:
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens == 4
    assert "".join(lp.tokens) == out.choices[0].text
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 3 <= len(top) <= 4
        assert value == max(top.values())  # greedy: the chosen token is the most likely
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]

    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1,
                                       echo=True, extra_body={"ignore_eos": True})
    choice = echoed.choices[0]
    assert choice.text == PROMPT + out.choices[0].text
    n_prompt = count_tokens(http, PROMPT)
    assert len(choice.logprobs.tokens) == n_prompt + 4
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(v is not None for v in choice.logprobs.token_logprobs[1:])


def test_penalties_bias_and_extras_accepted(client: openai.OpenAI, http: httpx.Client) -> None:
    token = http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"][0]
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, logit_bias={str(token): 100}, user="someone", seed=3,
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 2, "stop_token_ids": [0],
                    "skip_special_tokens": True, "ignore_eos": False},
    )
    assert out.choices[0].text.startswith(" banana banana")  # +100 wins over everything


def test_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", prompt=[PROMPT, "Once upon"], max_tokens=24, temperature=0, n=2,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert len({c.id for c in chunks}) == 1
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finishes.setdefault(c.index, []).append(c.finish_reason)
    assert texts == {c.index: c.text for c in full.choices}
    assert finishes == {i: ["length"] for i in range(4)}  # exactly one finish_reason per choice
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_stop_string_never_leaks_into_stream(client: openai.OpenAI) -> None:
    free = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[10:22]  # long enough to span several tokens
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop,
                  extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == free[: free.index(stop)] == client.completions.create(**kwargs).choices[0].text


def test_echo_streaming(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                  extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == client.completions.create(**kwargs).choices[0].text
    assert streamed.startswith(PROMPT)


def test_streaming_logprobs(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, echo=True,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].logprobs
    tokens, offsets = [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
    assert tokens == full.tokens and offsets == full.text_offset
