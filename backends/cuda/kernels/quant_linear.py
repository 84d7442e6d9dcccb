"""y = x @ W^T from 4- or 8-bit grouped integer weights (paged.quant.matrix.QuantizedMatrix), dequantized in
registers: the weight never exists densely in memory.

Layout. Codes are packed along K into int32 words, code k of a row in bits (k % P) * bits of word k // P
(P = 32 // bits codes a word): GPTQ's order, transposed to one row of words per output. Packing along K
keeps a row's words contiguous, so a GEMV program streams whole cache lines of rows; group sizes are
multiples of P, so the codes of one word always share one scale; and a tile of a K range is one load.
Rows are padded to a multiple of 16 words so that every row starts 64-byte aligned (Triton then
vectorises the loads); padded codes are zero and meet masked-out (zero) inputs, so they add nothing.
With act order (perm) the wrapper gathers x[:, perm] once; the stored columns have contiguous groups.

Codes become floats without a conversion instruction (those run at a quarter of the FMA rate, and a
GEMV is limited by ALU work as much as by bandwidth): a code shifted into the top mantissa bits of 1.0
reads as u = 1 + code / 2**bits, so one shift and one LOP3 give it, and
    (code - zero) * scale = u * S + B,  S = 2**bits * scale,  B = -(2**bits + zero) * scale
(or B = offset - 2**bits * scale): one FMA, exact for float16 scales and integer zeros. u stays within
[1, 2), so the 1 that B cancels is never much larger than the code term and little precision is lost.

Three kernels, chosen by the number of rows of x:
- "gemv", M <= 2 (decode): CUDA cores. A program owns 16 outputs and walks K; for each word it sums
  x * u over the word's P codes, then applies the word's S and B once (B to the sum of x), so a code
  costs a shift, a LOP3 and one FMA per row of x.
- "narrow", M <= 16 (decode batches): tensor cores, without gathering codes. A tile of 16 words per
  output holds P planes (code i of every word); plane i meets x at columns i, i + P, ..., so the tile is
  P tl.dot calls of K = 16, each on codes moved to the top mantissa bits with one constant shift.
- "dense", larger M (prefill, big decode batches): the codes are dequantized into a matrix of x's dtype
  (one pass over the packed words, writing it densely) and cuBLAS multiplies; at these sizes the product
  is compute-bound, and a register-dequantizing GEMM measured 0.03x of cuBLAS.
The narrow kernel rounds each dequantized tile to x's dtype and accumulates in fp32. It and the GEMV
split K when the outputs alone would leave SMs idle: each split writes an fp32 partial result and a
small kernel sums them (deterministic, unlike atomics). Launch shapes depend on tensor shapes only, never
on values, and nothing syncs with the host, so calls can be captured in CUDA graphs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from paged.quant.matrix import QuantizedMatrix

_ONE_BITS = tl.constexpr(0x3F800000)  # the float 1.0
_ROW_ALIGN_WORDS = 16
_GEMV_MAX_M = 2
# Measured on an H200 (benchmarks/RESULTS.md): the narrow kernel reaches 0.7-0.9x of bf16 F.linear's time
# up to 16 rows and falls to 0.15x at 64; above 16 rows dequantizing into a bf16 matrix and handing it to
# cuBLAS (one pass writing it, one reading it) costs less.
_NARROW_MAX_M = 16
_DEQUANT_BLOCK_N = 16
_DEQUANT_BLOCK_K = 128
_GEMV_BLOCK_N = 16
# Elements of a GEMV program's [BLOCK_M, BLOCK_N, BLOCK_KW] tile: 16 a thread at 8 warps, and 16 KiB of
# weight words in flight per program at M = 1, enough (two programs an SM) to cover DRAM latency.
_GEMV_TILE = 4096
_MAX_SPLIT = 16
# Tiles by batch size, (largest M, BLOCK_M, BLOCK_N, num_warps), the first that fits.
_NARROW_TILES = ((16, 16, 128, 8),)
_NARROW_BLOCK_KW = 16  # tl.dot's smallest K
_SUM_BLOCK = 1024
# SMs assumed off a GPU (the interpreter): small, so that test shapes exercise split K.
_INTERPRETER_SMS = 4


@dataclass
class PackedIntWeight:
    """A QuantizedMatrix on the device in the kernels' layout; its memory is the packed codes plus scales.

    group_size is the kernels' group: the checkpoint's, or a finer power of two with scales repeated when
    the checkpoint's is not one (a group of K or more becomes one power-of-two group). Scales and
    zeros/offsets are float16 where that is exact, else float32.
    """

    qweight: torch.Tensor  # int32 [n, row_words]
    scales: torch.Tensor  # float16 or float32 [n, groups]
    bits: int
    group_size: int
    n: int
    k: int
    zeros: torch.Tensor | None = None  # W = (code - zero) * scale
    offsets: torch.Tensor | None = None  # W = code * scale + offset
    perm: torch.Tensor | None = None  # int64 [k]: y = x[:, perm] @ W_stored^T

    @property
    def codes_per_word(self) -> int:
        return 32 // self.bits

    @property
    def k_words(self) -> int:
        """Words of a row that hold codes (the rest of a row is alignment padding)."""
        return triton.cdiv(self.k, self.codes_per_word)

    @property
    def affine(self) -> torch.Tensor:
        return self.zeros if self.zeros is not None else self.offsets

    @property
    def nbytes(self) -> int:
        """Bytes a call reads for the weight: codes, scales and zeros/offsets."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.affine))


@dataclass(frozen=True)
class LinearPlan:
    """How one call is launched; a function of shapes only. block_k counts codes for every kernel."""

    kernel: str  # "gemv", "narrow" or "dense" (see the module docstring)
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def pack_int_weight(matrix: QuantizedMatrix, device: torch.device) -> PackedIntWeight:
    """The kernels' form of `matrix` on `device`; packing runs there, so a GPU packs a big matrix quickly."""
    n, k = matrix.shape
    codes = matrix.codes.to(device)
    if codes.numel() and int(codes.max()) >= 1 << matrix.bits:
        raise ValueError(f"codes do not fit in {matrix.bits} bits")
    group_size, scales, affine = _kernel_groups(matrix)
    affine = {"zeros" if matrix.zeros is not None else "offsets": _compact(affine.to(device))}
    perm = None if matrix.perm is None else matrix.perm.to(device=device, dtype=torch.int64)
    return PackedIntWeight(
        qweight=_pack_codes(codes, matrix.bits), scales=_compact(scales.to(device)), bits=matrix.bits,
        group_size=group_size, n=n, k=k, perm=perm, **affine,
    )  # fmt: skip


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [n, k] -> int32 [n, row_words], code j in bits (j % P) * bits of word j // P.

    Built as bytes (two nibbles, or one code, a byte) and viewed as int32: both CPUs and GPUs are little
    endian, so byte b of a word holds its codes 2b, 2b + 1 (4-bit) or b (8-bit).
    """
    per_word = 32 // bits
    row_codes = triton.cdiv(codes.shape[1], per_word * _ROW_ALIGN_WORDS) * per_word * _ROW_ALIGN_WORDS
    padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, row_codes - codes.shape[1]))
    if bits == 4:
        padded = padded[:, 0::2] | (padded[:, 1::2] << 4)
    return padded.contiguous().view(torch.int32)


def _kernel_groups(matrix: QuantizedMatrix) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(group size, float32 scales, float32 zeros/offsets) with a power-of-two group of at least 16.

    The GEMM's K tile must sit inside one group and be a power of two of at least 16 (tl.dot's minimum),
    so a group size that is not such a power is expressed as finer groups of repeated scales.
    """
    group, k = matrix.group_size, matrix.shape[1]
    scales, affine = matrix.scales.float(), matrix.affine.float()
    if group >= k:
        return max(16, triton.next_power_of_2(k)), scales, affine
    if group % 16:
        raise ValueError(f"group size {group} is not a multiple of 16")
    fine = group & -group
    if fine == group:
        return group, scales, affine
    groups = triton.cdiv(k, fine)
    repeat = group // fine
    return fine, scales.repeat_interleave(repeat, 1)[:, :groups], affine.repeat_interleave(repeat, 1)[:, :groups]


def _compact(t: torch.Tensor) -> torch.Tensor:
    """float16 when every value survives the round trip (half the bytes a GEMV reads for it), else float32."""
    t = t.float().contiguous()
    half = t.half()
    return half if torch.equal(half.float(), t) else t


def plan_linear(m: int, weight: PackedIntWeight, dtype: torch.dtype, num_sms: int) -> LinearPlan:
    """The launch for an [m, k] input of `dtype`. The GEMV pays an FMA per row of x for every code, so
    from three rows on the tensor cores are cheaper even on a tile padded to 16 rows."""
    if m <= _GEMV_MAX_M:
        return _gemv_plan(m, weight, num_sms)
    if m <= _NARROW_MAX_M:
        return _dot_plan("narrow", m, _NARROW_TILES, _NARROW_BLOCK_KW * weight.codes_per_word, weight, dtype, num_sms)
    return LinearPlan("dense", m, weight.n, weight.k, 1, 0, 0)


def _gemv_plan(m: int, weight: PackedIntWeight, num_sms: int) -> LinearPlan:
    block_m = triton.next_power_of_2(m)
    block_kw = min(_GEMV_TILE // (block_m * _GEMV_BLOCK_N), triton.next_power_of_2(weight.k_words))
    block_k = block_kw * weight.codes_per_word
    programs = triton.cdiv(weight.n, _GEMV_BLOCK_N)
    split = _split_k(programs, triton.cdiv(weight.k, block_k), m, weight, num_sms)
    warps = min(8, max(1, block_m * _GEMV_BLOCK_N * block_kw // 512))
    return LinearPlan("gemv", block_m, _GEMV_BLOCK_N, block_k, split, warps, num_stages=2)


def _dot_plan(
    kernel: str, m: int, tiles: tuple, block_k: int, weight: PackedIntWeight, dtype: torch.dtype, num_sms: int
) -> LinearPlan:
    _, block_m, block_n, warps = next(tile for tile in tiles if tile[0] is None or m <= tile[0])
    stages = 3
    if dtype == torch.float32:
        # An IEEE float32 tl.dot runs on the FMA units from registers: larger tiles spill.
        block_m, block_n, warps, stages = 16, 32, 4, 2
    programs = triton.cdiv(m, block_m) * triton.cdiv(weight.n, block_n)
    split = _split_k(programs, triton.cdiv(weight.k, block_k), m, weight, num_sms)
    return LinearPlan(kernel, block_m, block_n, block_k, split, warps, stages)


def _split_k(programs: int, tiles: int, m: int, weight: PackedIntWeight, num_sms: int) -> int:
    """Splits of K: only when the outputs give fewer programs than SMs, to about two programs an SM, and
    never so many that the fp32 partials (8 bytes per output and split: written, then read back) outweigh
    the weight. Rounded so that no split is left without a K tile."""
    if programs >= num_sms:
        return 1
    by_traffic = max(1, weight.k * weight.bits // (64 * m))
    wanted = min(triton.cdiv(2 * num_sms, programs), by_traffic, _MAX_SPLIT, tiles)
    return triton.cdiv(tiles, triton.cdiv(tiles, wanted))


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _unit_bits(moved, BITS: tl.constexpr):
    """u = 1 + code / 2**BITS from words shifted so that the code sits in the top BITS mantissa bits."""
    mask = ((1 << BITS) - 1) << (23 - BITS)
    return ((moved & mask) | _ONE_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _unit_codes_at(words, OFFSET: tl.constexpr, BITS: tl.constexpr):
    """u of the code at bit OFFSET of each word: one (logical) shift, one LOP3."""
    words = words.to(tl.uint32, bitcast=True)
    if OFFSET <= 23 - BITS:
        moved = words << (23 - BITS - OFFSET)
    else:
        moved = words >> (OFFSET - (23 - BITS))
    return _unit_bits(moved, BITS)


@triton.jit
def _unit_affine(scale, affine, BITS: tl.constexpr, ZEROS: tl.constexpr):
    """(S, B) with (code - zero) * scale, or code * scale + offset, equal to u * S + B."""
    unit_scale = scale * (1 << BITS)
    if ZEROS:
        return unit_scale, -((1 << BITS) + affine) * scale
    return unit_scale, affine - unit_scale


@triton.jit
def _store_result(
    y, offs_m, offs_n, out_ptr, partial_ptr, bias_ptr, M, N, split, stride_om,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """y [BLOCK_M, BLOCK_N] (fp32) into out with bias, or, when K is split, into this split's partial."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT:
        rows = (split * M + offs_m).to(tl.int64)
        tl.store(partial_ptr + rows[:, None] * N + offs_n[None, :], y, mask=mask)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _x_plane(x_tile, x_mask, offs, k_left):
    """x_tile[:, offs] as float32 [BLOCK_M, 1, BLOCK_KW], zero at and past k_left.

    Loaded two-dimensional and expanded afterwards, with offsets that do not depend on the loop, so that
    the compiler moves only this small tensor into the weights' layout, never the [BLOCK_M, BLOCK_N,
    BLOCK_KW] products into this load's (which, strided, is not vectorised).
    """
    x = tl.load(x_tile + offs[None, :], mask=x_mask & (offs < k_left)[None, :], other=0.0)
    return x.to(tl.float32)[:, None, :]


@triton.jit
def _word_affine(
    scales_ptr, affine_ptr, rows_n, first_word, k_words, N, stride_sn,
    BITS: tl.constexpr, GROUP: tl.constexpr, ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
    RUNS: tl.constexpr, RUN: tl.constexpr,
):  # fmt: skip
    """S and B [1, BLOCK_N, RUNS * RUN] of the words of a tile: the tile is RUNS runs of RUN words, each
    inside one group, so each (output, run) loads its scale once and repeats it over its words (a gather
    per word would cost as many instructions as the codes themselves)."""
    starts = first_word + tl.arange(0, RUNS) * RUN
    offs = rows_n * stride_sn + (starts // (GROUP // (32 // BITS)))[None, None, :]
    mask = (rows_n < N) & (starts < k_words)[None, None, :]
    scale = tl.load(scales_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    affine = tl.load(affine_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    unit_scale, unit_bias = _unit_affine(scale, affine, BITS, ZEROS)
    unit_scale = tl.broadcast_to(unit_scale[:, :, :, None], [1, BLOCK_N, RUNS, RUN])
    unit_bias = tl.broadcast_to(unit_bias[:, :, :, None], [1, BLOCK_N, RUNS, RUN])
    return tl.reshape(unit_scale, [1, BLOCK_N, RUNS * RUN]), tl.reshape(unit_bias, [1, BLOCK_N, RUNS * RUN])


@triton.jit
def _gemv_kernel(
    out_ptr, partial_ptr, x_ptr, w_ptr, scales_ptr, affine_ptr, bias_ptr,
    M, N, K, k_words, tiles_per_split, stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUNS: tl.constexpr, RUN: tl.constexpr,
):  # fmt: skip
    """Grid (output blocks, K splits): outputs [BLOCK_N] for all M <= BLOCK_M rows over one share of K, in
    tiles of RUNS * RUN words.

    Tensors are [rows of x, outputs, words]; the word axis is summed once at the end, so the loop does no
    cross-thread reduction. A word's S and B multiply its sums of x * u and of x, not each code.
    """
    tl.static_assert((GROUP // (32 // BITS)) % RUN == 0)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]
    cols = tl.arange(0, RUNS * RUN)
    x_rows = x_ptr + tl.arange(0, BLOCK_M).to(tl.int64)[:, None] * stride_xm
    x_mask = (tl.arange(0, BLOCK_M) < M)[:, None]
    x_offs = cols * (32 // BITS)
    acc = tl.zeros([BLOCK_M, BLOCK_N, RUNS * RUN], tl.float32)
    for t in range(0, tiles_per_split):
        first_word = (split * tiles_per_split + t) * (RUNS * RUN)
        kw = first_word + cols
        w_mask = (rows_n < N) & (kw < k_words)[None, None, :]
        words = tl.load(w_ptr + rows_n * stride_wn + kw[None, None, :], mask=w_mask, other=0)
        unit_scale, unit_bias = _word_affine(
            scales_ptr, affine_ptr, rows_n, first_word, k_words, N, stride_sn, BITS, GROUP, ZEROS, BLOCK_N, RUNS, RUN
        )  # fmt: skip
        k0 = first_word * (32 // BITS)
        x = _x_plane(x_rows + k0, x_mask, x_offs, K - k0)
        word_sum = x * _unit_codes_at(words, 0, BITS)
        x_sum = x
        for i in tl.static_range(1, 32 // BITS):
            x = _x_plane(x_rows + k0, x_mask, x_offs + i, K - k0)
            word_sum += x * _unit_codes_at(words, i * BITS, BITS)
            x_sum += x
        acc += word_sum * unit_scale + x_sum * unit_bias
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _store_result(
        tl.sum(acc, axis=2), offs_m, offs_n, out_ptr, partial_ptr, bias_ptr, M, N, split, stride_om, HAS_BIAS, SPLIT
    )  # fmt: skip


@triton.jit
def _tile_affine(
    scales_ptr, affine_ptr, offs_n, n_mask, first_word, kw, k_words, stride_sn,
    BITS: tl.constexpr, GROUP: tl.constexpr, ZEROS: tl.constexpr, BLOCK_KW: tl.constexpr,
):  # fmt: skip
    """S and B for a [BLOCK_KW, BLOCK_N] tile of words starting at first_word: one row of them when the
    tile lies in one group (the common case, 16 words of 128 4-bit codes), else one per word. A tile past
    K (a split's leftover) reads the last group; its x is zero."""
    if BLOCK_KW <= GROUP // (32 // BITS):
        offs = offs_n * stride_sn + tl.minimum(first_word, k_words - 1) // (GROUP // (32 // BITS))
        scale = tl.load(scales_ptr + offs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        affine = tl.load(affine_ptr + offs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    else:
        offs = offs_n[None, :] * stride_sn + (kw // (GROUP // (32 // BITS)))[:, None]
        mask = (kw < k_words)[:, None] & n_mask[None, :]
        scale = tl.load(scales_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        affine = tl.load(affine_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return _unit_affine(scale, affine, BITS, ZEROS)


@triton.jit
def _narrow_kernel(
    out_ptr, partial_ptr, x_ptr, w_ptr, scales_ptr, affine_ptr, bias_ptr,
    M, N, K, k_words, tiles_per_split, stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (output tiles, K splits): per tile of BLOCK_KW words, one tl.dot per code plane (see the module
    docstring). The words load once and vectorised; x is read at stride P, which costs little while
    x has few rows."""
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_n = tl.program_id(0) // num_m
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_KW)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    m_mask = (offs_m < M)[:, None]
    n_mask = offs_n < N
    x_offs = cols * (32 // BITS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(0, tiles_per_split):
        first_word = (split * tiles_per_split + t) * BLOCK_KW
        kw = first_word + cols
        w_mask = (kw < k_words)[:, None] & n_mask[None, :]
        words = tl.load(w_ptr + offs_n[None, :] * stride_wn + kw[:, None], mask=w_mask, other=0)
        unit_scale, unit_bias = _tile_affine(
            scales_ptr, affine_ptr, offs_n, n_mask, first_word, kw, k_words, stride_sn, BITS, GROUP, ZEROS, BLOCK_KW
        )  # fmt: skip
        k0 = first_word * (32 // BITS)
        for i in tl.static_range(32 // BITS):
            x_mask = m_mask & (x_offs + i < K - k0)[None, :]
            x = tl.load(x_rows + k0 + (x_offs + i)[None, :], mask=x_mask, other=0.0)
            w = _unit_codes_at(words, i * BITS, BITS) * unit_scale + unit_bias
            w = w.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
            acc = tl.dot(x.to(DOT_DTYPE), w, acc, input_precision=DOT_PRECISION)
    _store_result(acc, offs_m, offs_n, out_ptr, partial_ptr, bias_ptr, M, N, split, stride_om, HAS_BIAS, SPLIT)


@triton.jit
def _dequantize_kernel(
    out_ptr, w_ptr, scales_ptr, affine_ptr, N, K, stride_wn, stride_sn, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Grid (output blocks, column blocks): W [N, K] in out's dtype, as QuantizedMatrix.dequantize computes it
    (float32, then rounded once). Each column reads its code's word (a word's P columns hit it in L1), so
    the stores, which carry P times the bytes of the loads, stay contiguous; BLOCK_K <= GROUP gives the
    tile one scale per row."""
    P: tl.constexpr = 32 // BITS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n[:, None] < N
    mask = n_mask & (cols[None, :] < K)
    rows = offs_n.to(tl.int64)[:, None]
    words = tl.load(w_ptr + rows * stride_wn + (cols // P)[None, :], mask=mask, other=0)
    codes = ((words >> ((cols % P) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    group = rows * stride_sn + k0 // GROUP
    scale = tl.load(scales_ptr + group, mask=n_mask, other=0.0).to(tl.float32)
    affine = tl.load(affine_ptr + group, mask=n_mask, other=0.0).to(tl.float32)
    if ZEROS:
        w = (codes - affine) * scale
    else:
        w = codes * scale + affine
    tl.store(out_ptr + rows * stride_on + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(
    out_ptr, partial_ptr, bias_ptr, M, N, splits, stride_om, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    """Grid (rows, output blocks): out = sum of the K splits' partials + bias, in a fixed order."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, splits):
        acc += tl.load(partial_ptr + (s * M + row).to(tl.int64) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_INTERPRETED = type(_dequantize_kernel).__name__ == "InterpretedFunction"


def _dot_args(dtype: torch.dtype) -> dict[str, object]:
    """tl.dot's operand dtype and precision: x's dtype, except under the interpreter, whose dot multiplies
    bfloat16 as raw integers; there operands go to float32 after rounding to x's dtype (products of 16-bit
    floats are exact in float32). float32 x gets full-precision dots instead of tf32."""
    return {
        "DOT_DTYPE": tl.float32 if _INTERPRETED else _TL_DTYPES[dtype],
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def int_linear(
    x: torch.Tensor, weight: PackedIntWeight, bias: torch.Tensor | None = None, plan: LinearPlan | None = None
) -> torch.Tensor:
    """x [..., k] (bfloat16, float16 or float32) @ W^T + bias -> [..., n] in x's dtype.

    `plan` overrides the launch heuristic (tests and tuning); by default it follows from the shapes, so a
    call can be captured in a CUDA graph once it has run (and compiled) outside one.
    """
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"int_linear takes bfloat16, float16 or float32 inputs, not {x.dtype}")
    if x.shape[-1] != weight.k:
        raise ValueError(f"input of {x.shape[-1]} features for a weight of {weight.k}")
    rows = x.reshape(-1, weight.k)
    if weight.perm is not None:
        rows = rows.index_select(1, weight.perm)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], weight.n, device=x.device, dtype=x.dtype)
    if rows.shape[0]:
        plan = plan or plan_linear(rows.shape[0], weight, x.dtype, _sm_count(x.device))
        if plan.kernel == "dense":
            out = F.linear(rows, dequantize_int_weight(weight, x.dtype), bias)
        else:
            _launch(rows, weight, bias, out, plan)
    return out.view(*x.shape[:-1], weight.n)


def dequantize_int_weight(weight: PackedIntWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense W [n, k] (stored column order) in `dtype`, written in one pass."""
    out = torch.empty(weight.n, weight.k, device=weight.qweight.device, dtype=dtype)
    block_k = min(_DEQUANT_BLOCK_K, weight.group_size)
    grid = (triton.cdiv(weight.n, _DEQUANT_BLOCK_N), triton.cdiv(weight.k, block_k))
    _dequantize_kernel[grid](
        out, weight.qweight, weight.scales, weight.affine, weight.n, weight.k, weight.qweight.stride(0),
        weight.scales.stride(0), out.stride(0), BITS=weight.bits, GROUP=weight.group_size,
        ZEROS=weight.zeros is not None, BLOCK_N=_DEQUANT_BLOCK_N, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out


def _gemv_runs(plan: LinearPlan, weight: PackedIntWeight) -> dict[str, int]:
    """The GEMV's K tile as RUNS runs of RUN words: a group's words, or the whole tile when it is shorter."""
    tile_words = plan.block_k // weight.codes_per_word
    run = min(tile_words, weight.group_size // weight.codes_per_word)
    return {"RUNS": tile_words // run, "RUN": run}


def _launch(
    x: torch.Tensor, weight: PackedIntWeight, bias: torch.Tensor | None, out: torch.Tensor, plan: LinearPlan
) -> None:
    m, n, k = x.shape[0], weight.n, weight.k
    tiles_per_split = triton.cdiv(triton.cdiv(k, plan.block_k), plan.split_k)
    split = plan.split_k > 1
    partial = torch.empty(plan.split_k, m, n, device=x.device, dtype=torch.float32) if split else out
    bias_arg = out if bias is None else bias
    flags = dict(
        BITS=weight.bits,
        GROUP=weight.group_size,
        ZEROS=weight.zeros is not None,
        HAS_BIAS=bias is not None,
        SPLIT=split,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    tensors = (out, partial, x, weight.qweight, weight.scales, weight.affine, bias_arg)
    strides = (x.stride(0), weight.qweight.stride(0), weight.scales.stride(0), out.stride(0))
    grid = (triton.cdiv(m, plan.block_m) * triton.cdiv(n, plan.block_n), plan.split_k)
    if plan.kernel == "gemv":
        _gemv_kernel[(triton.cdiv(n, plan.block_n), plan.split_k)](
            *tensors, m, n, k, weight.k_words, tiles_per_split, *strides, **_gemv_runs(plan, weight), **flags,
        )  # fmt: skip
    elif plan.kernel == "narrow":
        _narrow_kernel[grid](
            *tensors, m, n, k, weight.k_words, tiles_per_split, *strides,
            BLOCK_KW=plan.block_k // weight.codes_per_word, **_dot_args(x.dtype), **flags,
        )  # fmt: skip
    else:
        raise ValueError(f"no kernel {plan.kernel!r}")
    if split:
        _sum_splits_kernel[(m, triton.cdiv(n, _SUM_BLOCK))](
            out, partial, bias_arg, m, n, plan.split_k, out.stride(0), HAS_BIAS=bias is not None, BLOCK=_SUM_BLOCK,
        )  # fmt: skip
