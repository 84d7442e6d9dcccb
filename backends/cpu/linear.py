"""Linear layers of the CPU backend: oneDNN with weights reordered once into its blocked layout, and the
compiled kernel for the one- or two-row products of decoding where the host can build it (native.py).

torch's plain F.linear re-lays out the weight on every call for bf16 and falls to a slow path for a
single row; a pre-reordered weight lets each call go straight to the AVX-512/AMX kernels (about 2x on
the vocabulary projection and many times for single-sequence decode on the machines measured here).
"""

from __future__ import annotations

import torch

from paged.backends.cpu.native import Kernels
from paged.models.ops import LinearMethod


class OneDNNLinear(LinearMethod):
    def __init__(self, kernels: Kernels | None = None) -> None:
        self.kernels = kernels

    def process_weights(self, layer: torch.nn.Module) -> None:
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kernels is not None and x.shape[0] <= self.kernels.gemv_max_rows and x.dtype == torch.bfloat16:
            y = self.kernels.gemv(x, layer.weight)
            return y if bias is None else y.add_(bias)
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, bias, "none", [], "")
