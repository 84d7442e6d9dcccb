"""/metrics under vLLM's names: counters move by exactly the tokens served, histograms by the requests."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai

from .conftest import metric

MODEL = {"model_name": "tiny"}


def test_counters_move_by_exactly_the_tokens_served(client: openai.OpenAI, http: httpx.Client) -> None:
    def snapshot() -> dict[str, float]:
        return {
            "prompt": metric(http, "vllm:prompt_tokens_total", **MODEL),
            "generation": metric(http, "vllm:generation_tokens_total", **MODEL),
            "length": metric(http, "vllm:request_success_total", finished_reason="length", **MODEL),
            "stop": metric(http, "vllm:request_success_total", finished_reason="stop", **MODEL),
            "ttft": metric(http, "vllm:time_to_first_token_seconds_count", **MODEL),
            "e2e": metric(http, "vllm:e2e_request_latency_seconds_count", **MODEL),
            "queue": metric(http, "vllm:request_queue_time_seconds_count", **MODEL),
            "itl": metric(http, "vllm:inter_token_latency_seconds_count", **MODEL),
            "prefix_queries": metric(http, "vllm:prefix_cache_queries_total", **MODEL),
        }

    before = snapshot()
    completion = client.completions.create(model="tiny", prompt=["one two three", "four"], n=2, max_tokens=5,
                                           extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True})
    chat_usage = [chunk.usage for chunk in chat if chunk.usage is not None][0]
    after = snapshot()

    delta = {k: after[k] - before[k] for k in before}
    assert delta["prompt"] == completion.usage.prompt_tokens + chat_usage.prompt_tokens
    assert delta["generation"] == completion.usage.completion_tokens + chat_usage.completion_tokens == 4 * 5 + 3
    assert delta["length"] == 4 + 1 and delta["stop"] == 0  # one per sequence, as the engine counts them
    assert delta["ttft"] == delta["e2e"] == delta["queue"] == 3  # one per engine request (prompt)
    assert delta["itl"] > 0
    assert delta["prefix_queries"] > 0
    assert metric(http, "vllm:num_requests_running", **MODEL) == 0
    assert metric(http, "vllm:num_requests_waiting", **MODEL) == 0


def test_every_vllm_dashboard_metric_is_exported(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    for name in [
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
        "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
        "vllm:request_prefill_time_seconds_bucket", "vllm:request_decode_time_seconds_bucket",
        "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
    ]:
        assert f'\n{name}{{' in text, name


def test_grafana_dashboard_uses_only_exported_metrics(http: httpx.Client) -> None:
    dashboard = Path(__file__).parents[2] / "docs" / "grafana" / "paged-dashboard.json"
    used = set(re.findall(r"vllm:[a-z0-9_]+", dashboard.read_text()))
    exported = {line.split("{")[0].split(" ")[0] for line in http.get("/metrics").text.splitlines()
                if line.startswith("vllm:")}
    assert used and used <= exported, used - exported
