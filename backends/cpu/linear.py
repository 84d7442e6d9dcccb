"""Linear layers of the CPU backend, one LinearMethod per path the probe can choose (backend.py).

- OneDNNLinear: oneDNN with weights reordered once into its blocked layout (float32, and bfloat16 where
  oneDNN runs it), plus the compiled AVX-512 BF16 GEMV for the one- or two-row products of decoding.
  torch's plain F.linear re-lays out the weight on every call for bf16 and falls to a slow path for a
  single row; a pre-reordered weight goes straight to oneDNN's kernels (about 2x on the vocabulary
  projection, many times for single-sequence decode, on the machines measured here).
- PackedBF16Linear: float32 activations over bfloat16-stored weights (kernels_avx2.c), for CPUs without
  bfloat16 arithmetic: decoding reads half the bytes of float32 weights. From PACKED_GEMM_MAX_ROWS rows
  on (long prefills) the step is compute-bound and BLAS's float32 GEMM beats the kernel, so the weight is
  widened back for that call.
"""

from __future__ import annotations

import torch

from paged.backends.cpu.native import AVX2Kernels, BF16Kernels
from paged.models.ops import LinearMethod


class OneDNNLinear(LinearMethod):
    def __init__(self, kernels: BF16Kernels | None = None) -> None:
        self.kernels = kernels

    def process_weights(self, layer: torch.nn.Module) -> None:
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kernels is not None and x.shape[0] <= self.kernels.gemv_max_rows and x.dtype == torch.bfloat16:
            y = self.kernels.gemv(x, layer.weight)
            return y if bias is None else y.add_(bias)
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, bias, "none", [], "")


# Measured in benchmarks/RESULTS.md: at 128 rows BLAS's float32 GEMM plus widening the weight matches the
# kernel, and pulls ahead above (about 1.35x at 2,048 rows).
PACKED_GEMM_MAX_ROWS = 128


class PackedBF16Linear(LinearMethod):
    def __init__(self, kernels: AVX2Kernels) -> None:
        self.kernels = kernels

    def process_weights(self, layer: torch.nn.Module) -> None:
        weight = layer.weight.detach()
        layer.packed_weight = self.kernels.pack_weight(weight)
        layer.out_features = weight.shape[0]
        if getattr(layer, "owns_weight", True):
            # The float32 copy is never read again; a weight tied to the embedding stays for its lookups.
            layer.weight = torch.nn.Parameter(torch.empty(0, weight.shape[1]), requires_grad=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] > PACKED_GEMM_MAX_ROWS:
            transposed = self.kernels.unpack(layer.packed_weight, layer.out_features)
            return torch.mm(x, transposed) if bias is None else torch.addmm(bias, x, transposed)
        return self.kernels.linear(x, layer.packed_weight, layer.out_features, bias)
