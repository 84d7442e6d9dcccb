"""SIGTERM while requests stream: short ones finish, long ones end cleanly, newcomers get 503, exit 0.

On the default model (SmolLM2 on the CPU streams a few tokens a second per request here), so a stream of
400 tokens is sure to outlast a 3-second drain and one of 12 sure to finish inside it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx

from .conftest import assert_gone, descendants, start_server


def _stream(url: str, max_tokens: int, events: list[str], started: threading.Event) -> None:
    body = {"prompt": "Tell me a long story.", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                started.set()


def test_sigterm_drains_then_ends_the_rest_and_exits_0(smollm2_gguf: str, tmp_path: Path) -> None:
    server = start_server(None, tmp_path / "serve.log", "--max-model-len", "1024", "--kv-cache-memory", "256MiB",
                          "--shutdown-timeout", "3", "--uvicorn-log-level", "info")
    lengths = [12, 400, 400]
    events: list[list[str]] = [[] for _ in lengths]
    started = [threading.Event() for _ in lengths]
    readers = [threading.Thread(target=_stream, args=(server.url, n, events[i], started[i]))
               for i, n in enumerate(lengths)]
    children = descendants(server.process.pid)
    try:
        for reader in readers:
            reader.start()
        assert all(event.wait(60) for event in started)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        health = httpx.get(f"{server.url}/health", timeout=10)
        for reader in readers:
            reader.join(60)
        assert server.process.wait(60) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert "shutting down" in refused.json()["error"]["message"]
    assert health.status_code == 503 and "shutting down" in health.json()["error"]["message"]

    finished = events[0]
    assert finished[-1] == "[DONE]" and json.loads(finished[-2])["choices"][0]["finish_reason"] == "length"
    for cut in events[1:]:
        assert cut[-1] == "[DONE]"
        error = json.loads(cut[-2])["error"]
        assert "shutting down" in error["message"] and error["code"] == 503
        assert json.loads(cut[-3])["choices"][0]["finish_reason"] == "abort"
    log = server.log_text()
    assert "Traceback" not in log and "CancelledError" not in log
    assert len(children) >= 2
    assert_gone(children)
