"""SIGTERM while a request streams: the request finishes, then the process exits cleanly."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import pytest

from .conftest import assert_gone, descendants, start_server


def test_sigterm_lets_in_flight_requests_finish(tiny_chat_model: Path, tmp_path: Path) -> None:
    server = start_server(str(tiny_chat_model), tmp_path / "serve.log", "--max-model-len", "256",
                          "--kv-cache-memory", "64MiB", "--uvicorn-log-level", "info")
    events: list[str] = []
    first_chunk = threading.Event()

    def stream() -> None:
        body = {"prompt": "Hello", "max_tokens": 150, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    first_chunk.set()

    reader = threading.Thread(target=stream)
    children = descendants(server.process.pid)
    try:
        reader.start()
        assert first_chunk.wait(60)
        server.process.send_signal(signal.SIGTERM)
        reader.join(60)
        # After its graceful shutdown uvicorn re-raises the signal, so the exit status says what stopped it.
        assert server.process.wait(60) == -signal.SIGTERM
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert events[-1] == "[DONE]"
    assert '"finish_reason":"length"' in events[-2]
    log = server.log_text()
    assert "Waiting for application shutdown" in log and "Application shutdown complete" in log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)
    assert len(children) >= 2
    assert_gone(children)
