"""The one in-memory form every integer weight format is converted to at load: codes with per-group scales.

AWQ, GPTQ, compressed-tensors' pack-quantized and GGUF's blocks all describe a matrix W [N, K] (torch
orientation: N outputs, K inputs) as small integer codes, a scale per group of `group_size` consecutive
inputs of a row, and either an integer zero point or an additive minimum. Converting each to this form
once means a backend writes one kernel family (and one packing) and the checkpoint formats stay in quant/.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class QuantizedMatrix:
    """W[n, k] = (codes[n, j] - zeros[n, j // g]) * scales[n, j // g]        (zeros form: AWQ, GPTQ, Q8_0, Q6_K)
    or          codes[n, j] * scales[n, j // g] + offsets[n, j // g]         (offsets form: Q4_1, Q4_K, Q5_K)

    with j the stored column of input k: j = k, or with `perm` (GPTQ's act order) the inputs were reordered
    so that every group is contiguous, stored column j holding input perm[j] (y = x[:, perm] @ W_stored^T).
    `bits` is the container width the codes need (4: values 0..15, 8: 0..255); 5- and 6-bit GGUF codes
    travel as 8. The last group of a row may be shorter when K is not a multiple of group_size.
    """

    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 (or float16) [N, ceil(K / group_size)]
    bits: int
    group_size: int
    zeros: torch.Tensor | None = None  # same shape as scales; exactly one of zeros / offsets is set
    offsets: torch.Tensor | None = None
    perm: torch.Tensor | None = None  # int64 [K]

    def __post_init__(self) -> None:
        if (self.zeros is None) == (self.offsets is None):
            raise ValueError("a QuantizedMatrix has exactly one of zeros and offsets")
        if self.bits not in (4, 8):
            raise ValueError(f"codes of {self.bits} bits have no container (4 or 8)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def affine(self) -> torch.Tensor:
        """The per-group tensor that is not the scale: zeros or offsets."""
        return self.zeros if self.zeros is not None else self.offsets

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense W [N, K] in input order, computed in float32 then cast once: the reference every kernel
        and every format's loader is tested against."""
        groups = torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size
        codes, scales = self.codes.float(), self.scales.float()[:, groups]
        if self.zeros is not None:
            dense = (codes - self.zeros.float()[:, groups]) * scales
        else:
            dense = codes * scales + self.offsets.float()[:, groups]
        if self.perm is not None:
            dense = torch.empty_like(dense).index_copy_(1, self.perm, dense)
        return dense.to(dtype)

    def rows(self, start: int, length: int) -> QuantizedMatrix:
        """Outputs start .. start + length (a column-parallel shard, or one of q/k/v)."""
        return replace(self, codes=self.codes.narrow(0, start, length), scales=self.scales.narrow(0, start, length),
                       zeros=_narrow(self.zeros, 0, start, length), offsets=_narrow(self.offsets, 0, start, length))

    def columns(self, start: int, length: int) -> QuantizedMatrix:
        """Inputs start .. start + length (a row-parallel shard); the bounds must fall on group boundaries."""
        if self.perm is not None:
            raise ValueError("an act-order (g_idx) matrix cannot be split by inputs")
        if self.group_size >= self.codes.shape[1]:  # one group per row: every share keeps the row's scale
            return replace(self, codes=self.codes.narrow(1, start, length), group_size=length)
        if start % self.group_size or (length % self.group_size and start + length != self.codes.shape[1]):
            raise ValueError(f"inputs {start}..{start + length} do not fall on groups of {self.group_size}")
        first, count = start // self.group_size, -(-length // self.group_size)
        return replace(self, codes=self.codes.narrow(1, start, length),
                       scales=self.scales.narrow(1, first, count),
                       zeros=_narrow(self.zeros, 1, first, count), offsets=_narrow(self.offsets, 1, first, count))

    @staticmethod
    def stack(parts: list[QuantizedMatrix]) -> QuantizedMatrix:
        """Several matrices of one input size stacked by outputs (q, k, v into qkv), which must agree on
        their format."""
        first = parts[0]
        for part in parts[1:]:
            same = (part.bits, part.group_size, part.zeros is None, part.shape[1]) == (
                first.bits, first.group_size, first.zeros is None, first.shape[1])
            if not same or not _same_perm(part.perm, first.perm):
                raise ValueError("matrices packed into one layer are quantized differently")
        return replace(first, codes=torch.cat([p.codes for p in parts]), scales=torch.cat([p.scales for p in parts]),
                       zeros=_cat([p.zeros for p in parts]), offsets=_cat([p.offsets for p in parts]))


def _narrow(tensor: torch.Tensor | None, dim: int, start: int, length: int) -> torch.Tensor | None:
    return None if tensor is None else tensor.narrow(dim, start, length)


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(tensors)


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@dataclass
class ScaledMatrix:
    """W = weight * scale[:, None]: 8-bit values (float8_e4m3fn or int8) [N, K] with a float32 scale per output
    (a per-tensor scale is repeated over its rows, so q, k and v with scales of their own stack into one).

    `input_scale` is the checkpoint's static activation scale ([] float32) where it has one; without it a W8A8
    kernel quantizes each token's activations with a scale of its own at every call. `weight_only` checkpoints
    (W8A16) keep activations in the compute dtype."""

    weight: torch.Tensor
    scale: torch.Tensor  # float32 [N]
    input_scale: torch.Tensor | None = None
    weight_only: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scale.float()[:, None]).to(dtype)

    def rows(self, start: int, length: int) -> ScaledMatrix:
        return replace(self, weight=self.weight.narrow(0, start, length), scale=self.scale.narrow(0, start, length))

    def columns(self, start: int, length: int) -> ScaledMatrix:
        return replace(self, weight=self.weight.narrow(1, start, length))

    @staticmethod
    def stack(parts: list[ScaledMatrix]) -> ScaledMatrix:
        """Matrices that read one input stacked by outputs; their static input scales, where they differ,
        become the largest (every part's inputs are the same tensor, so the largest range covers them all)."""
        scales = [p.input_scale for p in parts if p.input_scale is not None]
        if scales and len(scales) != len(parts):
            raise ValueError("matrices packed into one layer disagree on static activation scales")
        return ScaledMatrix(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]),
                            torch.stack(scales).max() if scales else None, parts[0].weight_only)
