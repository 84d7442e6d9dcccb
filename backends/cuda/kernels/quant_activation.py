"""Per-token symmetric quantization of activations for W8A8 products, one program per row.

torch would make five passes over the activations (widen, abs, amax, divide and clamp, narrow); here a
row of up to _ONE_PASS_MAX values is read once into registers (a decode step's single row is then one
short program, not a loop), longer rows twice. The division is IEEE's (div_rn), as torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ONE_PASS_MAX = 32768
_BLOCK = 4096


@triton.jit
def _narrow(x, scale, top, ROUND: tl.constexpr):
    x = tl.math.div_rn(x, scale)
    x = tl.minimum(tl.maximum(x, -top), top)
    if ROUND:  # to nearest, ties to even, as torch.round: adding 1.5 * 2**23 leaves no fraction bits
        x = (x + 12582912.0) - 12582912.0
    return x


@triton.jit
def _quantize_rows_kernel(out_ptr, scale_ptr, x_ptr, static_ptr, cols, stride_x, stride_out, top,
                          STATIC: tl.constexpr, ROUND: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    x_row, out_row = x_ptr + row * stride_x, out_ptr + row * stride_out
    if ONE_PASS:
        mask = offsets < cols
        x = tl.load(x_row + offsets, mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(static_ptr)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-10) / top
        tl.store(scale_ptr + row, scale)
        tl.store(out_row + offsets, _narrow(x, scale, top, ROUND).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if STATIC:
            scale = tl.load(static_ptr)
        else:
            largest = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, cols, BLOCK):
                x = tl.load(x_row + start + offsets, mask=start + offsets < cols, other=0.0)
                largest = tl.maximum(largest, tl.abs(x.to(tl.float32)))
            scale = tl.maximum(tl.max(largest, 0), 1e-10) / top
        tl.store(scale_ptr + row, scale)
        for start in range(0, cols, BLOCK):
            mask = start + offsets < cols
            x = tl.load(x_row + start + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + start + offsets, _narrow(x, scale, top, ROUND).to(out_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, static: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale in `dtype` (float8_e4m3fn or int8), scale [rows, 1] float32), as
    paged.backends.common.quant_linear.quantize_per_token computes them."""
    rows, cols = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, cols, dtype=dtype, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    top = torch.finfo(dtype).max if dtype.is_floating_point else float(torch.iinfo(dtype).max)
    one_pass = cols <= _ONE_PASS_MAX
    block = triton.next_power_of_2(cols) if one_pass else _BLOCK
    _quantize_rows_kernel[(rows,)](out, scale, x, scale if static is None else static, cols, x.stride(0),
                                   out.stride(0), top, STATIC=static is not None,
                                   ROUND=not dtype.is_floating_point, ONE_PASS=one_pass, BLOCK=block,
                                   num_warps=min(16, max(4, block // 1024)))
    return out, scale
