"""`paged serve` flags: vLLM's names and defaults, and --generation-config's sampling defaults reaching requests."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from paged.cli.main import build_parser
from paged.cli.serve import run
from paged.errors import UserError
from paged.model_source import ModelSource, sampling_defaults

from .conftest import start_server, stop_server


def parse(*argv: str):
    parser, _ = build_parser()
    return parser.parse_args(["serve", *argv])


def test_vllm_flag_names_and_defaults() -> None:
    args = parse()
    assert (args.model_tag, args.model, args.host, args.port, args.api_key) == (None, None, "0.0.0.0", 8000, None)
    assert args.generation_config == "auto" and args.max_logprobs == 20 and args.enable_prefix_caching
    assert args.gpu_memory_utilization == 0.9 and args.max_num_seqs == 256 and args.block_size == 16
    args = parse("some/model", "--port", "9000", "--api-key", "k", "--served-model-name", "a", "b",
                 "--no-enable-prefix-caching", "--max-model-len", "512", "--uvicorn-log-level", "debug")
    assert args.model_tag == "some/model" and args.port == 9000 and args.served_model_name == ["a", "b"]
    assert not args.enable_prefix_caching and args.max_model_len == 512


def test_two_different_models_is_an_error() -> None:
    with pytest.raises(UserError, match="two models"):
        run(parse("a", "--model", "b"))


def test_generation_config_choices(tmp_path: Path) -> None:
    served, other = tmp_path / "served", tmp_path / "other"
    for folder, temperature in ((served, 0.3), (other, 0.9)):
        folder.mkdir()
        (folder / "generation_config.json").write_text(json.dumps({"temperature": temperature, "max_new_tokens": 7}))
    model = ModelSource(str(served), None, None)
    assert sampling_defaults("auto", model) == {"temperature": 0.3, "max_tokens": 7}
    assert sampling_defaults(str(other), model) == {"temperature": 0.9, "max_tokens": 7}
    assert sampling_defaults("vllm", model) == {}
    with pytest.raises(UserError, match="generation_config.json"):
        sampling_defaults(str(tmp_path / "missing"), model)


def test_generation_defaults_apply_when_the_request_leaves_them_out(tiny_chat_model: Path, tmp_path: Path) -> None:
    defaults = tmp_path / "defaults"
    defaults.mkdir()
    (defaults / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3}))
    server = start_server(str(tiny_chat_model), tmp_path / "serve.log", "--max-model-len", "128",
                          "--kv-cache-memory", "16MiB", "--generation-config", str(defaults))
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()["usage"][
            "completion_tokens"] == 3
        body["max_tokens"] = 5
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()["usage"][
            "completion_tokens"] == 5
    finally:
        stop_server(server)
