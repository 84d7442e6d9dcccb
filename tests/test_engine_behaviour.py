"""Engine behaviour on the CPU: the real default model, preemption, prefix caching, sampling, bad input."""

from __future__ import annotations

import random

import pytest
import torch

from paged import LLM, SamplingParams
from paged.errors import UserError
from paged.models.layers import BlockLoading
from tests.models_factory import VOCAB, save_tiny_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colours are",
    "Water boils at",
    "My favourite programming language is",
    "Translate to French: good morning",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def smollm2_expected(smollm2_gguf):
    """transformers' greedy tokens for PROMPTS from the GGUF in float32 (its weights as gguf-py dequantizes them)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    return prompts, [hf_greedy(model, ids, 32) for ids in prompts]


def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def smollm2_greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    # min_tokens mirrors min_new_tokens: both ban EOS until the end.
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [out.outputs[0].token_ids for out in outputs]


def test_smollm2_gguf_greedy_matches_transformers(smollm2_gguf, smollm2_expected, cpu_level):
    prompts, expected = smollm2_expected
    llm = LLM(model=smollm2_gguf, dtype="float32", device="cpu", kv_cache_memory="512MiB")
    assert smollm2_greedy(llm, prompts) == expected


def test_smollm2_auto_matches_transformers_on_its_weights(smollm2_gguf, smollm2_expected, cpu_level):
    """dtype auto where it computes in float32 (no bfloat16 arithmetic): the Q4_1 and Q8_0 matrices stay in
    their GGUF blocks (AVX2 and up) or are dequantized (below), and either way the tokens are exactly those
    of the dequantized model in float32."""
    llm = LLM(model=smollm2_gguf, device="cpu", kv_cache_memory="512MiB")
    precision = llm.engine.precision
    if precision.compute != torch.float32:
        pytest.skip(f"auto is {precision} at {cpu_level}")
    stored = {m.method.storage(m) for m in llm.engine.model.modules() if isinstance(m, BlockLoading)}
    assert stored == ({"Q4_1", "Q8_0"} if precision.weights == torch.bfloat16 else {"float32"})
    prompts, expected = smollm2_expected
    assert smollm2_greedy(llm, prompts) == expected


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model("llama", folder, seed=random.randrange(1 << 30))
    return str(folder)


def random_prompts(count: int, low: int, high: int) -> list[dict]:
    return [{"prompt_token_ids": [random.randrange(3, VOCAB) for _ in range(random.randint(low, high))]}
            for _ in range(count)]


def test_preemption_gives_the_same_greedy_output(tiny_dir, cpu_level):
    prompts = random_prompts(12, 20, 60)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = LLM(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB")
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    # 16 blocks of 16 tokens: room for about two of these requests at a time.
    tight = LLM(model=tiny_dir, dtype="float32", device="cpu", num_gpu_blocks_override=16, max_model_len=256)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected


def test_prompt_logprobs_of_chunked_prompts(tiny_dir):
    """A prompt prefilled over several steps (and, in the tight cache, preempted and recomputed) still gets one
    entry per position, equal to those of a prompt prefilled at once; offline outputs are final-only, so the
    core holds each chunk's scores until the request is sent."""
    prompts = random_prompts(6, 70, 130)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1)
    whole = LLM(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB")
    chunked = LLM(model=tiny_dir, dtype="float32", device="cpu", max_num_batched_tokens=32,
                  num_gpu_blocks_override=20, max_model_len=256)
    for a, b, prompt in zip(whole.generate(prompts, params, use_tqdm=False),
                            chunked.generate(prompts, params, use_tqdm=False), prompts):
        assert len(b.prompt_logprobs) == len(prompt["prompt_token_ids"])
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x.keys() == y.keys()
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


def test_prefix_caching_reuses_blocks_and_output(tiny_dir, cpu_level):
    llm = LLM(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB")
    prefix = [random.randrange(3, VOCAB) for _ in range(100)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": prefix + [5]}, params, use_tqdm=False)[0]
    hits_before = llm.engine.block_manager.prefix_hits
    second = llm.generate({"prompt_token_ids": prefix + [5]}, params, use_tqdm=False)[0]
    assert second.num_cached_tokens == 96  # six full blocks of the 101-token prompt
    assert llm.engine.block_manager.prefix_hits - hits_before == 96
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    uncached = LLM(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB", enable_prefix_caching=False)
    third = uncached.generate({"prompt_token_ids": prefix + [5]}, params, use_tqdm=False)[0]
    assert third.num_cached_tokens == 0 and third.outputs[0].token_ids == first.outputs[0].token_ids


def test_same_seed_same_sample_and_n_outputs(tiny_dir):
    llm = LLM(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB")
    prompt = random_prompts(1, 5, 10)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    a = llm.generate([prompt] + random_prompts(3, 5, 30), seeded, use_tqdm=False)[0]
    b = llm.generate(prompt, seeded, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    several = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=20, seed=7, ignore_eos=True),
                           use_tqdm=False)[0]
    assert [o.index for o in several.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in several.outputs}) > 1


def test_stop_strings_cut_exactly(tiny_dir):
    llm = LLM(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB")
    prompt = random_prompts(1, 5, 10)[0]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    words = free.outputs[0].text.split()
    stop = " ".join(words[3:5])  # a stop string spanning two tokens
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == free.outputs[0].text[: free.outputs[0].text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text.endswith(stop) and kept.text == cut.text + stop
    token = free.outputs[0].token_ids[6]
    by_id = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                stop_token_ids=[token]), use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids[-1] == token and by_id.stop_reason == token
    assert token not in by_id.token_ids[:-1]


@pytest.mark.parametrize("make", [
    lambda d: LLM(model="/no/such/model", device="cpu"),
    lambda d: LLM(model=d, device="no-such-device"),
    lambda d: LLM(model=d, device="cpu", max_model_len=10**6),
    lambda d: SamplingParams(max_tokens=-1),
    lambda d: SamplingParams(temperature=-0.5),
    lambda d: LLM(model=d, device="cpu", kv_cache_memory="64MiB", max_model_len=64).generate(
        {"prompt_token_ids": [5] * 100}, use_tqdm=False),
], ids=["unknown-model", "unknown-device", "context-too-long", "negative-max-tokens", "negative-temperature",
        "prompt-too-long"])
def test_bad_input_is_one_clear_error(make, tiny_dir):
    with pytest.raises(UserError) as info:
        make(tiny_dir)
    message = str(info.value)
    assert message and "\n" not in message


def test_cli_reports_bad_input_in_one_line(tiny_dir):
    import subprocess
    import sys

    for args in (["generate", "hi", "--model", "/no/such/model"], ["generate", "hi", "--device", "rocm"],
                 ["generate", "hi", "--model", tiny_dir, "--temperature", "-1"]):
        done = subprocess.run([sys.executable, "-m", "paged.cli.main", *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.startswith("paged: error:")]
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
