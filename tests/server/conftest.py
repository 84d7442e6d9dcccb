"""A real `paged serve` process per session, on the CPU, over a tiny random model with SmolLM2's tokenizer.

The tiny model keeps generation fast; the real tokenizer and chat template keep detokenization, stop
strings and chat rendering realistic. Tests talk to it with the official `openai` client and httpx.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

API_KEY = "test-key-123"
MAX_MODEL_LEN = 256
MAX_BODY = 256 * 1024


@pytest.fixture(scope="session")
def tiny_chat_model(smollm2_gguf: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved as an HF folder."""
    gguf = Path(smollm2_gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny-chat")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def core_pid(self) -> int:
        """The engine core's pid, as the supervisor logs it."""
        return int(self.log_text().split("the engine core (pid ")[1].split(")")[0])

    def api_server_pid(self, index: int) -> int:
        return int(self.log_text().split(f"API server {index}: pid ")[1].split()[0])


def start_server(model: str | None, log: Path, *flags: str, env: dict[str, str] | None = None,
                 timeout: float = 180, as_a_user_would: bool = False, scheme: str = "http",
                 python: str = sys.executable, cwd: Path | None = None) -> Server:
    """Start `paged serve` (on the default model when `model` is None) and wait until every API server is
    ready (/health answers 200, and each logged the core's READY: an API server still starting would answer 503).

    The tests' defaults pin the device and float32; `as_a_user_would` passes nothing but the port. `python`
    is the interpreter that runs it (a venv's, to serve an installed wheel), in `cwd`.
    """
    port = free_port()
    ours = [] if as_a_user_would else ["--host", "127.0.0.1", "--device", "cpu", "--dtype", "float32",
                                       "--uvicorn-log-level", "warning"]
    command = [python, "-m", "paged.cli.main", "serve", *([model] if model else []), "--port", str(port),
               *ours, *flags]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                   cwd=cwd)
    server = Server(f"{scheme}://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()}")
        try:
            healthy = httpx.get(f"{server.url}/health", timeout=2, verify=False).status_code == 200
        except httpx.TransportError:
            healthy = False
        text = server.log_text()
        if healthy and text.count(": the engine core is ready") == text.count("INFO paged.server.launcher: API server "):
            return server
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"server did not become healthy in {timeout}s:\n{server.log_text()}")


def descendants(pid: int) -> list[int]:
    """Every descendant of pid, from /proc."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
                frontier.append(int(entry.name))
    return found


def assert_gone(pids: list[int], timeout: float = 5) -> None:
    """Every one of these processes ends within `timeout` seconds: no orphan outlives the server."""
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "orphaned processes"


def stop_server(server: Server, timeout: float = 30) -> int:
    """SIGTERM, as an orchestrator stops it; SIGKILL only if it does not exit in time."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="session")
def server(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared server, with two API servers in front of the core (any test may reach either): API key from
    the environment, a small context and body limit for the error tests, request ids from X-Request-Id, each
    request logged with its first three prompt tokens."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    srv = start_server(
        str(tiny_chat_model), log, "--api-server-count", "2", "--served-model-name", "tiny", "tiny-alias",
        "--max-model-len",
        str(MAX_MODEL_LEN), "--kv-cache-memory", "64MiB", "--max-body-size", str(MAX_BODY),
        "--enable-request-id-headers", "--enable-log-requests", "--max-log-len", "3", env={"PAGED_API_KEY": API_KEY},
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[httpx.Client]:
    """Raw HTTP with the key, for what the SDK will not send (malformed bodies, wrong types)."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """One sample's value from /metrics."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        if sample == name and ",".join(sorted(label_text.rstrip("}").split(","))) == wanted:
            return float(value)
    raise KeyError(f"{name}{{{wanted}}} not in /metrics")
