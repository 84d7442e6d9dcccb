"""End to end on the CPU: greedy token ids equal transformers' own greedy decoding, exactly, in fp32, at
every instruction-set level of the CPU backend up to this machine's; and `dtype="auto"` where it computes
in float32 over bfloat16 weights equals transformers run on the same bfloat16-rounded weights."""

from __future__ import annotations

import copy
import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from paged import LLM, SamplingParams
from tests.models_factory import ARCHS, VOCAB, save_tiny_model


@pytest.fixture(scope="module", params=sorted(ARCHS))
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_tiny_model(request.param, folder, seed=random.randrange(1 << 30))
    return folder, reference


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_greedy(llm: LLM, reference, lengths=(1, 7, 16, 17, 40, 95)) -> None:
    prompts = [[random.randrange(3, VOCAB) for _ in range(n)] for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)  # as min_new_tokens: EOS banned
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, 24)


def test_greedy_matches_transformers(tiny, cpu_level):
    folder, reference = tiny
    check_greedy(LLM(model=str(folder), dtype="float32", device="cpu", max_num_batched_tokens=64,
                     kv_cache_memory="64MiB"), reference)


def test_auto_on_a_bfloat16_checkpoint(tiny, cpu_level, tmp_path):
    """Where auto computes in float32 (over bfloat16 weights, or float32 ones below AVX2), the tokens are those
    of transformers in float32 on the checkpoint's bfloat16 values."""
    folder, reference = tiny
    copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(tmp_path)
    for tokenizer_file in folder.glob("tokenizer*"):
        shutil.copy(tokenizer_file, tmp_path)
    llm = LLM(model=str(tmp_path), device="cpu", max_num_batched_tokens=64, kv_cache_memory="64MiB")
    if llm.engine.precision.compute != torch.float32:
        pytest.skip(f"auto is {llm.engine.precision} at {cpu_level}")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    check_greedy(llm, reference.eval())


def test_broken_attention_is_caught(tiny, monkeypatch):
    """The comparison above can fail: attention that drops all but the newest token changes the tokens."""
    from paged.backends.cpu.attention import TorchPagedAttention
    from paged.backends.cpu.backend import CPUBackend

    class NewestOnly(TorchPagedAttention):
        def forward(self, query, key, value, kv_cache, meta, scale, kv_scale=None, **layer):
            super().forward(query, key, value, kv_cache, meta, scale, kv_scale, **layer)  # the cache is written
            return value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)  # softmax over one key

    monkeypatch.setattr(CPUBackend, "attention", lambda self, max_model_len: NewestOnly(self._avx2_kernels[0]))
    folder, reference = tiny
    prompts = [[random.randrange(3, VOCAB) for _ in range(n)] for n in (20, 40)]
    llm = LLM(model=str(folder), dtype="float32", device="cpu", kv_cache_memory="64MiB")
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=24,
                           min_tokens=24), use_tqdm=False)
    assert any(out.outputs[0].token_ids != hf_greedy(reference, p, 24) for p, out in zip(prompts, outputs))


def test_sliding_window_blocks_handed_on_keep_greedy_exact(tmp_path):
    """Every layer slides over 24 tokens: four 90-token prompts need 32 blocks of 16 without releasing any,
    and run at once in 14 because blocks behind the window go back to the pool (and, with no prefix cache
    keeping them, straight to other sequences while the old tables still name them)."""
    reference = save_tiny_model("mistral-sliding", tmp_path, seed=random.randrange(1 << 30))
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", max_model_len=128, num_gpu_blocks_override=14,
              enable_prefix_caching=False, max_num_batched_tokens=32)
    assert llm.engine.block_manager.window == 24
    check_greedy(llm, reference, lengths=(90, 90, 90, 90))
    assert llm.engine.scheduler.num_preemptions == 0
