"""A GEMV from FP8 weights for the one or two rows of a decode step: y = x @ (W * scale)^T.

torch._scaled_mm runs cuBLAS's FP8 GEMM, whose tiles waste most of their work on a single row and which
first needs the row quantized; here each program reads 16 output rows of FP8 weights once, widens them
in registers and multiplies the row(s) of x as they are (so the product is also weight-only: W8A16),
bound by the weight's bytes, half of bfloat16's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 2
_BLOCK_N = 8
_BLOCK_K = 512


@triton.jit
def _fp8_gemv_kernel(out_ptr, x_ptr, w_ptr, scale_ptr, bias_ptr, N, K, stride_xm, stride_wn, stride_om,
                     HAS_BIAS: tl.constexpr, TWO_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each program: BLOCK_N outputs. Products accumulate elementwise in a [BLOCK_N, BLOCK_K] tile and are
    summed across K once at the end, so the loop body is loads and FMAs, with no reduction between threads."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc0 += w * tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        if TWO_ROWS:
            acc1 += w * tl.load(x_ptr + stride_xm + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    y0 = tl.sum(acc0, axis=1) * scale
    y1 = tl.sum(acc1, axis=1) * scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y0 += bias
        y1 += bias
    tl.store(out_ptr + offs_n, y0.to(out_ptr.dtype.element_ty), mask=n_mask)
    if TWO_ROWS:
        tl.store(out_ptr + stride_om + offs_n, y1.to(out_ptr.dtype.element_ty), mask=n_mask)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [m <= MAX_ROWS, k] @ (weight [n, k] fp8 * scale [n] float32)^T + bias -> [m, n] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _fp8_gemv_kernel[(triton.cdiv(n, _BLOCK_N),)](
        out, x, weight, scale, out if bias is None else bias, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, TWO_ROWS=m == 2, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=4, num_stages=3,
    )
    return out
