"""On a GPU backend: greedy token ids equal transformers' for tiny random models, in fp32.

Marked `gpu`: the default suite skips them; benchmarks/gpu.sh runs them on the GPU machine.
"""

from __future__ import annotations

import random

import pytest
import torch

from paged import LLM, SamplingParams
from paged.backends.registry import choose, discover
from tests.models_factory import VOCAB, save_tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_device() -> str:
    chosen = choose(discover())
    if chosen.name == "cpu":
        pytest.skip("no GPU backend available")
    return chosen.name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3-scaled"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_greedy_matches_transformers_on_gpu(arch, eager, gpu_device, tmp_path):
    reference = save_tiny_model(arch, tmp_path, seed=random.randrange(1 << 30))
    prompts = [[random.randrange(3, VOCAB) for _ in range(n)] for n in (1, 7, 16, 17, 40, 95, 130)]
    llm = LLM(model=str(tmp_path), dtype="float32", device=gpu_device, enforce_eager=eager, max_num_seqs=8,
              max_num_batched_tokens=128, gpu_memory_utilization=0.2)
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                          min_new_tokens=24, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == expected[0, len(prompt):].tolist()
