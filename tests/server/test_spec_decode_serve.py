"""`paged serve --speculative-config`: the openai client gets the text the model gives without speculation,
streamed or not, and /metrics counts the drafts as vLLM names them."""

from __future__ import annotations

import httpx
import openai

from paged import LLM, SamplingParams
from tests.server.conftest import metric, start_server, stop_server

TEXT = "Please send the signed contract back by Friday so that the work can start next month."
MESSAGES = [{"role": "user", "content": f"Repeat this text exactly: {TEXT}"}]


def test_served_with_ngram_drafts(smollm2_gguf, tmp_path):
    expected = LLM(model=smollm2_gguf, dtype="float32", device="cpu", kv_cache_memory="256MiB",
                   max_model_len=512).chat([MESSAGES], SamplingParams(temperature=0, max_tokens=40),
                                           use_tqdm=False)[0].outputs[0].text
    server = start_server(smollm2_gguf, tmp_path / "serve.log", "--max-model-len", "512", "--kv-cache-memory",
                          "256MiB", "--speculative-config",
                          '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}')
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=40)
        assert reply.choices[0].message.content == expected
        stream = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=40,
                                                stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected
        with httpx.Client(base_url=server.url, timeout=30) as http:
            drafted = metric(http, "vllm:spec_decode_num_draft_tokens_total", model_name=model)
            accepted = metric(http, "vllm:spec_decode_num_accepted_tokens_total", model_name=model)
            assert metric(http, "vllm:spec_decode_num_drafts_total", model_name=model) > 0
            assert drafted / 2 < accepted <= drafted
            assert metric(http, "vllm:spec_decode_num_accepted_tokens_per_pos_total", model_name=model,
                          position="0") > 0
        assert "speculative decoding: ngram, up to 4 tokens a step" in server.log_text()
    finally:
        stop_server(server)
