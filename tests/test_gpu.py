"""On a GPU backend: greedy token ids equal transformers' for tiny random models, in fp32.

Marked `gpu`: the default suite skips them; benchmarks/gpu.sh runs them on the GPU machine.
"""

from __future__ import annotations

import random
import re

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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3-scaled", "qwen3", "phi3", "mixtral", "qwen3-moe",
                                  "qwen2-moe", "gemma2", "gemma3", "apertus", "mistral-sliding"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_greedy_matches_transformers_on_gpu(arch, eager, gpu_device, tmp_path):
    reference = save_tiny_model(arch, tmp_path, seed=random.randrange(1 << 30))
    # Phi-3's LongRoPE agrees with transformers' only within its trained context (see models.layers.rope_angles).
    lengths = (1, 7, 16, 17, 40, 95) if arch == "phi3" else (1, 7, 16, 17, 40, 95, 130)
    prompts = [[random.randrange(3, VOCAB) for _ in range(n)] for n in lengths]
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


def greedy_on(device: str, model, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    llm = LLM(model=str(model), dtype="float32", device=device, max_num_seqs=8, max_num_batched_tokens=128,
              gpu_memory_utilization=0.2, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def quant_prompts() -> list[list[int]]:
    return [[random.randrange(3, 512) for _ in range(n)] for n in (1, 9, 33, 70)]


@pytest.mark.parametrize("fmt, options", [("awq", {}), ("gptq", {"desc_act": True, "group_size": 32}),
                                          ("gptq", {"bits": 8, "sym": False, "group_size": 64}),
                                          ("ct-w4a16", {"symmetric": False, "group_size": 64})])
def test_int_checkpoints_equal_their_twin_on_gpu(fmt, options, gpu_device, tmp_path):
    """The Triton int kernels (GEMV for decode, GEMM for prefill) give the dense twin's greedy tokens."""
    from tests.quant_checkpoints import write_quantized

    quantized, twin = write_quantized(tmp_path, fmt, seed=random.randrange(1 << 30), **options)
    prompts = quant_prompts()
    assert greedy_on(gpu_device, quantized, prompts) == greedy_on(gpu_device, twin, prompts)


@pytest.mark.parametrize("fmt, options", [("fp8", {}), ("ct-int8", {}),
                                          ("ct-fp8", {"strategy": "tensor", "activation_scheme": "static"})])
def test_w8a8_checkpoints_on_gpu(fmt, options, gpu_device, tmp_path):
    """Activations quantized too, which no dense twin holds: the tokens are reported against the twin's (on
    these tiny random models FP8 activations, 3 mantissa bits, part ways quickly), and each W8A8 product is
    checked against float64 arithmetic on the same quantized activations."""
    from tests.quant_checkpoints import write_quantized

    quantized, twin = write_quantized(tmp_path, fmt, seed=random.randrange(1 << 30), **options)
    prompts = quant_prompts()
    ours, theirs = greedy_on(gpu_device, quantized, prompts), greedy_on(gpu_device, twin, prompts)
    same = sum(x == y for a, b in zip(ours, theirs) for x, y in zip(a, b))
    print(f"{fmt} {options} on {gpu_device}: {same}/{16 * len(prompts)} greedy tokens equal the twin's")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("rows", [1, 2, 7, 300])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_product_matches_float64(dtype, rows, static, gpu_device):
    """FP8Linear and Int8Linear = float64 products of the per-token quantized activations and the weights
    (one or two FP8 rows: the GEMV, which multiplies the activations as they are)."""
    from paged.backends.common.quant_linear import Int8Linear, quantize_per_token
    from paged.backends.cuda.linear import FP8Linear
    from paged.quant.base import quantize_rows

    if dtype == torch.int8 and static:
        pytest.skip("INT8 runs with dynamic activation scales only")
    n, k = 384, 1024
    matrix = quantize_rows(torch.randn(n, k, device="cuda") * 0.05, dtype)
    if static:
        matrix.input_scale = torch.tensor(0.05, device="cuda")
    kernel = FP8Linear(has_fp8_units=True) if dtype != torch.int8 else Int8Linear()
    state = kernel.prepare(matrix)
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    if dtype != torch.int8 and rows <= 2:
        inputs = x.double()
    else:
        q, scale = quantize_per_token(x, dtype, matrix.input_scale)
        inputs = q.double() * scale.double()
    expected = inputs @ matrix.dequantize(torch.float64).T + bias.double()
    got = kernel.apply(state, x, bias).double()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2  # the bfloat16 output's rounding


def test_fp8_activation_quantization_on_gpu(gpu_device):
    from paged.backends.common.quant_linear import quantize_per_token
    from paged.backends.cuda.kernels.quant_activation import quantize_rows

    x = (torch.randn(37, 4096, device="cuda") * 20).to(torch.bfloat16)
    for dtype in (torch.float8_e4m3fn, torch.int8):
        q, scale = quantize_rows(x, dtype)
        q_ref, scale_ref = quantize_per_token(x, dtype)
        assert torch.equal(scale, scale_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_blocks_on_gpu(qtype, gpu_device):
    """A GGUF matrix kept in its blocks on the GPU computes what its dequantized matrix computes."""
    from paged.backends.cuda.linear import GGUFLinear
    from tests.test_gguf_blocks import _random_blocks

    blocks = _random_blocks(qtype, seed=random.randrange(1 << 30))
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.empty(blocks.shape, device="cuda"), requires_grad=False)
    layer.gguf_blocks, layer.num_parts = {0: blocks}, 1
    method = GGUFLinear()
    method.process_weights(layer)
    x = torch.randn(5, blocks.shape[1], device="cuda")
    expected = x.double() @ blocks.dequantize(torch.float32).cuda().double().T
    got = method.apply(layer, x, None).double()
    assert layer.weight.numel() == 0 and method.weight_bytes(layer) < blocks.shape[0] * blocks.shape[1] * 2
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


def test_fp8_kv_cache_agreement_on_gpu(gpu_device, tmp_path):
    from tests.test_quantization import fp8_kv_agreement

    top_same, positions, worst, _ = fp8_kv_agreement(gpu_device, tmp_path)
    assert top_same >= 0.8 * positions and worst < 0.5


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_structured_output_on_gpu(eager, gpu_device, tmp_path):
    """The grammar's bitmask applied on the device: constrained rows keep to their regex (words w1..w99, then
    the end), greedy equals the CPU backend's, and an unconstrained neighbour is unchanged."""
    from paged.structured_output import StructuredOutputsParams

    save_tiny_model("llama", tmp_path, seed=random.randrange(1 << 30))
    prompts = [{"prompt_token_ids": [random.randrange(3, VOCAB) for _ in range(n)]} for n in (5, 23)]
    constrained = SamplingParams(temperature=0, max_tokens=20,
                                 structured_outputs=StructuredOutputsParams(regex="(w[1-9][0-9]?){8}"))
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    runs = {}
    for device in (gpu_device, "cpu"):
        llm = LLM(model=str(tmp_path), dtype="float32", device=device, enforce_eager=eager, max_num_seqs=8,
                  gpu_memory_utilization=0.2, kv_cache_memory="64MiB")
        runs[device] = [o.outputs[0].token_ids for o in llm.generate(prompts * 2, [constrained] * 2 + [free] * 2,
                                                                      use_tqdm=False)]
        alone = llm.generate(prompts, free, use_tqdm=False)
        assert runs[device][2:] == [o.outputs[0].token_ids for o in alone]
    words = [llm.engine.tokenizer.convert_ids_to_tokens(t) for t in range(VOCAB)]  # id 1 is "w1" as well as <s>
    for tokens in runs[gpu_device][:2]:
        assert len(tokens) == 9 and all(re.fullmatch(r"w[1-9][0-9]?", words[t]) for t in tokens[:8])
    assert runs[gpu_device] == runs["cpu"]


@pytest.mark.parametrize("tokens", [1, 40, 600])
def test_fp8_experts_kernel_on_gpu(tokens, gpu_device):
    """The fused MoE kernel over float8 experts (a scale per expert and row), compiled, against the plain-torch
    op in float64 over the values the codes encode."""
    from paged.backends.cuda.kernels.fused_moe import fused_moe
    from paged.models.ops import fused_moe as reference

    experts, top_k, hidden, inter = 16, 4, 256, 192
    x = torch.randn(tokens, hidden).bfloat16()
    codes, scales = [], []
    for shape in ((experts, 2 * inter, hidden), (experts, hidden, inter)):
        dense = torch.randn(*shape) / shape[-1] ** 0.5
        scale = dense.abs().amax(-1) / torch.finfo(torch.float8_e4m3fn).max
        codes.append((dense / scale[..., None]).to(torch.float8_e4m3fn))
        scales.append(scale)
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k).softmax(-1)
    on_gpu = [t.to(gpu_device) for t in (x, codes[0], codes[1], weights, ids, scales[0], scales[1])]
    y = fused_moe(*on_gpu).cpu().double()
    decoded = [c.double() * s.double()[..., None] for c, s in zip(codes, scales)]
    expected = reference(x.double(), decoded[0], decoded[1], weights.double(), ids)
    assert float((y - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.parametrize("method", ["ngram", "oracle", "self-draft"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_speculative_decoding_on_gpu(method, eager, gpu_device, tmp_path):
    """Greedy tokens with drafts checked (in graphs of 1 + 3 tokens a request, where captured) equal those
    without, in fp32; a draft model's K/V sits in the target's blocks."""
    from tests.test_spec_decode import OracleProposer

    save_tiny_model("llama", tmp_path, seed=random.randrange(1 << 30))
    phrases = [[random.randrange(3, VOCAB) for _ in range(random.randint(2, 6))] for _ in range(6)]
    prompts = [{"prompt_token_ids": (p * 20)[: random.randint(3, 90)]} for p in phrases]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kwargs = dict(model=str(tmp_path), dtype="float32", device=gpu_device, enforce_eager=eager, max_num_seqs=8,
                  gpu_memory_utilization=0.2)
    expected = [o.outputs[0].token_ids for o in LLM(**kwargs).generate(prompts, params, use_tqdm=False)]
    spec = {"model": str(tmp_path)} if method == "self-draft" else {"method": "ngram", "prompt_lookup_max": 2}
    llm = LLM(**kwargs, speculative_config={**spec, "num_speculative_tokens": 3})
    if method == "oracle":
        llm.engine.core.proposer = OracleProposer([p["prompt_token_ids"] + e for p, e in zip(prompts, expected)])
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    stats = llm.engine.core.stats  # a random model's outputs repeat its prompt only by chance
    assert (stats.spec_num_draft_tokens if method == "ngram" else stats.spec_num_accepted_tokens) > 0
