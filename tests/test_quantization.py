"""Quantized checkpoints end to end on the CPU: each on-disk format, written by tests/quant_checkpoints.py
(with the compressed-tensors library where it writes the format), gives exactly the greedy tokens of its
dense twin (the same model with the dequantized weights) in float32, offline and through `paged serve`.

INT8 W8A8 also quantizes activations, which no dense twin can hold: there the tokens are compared with the
twin's and the agreement reported. And the refusals: methods that disagree, that need a quantized
checkpoint, or that the backend does not run, each one line at start-up.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoTokenizer

from paged import LLM, SamplingParams
from paged.backends.common.quant_linear import DequantizingLinear
from paged.backends.interface import Communicator
from paged.errors import UserError
from paged.models.layers import ColumnParallelLinear, RowParallelLinear
from paged.models.ops import bind_ops
from paged.quant.awq import AWQ
from paged.quant.base import quantize_rows
from paged.quant.linear import QuantizedLinearMethod
from tests.plugin_backends import write_backend_plugin
from tests.quant_checkpoints import kv_scale_values, write_quantized
from tests.server.conftest import start_server, stop_server

VOCAB = 512
EXACT = [
    ("awq", {"group_size": 32}),
    ("awq", {"group_size": 128}),
    ("gptq", {}),
    ("gptq", {"bits": 8, "sym": False, "group_size": 64}),
    ("gptq", {"desc_act": True, "group_size": 32}),
    ("gptq", {"group_size": -1}),
    ("ct-w4a16", {}),
    ("ct-w4a16", {"symmetric": False, "group_size": 64}),
    ("ct-w8a16", {}),
    ("ct-fp8", {}),
    ("ct-fp8", {"strategy": "tensor", "activation_scheme": "static"}),
    ("fp8", {}),
    ("fp8", {"activation_scheme": "static"}),
]


def case_id(case) -> str:
    fmt, options = case
    return "-".join([fmt, *(f"{k}={v}" for k, v in options.items())])


def greedy(model: Path | str, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    llm = LLM(model=str(model), dtype="float32", device="cpu", kv_cache_memory="64MiB", **kwargs)
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]


def random_prompts() -> list[list[int]]:
    return [[random.randrange(3, VOCAB) for _ in range(n)] for n in (1, 9, 33, 70)]


@pytest.mark.parametrize("case", EXACT, ids=case_id)
def test_greedy_equals_dequantized_twin(case, tmp_path):
    fmt, options = case
    quantized, twin = write_quantized(tmp_path, fmt, seed=random.randrange(1 << 30), **options)
    prompts = random_prompts()
    assert greedy(quantized, prompts) == greedy(twin, prompts)


def test_int8_w8a8(tmp_path):
    """Activations quantized per token too, which no dense twin holds: each loaded layer's product equals float64
    arithmetic on the same quantized activations and the checkpoint's int8 weights, and the greedy tokens'
    agreement with the twin is reported (on this tiny random model they part ways after a few tokens)."""
    from paged.backends.common.quant_linear import quantize_per_token

    quantized, twin = write_quantized(tmp_path, "ct-int8", seed=random.randrange(1 << 30))
    llm = LLM(model=str(quantized), dtype="float32", device="cpu", kv_cache_memory="64MiB")
    layer = llm.engine.core.model.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features)
    q, scale = quantize_per_token(x, torch.int8)
    expected = (q.double() * scale.double()) @ layer.quant_state.dequantize(torch.float64).T
    got = layer(x).double()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-6
    prompts = random_prompts()
    ours, theirs = greedy(quantized, prompts), greedy(twin, prompts)
    same = sum(x == y for a, b in zip(ours, theirs) for x, y in zip(a, b))
    print(f"INT8 W8A8 vs its dequantized twin: {same}/{16 * len(prompts)} greedy tokens equal")


@pytest.mark.parametrize("trust_int_mm", [True, False])
def test_int8_matmul_is_exact(trust_int_mm, monkeypatch):
    """Full-range int8 products equal int64 arithmetic, through torch._int_mm where the probe found it exact
    here and through the float32 blocks otherwise (forced: this machine's _int_mm may be either)."""
    from paged.backends.common import quant_linear

    if not trust_int_mm:
        monkeypatch.setattr(quant_linear, "int_mm_is_exact", lambda device_type: False)
    elif not quant_linear.int_mm_is_exact("cpu"):
        pytest.skip("torch._int_mm is inexact on this CPU (the probe routes around it)")
    a = torch.randint(-128, 128, (33, 3000), dtype=torch.int8)
    b = torch.randint(-128, 128, (3000, 40), dtype=torch.int8)
    assert torch.equal(quant_linear.int8_matmul(a, b).long(), a.long() @ b.long())


def test_fp8_on_the_fly_equals_rounded_weights(tmp_path):
    """--quantization fp8 on a dense checkpoint = the dense model with each decoder linear rounded to FP8 per
    output channel (on the CPU FP8 is widened per call, so the products are the dense ones)."""
    quantized, _ = write_quantized(tmp_path / "q", "awq", seed=random.randrange(1 << 30))
    from transformers import AutoModelForCausalLM

    dense_dir, rounded_dir = tmp_path / "dense", tmp_path / "rounded"
    twin = AutoModelForCausalLM.from_pretrained(tmp_path / "q" / "dense", dtype=torch.float32)
    twin.save_pretrained(dense_dir)
    for name, module in twin.named_modules():
        if name.endswith("_proj") and "layers" in name:
            module.weight.data = quantize_rows(module.weight.data, torch.float8_e4m3fn).dequantize()
    twin.save_pretrained(rounded_dir)
    for folder in (dense_dir, rounded_dir):
        for file in (tmp_path / "q" / "dense").glob("tokenizer*"):
            (folder / file.name).write_bytes(file.read_bytes())
    prompts = random_prompts()
    assert greedy(dense_dir, prompts, quantization="fp8") == greedy(rounded_dir, prompts)


def test_fp8_experts_equal_rounded_experts(tmp_path):
    """--quantization fp8 on a mixture of experts rounds the experts too, per expert and output channel: the
    tokens are those of the dense model whose linears and experts hold the rounded values."""
    from tests.models_factory import save_tiny_model, word_tokenizer

    dense_dir, rounded_dir = tmp_path / "dense", tmp_path / "rounded"
    twin = save_tiny_model("qwen3-moe", dense_dir, seed=random.randrange(1 << 30))
    for name, module in twin.named_modules():
        if name.endswith("_proj") and "layers" in name and isinstance(module, torch.nn.Linear):
            module.weight.data = quantize_rows(module.weight.data, torch.float8_e4m3fn).dequantize()
        if name.endswith("mlp.experts") and hasattr(module, "gate_up_proj"):
            for stacked in (module.gate_up_proj, module.down_proj):  # [experts, outputs, inputs]
                rows = stacked.data.reshape(-1, stacked.shape[-1])
                stacked.data = quantize_rows(rows, torch.float8_e4m3fn).dequantize().view(stacked.shape)
    twin.save_pretrained(rounded_dir)
    word_tokenizer().save_pretrained(rounded_dir)
    prompts = random_prompts()
    fp8 = LLM(model=str(dense_dir), dtype="float32", device="cpu", kv_cache_memory="64MiB", quantization="fp8")
    experts = fp8.engine.core.model.model.layers[0].mlp.experts
    assert experts.w13_weight.dtype == torch.float8_e4m3fn and experts.w2_scale is not None
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    ours = [o.outputs[0].token_ids for o in fp8.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)]
    assert ours == greedy(rounded_dir, prompts)
    assert ours != greedy(dense_dir, prompts)  # the rounding is large enough to change the tokens here


def test_kv_cache_scales_are_loaded(tmp_path):
    quantized, _ = write_quantized(tmp_path, "fp8", seed=1, kv_scales=True)
    llm = LLM(model=str(quantized), dtype="float32", device="cpu", kv_cache_memory="64MiB", kv_cache_dtype="fp8")
    layers = llm.engine.core.model.model.layers
    for index, layer in enumerate(layers):
        assert layer.self_attn.kv_scale.tolist() == list(kv_scale_values(index))
    assert llm.engine.core.kv_dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("case", [("gptq", {"desc_act": True}), ("awq", {"group_size": 64}), ("ct-fp8", {})],
                         ids=case_id)
def test_served_tokens_equal_the_twin(case, tmp_path):
    fmt, options = case
    quantized, twin = write_quantized(tmp_path, fmt, seed=random.randrange(1 << 30), **options)
    prompts = random_prompts()
    expected = greedy(twin, prompts)
    names = AutoTokenizer.from_pretrained(quantized).convert_ids_to_tokens
    server = start_server(str(quantized), tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        model = client.models.list().data[0].id
        for prompt, tokens in zip(prompts, expected):
            reply = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                              logprobs=0, extra_body={"min_tokens": 16})
            assert reply.choices[0].logprobs.tokens == names(tokens)
        described = {"gptq": "gptq 4-bit", "awq": "awq 4-bit", "ct-fp8": "compressed-tensors FP8 W8A8"}[fmt]
        assert f"quantization: {described}" in server.log_text()
    finally:
        stop_server(server)


class HalfOfTwo(Communicator):
    """Rank 1 of 2, for cutting shards; the tests here never exchange anything."""

    def __init__(self) -> None:
        super().__init__(rank=1, world_size=2)

    def all_reduce(self, tensor):
        return tensor

    def all_gather(self, tensor, dim=-1):
        return tensor

    def broadcast(self, tensor, src=0):
        return tensor

    def barrier(self):
        return None


def test_tensor_parallel_shards_like_dense(tmp_path):
    """A rank's share of a quantized matrix dequantizes to exactly its share of the dense matrix: rows for a
    column-parallel layer (each of q/k/v cut separately), group-aligned inputs for a row-parallel one."""
    method = QuantizedLinearMethod(AWQ(group_size=32), DequantizingLinear())
    ops = bind_ops({}, method)
    generator = torch.Generator().manual_seed(random.randrange(1 << 30))
    column = ColumnParallelLinear(128, [64, 32, 32], False, HalfOfTwo(), ops)
    row = RowParallelLinear(128, 64, False, HalfOfTwo(), ops)
    for layer in (column, row):
        full = [AWQ(group_size=32).random(shape, torch.device("cpu"), generator) for shape in layer.part_shapes]
        layer.matrix = method._stack(layer, full)
        method.process_weights(layer)
        dense = [m.dequantize() for m in full]
        if layer is column:
            expected = torch.cat([d[d.shape[0] // 2:] for d in dense])
        else:
            expected = dense[0][:, 64:]
        assert torch.equal(layer.quant_state.dequantize(), expected)


@pytest.mark.parametrize("flags, message", [
    (["--quantization", "gptq"], "does not match the checkpoint's quantization method (awq)"),
    (["--quantization", "int3"], "unknown method"),
    (["--quantization", "gguf"], "needs a .gguf file"),
    (["--kv-cache-dtype", "fp8_e5m2"], "invalid choice"),
])
def test_bad_flags_are_one_line(flags, message, tmp_path):
    quantized, twin = write_quantized(tmp_path, "awq", seed=1)
    result = subprocess.run([sys.executable, "-m", "paged.cli.main", "generate", "--model", str(quantized),
                             "--device", "cpu", *flags, "w1 w2"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_awq_flag_on_a_dense_checkpoint(tmp_path):
    _, twin = write_quantized(tmp_path, "awq", seed=1)
    with pytest.raises(UserError, match="needs a checkpoint quantized with awq"):
        LLM(model=str(twin), device="cpu", quantization="awq", kv_cache_memory="64MiB")


PLUGIN = '''
from paged.backends.cpu.backend import CPUBackend
from paged.backends.interface import Availability


class NoQuantAccelerator(CPUBackend):
    name = "no-quant"
    supported_quantizations = ("gguf",)

    @classmethod
    def is_available(cls):
        return Availability(True, "a backend that runs no quantized checkpoints")
'''


def test_backend_without_the_method_fails_at_start(tmp_path):
    """A backend (here a plugin) that lacks a checkpoint's method: `paged serve` says so in one line, exit 2."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    write_backend_plugin(plugin, "no-quant", "no_quant_plugin", "NoQuantAccelerator", PLUGIN)
    quantized, _ = write_quantized(tmp_path / "model", "awq", seed=1)
    result = subprocess.run([sys.executable, "-m", "paged.cli.main", "serve", str(quantized), "--device", "no-quant",
                             "--port", "0"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(plugin)})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert any("backend no-quant does not run awq quantization" in line for line in errors), result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"


def fp8_kv_agreement(device: str, folder: Path) -> tuple[int, int, float, int]:
    """A request mix that fills a small FP8 KV cache (so requests are preempted and recomputed) against a large
    float32 one: (teacher-forced positions whose top token agrees, positions, the largest prompt-token logprob
    difference, generated tokens equal of 96).

    e4m3 keeps 3 bits of each key's and value's mantissa (a relative error up to 1/16), so free generations
    part ways after near ties and then differ for good; teacher-forced over the prompts (prompt logprobs,
    whose later chunks read the earlier ones' keys from the cache) each position is compared on its own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.models_factory import SHAPE, word_tokenizer

    config = LlamaConfig(**{**SHAPE, "initializer_range": 0.05, "hidden_size": 256, "intermediate_size": 512})
    torch.manual_seed(random.randrange(1 << 30))
    LlamaForCausalLM(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    prompts = [{"prompt_token_ids": [random.randrange(3, VOCAB) for _ in range(n)]} for n in (20, 45, 70, 90, 110, 130)]
    free = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    forced = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    memory = {"kv_cache_memory": "64MiB"} if device == "cpu" else {"gpu_memory_utilization": 0.2}
    engines = {
        "float32": LLM(model=str(folder), dtype="float32", device=device, max_num_batched_tokens=64, **memory),
        "fp8": LLM(model=str(folder), dtype="float32", device=device, kv_cache_dtype="fp8",
                   num_gpu_blocks_override=24, max_model_len=256, max_num_batched_tokens=64),
    }
    generated = {name: [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
                 for name, llm in engines.items()}
    assert engines["fp8"].engine.core.kv_dtype == torch.float8_e4m3fn
    assert engines["fp8"].engine.scheduler.num_preemptions > 0
    scored = {name: [o.prompt_logprobs[1:] for o in llm.generate(prompts, forced, use_tqdm=False)]
              for name, llm in engines.items()}
    positions = top_same = 0
    worst = 0.0
    for prompt, ours, theirs in zip(prompts, scored["fp8"], scored["float32"]):
        for token, mine, reference in zip(prompt["prompt_token_ids"][1:], ours, theirs):
            positions += 1
            top_same += min(mine, key=lambda t: mine[t].rank) == min(reference, key=lambda t: reference[t].rank)
            worst = max(worst, abs(mine[token].logprob - reference[token].logprob))
    same = sum(x == y for a, b in zip(generated["fp8"], generated["float32"]) for x, y in zip(a, b))
    print(f"fp8 KV cache vs float32 on {device}: generated {same}/{16 * len(prompts)} tokens equal; teacher-forced "
          f"top token {top_same}/{positions}, largest prompt-token logprob difference {worst:.3f}")
    return top_same, positions, worst, same


def test_fp8_kv_cache_agreement(tmp_path):
    top_same, positions, worst, _ = fp8_kv_agreement("cpu", tmp_path)
    assert top_same >= 0.8 * positions and worst < 0.5
