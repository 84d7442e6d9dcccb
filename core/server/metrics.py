"""Prometheus metrics under vLLM's names and labels, so a dashboard built for vLLM works unchanged.

Counters and gauges are read from the core's stats, which come with every step's outputs (they are
the core's own totals, so every API server reports the same numbers); latency histograms are observed
per request from the timestamps in RequestOutput.metrics, before the client sees the step's outputs,
so a client that got its answer finds it counted. With several API servers, each writes its
histograms to Prometheus' multiprocess folder and any of them answers /metrics with the sum.
`process_*` is the answering API server's process; `paged_engine_core_process_*` the core's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import APIRouter, Request, Response
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from paged.core_protocol import ITERATION_TOKEN_BUCKETS, EngineStats
from paged.outputs import RequestOutput

router = APIRouter()

# vLLM's buckets, so histogram panels and quantile queries line up with theirs.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0]
_REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0]
_N_BUCKETS = [1, 2, 5, 10, 20]


def _token_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to the context length, as vLLM buckets token counts."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return buckets
            buckets.append(float(mantissa * scale))
        scale *= 10


class _StatsCollector(Collector):
    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        stats, labels = self._metrics.stats, [self._metrics.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        yield gauge("vllm:num_requests_running", "Sequences being generated.", stats.num_running)
        yield gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", stats.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", stats.kv_cache_usage)
        yield counter("vllm:prompt_tokens", "Prompt tokens received.", stats.prompt_tokens)
        yield counter("vllm:generation_tokens", "Tokens generated.", stats.generation_tokens)
        yield counter("vllm:num_preemptions", "Preemptions of running sequences.", stats.num_preemptions)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        success = CounterMetricFamily("vllm:request_success", "Finished sequences by finish reason.",
                                      labels=["model_name", "finished_reason"])
        for reason in ("stop", "length", "abort"):
            success.add_metric([*labels, reason], stats.finished_reasons.get(reason, 0))
        yield success
        yield counter("vllm:spec_decode_num_drafts", "Draft steps: one sequence's draft tokens checked once.",
                      stats.spec_num_drafts)
        yield counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", stats.spec_num_draft_tokens)
        yield counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens the model accepted.",
                      stats.spec_num_accepted_tokens)
        per_position = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                           "Draft tokens accepted, by their position in the draft.",
                                           labels=["model_name", "position"])
        for position, count in enumerate(stats.spec_accepted_per_position):
            per_position.add_metric([*labels, str(position)], count)
        yield per_position
        iterations = HistogramMetricFamily("vllm:iteration_tokens_total", "Tokens computed per engine step.",
                                           labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, ITERATION_TOKEN_BUCKETS), "+Inf"], stats.iteration_token_counts):
            cumulative += count
            buckets.append((bound, cumulative))
        iterations.add_metric(labels, buckets, stats.iteration_tokens_sum)
        yield iterations
        facts = self._metrics.facts()
        if facts is not None:  # the KV cache as reserved at start-up: its size never changes after
            info = GaugeMetricFamily("vllm:cache_config_info", "The KV cache's configuration.",
                                     labels=["block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"])
            info.add_metric([str(facts["block_size"]), str(facts["num_blocks"]), facts["kv_cache_dtype"],
                             str(facts["enable_prefix_caching"])], 1)
            yield info
            yield gauge("paged:kv_cache_reserved_bytes", "Bytes reserved for the KV cache at start-up.",
                        facts["kv_cache_bytes"])


class EngineMetrics:
    """The server's registry; an `EngineObserver` the EngineClient tells about every step."""

    def __init__(self, model_name: str, max_model_len: int, core_pid: int | None = None,
                 facts: Callable[[], dict | None] = lambda: None) -> None:
        self.model_name = model_name
        self.stats = EngineStats()
        self.facts = facts
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(self))
        ProcessCollector(registry=self.registry)
        if core_pid is not None:
            ProcessCollector(namespace="paged_engine_core", pid=lambda: core_pid, registry=self.registry)
        # In multiprocess mode the histograms live in files, summed over the API servers at scrape time.
        shared = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        if shared:
            MultiProcessCollector(self.registry)
        self._last_token_time: dict[str, float] = {}  # running requests seen before

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets,
                             registry=None if shared else self.registry).labels(model_name)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between generated tokens.", _ITL_BUCKETS)
        # vLLM's older name for the same observations, which its example dashboards still query.
        self.tpot = histogram("vllm:time_per_output_token_seconds", "Time between generated tokens (the older "
                              "name of vllm:inter_token_latency_seconds).", _ITL_BUCKETS)
        self.request_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                      "Decode time over the tokens after the first, per request.", _ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", _REQUEST_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.", _REQUEST_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds", "First scheduled to first token.",
                                 _REQUEST_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds", "First to last token.", _REQUEST_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds", "First scheduled to last token.",
                                   _REQUEST_BUCKETS)
        tokens = _token_buckets(max_model_len)
        self.max_model_len = max_model_len
        self.prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", tokens)
        self.generation_tokens = histogram("vllm:request_generation_tokens", "Tokens generated per request.", tokens)
        self.max_generation_tokens = histogram("vllm:request_max_num_generation_tokens",
                                               "The longest completion of a request, in tokens.", tokens)
        self.params_n = histogram("vllm:request_params_n", "The n parameter of requests.", _N_BUCKETS)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens", "The max_tokens parameter of requests "
                                           "(unset: what the context leaves after the prompt).", tokens)
        self.refused = Counter("paged:requests_refused", "Requests refused: reason queue_full (429), loading or "
                               "draining (503).", ["model_name", "reason"], registry=None if shared else self.registry)

    def on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        self.stats = stats
        for out in outputs:
            self._observe(out)

    def on_refused(self, reason: str) -> None:
        self.refused.labels(self.model_name, reason).inc()

    def on_abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._last_token_time.pop(request_id, None)

    def _observe(self, out: RequestOutput) -> None:
        times = out.metrics
        previous = self._last_token_time.get(out.request_id)
        if previous is None:
            self.ttft.observe(times["first_token_time"] - times["arrival_time"])
        elif times["last_token_time"] > previous:
            self.itl.observe(times["last_token_time"] - previous)
            self.tpot.observe(times["last_token_time"] - previous)
        if not out.finished:
            self._last_token_time[out.request_id] = times["last_token_time"]
            return
        self._last_token_time.pop(out.request_id, None)
        self.e2e.observe(times["last_token_time"] - times["arrival_time"])
        self.queue.observe(times["first_scheduled_time"] - times["arrival_time"])
        self.prefill.observe(times["first_token_time"] - times["first_scheduled_time"])
        self.decode.observe(times["last_token_time"] - times["first_token_time"])
        self.inference.observe(times["last_token_time"] - times["first_scheduled_time"])
        longest = max(len(c.token_ids) for c in out.outputs)
        if longest > 1:
            self.request_tpot.observe((times["last_token_time"] - times["first_token_time"]) / (longest - 1))
        self.prompt_tokens.observe(len(out.prompt_token_ids))
        self.generation_tokens.observe(sum(len(c.token_ids) for c in out.outputs))
        self.max_generation_tokens.observe(longest)
        self.params_n.observe(len(out.outputs))
        self.params_max_tokens.observe(times.get("max_tokens", self.max_model_len - len(out.prompt_token_ids)))

    def render(self) -> bytes:
        return generate_latest(self.registry)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
