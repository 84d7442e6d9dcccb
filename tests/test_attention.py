"""The CPU backend's paged attention against a dense float64 reference on random block tables."""

from __future__ import annotations

import random

import pytest
import torch

from paged.backends.cpu.attention import TorchPagedAttention
from paged.backends.interface import AttentionMetadata


def dense_reference(q, k, v, scale):
    """Causal attention of q (the last len(q) positions) over the full k/v, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    offset = k.shape[0] - q.shape[0]
    allowed = torch.arange(k.shape[0])[None, :] <= (torch.arange(q.shape[0])[:, None] + offset)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_case(context_lens, query_lens, heads, kv_heads, head_dim=16, block_size=4, dtype=torch.float32):
    rng = random.Random()
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 3
    cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, slots, full_kv, qs = [], [], [], []
    for ctx, ql in zip(context_lens, query_lens):
        blocks = [free.pop() for _ in range(-(-ctx // block_size))]
        tables.append(blocks)
        k = torch.randn(ctx, kv_heads, head_dim, dtype=dtype)
        v = torch.randn(ctx, kv_heads, head_dim, dtype=dtype)
        full_kv.append((k, v))
        cached = ctx - ql
        for pos in range(cached):  # the prefix is already in the cache
            b, o = blocks[pos // block_size], pos % block_size
            cache[0, b, o], cache[1, b, o] = k[pos], v[pos]
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(cached, ctx)]
        qs.append(torch.randn(ql, heads, head_dim, dtype=dtype))
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32),
        seq_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(query_lens),
        max_seq_len=max(context_lens),
        block_size=block_size,
    )
    attn = TorchPagedAttention()
    meta.prepared = attn.prepare(meta)
    new_k = torch.cat([k[c - q:] for (k, _), c, q in zip(full_kv, context_lens, query_lens)])
    new_v = torch.cat([v[c - q:] for (_, v), c, q in zip(full_kv, context_lens, query_lens)])
    scale = head_dim**-0.5
    out = attn.forward(torch.cat(qs), new_k, new_v, cache, meta, scale)
    ref = torch.cat([dense_reference(q, k, v, scale) for q, (k, v) in zip(qs, full_kv)])
    err = (out.double() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
    # Every new token's K/V landed in its slot.
    for (k, v), table, ctx in zip(full_kv, tables, context_lens):
        for pos in range(ctx):
            b, o = table[pos // block_size], pos % block_size
            assert torch.equal(cache[0, b, o], k[pos]) and torch.equal(cache[1, b, o], v[pos])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 2)])
def test_prefill(heads, kv_heads):
    lens = [random.randint(1, 23) for _ in range(4)]
    run_case(lens, lens, heads, kv_heads)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_prefill_with_cached_prefix(heads, kv_heads):
    ctx = [random.randint(2, 30) for _ in range(4)]
    run_case(ctx, [random.randint(1, c) for c in ctx], heads, kv_heads)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_decode(heads, kv_heads):
    ctx = [random.randint(1, 40) for _ in range(5)] + [4, 8, 9]
    run_case(ctx, [1] * len(ctx), heads, kv_heads)


def test_mixed_batch_bf16():
    run_case([17, 5, 33, 8], [17, 1, 4, 1], 8, 4, dtype=torch.bfloat16)
