"""The engine core failing or dying under a real `paged serve --api-server-count 2`.

Every open stream ends with an error event, /health turns 503 while the API servers still stand, and the
server exits non-zero within seconds, leaving no process behind. A step that raises is injected through
a sitecustomize on the server's PYTHONPATH (every spawned process imports it); a death is a SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import Server, assert_gone, descendants, start_server, stop_server

_FAILING_STEP = '''
import os
from paged.engine_core import EngineCore

_real_step, _calls = EngineCore.step, [0]


def _step(self):
    _calls[0] += 1
    if _calls[0] > int(os.environ["PAGED_TEST_FAIL_AFTER"]):
        raise RuntimeError("device lost")
    return _real_step(self)


EngineCore.step = _step
'''


def _stream_events(url: str, events: list, started: threading.Event) -> None:
    body = {"prompt": "Hello", "max_tokens": 1000, "stream": True, "ignore_eos": True}  # seconds of streaming
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    started.set()
    except httpx.TransportError as error:
        events.append(f"transport error: {error}")
    started.set()


def _streams_while(server: Server, count: int, action) -> list[list[str]]:
    """Start `count` streams, run `action` once each has produced a chunk, return every stream's events."""
    results: list[list[str]] = [[] for _ in range(count)]
    started = [threading.Event() for _ in range(count)]
    readers = [threading.Thread(target=_stream_events, args=(server.url, results[i], started[i]))
               for i in range(count)]
    for reader in readers:
        reader.start()
    assert all(event.wait(60) for event in started)
    action()
    for reader in readers:
        reader.join(60)
    return results


def _assert_ended_with_error(events: list[str], words: str) -> None:
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2]).get("error") or pytest.fail(f"no error event: {events[-3:]}")
    assert words in error["message"] and error["code"] >= 500, error
    assert any(json.loads(e).get("choices") for e in events[:-2])  # text streamed before the failure


def _assert_exits_nonzero_leaving_nothing(server: Server, children: list[int]) -> None:
    assert server.process.wait(30) not in (0, None)
    assert_gone(children)


def test_a_failing_step_errors_every_stream_and_the_server_exits(tiny_chat_model: Path, tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(_FAILING_STEP)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "PAGED_TEST_FAIL_AFTER": "30"}
    server = start_server(str(tiny_chat_model), tmp_path / "serve.log", "--api-server-count", "2",
                          "--max-model-len", "1024", "--kv-cache-memory", "16MiB", env=env)
    try:
        children = descendants(server.process.pid)
        results = _streams_while(server, 4, lambda: None)
        for events in results:
            _assert_ended_with_error(events, "device lost")
        _assert_exits_nonzero_leaving_nothing(server, children)
        assert "device lost" in server.log_text()
    finally:
        stop_server(server)


def test_killing_the_core_mid_stream(tiny_chat_model: Path, tmp_path: Path) -> None:
    server = start_server(str(tiny_chat_model), tmp_path / "serve.log", "--api-server-count", "2",
                          "--max-model-len", "1024", "--kv-cache-memory", "16MiB")
    try:
        children = descendants(server.process.pid)
        core = server.core_pid()
        health: list[int] = []

        def kill_core() -> None:
            os.kill(core, signal.SIGKILL)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and server.process.poll() is None:
                try:
                    health.append(httpx.get(f"{server.url}/health", timeout=1).status_code)
                except httpx.TransportError:
                    break
                if health[-1] == 503:
                    break

        results = _streams_while(server, 4, kill_core)
        for events in results:
            _assert_ended_with_error(events, "engine core")
        assert 503 in health or server.process.poll() is not None
        _assert_exits_nonzero_leaving_nothing(server, children)
    finally:
        stop_server(server)


def test_killing_one_api_server_leaves_the_other_serving(tiny_chat_model: Path, tmp_path: Path) -> None:
    server = start_server(str(tiny_chat_model), tmp_path / "serve.log", "--api-server-count", "2",
                          "--max-model-len", "1024", "--kv-cache-memory", "16MiB", "--enable-log-requests")
    try:
        first = server.api_server_pid(0)
        assert first in descendants(server.process.pid)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "1 still serving" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.1)
        for _ in range(6):  # fresh connections: whichever API server the kernel picks must be the live one
            body = {"prompt": "Hello", "max_tokens": 4}
            with httpx.Client(timeout=30) as http:
                response = http.post(f"{server.url}/v1/completions", json=body)
                assert response.status_code == 200, response.text
        assert server.process.poll() is None
        log = server.log_text()
        assert "received request cmpl-" in log and "4 tokens (length)" in log  # --enable-log-requests
    finally:
        assert stop_server(server) == 0


def test_a_core_that_cannot_start_is_one_line_and_no_process_is_left(tiny_chat_model: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "paged.cli.main", "serve", str(tiny_chat_model), "--device", "cpu",
         "--max-model-len", "100000", "--api-server-count", "2"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].startswith("paged: error: max_model_len 100000")
    assert "Traceback" not in completed.stderr
