"""The CPU backend's paged attention against a dense float64 reference on random block tables."""

from __future__ import annotations

import random

import pytest
import torch

from paged.backends.cpu.attention import MATMUL_DECODE_FROM_SEQS, TorchPagedAttention
from paged.backends.cpu.backend import CPUBackend
from tests.backends.attention_cases import build_case, check, run_attention, tolerance


class TorchOnlyCPUBackend(CPUBackend):
    """The CPU backend without its compiled decode kernel, so the torch decode paths are checked too."""

    def attention(self, max_model_len: int) -> TorchPagedAttention:
        return TorchPagedAttention()


def run_case(context_lens, query_lens, heads, kv_heads, head_dim=16, block_size=4, dtype=torch.float32,
             backend: CPUBackend | None = None):
    case = build_case(context_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype)
    out, cache = run_attention(case, backend or CPUBackend())
    check(case, out, cache, tolerance(dtype))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 2)])
def test_prefill(heads, kv_heads):
    lens = [random.randint(1, 23) for _ in range(4)]
    run_case(lens, lens, heads, kv_heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("cached", [0, 1, 37], ids=["first-chunk", "one-cached", "cached-prefix"])
def test_one_sequence_prefill(heads, kv_heads, cached, dtype):
    """A lone sequence's chunk: causal over itself, unmasked over what is cached, merged by log-sum-exp."""
    new = random.randint(2, 60)
    run_case([cached + new], [new], heads, kv_heads, dtype=dtype)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_prefill_with_cached_prefix(heads, kv_heads):
    ctx = [random.randint(2, 30) for _ in range(4)]
    run_case(ctx, [random.randint(1, c) for c in ctx], heads, kv_heads)


@pytest.mark.parametrize("num_seqs", [1, 5, MATMUL_DECODE_FROM_SEQS + 4], ids=["one-seq", "flash-kernel", "matmuls"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_decode(heads, kv_heads, dtype, num_seqs):
    """Every torch decode path: one sequence (its context cut to length, no mask), a few (the flash kernel
    with a mask), many (two matmuls)."""
    ctx = [random.randint(1, 40) for _ in range(num_seqs)]
    run_case(ctx, [1] * len(ctx), heads, kv_heads, dtype=dtype, backend=TorchOnlyCPUBackend())


@pytest.mark.skipif(CPUBackend().attention(64).kernels is None, reason="no AVX2 kernels on this CPU")
@pytest.mark.parametrize("num_seqs", [1, 3, 17])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 4, 16, 4), (9, 3, 64, 16), (8, 1, 32, 128)])
def test_decode_kernel(heads, kv_heads, head_dim, block_size, num_seqs):
    """The compiled float32 decode kernel: online softmax over many blocks, query heads split or grouped."""
    ctx = [random.randint(1, 300) for _ in range(num_seqs)]
    run_case(ctx, [1] * len(ctx), heads, kv_heads, head_dim, block_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decodes", [2, MATMUL_DECODE_FROM_SEQS + 1])
@pytest.mark.parametrize("backend", [CPUBackend, TorchOnlyCPUBackend], ids=["kernels", "torch"])
def test_mixed_step(dtype, decodes, backend):
    """Prefill chunks (one a first chunk, one after a cached prefix) and decode tokens in one step, in a
    shuffled order: each prefill runs on its own, the decode tokens together."""
    lens = [(17, 17), (33, 4)] + [(random.randint(1, 40), 1) for _ in range(decodes)]
    random.shuffle(lens)
    run_case([c for c, _ in lens], [q for _, q in lens], 8, 4, dtype=dtype, backend=backend())
