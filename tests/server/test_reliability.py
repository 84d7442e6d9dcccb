"""An operator's view of a server under load and over time: /health while loading, overload refusals, flat memory."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .conftest import free_port, metric, start_server, stop_server

_SLOW_LOAD = '''
import time
from paged.engine_core import EngineCore

_real_init = EngineCore.__init__


def _init(self, *args, **kwargs):
    time.sleep(12)
    _real_init(self, *args, **kwargs)


EngineCore.__init__ = _init
'''


def test_health_says_loading_until_the_model_is_in(tiny_chat_model: Path, tmp_path: Path) -> None:
    """The API server is up while the core still loads (slowed by 12 s here): 503 with the reason, then 200."""
    (tmp_path / "sitecustomize.py").write_text(_SLOW_LOAD)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "paged.cli.main", "serve", str(tiny_chat_model), "--port", str(port), "--host",
               "127.0.0.1", "--device", "cpu", "--dtype", "float32", "--max-model-len", "128", "--kv-cache-memory",
               "16MiB"]
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    seen: list[tuple[int, str]] = []
    completions: list[tuple[int, str]] = []  # asked while /health said 503 (the last may find the model in)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not seen or seen[-1][0] != 200):
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                seen.append((response.status_code, response.text))
                if response.status_code == 503:
                    refused = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi"}, timeout=5)
                    completions.append((refused.status_code, refused.text))
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(60)
    assert seen and seen[-1][0] == 200, seen[-3:]
    assert any(status == 503 and "loading the model" in text for status, text in seen), seen[:3]
    assert any(status == 503 and "loading the model" in text for status, text in completions), completions[:3]
    assert all(status in (200, 503) for status, _ in completions), completions


def test_overload_is_refused_with_429_and_no_accepted_request_is_lost(tiny_chat_model: Path, tmp_path: Path) -> None:
    server = start_server(str(tiny_chat_model), tmp_path / "serve.log", "--max-model-len", "128", "--kv-cache-memory",
                          "16MiB", "--max-num-seqs", "2", "--max-waiting-requests", "4")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            body = {"prompt": "Tell me a story", "max_tokens": 24, "ignore_eos": True}
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(40)))

    try:
        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        accepted = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 429]
        assert len(accepted) + len(refused) == 40, statuses
        assert refused and accepted, statuses
        assert all(r.headers["retry-after"] and "waiting" in r.json()["error"]["message"] for r in refused)
        assert all(r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 24
                   for r in accepted)
        with httpx.Client(base_url=server.url) as http:
            assert metric(http, "paged:requests_refused_total", model_name=str(tiny_chat_model),
                          reason="queue_full") == len(refused)
    finally:
        stop_server(server)


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def test_memory_stays_flat_over_thousands_of_requests(tiny_chat_model: Path, tmp_path: Path) -> None:
    """3,000 short requests after a warm-up of 500: the resident set of the core and the API server together
    grows less than 3% (the KV cache is touched at start, so it counts from the first sample)."""
    server = start_server(str(tiny_chat_model), tmp_path / "serve.log", "--max-model-len", "256",
                          "--kv-cache-memory", "256MiB", "--disable-log-stats")
    pids = [server.core_pid(), server.api_server_pid(0)]

    async def requests(count: int, offset: int) -> None:
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async def one(i: int) -> None:
                async with limit:
                    body = {"prompt": f"Request {offset + i} about {i * 7919 % 1000}", "max_tokens": 4}
                    assert (await http.post("/v1/completions", json=body)).status_code == 200

            await asyncio.gather(*(one(i) for i in range(count)))

    try:
        asyncio.run(requests(500, 0))
        samples = [_rss_mb(pids)]
        for round_ in range(3):
            asyncio.run(requests(1000, 1000 * (round_ + 1)))
            samples.append(_rss_mb(pids))
    finally:
        stop_server(server)
    growth = (samples[-1] - samples[0]) / samples[0]
    print("RSS MB after warm-up and every 1,000 requests:", [round(s) for s in samples])
    assert growth < 0.03, samples
