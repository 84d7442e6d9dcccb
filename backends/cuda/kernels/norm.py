"""RMSNorm and residual add fused with RMSNorm, one program per row.

Rounding follows paged.models.ops exactly: the residual sum is rounded to its dtype, the norm is computed
in float32, the normalised row is rounded to the input dtype, then multiplied by the weight in the
promoted dtype of (weight, input). Fusing the add saves a full read and write of the hidden state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    out_ptr,
    residual_out_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    hidden,
    eps,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    BLOCK: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
):
    """With ADD_RESIDUAL, normalise x + residual and also store that sum; otherwise normalise x."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        x_dtype = residual_out_ptr.dtype.element_ty
        x = (x + residual).to(x_dtype)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
        x = x.to(tl.float32)
    else:
        x_dtype = x_ptr.dtype.element_ty
    rstd = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    normed = (x * rstd).to(x_dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, hidden] with a contiguous last dim (a view when possible)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    x_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x_dtype))
    new_residual = None if residual is None else torch.empty(x.shape, device=x.device, dtype=x_dtype)
    x2, out2 = _rows(x), out.view(-1, hidden)
    r2 = x2 if residual is None else _rows(residual)
    nr2 = out2 if new_residual is None else new_residual.view(-1, hidden)
    if x2.shape[0] == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        out2, nr2, x2, r2, weight, hidden, eps,
        x2.stride(0), r2.stride(0), out2.stride(0), nr2.stride(0),
        BLOCK=block, ADD_RESIDUAL=residual is not None, num_warps=min(16, max(1, block // 512)),
    )  # fmt: skip
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[..., hidden] -> [..., hidden]; same values as paged.models.ops.rms_norm."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) in one pass; inputs are left untouched."""
    normed, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return normed, new_residual
