"""Serving benchmark: replay a workload against any OpenAI-compatible server and report latency and throughput.

    python benchmarks/serve.py --base-url http://localhost:8000 --num-prompts 200 --request-rate 4
    python benchmarks/serve.py --dataset prompts.jsonl --max-concurrency 1 4 16 64 --plot latency.png

Requests stream (as real clients do), so time to first token (TTFT), time per output token after the
first (TPOT), inter-token latency between streamed chunks (ITL) and end-to-end latency are measured per
request; each is reported as mean, median and p99, with request and output-token throughput. Arrivals
are Poisson at --request-rate (inf: all at once), capped at --max-concurrency in flight. Several values
of either sweep the load, one run each, and --plot draws latency against it.

Workloads (--dataset): `random`, prompts of --input-len token ids (sent as token ids to /v1/completions,
which vLLM and paged accept, so lengths are exact; with --endpoint chat, random words of about that many
tokens); `mixed`, the same with ShareGPT-like long-tailed lengths per request (log-normal input and output
lengths around --input-len and --output-len, clipped to [4, 8x]); a ShareGPT JSON file (a list of
{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}): the first human turn
is the prompt, the reply's length (about 4 characters a token) its max_tokens; or a JSONL file of
{"prompt": "..."} or {"messages": [...]} lines, each optionally with "max_tokens".

One client process tops out near 10k streamed tokens/s (JSON parsing of the chunks), so --num-clients N
runs N processes, each with 1/N of the requests, rate and concurrency, all starting at the same moment;
their results are merged as one run. Only httpx is needed; matplotlib only for --plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


@dataclass
class WorkItem:
    body: dict[str, Any]  # prompt or messages, max_tokens


@dataclass
class RequestResult:
    ok: bool
    start: float
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    chunk_gaps: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Summary:
    load: str
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://localhost:8000", help="server root, without /v1")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--model", help="default: the first model /v1/models lists")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--dataset", default="random", help="'random', 'mixed', a ShareGPT .json or a JSONL file")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="random workload: prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens where the workload gives none")
    p.add_argument("--request-rate", type=float, nargs="+", default=[math.inf], help="requests/s (Poisson); inf")
    p.add_argument("--max-concurrency", type=int, nargs="+", default=[0],
                   help="requests in flight, over all clients; 0: no cap")
    p.add_argument("--num-clients", type=int, default=1, help="client processes sharing the load")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM's extra) for exact lengths")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--result-json", help="write every load level's summary here")
    p.add_argument("--plot", help="PNG of latency against load (needs matplotlib)")
    args = p.parse_args(argv)
    if len(args.request_rate) > 1 and len(args.max_concurrency) > 1:
        p.error("sweep one of --request-rate and --max-concurrency, not both")
    if args.num_clients < 1:
        p.error("--num-clients must be at least 1")
    return args


def load_workload(args: argparse.Namespace, rng: random.Random) -> list[WorkItem]:
    if args.dataset == "random":
        return [_random_item(args, rng, args.input_len, args.output_len) for _ in range(args.num_prompts)]
    if args.dataset == "mixed":
        return [_random_item(args, rng, _long_tailed(rng, args.input_len), _long_tailed(rng, args.output_len))
                for _ in range(args.num_prompts)]
    if args.dataset.endswith(".json"):
        items = _sharegpt(args.dataset)
        return (items * (args.num_prompts // len(items) + 1))[: args.num_prompts] if items else []
    items = []
    with open(args.dataset) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            body = {k: record[k] for k in ("prompt", "messages") if k in record}
            if not body:
                raise SystemExit(f"{args.dataset}: each line needs 'prompt' or 'messages'")
            body["max_tokens"] = record.get("max_tokens", args.output_len)
            items.append(WorkItem(body))
    return (items * (args.num_prompts // len(items) + 1))[: args.num_prompts] if items else []


def _random_item(args: argparse.Namespace, rng: random.Random, input_len: int, output_len: int) -> WorkItem:
    if args.endpoint == "completions":
        prompt: Any = [rng.randrange(1000, 10000) for _ in range(input_len)]
        return WorkItem({"prompt": prompt, "max_tokens": output_len})
    words = " ".join(rng.choice(_WORDS) for _ in range(input_len))
    return WorkItem({"messages": [{"role": "user", "content": words}], "max_tokens": output_len})


def _long_tailed(rng: random.Random, median: int) -> int:
    """A length as ShareGPT's are spread: log-normal around the median, a long tail, clipped to [4, 8x]."""
    return max(4, min(8 * median, round(rng.lognormvariate(math.log(median), 0.9))))


def _sharegpt(path: str) -> list[WorkItem]:
    with open(path) as f:
        conversations = json.load(f)
    items = []
    for record in conversations:
        turns = record.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[0].get("value"):
            max_tokens = max(4, len(turns[1].get("value", "")) // 4)
            items.append(WorkItem({"prompt": turns[0]["value"], "max_tokens": max_tokens}))
    return items


_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "number group problem fact house river stone light water music garden story").split()


def request_body(item: WorkItem, args: argparse.Namespace, model: str) -> tuple[str, dict[str, Any]]:
    body = dict(item.body, model=model, stream=True, stream_options={"include_usage": True},
                temperature=args.temperature)
    if args.ignore_eos:
        body["ignore_eos"] = True
    if "messages" in body:
        return "/v1/chat/completions", body
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
        return "/v1/chat/completions", body
    return "/v1/completions", body


async def send(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> RequestResult:
    result = RequestResult(ok=False, start=time.perf_counter())
    last = result.start
    chunks = 0
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[len("data: "):])
                if "error" in data:
                    result.error = data["error"].get("message", "error event")
                    return result
                if data.get("usage"):
                    result.output_tokens = data["usage"]["completion_tokens"]
                if not any(_chunk_text(c) for c in data.get("choices") or []):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - result.start
                else:
                    result.chunk_gaps.append(now - last)
                last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.latency = time.perf_counter() - result.start
    result.output_tokens = result.output_tokens or chunks  # a server without usage: a chunk per token
    result.ok = chunks > 0
    result.error = "" if result.ok else "no text streamed"
    return result


def _chunk_text(choice: dict[str, Any]) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def run_level(args: argparse.Namespace, model: str, items: list[WorkItem], rate: float,
                    concurrency: int, start_at: float | None = None) -> tuple[list[RequestResult], float, float]:
    """Send `items` at `rate`, at most `concurrency` in flight; the results, and when the first and last ran."""
    rng = random.Random(args.seed)
    limit = asyncio.Semaphore(concurrency or len(items) or 1)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    pool = httpx.Limits(max_connections=concurrency or len(items) or 1)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout, limits=pool) as client:

        async def one(item: WorkItem) -> RequestResult:
            async with limit:
                return await send(client, *request_body(item, args, model))

        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        start = time.perf_counter()
        tasks = []
        for item in items:
            tasks.append(asyncio.create_task(one(item)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    return results, start, time.perf_counter()


def _client_process(args: argparse.Namespace, model: str, items: list[WorkItem], rate: float, concurrency: int,
                    start_at: float) -> tuple[list[RequestResult], float, float]:
    return asyncio.run(run_level(args, model, items, rate, concurrency, start_at))


def run_clients(args: argparse.Namespace, model: str, items: list[WorkItem], rate: float,
                concurrency: int) -> tuple[list[RequestResult], float]:
    """The level from --num-clients processes (perf_counter is one clock for all of them on Linux and macOS)."""
    n = args.num_clients
    if n == 1:
        results, start, end = asyncio.run(run_level(args, model, items, rate, concurrency))
        return results, end - start
    shares = [items[i::n] for i in range(n)]
    per_client = [max(1, concurrency // n + (i < concurrency % n)) if concurrency else 0 for i in range(n)]
    start_at = time.perf_counter() + 2.0 + 0.5 * n  # every process started and connected
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        parts = pool.starmap(_client_process, [(args, model, shares[i], rate / n, per_client[i], start_at)
                                               for i in range(n)])
    results = [r for part, _, _ in parts for r in part]
    return results, max(end for _, _, end in parts) - min(start for _, start, _ in parts)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"mean": statistics.fmean(values) * 1000, "median": statistics.median(values) * 1000, "p99": p99 * 1000}


def summarize(load: str, results: list[RequestResult], duration: float) -> Summary:
    ok = [r for r in results if r.ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in ok)
    return Summary(
        load=load, completed=len(ok), failed=len(results) - len(ok), duration_s=duration,
        request_throughput=len(ok) / duration, output_token_throughput=output_tokens / duration,
        ttft_ms=_stats([r.ttft for r in ok]), tpot_ms=_stats(tpot),
        itl_ms=_stats([gap for r in ok for gap in r.chunk_gaps]), e2e_ms=_stats([r.latency for r in ok]),
    )


def print_summary(s: Summary) -> None:
    print(f"\n=== {s.load} ===")
    print(f"completed {s.completed}, failed {s.failed}, in {s.duration_s:.2f} s")
    print(f"request throughput      {s.request_throughput:10.2f} req/s")
    print(f"output token throughput {s.output_token_throughput:10.2f} tok/s")
    print(f"{'(ms)':<8}{'mean':>12}{'median':>12}{'p99':>12}")
    for name, values in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2E", s.e2e_ms)):
        print(f"{name:<8}{values['mean']:>12.2f}{values['median']:>12.2f}{values['p99']:>12.2f}")


def plot(summaries: list[Summary], loads: list[float], xlabel: str, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("TTFT", "TPOT", "end-to-end"),
                                 strict=True):
        for stat in ("median", "p99"):
            ax.plot(loads, [getattr(s, metric)[stat] for s in summaries], marker="o", label=stat)
        ax.set(title=f"{title} latency", xlabel=xlabel, ylabel="ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def first_model(args: argparse.Namespace) -> str:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    response = httpx.get(f"{args.base_url}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    items = load_workload(args, random.Random(args.seed))
    if not items:
        print("the workload is empty", file=sys.stderr)
        return 1
    model = args.model or first_model(args)
    if len(args.max_concurrency) > 1:
        levels = [(args.request_rate[0], c, f"max concurrency {c}") for c in args.max_concurrency]
        loads, xlabel = [float(c) for c in args.max_concurrency], "max concurrency"
    else:
        levels = [(r, args.max_concurrency[0], f"request rate {r}/s") for r in args.request_rate]
        loads, xlabel = args.request_rate, "request rate (req/s)"
    summaries = []
    for rate, concurrency, label in levels:
        results, duration = run_clients(args, model, items, rate, concurrency)
        clients = f", {args.num_clients} client processes" if args.num_clients > 1 else ""
        summary = summarize(f"{model}, {len(items)} requests, {label}{clients}", results, duration)
        print_summary(summary)
        for failure in [r for r in results if not r.ok][:3]:
            print(f"  failed: {failure.error}", file=sys.stderr)
        summaries.append(summary)
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump([asdict(s) for s in summaries], f, indent=2)
    if args.plot:
        if all(math.isfinite(x) for x in loads) and len(loads) > 1:
            plot(summaries, loads, xlabel, args.plot)
        else:
            print("--plot needs several finite load levels (--request-rate or --max-concurrency)", file=sys.stderr)
    return 0 if all(s.failed == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
