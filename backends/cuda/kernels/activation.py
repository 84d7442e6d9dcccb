"""SiLU-and-multiply of the gated MLP: [tokens, 2 * inter] -> [tokens, inter] in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr):
    """Grid (token, column block). Rounds silu(gate) to the input dtype before the product, as torch does."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same values as paged.models.ops.silu_and_mul: silu(x[..., :inter]) * x[..., inter:]."""
    inter = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], inter, device=x.device, dtype=x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out2 = out.view(-1, inter)
    if x2.shape[0] == 0 or inter == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        out2, x2, inter, x2.stride(0), out2.stride(0), BLOCK=block, num_warps=4
    )
    return out
