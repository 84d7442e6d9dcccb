"""LinearKernels in plain torch that any backend can offer for quantized weights (backends/interface.py).

- DequantizingLinear: weight-only; widens the whole matrix to the activations' dtype at each call and
  multiplies densely. The weights stay quantized in memory; the product costs a dense one plus the widening.
  It is the CPU backend's path for every form, and a GPU's for FP8 where it has no FP8 units.
- Int8Linear: INT8 W8A8 through torch._int_mm (or exact float32 blocks where that is inexact), each token's
  activations quantized with a scale of its own.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from paged.backends.interface import LinearKernel
from paged.quant.matrix import QuantizedMatrix, ScaledMatrix


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype, static: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale as `dtype`, scale [M, 1] float32): symmetric, one scale per row from its largest magnitude,
    or the checkpoint's static scale for every row."""
    top = torch.finfo(dtype).max if dtype.is_floating_point else float(torch.iinfo(dtype).max)
    x32 = x.float()
    if static is None:
        scale = x32.abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / top
    else:
        scale = static.reshape(1, 1).expand(x.shape[0], 1)
    values = x32 / scale
    if not dtype.is_floating_point:
        values = values.round()
    return values.clamp(-top, top).to(dtype), scale


def matrix_nbytes(matrix: QuantizedMatrix | ScaledMatrix) -> int:
    fields = ("codes", "scales", "zeros", "offsets", "perm", "weight", "scale", "input_scale")
    return sum(t.nbytes for t in (getattr(matrix, f, None) for f in fields) if isinstance(t, torch.Tensor))


class DequantizingLinear(LinearKernel):
    name = "dequantized per call"

    def prepare(self, matrix: QuantizedMatrix | ScaledMatrix) -> QuantizedMatrix | ScaledMatrix:
        return matrix

    def apply(self, state: QuantizedMatrix | ScaledMatrix, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, state.dequantize(x.dtype), bias)

    def nbytes(self, state: QuantizedMatrix | ScaledMatrix) -> int:
        return matrix_nbytes(state)


class Int8Linear(LinearKernel):
    """y = (q_x @ q_w^T) * s_x * s_w in int32 then float: the weight kept as int8 [K, N] column-major for
    torch._int_mm. CUDA's int8 GEMM wants more than 16 rows, so smaller products are padded to 32."""

    name = "torch._int_mm W8A8"
    min_rows = 17

    def prepare(self, matrix: ScaledMatrix) -> ScaledMatrix:
        if matrix.weight_only or matrix.input_scale is not None:
            raise ValueError("INT8 weights run with dynamic per-token activations only")
        return matrix

    def apply(self, state: ScaledMatrix, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.shape[0]
        q, scale = quantize_per_token(x, torch.int8)
        if rows < self.min_rows:
            q = torch.cat([q, q.new_zeros(32 - rows, q.shape[1])])
        out = int8_matmul(q, state.weight.t())[:rows].float() * scale * state.scale
        out = out.to(x.dtype)
        return out if bias is None else out + bias

    def nbytes(self, state: ScaledMatrix) -> int:
        return matrix_nbytes(state)


# Inputs of a block of K this long sum exactly in float32: 1024 products of at most 128 * 128 stay below 2**24.
_EXACT_FLOAT_K = 1024


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [K, N] int8, exactly, in int32. torch._int_mm where it is exact here; on x86 CPUs
    without VNNI its oneDNN path multiplies through saturating 16-bit pair sums (measured off by 7e4 on
    random int8 under SSE4.1), so there K is summed in float32 blocks that cannot round, then in int32."""
    if int_mm_is_exact(a.device.type):
        return torch._int_mm(a, b)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for start in range(0, a.shape[1], _EXACT_FLOAT_K):
        block = slice(start, start + _EXACT_FLOAT_K)
        out += (a[:, block].float() @ b[block].float()).to(torch.int32)
    return out


@functools.cache
def int_mm_is_exact(device_type: str) -> bool:
    """Whether torch._int_mm gives the exact product on this device, tried once on full-range values."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 256), dtype=torch.int8, generator=generator)
    b = torch.randint(-128, 128, (256, 32), dtype=torch.int8, generator=generator)
    try:
        got = torch._int_mm(a.to(device_type), b.to(device_type)).cpu()
    except RuntimeError:
        return False
    return torch.equal(got.long(), a.long() @ b.long())
