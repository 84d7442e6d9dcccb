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
            "tpot": metric(http, "vllm:time_per_output_token_seconds_count", **MODEL),
            "request_tpot": metric(http, "vllm:request_time_per_output_token_seconds_count", **MODEL),
            "inference": metric(http, "vllm:request_inference_time_seconds_count", **MODEL),
            "n": metric(http, "vllm:request_params_n_sum", **MODEL),
            "max_tokens": metric(http, "vllm:request_params_max_tokens_sum", **MODEL),
            "longest": metric(http, "vllm:request_max_num_generation_tokens_sum", **MODEL),
            "steps": metric(http, "vllm:iteration_tokens_total_count", **MODEL),
            "step_tokens": metric(http, "vllm:iteration_tokens_total_sum", **MODEL),
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
    assert delta["itl"] == delta["tpot"] > 0
    assert delta["request_tpot"] == delta["inference"] == 3
    assert delta["n"] == 2 + 2 + 1 and delta["max_tokens"] == delta["longest"] == 5 + 5 + 3
    # Every token generated but the last of each sequence is fed back in a later step, besides the prompts.
    assert delta["steps"] > 0 and delta["step_tokens"] >= delta["generation"] - 5
    assert delta["prefix_queries"] > 0
    assert metric(http, "vllm:num_requests_running", **MODEL) == 0
    assert metric(http, "vllm:num_requests_waiting", **MODEL) == 0


def test_every_vllm_dashboard_metric_is_exported(client: openai.OpenAI, http: httpx.Client) -> None:
    """The series vLLM's example dashboard queries (tests/data, read off its JSON), and the rest of vLLM's /metrics
    that has a meaning here."""
    client.completions.create(model="tiny", prompt="one two", max_tokens=3)  # so every histogram has a sample
    listed = Path(__file__).parents[1] / "data" / "vllm_dashboard_metrics.txt"
    dashboard = [line for line in listed.read_text().splitlines() if line and not line.startswith("#")]
    text = http.get("/metrics").text
    for name in [*dashboard,
                 "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:iteration_tokens_total_bucket", "vllm:request_time_per_output_token_seconds_bucket",
                 "vllm:request_inference_time_seconds_bucket", "vllm:request_params_n_bucket",
                 "vllm:request_params_max_tokens_bucket", "vllm:request_max_num_generation_tokens_bucket",
                 "vllm:request_prefill_time_seconds_bucket", "vllm:request_decode_time_seconds_bucket",
                 "vllm:cache_config_info"]:
        assert f'\n{name}{{' in text, name


def test_grafana_dashboard_uses_only_exported_metrics(http: httpx.Client) -> None:
    dashboard = Path(__file__).parents[2] / "docs" / "grafana" / "paged-dashboard.json"
    used = set(re.findall(r"vllm:[a-z0-9_]+", dashboard.read_text()))
    exported = {line.split("{")[0].split(" ")[0] for line in http.get("/metrics").text.splitlines()
                if line.startswith("vllm:")}
    assert used and used <= exported, used - exported
