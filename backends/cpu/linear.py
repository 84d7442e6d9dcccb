"""Linear layers of the CPU backend, one LinearMethod per path the probe can choose (backend.py).

- OneDNNLinear: oneDNN with weights reordered once into its blocked layout (float32, and bfloat16 where
  oneDNN runs it), plus the compiled AVX-512 BF16 GEMV for the one- or two-row products of decoding.
  torch's plain F.linear re-lays out the weight on every call for bf16 and falls to a slow path for a
  single row; a pre-reordered weight goes straight to oneDNN's kernels (about 2x on the vocabulary
  projection, many times for single-sequence decode, on the machines measured here).
- PackedLinear: float32 activations over weights stored as bfloat16, or in a GGUF file's own 4- and 8-bit
  blocks (kernels_avx2.c, packing.py), for CPUs without bfloat16 arithmetic: decoding reads half or less
  of float32's bytes. From PACKED_GEMM_MAX_ROWS rows on (long prefills) the step is compute-bound and
  BLAS's float32 GEMM beats the kernel, so the weight is widened for that call.
"""

from __future__ import annotations

import functools

import torch

from paged.backends.cpu.native import AVX2Kernels, BF16Kernels
from paged.backends.cpu.packing import BLOCK_TYPES, pack_bf16, pack_gguf
from paged.quant.gguf import GGUFBlocks
from paged.models.ops import LinearMethod


class OneDNNLinear(LinearMethod):
    def __init__(self, kernels: BF16Kernels | None = None) -> None:
        self.kernels = kernels

    @staticmethod
    @functools.cache
    def runs(dtype: torch.dtype) -> bool:
        """Whether this torch's oneDNN takes a linear layer of this dtype here: tried on a tiny one, since
        builds and CPUs differ (an Arm build's oneDNN, or an x86 one below its bfloat16 level, raises)."""
        try:
            weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), None)
            torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), weight, None, "none", [], "")
        except (RuntimeError, AttributeError):
            return False
        return True

    def process_weights(self, layer: torch.nn.Module) -> None:
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.shape[0]
        if self.kernels is not None and rows <= self.kernels.gemv_max_rows and x.dtype == torch.bfloat16:
            y = self.kernels.gemv(x, layer.weight)
            return y if bias is None else y.add_(bias)
        padded = padded_rows(rows)
        if padded != rows:
            x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, bias, "none", [], "")[:rows]


def padded_rows(rows: int) -> int:
    """Row counts oneDNN is asked for, so a server meets a few dozen shapes, not one per step's token count.

    oneDNN builds and caches a primitive per shape (up to 1,024 of them, each with its scratch memory): a
    server whose steps take every token count from 1 to 1,024 grew its resident set by ~100 MB per thousand
    requests until the cache filled. Multiples of 16 up to 128, then four sizes per power of two (at most
    a quarter more rows computed, ~12% on average)."""
    if rows <= 128:
        return -(-rows // 16) * 16
    step = 1 << (rows.bit_length() - 3)
    return -(-rows // step) * step


# Measured in benchmarks/RESULTS.md: at 128 rows BLAS's float32 GEMM plus widening the weight matches the
# kernel, and pulls ahead above (about 1.35x at 2,048 rows).
PACKED_GEMM_MAX_ROWS = 128


class PackedLinear(LinearMethod):
    """Float32 activations over weights packed by packing.py: a GGUF matrix in Q4_0 / Q4_1 / Q8_0 keeps its
    blocks (the loader hands them over: block_types), every other weight is rounded to bfloat16."""

    block_types = BLOCK_TYPES

    def __init__(self, kernels: AVX2Kernels) -> None:
        self.kernels = kernels

    def process_weights(self, layer: torch.nn.Module) -> None:
        blocks = getattr(layer, "gguf_blocks", {})
        parts = [blocks.get(i) for i in range(getattr(layer, "num_parts", 1))]
        if parts and all(p is not None and p.qtype == parts[0].qtype for p in parts):
            rows = torch.cat([p.data for p in parts])  # q, k, v (or gate, up) stacked as the layer stacks them
            layer.packed_weight = pack_gguf(GGUFBlocks(parts[0].qtype, rows, (rows.shape[0], parts[0].shape[1])))
        else:
            for shard, part in blocks.items():  # kept for a matrix whose other parts are in another format
                layer.place_local(layer.weight, part.dequantize(layer.weight.dtype), shard)
            layer.packed_weight = pack_bf16(layer.weight.detach())
        layer.gguf_blocks = {}
        if getattr(layer, "owns_weight", True):
            # The float32 copy is never read again; a weight tied to the embedding stays for its lookups.
            layer.weight = torch.nn.Parameter(torch.empty(0, layer.weight.shape[1]), requires_grad=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] > PACKED_GEMM_MAX_ROWS:
            transposed = self.kernels.widen_transposed(layer.packed_weight)
            return torch.mm(x, transposed) if bias is None else torch.addmm(bias, x, transposed)
        return self.kernels.linear(x, layer.packed_weight, bias)

    def storage(self, layer: torch.nn.Module) -> str:
        return layer.packed_weight.source

    def weight_bytes(self, layer: torch.nn.Module) -> int:
        return layer.packed_weight.nbytes
