"""GGUF tensors to dense torch tensors, through the `gguf` package's own dequantizers.

Reusing gguf-py's numpy kernels (the ones transformers' GGUF loader uses) makes our weights bit-identical
to a transformers load of the same file, which is what lets tests compare the two with `torch.equal`.
Every type `gguf.quants.dequantize` knows is accepted: F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, Q2_K..Q6_K
and whichever others the installed gguf version adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
from gguf.quants import dequantize

from paged.errors import UserError


def torch_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """The tensor's shape in torch order: GGUF lists dimensions fastest-moving first, torch slowest first."""
    return tuple(int(dim) for dim in reversed(tensor.shape.tolist()))


def dequantize_tensor(tensor: ReaderTensor, dtype: torch.dtype) -> torch.Tensor:
    """A GGUF tensor as a dense `dtype` tensor in torch/Hugging Face orientation ([out, in] for a linear).

    Unpacks to float32 first, like transformers, so that casting to `dtype` afterwards rounds once.
    """
    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        values = dequantize(tensor.data, qtype)
    except NotImplementedError as error:
        raise UserError(
            f"GGUF tensor '{tensor.name}' is stored as {qtype.name}, which the installed gguf package "
            "cannot dequantize; use a file quantized with F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 or a K-quant"
        ) from error
    if not values.flags.writeable:  # F32 comes back as a view of the read-only memory-mapped file
        values = np.array(values)
    return torch.from_numpy(values).reshape(torch_shape(tensor)).to(dtype)


@dataclass
class GGUFBlocks:
    """A matrix kept in its GGUF blocks, for a backend that computes from them: `data` holds each row's
    blocks as bytes, [rows, bytes per row]; `shape` is the matrix's, [rows, columns], in torch orientation."""

    qtype: str
    data: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def of(cls, tensor: ReaderTensor) -> GGUFBlocks:
        rows, cols = torch_shape(tensor)
        data = torch.from_numpy(np.array(tensor.data, dtype=np.uint8, copy=True)).view(rows, -1)
        return cls(GGMLQuantizationType(tensor.tensor_type).name, data, (rows, cols))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense matrix, exactly as dequantize_tensor gives it."""
        values = dequantize(self.data.numpy(), GGMLQuantizationType[self.qtype])
        return torch.from_numpy(values).reshape(self.shape).to(dtype)

    def rows(self, start: int, length: int) -> GGUFBlocks:
        """Outputs start .. start + length (a column-parallel shard): whole rows of blocks."""
        return GGUFBlocks(self.qtype, self.data.narrow(0, start, length), (length, self.shape[1]))

    def columns(self, start: int, length: int) -> GGUFBlocks:
        """Inputs start .. start + length (a row-parallel shard); the bounds must fall on block boundaries."""
        per_block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[self.qtype]]
        if not (self.splits_at(start) and self.splits_at(length)):
            raise ValueError(f"inputs {start}..{start + length} do not fall on {self.qtype} blocks of {per_block}")
        first = start // per_block * block_bytes
        data = self.data.narrow(1, first, length // per_block * block_bytes).contiguous()
        return GGUFBlocks(self.qtype, data, (self.shape[0], length))

    def splits_at(self, column: int) -> bool:
        """Whether a row-parallel cut at this input falls on a block boundary."""
        return column % GGML_QUANT_SIZES[GGMLQuantizationType[self.qtype]][0] == 0

    def with_rows(self, data: torch.Tensor) -> GGUFBlocks:
        """The same matrix with its rows replaced (reordered) by `data`."""
        return GGUFBlocks(self.qtype, data, self.shape)
