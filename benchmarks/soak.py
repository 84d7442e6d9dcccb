"""Soak: many short requests at a fixed concurrency against a `paged serve` it starts, resident memory sampled.

    python benchmarks/soak.py --requests 10000 --concurrency 32 --sample-every 1000 --plot soak.png
    python benchmarks/soak.py --requests 5000 -- --kv-cache-memory 512MiB

Arguments after `--` go to `paged serve` (default model unless one is given). The resident set (VmRSS) of
the engine core and of the API servers is read from /proc after a warm-up and every --sample-every
requests; the table says how far each moved from the warm-up figure, which is what an operator watching
a server for hours sees. Meanwhile a thread asks /health every 0.1 s: its latency percentiles under the
load are printed too. Only httpx is needed; matplotlib only for --plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def roles(log: Path) -> dict[str, int]:
    """The engine core's and each API server's pid, as the supervisor logged them."""
    text = log.read_text()
    found = {"core": int(text.split("the engine core (pid ")[1].split(")")[0])}
    for line in text.splitlines():
        if "API server " in line and ": pid " in line:
            found[f"api{line.split('API server ')[1].split(':')[0]}"] = int(line.rsplit("pid ", 1)[1])
    return found


async def run_requests(url: str, count: int, concurrency: int, max_tokens: int, offset: int) -> int:
    limit = asyncio.Semaphore(concurrency)
    failed = 0
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)) as http:
        async def one(i: int) -> None:
            nonlocal failed
            body = {"prompt": f"Request {offset + i}: tell me about the number {offset + i}", "max_tokens": max_tokens,
                    "ignore_eos": True}
            async with limit:
                response = await http.post("/v1/completions", json=body)
            failed += response.status_code != 200

        await asyncio.gather(*(one(i) for i in range(count)))
    return failed


def poll_health(url: str, latencies: list[float], stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            start = time.perf_counter()
            http.get("/health")
            latencies.append(time.perf_counter() - start)
            time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--sample-every", type=int, default=1000)
    ap.add_argument("--port", type=int, default=8191)
    ap.add_argument("--result-json")
    ap.add_argument("--plot")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: `paged serve` arguments")
    args = ap.parse_args()
    serve_args = [a for a in args.serve_args if a != "--"]
    log = Path(args.result_json or "soak").with_suffix(".serve.log")
    url = f"http://127.0.0.1:{args.port}"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "paged.cli.main", "serve", *serve_args, "--port",
                                   str(args.port), "--host", "127.0.0.1", "--uvicorn-log-level", "warning",
                                   "--disable-log-stats"], stdout=out, stderr=subprocess.STDOUT)
    try:
        while True:
            if server.poll() is not None:
                print(log.read_text(), file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pids = roles(log)
        health: list[float] = []
        stop = threading.Event()
        poller = threading.Thread(target=poll_health, args=(url, health, stop), daemon=True)
        poller.start()
        asyncio.run(run_requests(url, args.warmup, args.concurrency, args.max_tokens, -args.warmup))
        rows = [{"requests": 0, **{role: rss_mb(pid) for role, pid in pids.items()}}]
        done, failed, start = 0, 0, time.perf_counter()
        while done < args.requests:
            batch = min(args.sample_every, args.requests - done)
            failed += asyncio.run(run_requests(url, batch, args.concurrency, args.max_tokens, done))
            done += batch
            rows.append({"requests": done, **{role: rss_mb(pid) for role, pid in pids.items()}})
            print(json.dumps(rows[-1]), flush=True)
        elapsed = time.perf_counter() - start
        stop.set()
        poller.join()
    finally:
        server.terminate()
        server.wait(60)
    print(f"\n{done} requests ({failed} failed) in {elapsed:.0f} s at concurrency {args.concurrency}; "
          f"paged serve {' '.join(serve_args)}")
    ordered = sorted(health)
    print(f"/health under the load: {len(ordered)} probes, median {statistics.median(ordered) * 1000:.1f} ms, "
          f"p99 {ordered[int(0.99 * (len(ordered) - 1))] * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms")
    names = list(pids)
    print("| requests | " + " | ".join(f"{n} RSS MB" for n in names) + " | total | vs warm-up |")
    print("|---|" + "---|" * (len(names) + 2))
    base = sum(rows[0][n] for n in names)
    for row in rows:
        total = sum(row[n] for n in names)
        print(f"| {row['requests']:,} | " + " | ".join(f"{row[n]:.0f}" for n in names) +
              f" | {total:.0f} | {100 * (total - base) / base:+.1f}% |")
    if args.result_json:
        Path(args.result_json).write_text(json.dumps({"serve_args": serve_args, "rows": rows, "failed": failed,
                                                      "health_s": health}))
    if args.plot:
        plot(rows, names, args.plot)
    return 0 if failed == 0 else 1


def plot(rows: list[dict], names: list[str], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        ax.plot([r["requests"] for r in rows], [r[name] for r in rows], marker="o", label=name)
    ax.set(xlabel="requests after warm-up", ylabel="RSS (MB)", title="paged serve resident memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
