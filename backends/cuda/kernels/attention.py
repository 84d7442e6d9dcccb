"""Paged attention in Triton: the KV-cache write, ragged prefill/mixed attention and split-K decode.

The KV cache of one layer is [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]; a sequence's
context position p lives in block block_tables[seq, p // block_size] at offset p % block_size.

Both attention kernels share one inner loop (`_attend_keys`): flash-attention's online softmax over
tiles of keys gathered through the block table, in the log2 domain (scores are pre-multiplied by
log2(e) so the loop uses exp2). A program handles every query head of one KV head at once ("GQA
packing"): the rows of its query tile are (token, head) pairs, so each K/V tile is loaded once for the
whole group instead of once per query head.

Grids below name the axes as if sequences came first; by default (TileConfig.heads_first) the sequence
and KV-head axes are swapped, so that the programs launched together read neighbouring heads.
- Prefill/mixed: grid (seq, query tile, kv head). Keys every row of the tile may see are processed
  without a mask; only the diagonal band pays for the causal mask.
- Decode (every sequence has at most one new token): "flash decoding". Grid (seq, kv head, split); each
  split attends over an equal share of the context and writes a partial (max, sum, acc); a second kernel
  combines the splits (with one split the program writes the output itself and no second kernel runs).
  The split count comes from a host-side bound (max_model_len), and each split's share is computed on
  the device from seq_lens, so the launch never depends on the step's data and can be captured in a CUDA
  graph. Shares are at least SPLIT_TOKENS long: a short context uses only its first
  few splits, the others return at once, and a large batch of short contexts pays little for the split.

An fp8 cache (any of torch's one-byte float types; the dtype of the cache tensor decides) stores
key / k_scale and value / v_scale, saturated to the type's range and rounded to nearest even. Reading
never multiplies a tile by its scale: an fp8 value converts exactly to the query's 16- or 32-bit type,
q . (k_scale * k) = k_scale * (q . k) and sum p * (v_scale * v) = v_scale * sum p * v, so k_scale joins the
softmax scale and v_scale multiplies the output once. The inner loop then pays for the conversion only,
and the dots see the cached values themselves rather than their scaled copies rounded to bf16. The
scales are read from a device tensor inside the kernels, so a captured CUDA graph follows them; a
constexpr flag (KV_FP8) keeps the code of 16- and 32-bit caches exactly as it was.

A sliding window (query at p sees keys p - window < j <= p) bounds which keys are read, not only which
are masked: once every layer slides, the block manager may hand blocks before the window to another
sequence, whose values (NaN among them: a zero weight times NaN is NaN) must never reach the output.
- Prefill/mixed: a query tile's key loop starts at its first token's first key. Keys from its last
  token's first key up to its first token are seen by every row and go unmasked; the band below (the
  window's lower edge) pays for the window mask, the diagonal band above for both masks.
- Decode: the splits share out only the window's span [seq_len - window, seq_len), all of which the token
  sees, so no mask is needed beyond the context's end, and a windowed layer needs no more splits than
  its window fills.
Gemma 2's soft cap (softcap * tanh(s / softcap)) bends the scores in the natural domain: with it the
kernels scale the dot by scale / softcap (times k_scale, so that the cap sees the true score) and the
tanh by softcap * log2(e). tanh is 1 - 2 / (e^2x + 1), exact in the limits where e^2x is inf or 0 (not
every Triton has tl.tanh). Window and cap are per-layer constants, launch arguments fixed in a captured
graph; constexpr flags (WINDOW, SOFTCAP), with None passed for what a layer does not use, keep the code of
layers without them exactly as it was.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from paged.backends.interface import Attention, AttentionMetadata

_LOG2E = 1.4426950408889634
# Start of the running max. Finite, so a row that has seen no key yet rescales by exp2(0) = 1 instead of
# exp2(-inf - -inf) = NaN; masked scores are -inf and still contribute exp2(-inf) = 0.
_M_INIT = tl.constexpr(-1.0e30)
_TWO_LOG2E = tl.constexpr(2 * _LOG2E)
# Decode splits: enough to fill the GPU for a handful of long sequences; each share of a context is a
# multiple of _SPLIT_TOKENS so that the partial results stay small next to the K/V they summarise.
_MAX_DECODE_SPLITS = 16
_SPLIT_TOKENS = 256
_SMALL_BATCH_SPLIT_TOKENS = 64


@triton.jit
def _round_to_fp8_grid(x, FP8_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """float32 x saturated to +-FP8_MAX and rounded to nearest even on the fp8 type's grid, still as float32.

    The cast that follows is then exact, whichever conversion the target has: the Triton interpreter's
    float32 -> fp8 conversion neither rounds to even nor handles subnormals, and a hardware convert
    rounds to nearest even anyway. The grid step at |x| is 2**(exponent - MANTISSA_BITS), the exponent
    read from x's bits and held at MIN_EXPONENT below the smallest normal (fp8 subnormals share that
    step); scaling by a power of two is exact, and adding and taking away 1.5 * 2**23 rounds the scaled
    magnitude (below 2**(MANTISSA_BITS + 1)) to an integer, to even, in float32 arithmetic.
    """
    x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    bits = x.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXPONENT)
    step = ((exponent - MANTISSA_BITS + 127) << 23).to(tl.float32, bitcast=True)
    inverse_step = ((MANTISSA_BITS - exponent + 127) << 23).to(tl.float32, bitcast=True)
    rounded = ((tl.abs(x) * inverse_step + 12582912.0) - 12582912.0) * step
    return tl.where(bits < 0, -rounded, rounded)  # the sign bit, so that -0.0 stays -0.0 as torch casts it


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    kv_scale_ptr,
    num_kv_heads,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
):
    """One program per token: copy its K and V for every KV head to its slot (slot -1: padding, skip).

    With KV_FP8, K and V are divided by their scales (IEEE division, as torch divides) and rounded onto
    the cache type's grid first.
    """
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < num_kv_heads
    cache_offsets = (
        (slot // PAGE_SIZE) * stride_cache_block
        + (slot % PAGE_SIZE) * stride_cache_slot
        + heads * stride_cache_head
        + dims
    )
    token = token.to(tl.int64)
    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    if KV_FP8:
        k = tl.math.div_rn(k.to(tl.float32), tl.load(kv_scale_ptr))
        v = tl.math.div_rn(v.to(tl.float32), tl.load(kv_scale_ptr + 1))
        k = _round_to_fp8_grid(k, FP8_MAX, MANTISSA_BITS, MIN_EXPONENT)
        v = _round_to_fp8_grid(v, FP8_MAX, MANTISSA_BITS, MIN_EXPONENT)
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tanh(x):
    """tanh as 1 - 2 / (e^2x + 1) (not every Triton has tl.tanh): e^2x overflowing to inf gives 1 and
    underflowing to 0 gives -1, so no |x| makes a NaN; near 0 the error is float32's, absolute."""
    return 1.0 - 2.0 / (tl.exp2(x * _TWO_LOG2E) + 1.0)


@triton.jit
def _attend_keys(
    q,
    m_i,
    l_i,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    start,
    end,
    row_pos,
    qk_scale,
    window,
    softcap,
    stride_cache_block,
    stride_cache_slot,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold context positions [start, end) into the online-softmax state (m_i, l_i, acc).

    k_cache_ptr/v_cache_ptr point at the KV head's column of the cache, block_table_ptr at the sequence's
    row of the block table. With CAUSAL, row r only sees positions <= row_pos[r], and with WINDOW as well
    only positions > row_pos[r] - window; without CAUSAL the caller guarantees that every row sees every
    position of the range. Positions outside [start, end) are never read, so a partly filled last block
    (or a stale block id past the context) and the blocks before a window are never touched.
    With SOFTCAP, qk_scale is the natural-domain scale over the cap and softcap the cap times log2(e):
    scores become softcap * tanh(q.k * scale / softcap) in the log2 domain, before any mask.
    An fp8 cache's tiles convert exactly to q's dtype; their scales are the caller's (see the module).
    """
    dims = tl.arange(0, HEAD_DIM)
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        in_range = pos < end
        block = tl.load(block_table_ptr + pos // PAGE_SIZE, mask=in_range, other=0).to(tl.int64)
        rows = block * stride_cache_block + (pos % PAGE_SIZE) * stride_cache_slot
        k = tl.load(k_cache_ptr + rows[:, None] + dims[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(v_cache_ptr + rows[:, None] + dims[None, :], mask=in_range[:, None], other=0.0)
        k = k.to(q.dtype).to(DOT_DTYPE)
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP:
            s = _tanh(s) * softcap
        if CAUSAL:
            seen = (pos[None, :] <= row_pos[:, None]) & in_range[None, :]
            if WINDOW:
                seen = seen & (pos[None, :] > row_pos[:, None] - window)
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q.dtype).to(DOT_DTYPE)  # rounded like the query, as flash attention does
        acc = tl.dot(p, v.to(q.dtype).to(DOT_DTYPE), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _attend_context(
    q,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq,
    kv_head,
    start,
    unmasked_start,
    unmasked_end,
    end,
    row_pos,
    qk_scale,
    window,
    softcap,
    stride_bt,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    ROWS: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The online-softmax state (m_i, l_i, acc) of q's ROWS rows over context [start, end) of one sequence
    and KV head: [unmasked_start, unmasked_end) is seen by every row, the rest causally and, with WINDOW,
    within the window; without WINDOW, start must equal unmasked_start (the caller needs no lower band)."""
    m_i = tl.full([ROWS], _M_INIT, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    k_head_ptr = k_cache_ptr + kv_head * stride_cache_head
    v_head_ptr = v_cache_ptr + kv_head * stride_cache_head
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if WINDOW:  # the band at the window's lower edge
        m_i, l_i, acc = _attend_keys(
            q, m_i, l_i, acc, k_head_ptr, v_head_ptr, table_ptr, start, unmasked_start, row_pos, qk_scale,
            window, softcap, stride_cache_block, stride_cache_slot, PAGE_SIZE, HEAD_DIM, BLOCK_N, True, True,
            SOFTCAP, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
    m_i, l_i, acc = _attend_keys(
        q, m_i, l_i, acc, k_head_ptr, v_head_ptr, table_ptr, unmasked_start, unmasked_end, row_pos, qk_scale,
        window, softcap, stride_cache_block, stride_cache_slot, PAGE_SIZE, HEAD_DIM, BLOCK_N, False, False,
        SOFTCAP, DOT_DTYPE, DOT_PRECISION,
    )  # fmt: skip
    return _attend_keys(
        q, m_i, l_i, acc, k_head_ptr, v_head_ptr, table_ptr, unmasked_end, end, row_pos, qk_scale,
        window, softcap, stride_cache_block, stride_cache_slot, PAGE_SIZE, HEAD_DIM, BLOCK_N, True, WINDOW,
        SOFTCAP, DOT_DTYPE, DOT_PRECISION,
    )  # fmt: skip


@triton.jit
def _grid_seq_and_head(seq_axis: tl.constexpr, head_axis: tl.constexpr, HEADS_FIRST: tl.constexpr):
    """(sequence, KV head) of this program. Programs are launched in the order of grid axis 0 first, so
    with HEADS_FIRST the programs running side by side read the KV heads of the same cache blocks: one
    position's heads lie next to each other, and the reads of neighbouring programs meet in DRAM rows
    and L2 lines instead of striding through the cache one head apart."""
    if HEADS_FIRST:
        return tl.program_id(head_axis), tl.program_id(seq_axis)
    return tl.program_id(seq_axis), tl.program_id(head_axis)


@triton.jit
def _prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    kv_scale_ptr,
    qk_scale,
    window,
    softcap,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    """Grid (seq, query tile, kv head), or (kv head, query tile, seq) with HEADS_FIRST: BLOCK_T new tokens x
    GROUP query heads of one sequence.

    Row r of the tile is token tile * BLOCK_T + r // GROUP, query head kv_head * GROUP + r % GROUP.
    """
    seq, kv_head = _grid_seq_and_head(0, 2, HEADS_FIRST)
    first = tl.program_id(1) * BLOCK_T
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if first >= query_len:
        return
    context = tl.load(seq_lens_ptr + seq) - query_len  # cached prefix before the first new token
    if KV_FP8:
        qk_scale = qk_scale * tl.load(kv_scale_ptr)

    r = tl.arange(0, BLOCK_M)
    token = first + r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_ok = (r < BLOCK_T * GROUP) & (token < query_len)
    row_pos = context + token
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + token).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)

    # Positions up to the tile's first token are visible to every row; the rest form the causal band.
    unmasked_end = tl.maximum(context + first + 1, 0) // BLOCK_N * BLOCK_N
    kv_end = context + tl.minimum(first + BLOCK_T, query_len)
    start = 0
    unmasked_start = 0
    if WINDOW:
        # Key tiles from the first key the tile's first token sees, each either seen by every row (from the
        # last token's first key up to the first token) or masked: the window's lower band below, the
        # causal band above. Differences are clamped to >= 0 before they are divided, so that whether
        # integer division truncates or floors never matters.
        start = tl.maximum(context + first - window + 1, 0)
        all_from = tl.maximum(kv_end - window, start)  # the last token's first key
        unmasked_start = tl.minimum(start + tl.cdiv(all_from - start, BLOCK_N) * BLOCK_N, kv_end)
        unmasked_end = start + tl.maximum(context + first + 1 - start, 0) // BLOCK_N * BLOCK_N
        unmasked_end = tl.maximum(unmasked_end, unmasked_start)
    m_i, l_i, acc = _attend_context(
        q, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, kv_head, start, unmasked_start, unmasked_end, kv_end,
        row_pos, qk_scale, window, softcap, stride_bt, stride_cache_block, stride_cache_slot, stride_cache_head,
        BLOCK_M, PAGE_SIZE, HEAD_DIM, BLOCK_N, WINDOW, SOFTCAP, DOT_DTYPE, DOT_PRECISION,
    )  # fmt: skip

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i == 0 only for rows with no context (padding)
    if KV_FP8:
        out = out * tl.load(kv_scale_ptr + 1)
    o_rows = (q_start + token).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _split_bounds(seq_len, split, window, NUM_SPLITS: tl.constexpr, SPLIT_TOKENS: tl.constexpr, WINDOW: tl.constexpr):
    """Context positions [start, end) of one decode split: equal shares, each a multiple of SPLIT_TOKENS, of
    the keys the token sees: its whole context, or with WINDOW the last `window` positions of it."""
    if WINDOW:
        first = tl.maximum(seq_len - window, 0)
    else:
        first = 0
    share = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), SPLIT_TOKENS) * SPLIT_TOKENS
    start = first + split * share
    return start, tl.minimum(start + share, seq_len)


@triton.jit
def _decode_split_kernel(
    out_ptr,
    partial_m_ptr,
    partial_l_ptr,
    partial_acc_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    kv_scale_ptr,
    qk_scale,
    window,
    softcap,
    num_heads,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    """Grid (seq, kv head, split), or (kv head, seq, split) with HEADS_FIRST: the GROUP query heads of one
    decode token over one share of its context.

    Writes the split's running max and sum [seq, head, split] and its unnormalised output
    [seq, head, split, :]. An empty split (short context, padding) writes nothing: the reduce skips it.
    With one split there is nothing to combine: the program normalises and writes the output rows itself
    (zero rows for a sequence of no context) and no reduce kernel runs.
    With WINDOW the shares cover only the window, all of which the token sees: no mask beyond the context's
    end, and the blocks before the window are never read.
    """
    seq, kv_head = _grid_seq_and_head(0, 1, HEADS_FIRST)
    split = tl.program_id(2)
    token = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - token
    seq_len = tl.load(seq_lens_ptr + seq)
    start, end = _split_bounds(seq_len, split, window, NUM_SPLITS, SPLIT_TOKENS, WINDOW)
    if (query_len == 0) | ((start >= end) & (NUM_SPLITS > 1)):
        return
    unmasked_end = start + (end - start) // BLOCK_N * BLOCK_N

    r = tl.arange(0, BLOCK_H)
    row_ok = r < GROUP
    head = kv_head * GROUP + r
    dims = tl.arange(0, HEAD_DIM)
    row_pos = tl.zeros([BLOCK_H], tl.int32) + seq_len - 1
    q_rows = token.to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(kv_scale_ptr)

    m_i, l_i, acc = _attend_context(
        q, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, kv_head, start, start, unmasked_end, end, row_pos,
        qk_scale, window, softcap, stride_bt, stride_cache_block, stride_cache_slot, stride_cache_head,
        BLOCK_H, PAGE_SIZE, HEAD_DIM, BLOCK_N, False, SOFTCAP, DOT_DTYPE, DOT_PRECISION,
    )  # fmt: skip
    if KV_FP8:
        acc = acc * tl.load(kv_scale_ptr + 1)  # the reduce is linear in the partial outputs
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_rows = token.to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        return

    stat_offsets = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + split
    tl.store(partial_m_ptr + stat_offsets, m_i, mask=row_ok)
    tl.store(partial_l_ptr + stat_offsets, l_i, mask=row_ok)
    tl.store(partial_acc_ptr + stat_offsets[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    partial_m_ptr,
    partial_l_ptr,
    partial_acc_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    window,
    num_heads,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Grid (seq, head): rescale the non-empty splits' partials to their common max and normalise.

    A sequence of no context (padding) has no non-empty split and gets a zero row.
    """
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) <= token:
        return
    split = tl.arange(0, NUM_SPLITS)
    start, end = _split_bounds(tl.load(seq_lens_ptr + seq), split, window, NUM_SPLITS, SPLIT_TOKENS, WINDOW)
    used = start < end
    splits = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + split
    dims = tl.arange(0, HEAD_DIM)
    m = tl.load(partial_m_ptr + splits, mask=used, other=_M_INIT)
    weight = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(tl.load(partial_l_ptr + splits, mask=used, other=0.0) * weight, 0)
    acc = tl.load(partial_acc_ptr + splits[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch knobs of an attention kernel."""

    block_m: int  # query rows (tokens x heads) per program; decode: head rows
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int
    heads_first: bool = True  # launch order: the KV heads of a sequence side by side (_grid_seq_and_head)

    def grid_axes(self, num_seqs: int, num_kv_heads: int) -> tuple[int, int]:
        """Sizes of the sequence and KV-head grid axes in the order the kernels read them."""
        return (num_kv_heads, num_seqs) if self.heads_first else (num_seqs, num_kv_heads)


def prefill_config(head_dim: int) -> TileConfig:
    """Hopper defaults, the fastest across a sweep on an H200 (benchmarks/attention_sweep.py: steps of 8,192
    tokens as 16 prompts of 512, or one of 7,680 and the next one's first chunk, GQA 4): 64-row query tiles
    of 4 warps; larger heads take narrower key tiles to fit registers."""
    if head_dim <= 64:
        return TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    if head_dim <= 128:
        return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return TileConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


def decode_config(head_dim: int) -> TileConfig:
    """Head rows padded to at least 16, the smallest tl.dot tile. Decode is bound by reading K/V: on an H200
    (same sweep: 256 contexts of 640, 64 of 8,192) these tiles read it at 3.3-4.1 TB/s for 64-wide heads and
    3.9-4.3 TB/s for 128-wide ones, against a copy ceiling of 4.25 TB/s."""
    return TileConfig(
        block_m=16,
        block_n=128 if head_dim <= 64 else 64 if head_dim <= 128 else 32,
        num_warps=4,
        num_stages=2,
    )


def decode_splits(max_model_len: int, programs: int | None = None, num_sms: int = 1,
                  split_tokens: int = _SPLIT_TOKENS) -> int:
    """Splits of the decode kernel: a power of two (the reduce kernel's arange) set by the longest context,
    and, when the (sequence, KV head) programs already fill the multiprocessors twice over, no more than
    that needs: a big batch gains nothing from splitting and pays for the reduction."""
    wanted = math.ceil(max_model_len / split_tokens)
    if programs is not None:
        wanted = min(wanted, math.ceil(2 * num_sms / max(programs, 1)))
    return min(_MAX_DECODE_SPLITS, triton.next_power_of_2(max(1, wanted)))


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_INTERPRETED = type(_prefill_kernel).__name__ == "InterpretedFunction"


def _dot_args(dtype: torch.dtype) -> dict[str, object]:
    """tl.dot's operand dtype and precision for inputs of `dtype`.

    Operands stay in the input dtype, except under the Triton interpreter, whose dot multiplies bfloat16
    values as raw integers (numpy has no bfloat16): there they go to float32, where products of 16-bit
    floats are exact, so only the summation order differs. fp32 inputs get full-precision dots (tl.dot
    would otherwise round them to tf32).
    """
    return {
        "DOT_DTYPE": tl.float32 if _INTERPRETED else _TL_DTYPES[dtype],
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


@functools.cache
def _unit_scales(device: torch.device) -> torch.Tensor:
    """k_scale = v_scale = 1 for an fp8 cache given no scales: made once per device, so that no launch
    (a captured one least of all) allocates it."""
    return torch.ones(2, dtype=torch.float32, device=device)


def _kv_scale_arg(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """The kernels' scale pointer and KV_FP8 flag. A 16/32-bit cache passes None, which Triton takes as a
    constexpr that the kernel never reads, so its compiled code is the one it had before scales existed."""
    if not _is_fp8(kv_cache.dtype):
        return None, False
    if kv_scale is None:
        return _unit_scales(kv_cache.device), True
    if kv_scale.dtype != torch.float32 or kv_scale.shape != (2,) or kv_scale.stride(0) != 1:
        raise ValueError(f"kv_scale must be a contiguous float32 [2], got {kv_scale.dtype} {tuple(kv_scale.shape)}")
    if kv_scale.device != kv_cache.device:
        raise ValueError(f"kv_scale is on {kv_scale.device}, the KV cache on {kv_cache.device}")
    return kv_scale, True


def _fp8_grid(dtype: torch.dtype) -> dict[str, object]:
    """The write kernel's description of an fp8 type (see _round_to_fp8_grid); fixed values for other
    dtypes, which never read them, so that they add no compiled variants."""
    if not _is_fp8(dtype):
        return {"FP8_MAX": 0.0, "MANTISSA_BITS": 0, "MIN_EXPONENT": 0}
    info = torch.finfo(dtype)
    return {
        "FP8_MAX": info.max,
        "MANTISSA_BITS": round(-math.log2(info.eps)),
        "MIN_EXPONENT": round(math.log2(info.tiny)),  # of the smallest normal
    }


def _score_args(scale: float, window: int | None, softcap: float | None) -> dict[str, object]:
    """The attention kernels' score scale, window and cap, and their WINDOW / SOFTCAP flags.

    Scores are in the log2 domain: qk_scale is scale * log2(e), or with a cap scale / softcap (tanh's
    argument, in the natural domain) and softcap * log2(e) multiplies tanh's value. What a layer does not
    use is passed as None, a constexpr the kernel never reads, so layers without a window or cap compile
    to the code they had before either existed. Both are per-layer constants, fixed in a captured graph.
    """
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        window = int(window)
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be positive and finite, got {softcap!r}")
    return {
        "qk_scale": scale * _LOG2E if softcap is None else scale / softcap,
        "window": window,
        "softcap": None if softcap is None else softcap * _LOG2E,
        "WINDOW": window is not None,
        "SOFTCAP": softcap is not None,
    }


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_shapes(query: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int]:
    """(GQA group size, page size), after checking what the kernels assume of the shapes."""
    num_heads, head_dim = query.shape[1:]
    _, _, page_size, num_kv_heads, cache_head_dim = kv_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads}x{head_dim} do not fit cache heads {num_kv_heads}x{cache_head_dim}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    return num_heads // num_kv_heads, page_size


def _check_out(out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    if out.shape != query.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(query.shape)} with a contiguous last dim")
    return out


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scale: torch.Tensor | None = None) -> None:
    """Store key/value [tokens, kv_heads, head_dim] at slot_mapping[:tokens]; slot -1 writes nothing.

    An fp8 cache gets clamp(key / kv_scale[0]) and clamp(value / kv_scale[1]) (scales of 1 when None),
    rounded to nearest even: bit for bit what torch's cast of the same float32 quotient gives.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    scale_ptr, fp8 = _kv_scale_arg(kv_cache, kv_scale)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, scale_ptr, num_kv_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        PAGE_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_HEADS=triton.next_power_of_2(num_kv_heads),
        KV_FP8=fp8, **_fp8_grid(kv_cache.dtype),
    )  # fmt: skip


def prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    config: TileConfig | None = None,
    out: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of every new token over its cached prefix and the new tokens (K/V already written).

    Writes every row of `out` (allocated when None) that belongs to a sequence; every token must belong to
    one, as in the reference. A sequence of no context and one padding token gets a zero row. An fp8
    cache is read as its values times kv_scale (1 when None). `window` and `softcap` as in
    Attention.forward: no block wholly before a tile's first token's window is read.
    """
    query = _last_dim_contiguous(query)
    _, num_heads, head_dim = query.shape
    group, page_size = _check_shapes(query, kv_cache)
    config = config or prefill_config(head_dim)
    block_m = max(config.block_m, triton.next_power_of_2(group))
    block_t = block_m // group
    out = torch.empty_like(query) if out is None else _check_out(out, query)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    scale_ptr, fp8 = _kv_scale_arg(kv_cache, kv_scale)
    first, last = config.grid_axes(meta.num_seqs, num_heads // group)
    grid = (first, max(1, triton.cdiv(meta.max_query_len, block_t)), last)
    _prefill_kernel[grid](
        out, query, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale_ptr,
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_bt=meta.block_tables.stride(0), stride_cache_block=k_cache.stride(0),
        stride_cache_slot=k_cache.stride(1), stride_cache_head=k_cache.stride(2),
        GROUP=group, PAGE_SIZE=page_size, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_T=block_t,
        BLOCK_N=config.block_n, KV_FP8=fp8, **_score_args(scale, window, softcap), **_dot_args(query.dtype),
        HEADS_FIRST=config.heads_first, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_splits: int,
    config: TileConfig | None = None,
    out: torch.Tensor | None = None,
    split_tokens: int = _SPLIT_TOKENS,
    kv_scale: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """At most one new token per sequence, over num_splits shares of each context (a power of two), each
    a multiple of split_tokens long; with a `window`, shares of the window's span only (and `softcap` as
    in Attention.forward).

    Launch shapes depend only on tensor shapes and num_splits, never on tensor contents (kv_scale
    included: the kernel reads it from the device), so the call can be captured in a CUDA graph. Sequences
    of no context (padding) get zero rows. Rows of tokens that belong to no sequence are left as they are
    in `out`; when `out` is None (allocated here, not zeroed: that would cost a kernel a layer) every token
    must belong to a sequence, as the model runner's padding sequences of one token each do. An fp8 cache
    is read as its values times kv_scale.
    """
    query = _last_dim_contiguous(query)
    _, num_heads, head_dim = query.shape
    group, page_size = _check_shapes(query, kv_cache)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    config = config or decode_config(head_dim)
    block_h = max(config.block_m, triton.next_power_of_2(group))
    num_seqs = meta.num_seqs
    out = torch.empty_like(query) if out is None else _check_out(out, query)
    stats = torch.empty(2, num_seqs, num_heads, num_splits, device=query.device, dtype=torch.float32)
    partial_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, device=query.device, dtype=torch.float32)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    scale_ptr, fp8 = _kv_scale_arg(kv_cache, kv_scale)
    score_args = _score_args(scale, window, softcap)
    _decode_split_kernel[(*config.grid_axes(num_seqs, num_heads // group), num_splits)](
        out, stats[0], stats[1], partial_acc, query, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
        meta.seq_lens, scale_ptr, num_heads=num_heads, stride_qt=query.stride(0), stride_qh=query.stride(1),
        stride_ot=out.stride(0), stride_oh=out.stride(1), stride_bt=meta.block_tables.stride(0),
        stride_cache_block=k_cache.stride(0), stride_cache_slot=k_cache.stride(1),
        stride_cache_head=k_cache.stride(2), GROUP=group, PAGE_SIZE=page_size, HEAD_DIM=head_dim, BLOCK_H=block_h,
        BLOCK_N=config.block_n, NUM_SPLITS=num_splits, SPLIT_TOKENS=split_tokens, KV_FP8=fp8, **score_args,
        **_dot_args(query.dtype), HEADS_FIRST=config.heads_first, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, stats[0], stats[1], partial_acc, meta.query_start_loc, meta.seq_lens, score_args["window"],
            num_heads, out.stride(0), out.stride(1), HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            SPLIT_TOKENS=split_tokens, WINDOW=score_args["WINDOW"],
        )  # fmt: skip
    return out


class TritonPagedAttention(Attention):
    """Paged attention on NVIDIA GPUs: write K/V, then the decode kernel when every sequence has at most
    one new token, the prefill kernel otherwise. A cache of an fp8 dtype is kept scaled by kv_scale."""

    def __init__(
        self,
        max_model_len: int,
        prefill_tiles: Callable[[int], TileConfig] = prefill_config,
        decode_tiles: Callable[[int], TileConfig] = decode_config,
    ) -> None:
        """The tile functions (head_dim -> TileConfig) are the one thing a vendor tunes: ROCm passes its own."""
        self.max_model_len = max_model_len
        self.prefill_tiles = prefill_tiles
        self.decode_tiles = decode_tiles
        self.num_sms: int | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        write_kv(key, value, kv_cache, meta.slot_mapping, kv_scale)
        if meta.max_query_len <= 1:
            splits, split_tokens = self.split_plan(meta.num_seqs * kv_cache.shape[3], window, query.device)
            return decode_attention(query, kv_cache, meta, scale, splits, self.decode_tiles(query.shape[-1]),
                                    split_tokens=split_tokens, kv_scale=kv_scale, window=window, softcap=softcap)
        return prefill_attention(query, kv_cache, meta, scale, self.prefill_tiles(query.shape[-1]),
                                 kv_scale=kv_scale, window=window, softcap=softcap)

    def split_plan(self, programs: int, window: int | None, device: torch.device) -> tuple[int, int]:
        """(splits, split tokens) of a decode step of `programs` (sequence, KV head) pairs."""
        if self.num_sms is None:
            on_gpu = device.type == "cuda"
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1
        # A batch too small to fill the GPU cuts contexts into finer shares, so more programs run.
        split_tokens = _SMALL_BATCH_SPLIT_TOKENS if programs < self.num_sms else _SPLIT_TOKENS
        # A sliding window bounds the keys a token sees, hence the splits they need.
        span = self.max_model_len if window is None else min(self.max_model_len, window)
        return decode_splits(span, programs, self.num_sms, split_tokens), split_tokens
