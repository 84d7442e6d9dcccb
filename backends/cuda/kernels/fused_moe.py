"""Fused mixture-of-experts: each token's top-k experts as two grouped GEMMs over tokens sorted by expert.

Layout. The T * k (token, slot) pairs are sorted by expert with torch ops, and each expert's run of pairs is
padded to a multiple of BLOCK_M with a sentinel index (T * k, matching no pair). A tile of BLOCK_M sorted
rows then belongs to one expert, whose id is looked up per tile, so a program multiplies the rows of x it
gathers by one expert's weights: an ordinary GEMM tile, with tensor cores, whatever the routing. An expert
that got no pairs has no tiles, so it costs nothing. The sort runs on the device and never syncs with the
host: the grid is sized for the most tiles T * k pairs can need, and the programs of tiles past the last
expert's return at once, so a call can be captured in a CUDA graph.

The first GEMM computes a tile of gate columns and the matching tile of up columns together, so silu(gate)
* up is its epilogue and only the [T * k, I] intermediate is written. The second multiplies that by w2 and
by the pair's routing weight, and writes one [H] row per pair; a sum over the k slots finishes. Rows of
both outputs are in the pairs' original order (token-major), so the sum is a view and a reduction. Tiles
vary fastest in the grid, so the programs running together are the tiles of one expert at the same output
columns, and its weight columns are read from DRAM about once however many tiles the expert has.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl


@triton.jit
def _expert_gemm_kernel(
    out_ptr, a_ptr, w_ptr, scale_ptr, sorted_pairs_ptr, tile_experts_ptr, routing_ptr,
    num_pairs, num_experts, N, K, stride_am, stride_we, stride_wn, stride_se, stride_om,
    PAIRS_PER_A_ROW: tl.constexpr, GATED: tl.constexpr, ROUTED: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (tiles of sorted rows, output column blocks): out[pair, n] for the BLOCK_M pairs of one tile.

    Row p of a is pair p's input, a[p // PAIRS_PER_A_ROW]; the expert's weight w[e] is [N, K] (with GATED,
    [2N, K]: gate rows, then up rows, and out = silu(gate) * up). ROUTED multiplies row p by routing[p].
    SCALED: w holds 8-bit codes, widened exactly to the dot's type per tile, and scale[e, n] multiplies output
    column n of the fp32 sums (gate and up columns each by their own) before anything is rounded.
    """
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_experts_ptr + tile)
    if expert >= num_experts:  # past the last expert's tiles
        return
    pairs = tl.load(sorted_pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + (pairs // PAIRS_PER_A_ROW).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_tile = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_tile + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(DOT_DTYPE)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w = tl.load(w_tile + k0, mask=w_mask, other=0.0)
        acc = tl.dot(a, w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        if GATED:
            up = tl.load(w_tile + N * stride_wn + k0, mask=w_mask, other=0.0)
            acc_up = tl.dot(a, up.to(DOT_DTYPE), acc_up, input_precision=DOT_PRECISION)
    if SCALED:
        scale_row = scale_ptr + expert.to(tl.int64) * stride_se
        acc *= tl.load(scale_row + offs_n, mask=n_mask, other=0.0)[None, :]
        if GATED:
            acc_up *= tl.load(scale_row + N + offs_n, mask=n_mask, other=0.0)[None, :]
    if GATED:
        # Rounded to x's dtype where the plain-torch op stores: gate and up (F.linear), then silu(gate).
        gate = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = silu * acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
    if ROUTED:
        acc *= tl.load(routing_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_INTERPRETED = type(_expert_gemm_kernel).__name__ == "InterpretedFunction"


def _dot_args(dtype: torch.dtype) -> dict[str, object]:
    """tl.dot's operand dtype and precision: x's dtype, except under the interpreter, whose dot multiplies
    bfloat16 as raw integers; there operands go to float32 (products of 16-bit floats are exact in float32).
    float32 x gets full-precision dots instead of tf32."""
    return {
        "DOT_DTYPE": tl.float32 if _INTERPRETED else _TL_DTYPES[dtype],
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


@dataclass(frozen=True)
class _Tiles:
    """One launch shape of both GEMMs."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _tiles(num_pairs: int, num_experts: int, dtype: torch.dtype) -> _Tiles:
    """The launch for num_pairs (token, slot) pairs, by the pairs an expert gets on average.

    Timed on an H200 in bfloat16 (E = 128, H = 2048, I = 768 and E = 8, H = 4096, I = 14336, T from 1 to
    16384): up to 16 pairs an expert the weights dominate and short tiles pad least; from 64 on, 128 x 128
    tiles were fastest; the 64-row tile in between is interpolated, not timed at its own sizes.
    float32 tiles take a K step half as long, so that three stages of them fit in shared memory.
    """
    if num_pairs <= 16 * num_experts:
        tiles = _Tiles(16, 64, 128, 4, 3)
    elif num_pairs < 64 * num_experts:
        tiles = _Tiles(64, 128, 64, 4, 3)
    else:
        tiles = _Tiles(128, 128, 64, 8, 3)
    return replace(tiles, block_k=tiles.block_k // 2) if dtype == torch.float32 else tiles


def _sort_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted pair index per row, expert per tile): the pairs grouped by expert, each expert's run padded to
    a multiple of block_m rows with the sentinel T * k. Tiles past the last run get expert num_experts.

    Sized for the worst case without reading the routing on the host: sum over experts of
    ceil(count / block_m) is at most (pairs + used experts * (block_m - 1)) // block_m.
    """
    experts = topk_ids.flatten().long()
    num_pairs = experts.numel()
    max_tiles = (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m
    order = torch.argsort(experts, stable=True)
    sorted_experts = experts[order]
    expert_range = torch.arange(num_experts, device=experts.device)
    starts = torch.searchsorted(sorted_experts, expert_range)
    counts = torch.searchsorted(sorted_experts, expert_range, right=True) - starts
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded_counts, 0)
    shift = padded_ends - padded_counts - starts  # from a pair's place in `order` to its row
    rows = shift[sorted_experts] + torch.arange(num_pairs, device=experts.device)
    sorted_pairs = torch.full((max_tiles * block_m,), num_pairs, device=experts.device, dtype=torch.int32)
    sorted_pairs[rows] = order.to(torch.int32)
    tile_starts = torch.arange(0, max_tiles * block_m, block_m, device=experts.device)
    tile_experts = torch.searchsorted(padded_ends, tile_starts, right=True, out_int32=True)
    return sorted_pairs, tile_experts


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same values as paged.models.ops.fused_moe: x [T, H] through each token's top-k experts, w13 [E, 2I, H]
    (gate rows, then up rows) and w2 [E, H, I], weighted by topk_weights [T, k]; [T, H] in x's dtype. With
    w13_scale [E, 2I] and w2_scale [E, H] (float32), the weights are 8-bit codes (float8_e4m3fn)."""
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"fused_moe takes bfloat16, float16 or float32 inputs, not {x.dtype}")
    tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    if tokens == 0:
        return torch.zeros_like(x)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    scaled = w13_scale is not None
    w13_scale, w2_scale = (s.float().contiguous() if scaled else w for s, w in ((w13_scale, w13), (w2_scale, w2)))
    num_pairs = tokens * top_k
    tiles = _tiles(num_pairs, num_experts, x.dtype)
    sorted_pairs, tile_experts = _sort_pairs(topk_ids, num_experts, tiles.block_m)
    routing = topk_weights.flatten().contiguous()
    activated = torch.empty(num_pairs, inter, device=x.device, dtype=x.dtype)
    per_pair = torch.empty(num_pairs, hidden, device=x.device, dtype=x.dtype)
    common = dict(
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **_dot_args(x.dtype),
    )  # fmt: skip
    _expert_gemm_kernel[(tile_experts.numel(), triton.cdiv(inter, tiles.block_n))](
        activated, x, w13, w13_scale, sorted_pairs, tile_experts, routing, num_pairs, num_experts, inter, hidden,
        x.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), activated.stride(0),
        PAIRS_PER_A_ROW=top_k, GATED=True, ROUTED=False, SCALED=scaled, **common,
    )  # fmt: skip
    _expert_gemm_kernel[(tile_experts.numel(), triton.cdiv(hidden, tiles.block_n))](
        per_pair, activated, w2, w2_scale, sorted_pairs, tile_experts, routing, num_pairs, num_experts, hidden, inter,
        activated.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), per_pair.stride(0),
        PAIRS_PER_A_ROW=1, GATED=False, ROUTED=True, SCALED=scaled, **common,
    )  # fmt: skip
    return per_pair.view(tokens, top_k, hidden).sum(1)
