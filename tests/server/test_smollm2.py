"""The default model, SmolLM2-135M-Instruct, served with no model argument: real answers, real tokenizer."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest

from .conftest import Server, start_server, stop_server

NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    log = tmp_path_factory.mktemp("smollm2") / "serve.log"
    server: Server = start_server(None, log, "--max-model-len", "1024", "--kv-cache-memory", "256MiB")
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    stop_server(server)


def test_default_model_answers(smollm2: openai.OpenAI) -> None:
    models = smollm2.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].model_extra["root"] == NAME  # the model as the user named it, not the file's path
    out = smollm2.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
        max_tokens=24,
    )
    assert "Paris" in out.choices[0].message.content


def test_default_model_streams_what_it_returns(smollm2: openai.OpenAI) -> None:
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": "List three fruits."}], temperature=0,
                  max_tokens=32, stop=["\n\n"])
    full = smollm2.chat.completions.create(**kwargs).choices[0]
    streamed = "".join(c.choices[0].delta.content or "" for c in smollm2.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == full.message.content
    assert "\n\n" not in streamed


def test_serve_with_no_flags_on_the_smallest_cpu_level(smollm2_gguf: str, tmp_path) -> None:
    """`paged serve` as the README runs it, on the paths of a CPU with no AVX2 (and oneDNN and torch held to
    SSE4.1 as well): it starts, says what it chose, and answers a chat request that sets nothing."""
    log = tmp_path / "serve.log"
    env = {"PAGED_CPU_ISA": "baseline", "ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"}
    server = start_server(None, log, env=env, as_a_user_would=True)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        out = client.chat.completions.create(model=NAME, max_tokens=16,
                                             messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert out.choices[0].message.content.strip()
    finally:
        stop_server(server)
    text = server.log_text()
    assert "level baseline" in text and "dtype auto: float32" in text
    assert "Traceback" not in text


def test_an_abandoned_long_prefill_stops_within_a_step(smollm2: openai.OpenAI) -> None:
    """16 prompts of ~1,000 tokens are tens of seconds of prefill on the CPU; the client gives up after a
    second, and the next request is answered as if the server had been idle (within a step or two)."""
    long_prompt = "The history of the city is long and full of stories. " * 80
    impatient = smollm2.with_options(timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=NAME, prompt=[f"{i} {long_prompt}" for i in range(16)], max_tokens=1)
    start = time.monotonic()
    out = smollm2.completions.create(model=NAME, prompt="Hello", max_tokens=2)
    waited = time.monotonic() - start
    assert out.choices[0].text is not None
    assert waited < 8, f"the next request waited {waited:.1f} s behind the abandoned prefill"
