"""Linear layers of the CUDA backend for quantized weights (forms in paged.quant.matrix).

- IntLinear: 4- and 8-bit codes (AWQ, GPTQ, compressed-tensors W4A16/W8A16, GGUF blocks), dequantized in
  registers by the Triton GEMV/GEMM of kernels/quant_linear.py.
- FP8Linear: FP8 W8A8 through torch._scaled_mm with per-token activation and per-channel weight scales,
  on GPUs with FP8 units (compute capability 8.9 and up), except decode steps of one or two rows, which a
  Triton GEMV computes from the FP8 weights directly; elsewhere, and for weight-only checkpoints, the
  weight is widened per call.
- GGUFLinear: the LinearMethod for GGUF files, which keeps their matrices in their blocks on the device.
"""

from __future__ import annotations

import dataclasses

import torch

from paged.backends.common.quant_linear import DequantizingLinear, matrix_nbytes
from paged.backends.cuda.kernels.fp8_linear import MAX_ROWS as FP8_GEMV_MAX_ROWS
from paged.backends.cuda.kernels.fp8_linear import fp8_gemv
from paged.backends.cuda.kernels.quant_activation import quantize_rows
from paged.backends.cuda.kernels.quant_linear import PackedIntWeight, int_linear, pack_int_weight
from paged.backends.interface import LinearKernel
from paged.models.ops import LinearMethod
from paged.quant.gguf_blocks import CONVERTIBLE, to_quantized_matrix
from paged.quant.matrix import QuantizedMatrix, ScaledMatrix


_WIDENED = DequantizingLinear()


class IntLinear(LinearKernel):
    name = "Triton int GEMV/GEMM"

    def prepare(self, matrix: QuantizedMatrix) -> PackedIntWeight:
        return pack_int_weight(matrix, matrix.codes.device)

    def apply(self, state: PackedIntWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int_linear(x, state, bias)

    def nbytes(self, state: PackedIntWeight) -> int:
        return sum(value.nbytes for value in (getattr(state, f.name) for f in dataclasses.fields(state))
                   if isinstance(value, torch.Tensor))


class FP8Linear(LinearKernel):
    """torch._scaled_mm takes the weight as a column-major [K, N] (the row-major [N, K] transposed), needs
    both dimensions in multiples of 16 and gives bfloat16 with row-wise scales."""

    def __init__(self, has_fp8_units: bool) -> None:
        self.has_fp8_units = has_fp8_units
        self.name = "torch._scaled_mm FP8 W8A8" if has_fp8_units else "FP8 widened per call"

    def runs_w8a8(self, matrix: ScaledMatrix) -> bool:
        rows, cols = matrix.shape
        return self.has_fp8_units and not matrix.weight_only and rows % 16 == 0 and cols % 16 == 0

    def prepare(self, matrix: ScaledMatrix) -> ScaledMatrix:
        return dataclasses.replace(matrix, weight=matrix.weight.contiguous(), scale=matrix.scale.contiguous())

    def apply(self, state: ScaledMatrix, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.has_fp8_units and x.shape[0] <= FP8_GEMV_MAX_ROWS:
            return fp8_gemv(x, state.weight, state.scale, bias)  # decode: bound by the weight's bytes
        if not self.runs_w8a8(state):
            return _WIDENED.apply(state, x, bias)
        q, scale = quantize_rows(x, state.weight.dtype, state.input_scale)
        out = torch._scaled_mm(q, state.weight.t(), scale_a=scale, scale_b=state.scale.view(1, -1),
                               out_dtype=torch.bfloat16)
        out = out.to(x.dtype)
        return out if bias is None else out + bias

    def nbytes(self, state: ScaledMatrix) -> int:
        return matrix_nbytes(state)


class GGUFLinear(LinearMethod):
    """A GGUF matrix in one of CONVERTIBLE's types is kept as its codes and scales (converted exactly from its
    blocks) and computed by IntLinear; other matrices (F16, the few types not converted) are dense."""

    block_types = CONVERTIBLE

    def __init__(self) -> None:
        self.kernel = IntLinear()

    def process_weights(self, layer: torch.nn.Module) -> None:
        blocks = getattr(layer, "gguf_blocks", {})
        parts = [blocks.get(i) for i in range(getattr(layer, "num_parts", 1))]
        matrices = [to_quantized_matrix(p) for p in parts if p is not None]
        stackable = len(matrices) == len(parts) and all(
            (m.bits, m.group_size, m.zeros is None) == (matrices[0].bits, matrices[0].group_size,
                                                       matrices[0].zeros is None) for m in matrices)
        if stackable:
            device = layer.weight.device
            matrix = QuantizedMatrix.stack([dataclasses.replace(
                m, codes=m.codes.to(device), scales=m.scales.to(device),
                zeros=None if m.zeros is None else m.zeros.to(device),
                offsets=None if m.offsets is None else m.offsets.to(device)) for m in matrices])
            layer.quant_state = self.kernel.prepare(matrix)
            layer.source_type = ", ".join(sorted({p.qtype for p in parts}))
            if getattr(layer, "owns_weight", True):
                layer.weight = torch.nn.Parameter(torch.empty(0, layer.weight.shape[1], device=device),
                                                  requires_grad=False)
        else:
            for shard, part in blocks.items():
                layer.place_local(layer.weight, part.dequantize(layer.weight.dtype), shard)
        layer.gguf_blocks = {}

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        state = getattr(layer, "quant_state", None)
        if state is None:
            return super().apply(layer, x, bias)
        return self.kernel.apply(state, x, bias)

    def storage(self, layer: torch.nn.Module) -> str:
        if getattr(layer, "quant_state", None) is None:
            return super().storage(layer)
        return f"{layer.source_type} ({self.kernel.name})"

    def weight_bytes(self, layer: torch.nn.Module) -> int:
        state = getattr(layer, "quant_state", None)
        return super().weight_bytes(layer) if state is None else self.kernel.nbytes(state)
