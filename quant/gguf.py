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
    """A GGUF tensor as a dense `dtype` tensor in torch/Hugging Face orientation ([out, in] for a linear)."""
    return dequantize_bytes(tensor.data, tensor.tensor_type.name, torch_shape(tensor), dtype, tensor.name)


def dequantize_bytes(raw: np.ndarray, qtype: str, shape: tuple[int, ...], dtype: torch.dtype,
                     name: str = "") -> torch.Tensor:
    """Stored values (blocks, or plain floats) of a tensor or of some of its rows as a dense `dtype` tensor.

    Unpacks to float32 first, like transformers, so that casting to `dtype` afterwards rounds once.
    """
    try:
        values = dequantize(raw, GGMLQuantizationType[qtype])
    except NotImplementedError as error:
        raise UserError(
            f"GGUF tensor '{name}' is stored as {qtype}, which the installed gguf package "
            "cannot dequantize; use a file quantized with F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 or a K-quant"
        ) from error
    if not values.flags.writeable:  # F32 comes back as a view of the read-only memory-mapped file
        values = np.array(values)
    return torch.from_numpy(values).reshape(shape).to(dtype)


def stored_rows(tensor: ReaderTensor) -> np.ndarray:
    """A matrix's stored bytes, [rows, bytes per row], still in the (memory-mapped) file: rows of blocks, or of
    plain floats, so a slice of rows or of whole blocks is read without the rest."""
    return tensor.data.view(np.uint8).reshape(torch_shape(tensor)[0], -1)


def splits_at(qtype: str, column: int) -> bool:
    """Whether a cut at this column of a `qtype` matrix falls on a block boundary (a plain float type's blocks
    are one value)."""
    return column % GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0] == 0


def column_bytes(qtype: str, start: int, length: int) -> slice:
    """The bytes of every stored row that hold columns start .. start + length; the bounds must fall on blocks."""
    per_block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    if not (splits_at(qtype, start) and splits_at(qtype, length)):
        raise ValueError(f"inputs {start}..{start + length} do not fall on {qtype} blocks of {per_block}")
    return slice(start // per_block * block_bytes, (start + length) // per_block * block_bytes)


@dataclass
class GGUFBlocks:
    """A matrix kept in its GGUF blocks, for a backend that computes from them: `data` holds each row's
    blocks as bytes, [rows, bytes per row]; `shape` is the matrix's, [rows, columns], in torch orientation."""

    qtype: str
    data: torch.Tensor
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense matrix, exactly as dequantize_tensor gives it."""
        return dequantize_bytes(self.data.numpy(), self.qtype, self.shape, dtype)

    def rows(self, start: int, length: int) -> GGUFBlocks:
        """Outputs start .. start + length (a column-parallel shard): whole rows of blocks."""
        return GGUFBlocks(self.qtype, self.data.narrow(0, start, length), (length, self.shape[1]))

    def columns(self, start: int, length: int) -> GGUFBlocks:
        """Inputs start .. start + length (a row-parallel shard); the bounds must fall on block boundaries."""
        data = self.data[:, column_bytes(self.qtype, start, length)].contiguous()
        return GGUFBlocks(self.qtype, data, (self.shape[0], length))

    def splits_at(self, column: int) -> bool:
        """Whether a row-parallel cut at this input falls on a block boundary."""
        return splits_at(self.qtype, column)

    def padded(self, rows: int) -> GGUFBlocks:
        """The matrix with zero blocks (zero scales: zero weights) appended up to `rows` rows."""
        pad = self.data.new_zeros(rows - self.data.shape[0], self.data.shape[1])
        return GGUFBlocks(self.qtype, torch.cat((self.data, pad)), (rows, self.shape[1]))
