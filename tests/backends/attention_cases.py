"""Paged-attention cases on random block tables, checked against dense float64 attention, for any backend.

A case is built on the host in the standard cache layout ([2 (K, V), blocks, block_size, kv_heads,
head_dim]) with its cached prefix already in place; `run_attention` moves it to a backend's device and
layout, runs one step of that backend's attention, and brings the output and the cache back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from paged.backends.interface import AttentionMetadata, Backend


def dense_reference(q, k, v, scale, window: int | None = None, softcap: float | None = None):
    """Causal attention of q (the last len(q) positions) over the full k/v, in float64; with a `window`, the
    query at position p sees keys p - window < j <= p; with a `softcap`, scores are softcap * tanh(s / softcap)."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    offset = k.shape[0] - q.shape[0]
    key_pos, query_pos = torch.arange(k.shape[0])[None, :], torch.arange(q.shape[0])[:, None] + offset
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@dataclass
class Case:
    cache: torch.Tensor  # standard layout, cached prefixes written
    meta: AttentionMetadata
    query: torch.Tensor
    key: torch.Tensor  # the new tokens' keys and values
    value: torch.Tensor
    full_kv: list[tuple[torch.Tensor, torch.Tensor]]  # every sequence's whole context
    tables: list[list[int]]
    scale: float
    window: int | None = None  # the layer's sliding window and soft cap (Attention.forward's)
    softcap: float | None = None

    def reference(self) -> torch.Tensor:
        starts = self.meta.query_start_loc.tolist()
        return torch.cat([dense_reference(self.query[a:b], k, v, self.scale, self.window, self.softcap)
                          for (k, v), a, b in zip(self.full_kv, starts, starts[1:])])


def build_case(context_lens, query_lens, heads, kv_heads, head_dim=16, block_size=4, dtype=torch.float32) -> Case:
    """Sequences of context_lens tokens whose last query_lens are new this step; blocks in shuffled order."""
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
    new_k = torch.cat([k[c - q:] for (k, _), c, q in zip(full_kv, context_lens, query_lens)])
    new_v = torch.cat([v[c - q:] for (_, v), c, q in zip(full_kv, context_lens, query_lens)])
    return Case(cache, meta, torch.cat(qs), new_k, new_v, full_kv, tables, head_dim**-0.5)


def _layout(backend: Backend) -> str:
    """Which in-tree layout backend.kv_cache_shape declares, told apart by sizes that are all distinct."""
    layouts = {(2, 5, 7, 11, 13): "standard", (2, 5, 11, 7, 13): "head-major", (5, 7, 22, 13): "interleaved"}
    shape = tuple(backend.kv_cache_shape(5, 7, 11, 13))
    if shape not in layouts:
        raise NotImplementedError(f"{backend.name}: no test adapter for KV cache layout {shape}")
    return layouts[shape]


def to_backend_layout(cache: torch.Tensor, backend: Backend) -> torch.Tensor:
    """The standard-layout cache in the layout backend.kv_cache_shape declares (the three in tree)."""
    _, blocks, block_size, kv_heads, head_dim = cache.shape
    layout = _layout(backend)
    if layout == "head-major":  # each (block, head) a contiguous [block_size, head_dim] tile
        return cache.transpose(2, 3)
    if layout == "interleaved":  # K and V of a head interleaved
        return cache.permute(1, 2, 3, 0, 4).reshape(blocks, block_size, 2 * kv_heads, head_dim)
    return cache


def from_backend_layout(cache: torch.Tensor, standard_shape: torch.Size, backend: Backend) -> torch.Tensor:
    """Inverse of to_backend_layout."""
    _, blocks, block_size, kv_heads, head_dim = standard_shape
    layout = _layout(backend)
    if layout == "head-major":
        return cache.transpose(2, 3)
    if layout == "interleaved":
        return cache.reshape(blocks, block_size, kv_heads, 2, head_dim).permute(3, 0, 1, 2, 4)
    return cache


def run_attention(case: Case, backend: Backend, cache_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the backend's attention on the case: (output, cache in standard layout), both on the host.

    The cache is kept in cache_dtype, else in the dtype the backend stores K/V of a model of the case's dtype.
    """
    device = backend.device()
    cache_dtype = cache_dtype or backend.kv_cache_dtype(case.cache.dtype)
    cache = to_backend_layout(case.cache.to(cache_dtype), backend).contiguous().to(device)
    meta = replace(case.meta, **{name: getattr(case.meta, name).to(device)
                                 for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables")})
    attention = backend.attention(max_model_len=case.meta.max_seq_len)
    meta.prepared = attention.prepare(meta)
    out = attention.forward(case.query.to(device), case.key.to(device), case.value.to(device), cache, meta,
                            case.scale, window=case.window, softcap=case.softcap)
    return out.to("cpu"), from_backend_layout(cache.to("cpu"), case.cache.shape, backend)


def check(case: Case, out: torch.Tensor, cache: torch.Tensor, tolerance: float) -> None:
    """Output within `tolerance` (relative, vs float64) and every token's K/V, as stored, in its slot."""
    ref = case.reference()
    err = (out.double() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all()
    assert err < tolerance, err
    block_size = case.meta.block_size
    for (k, v), table in zip(case.full_kv, case.tables):
        for pos in range(k.shape[0]):
            b, o = table[pos // block_size], pos % block_size
            assert torch.equal(cache[0, b, o], k[pos].to(cache.dtype)), (pos, "K")
            assert torch.equal(cache[1, b, o], v[pos].to(cache.dtype)), (pos, "V")


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2
