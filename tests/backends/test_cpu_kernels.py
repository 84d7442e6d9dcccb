"""The CPU backend's compiled kernels (bfloat16 for AVX-512 BF16, float32 for AVX2) against float64 and the
plain-torch ops, and the fallback when they cannot be built."""

from __future__ import annotations

import random

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from paged.backends.cpu import isa, native
from paged.backends.cpu.linear import PACKED_GEMM_MAX_ROWS, OneDNNLinear, PackedLinear
from paged.backends.cpu.ops import Rotary
from paged.backends.cpu.packing import BLOCK_TYPES, pack_bf16, pack_gguf
from paged.quant.gguf import GGUFBlocks
from paged.models import ops as reference
from paged.models.layers import RotaryEmbedding

KERNELS, WHY = native.load_bf16_kernels(isa.probe())
needs_kernel = pytest.mark.skipif(KERNELS is None, reason=WHY)
AVX2, AVX2_WHY = native.load_avx2_kernels(isa.probe())
needs_avx2 = pytest.mark.skipif(AVX2 is None, reason=AVX2_WHY)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_matches_float64(rows):
    # Odd sizes too: a last block of fewer than four rows of W, and k not a multiple of 32.
    n, k = random.choice([(960, 576), (4, 64), (7, 33), (1001, 77), (3, 1)])
    x = torch.randn(rows, k).bfloat16()
    w = torch.randn(n, k).bfloat16()
    out = KERNELS.gemv(x, w)
    exact = x.double() @ w.double().T
    # float32 accumulation, then one rounding to bfloat16: within half a bfloat16 ulp plus the sum's error.
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    assert torch.allclose(out.double(), exact, rtol=2**-8, atol=1e-3 * k**0.5)


@needs_kernel
def test_linear_uses_it_for_few_rows_only():
    layer = torch.nn.Linear(64, 48, bias=True).bfloat16()
    method = OneDNNLinear(KERNELS)
    method.process_weights(layer)
    for rows in (1, KERNELS.gemv_max_rows, KERNELS.gemv_max_rows + 5):
        x = torch.randn(rows, 64).bfloat16()
        expected = x.double() @ layer.weight.double().T + layer.bias.double()
        assert torch.allclose(method.apply(layer, x, layer.bias).double(), expected, rtol=2**-7, atol=2e-2)


def assert_like_torch(out: torch.Tensor, torch_out: torch.Tensor, exact: torch.Tensor) -> None:
    """Same rounding steps as the torch op: nearly every element has its bits, and all are within bf16 error."""
    assert out.dtype == torch.bfloat16 and out.shape == torch_out.shape
    assert (out != torch_out).float().mean() < 0.02
    assert torch.allclose(out.double(), exact, rtol=2**-6, atol=2**-6)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 3, 40])  # 40: rows split over threads
def test_rms_norm_matches_torch(tokens):
    hidden, eps = random.choice([576, 64, 100]), 1e-5
    x, residual = torch.randn(tokens, hidden).bfloat16(), torch.randn(tokens, hidden).bfloat16()
    weight = (1 + 0.1 * torch.randn(hidden)).bfloat16()

    def norm64(h):
        h = h.double()
        return weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)

    out, none = KERNELS.rms_norm(x, None, weight, eps)
    assert none is None
    assert_like_torch(out, reference.rms_norm(x, weight, eps), norm64(x))
    out, total = KERNELS.rms_norm(x, residual, weight, eps)
    torch_out, torch_total = reference.add_rms_norm(x, residual, weight, eps)
    assert torch.equal(total, torch_total)
    assert_like_torch(out, torch_out, norm64(torch_total))


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_rotary_matches_torch_on_slices_of_fused_qkv(tokens):
    heads, kv_heads, head_dim = 6, 2, 64
    rope = RotaryEmbedding(head_dim, 512, {"rope_theta": 10000.0}, {"rotary": reference.rotary})
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).bfloat16()
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 512, (tokens,))
    torch_q, torch_k = Rotary()(positions, q, k, rope.cos_sin)
    exact_q, exact_k = reference.rotary(positions, q.double(), k.double(), rope.cos_sin.double())
    assert_like_torch(KERNELS.rotary(positions, q, rope.cos_sin), torch_q, exact_q)
    assert_like_torch(KERNELS.rotary(positions, k, rope.cos_sin), torch_k, exact_k)


def test_without_a_compiler_it_says_why(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    for file in (native.BF16_FILE, native.AVX2_FILE):
        caps = isa.probe()
        if not caps.at_least(file.level):
            continue
        library, why = native.load(file, caps)
        assert library is None and "/nonexistent/cc" in why


@pytest.mark.parametrize("cap", ["baseline", "avx2"])
def test_below_a_files_level_it_says_why(monkeypatch, cap):
    monkeypatch.setenv(isa.CAP_ENV, cap)
    caps = isa.probe()
    kernels, why = native.load_bf16_kernels(caps)
    assert kernels is None and "avx512_bf16" in why
    if cap == "baseline":
        kernels, why = native.load_avx2_kernels(caps)
        assert kernels is None and "below avx2" in why


# --- the AVX2 float32 kernels ----------------------------------------------------------------------


@needs_avx2
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 7, 13, 32, PACKED_GEMM_MAX_ROWS + 3])
def test_packed_linear_matches_float64(rows):
    # Odd sizes: a last panel of fewer than 16 columns, padding to 64, any k; with and without a bias.
    n, k = random.choice([(960, 576), (7, 33), (100, 17), (1001, 77), (64, 1)])
    layer = torch.nn.Linear(k, n, bias=random.random() < 0.5)
    method = PackedLinear(AVX2)
    weight = layer.weight.detach().clone()
    method.process_weights(layer)
    assert layer.weight.numel() == 0  # the float32 copy is released
    x = torch.randn(rows, k)
    out = method.apply(layer, x, layer.bias)
    exact = x.double() @ weight.bfloat16().double().T  # bfloat16 weights, exact products
    if layer.bias is not None:
        exact += layer.bias.double()
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    assert torch.allclose(out.double(), exact, rtol=1e-5, atol=1e-5 * k**0.5)


def gguf_blocks(qtype: str, n: int, k: int) -> GGUFBlocks:
    """A random [n, k] matrix quantized by gguf-py, as the loader hands such a matrix over."""
    values = (torch.randn(n, k) * random.choice([0.02, 1.0])).numpy()
    return GGUFBlocks(qtype, torch.from_numpy(quantize(values, GGMLQuantizationType[qtype])), (n, k))


@needs_avx2
@pytest.mark.parametrize("qtype", sorted(BLOCK_TYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 32, PACKED_GEMM_MAX_ROWS + 3])
def test_gguf_blocks_linear_matches_float64_of_the_dequantized_weights(qtype, rows):
    """Every path (in-register widening for few rows, widened panels, BLAS over the widened matrix) against
    float64 products with gguf-py's dequantization of the same blocks; n not a multiple of 16 or 64."""
    n, k = random.choice([(960, 576), (7, 32), (100, 64), (1001, 96)])
    blocks = gguf_blocks(qtype, n, k)
    layer = torch.nn.Linear(k, n, bias=random.random() < 0.5)
    layer.gguf_blocks, layer.num_parts = {0: blocks}, 1
    PackedLinear(AVX2).process_weights(layer)
    assert layer.packed_weight.source == qtype and layer.weight.numel() == 0
    x = torch.randn(rows, k)
    exact = x.double() @ blocks.dequantize(torch.float64).T
    if layer.bias is not None:
        exact += layer.bias.double()
    out = PackedLinear(AVX2).apply(layer, x, layer.bias)
    assert torch.allclose(out.double(), exact, rtol=1e-5, atol=1e-5 * k**0.5 * exact.abs().max().item())


@needs_avx2
@pytest.mark.parametrize("qtype", sorted(BLOCK_TYPES))
def test_gguf_blocks_rows_get_the_same_bits_alone_as_among_a_few(qtype):
    """Up to eight rows (a decode token and its drafts) each get exactly the bits that row gets alone, so a
    speculative check sees the logits a plain decode step would."""
    n, k = random.choice([(960, 576), (100, 64), (1001, 96)])
    layer = torch.nn.Linear(k, n, bias=False)
    layer.gguf_blocks, layer.num_parts = {0: gguf_blocks(qtype, n, k)}, 1
    PackedLinear(AVX2).process_weights(layer)
    x = torch.randn(8, k)
    alone = torch.cat([PackedLinear(AVX2).apply(layer, x[i : i + 1], None) for i in range(8)])
    for rows in range(1, 9):
        assert torch.equal(PackedLinear(AVX2).apply(layer, x[:rows], None), alone[:rows]), rows


@needs_avx2
@pytest.mark.parametrize("qtype", sorted(BLOCK_TYPES))
def test_gguf_blocks_widen_to_exactly_gguf_py_values(qtype):
    n, k = random.choice([(100, 64), (49, 128)])
    blocks = gguf_blocks(qtype, n, k)
    widened = AVX2.widen_transposed(pack_gguf(blocks))
    assert torch.equal(widened, blocks.dequantize(torch.float32).T)


@needs_avx2
def test_packed_linear_keeps_a_tied_weight():
    layer = torch.nn.Linear(32, 48, bias=False)
    layer.owns_weight = False
    PackedLinear(AVX2).process_weights(layer)
    assert layer.weight.shape == (48, 32)


@needs_avx2
def test_unpack_gives_the_bfloat16_weights_back():
    n, k = random.choice([(100, 17), (960, 576)])
    weight = torch.randn(n, k)
    assert torch.equal(AVX2.widen_transposed(pack_bf16(weight)), weight.bfloat16().float().T)


@needs_avx2
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_float32_rms_norm_and_rotary_match_torch(tokens):
    hidden, eps = random.choice([576, 64, 100]), 1e-5
    x, residual, weight = torch.randn(tokens, hidden), torch.randn(tokens, hidden), 1 + 0.1 * torch.randn(hidden)
    out, total = AVX2.rms_norm(x, residual, weight, eps)
    torch_out, torch_total = reference.add_rms_norm(x, residual, weight, eps)
    assert torch.equal(total, torch_total)
    assert torch.allclose(out, torch_out, rtol=1e-5, atol=1e-6)
    heads, kv_heads, head_dim = 6, 2, 64
    rope = RotaryEmbedding(head_dim, 512, {"rope_theta": 10000.0}, {"rotary": reference.rotary})
    q, k, _ = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 512, (tokens,))
    torch_q, torch_k = reference.rotary(positions, q, k, rope.cos_sin)
    # Elementwise with torch's rounding steps: the same bits.
    assert torch.equal(AVX2.rotary(positions, q, rope.cos_sin), torch_q)
    assert torch.equal(AVX2.rotary(positions, k, rope.cos_sin), torch_k)


@needs_avx2
def test_float32_silu_and_mul_matches_torch():
    x = torch.randn(random.choice([1, 5, 40]), 2 * random.choice([1536, 100, 3])) * 8
    assert torch.allclose(AVX2.silu_and_mul(x), reference.silu_and_mul(x), rtol=1e-6, atol=1e-6)
