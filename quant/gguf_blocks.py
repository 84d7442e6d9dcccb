"""GGUF's quantized blocks rewritten as a QuantizedMatrix, exactly.

A backend that computes from integer codes then needs no GGUF-specific kernel: the per-block fp16 scale
(and, for the K-quants, the 6-bit sub-block scales and minima) become the per-group scales of the common
form, and the packed nibbles and high bits become one uint8 code per weight.

Exactness is the point: for every type, `to_quantized_matrix(b).dequantize(torch.float32)` equals gguf-py's
`gguf.quants.dequantize` bit for bit, so a model loaded through this path is the model a transformers GGUF
load (and the dense path of quant/gguf.py) produces. That works because gguf-py's float32 arithmetic has
the shape of one of QuantizedMatrix's two formulas:

- Q8_0, Q4_0, Q5_0, Q6_K compute `d * (q - zero)` with small integer q: the zeros form with the same
  zero point. Q8_0's signed int8 becomes code = q + 128 with zero 128.
- Q4_1, Q5_1 compute `d * q + m`: the offsets form with offset m.
- Q4_K, Q5_K compute `(d * sc) * q - (dmin * m)` with both products rounded to float32 first: the offsets
  form holding those products, offset = -(dmin * m), since `a - b` and `a + (-b)` round identically.
- Q6_K's group scale is gguf-py's float32 product `d * sc` of the super-block scale and the int8 sub-scale.

Everything is vectorised over all blocks of all rows (no loop over blocks), so a 4096 x 14336 matrix
converts in well under a second on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from paged.quant.gguf import GGUFBlocks
from paged.quant.matrix import QuantizedMatrix

# What a decoder returns: codes [rows, blocks, block_size] uint8, scales [rows, groups] float32, and the
# zero points (uint8) or offsets (float32) of the same shape as scales.
_Decoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _half(raw: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian fp16 field at byte `start` of every block, as float32 [rows, blocks].

    The slice is made contiguous first because viewing bytes as fp16 needs an aligned, unit-stride pair."""
    return raw[..., start:start + 2].contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes to [..., 2, n]: all low nibbles, then all high ones, which is the element order GGUF
    uses for every 4-bit run (element i of a run of 2n is byte i's low nibble, element n + i its high)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-2)


def _bit_planes(packed: torch.Tensor, width: int) -> torch.Tensor:
    """[..., n] bytes to [..., 8 // width, n]: plane p holds bits p*width .. p*width + width - 1 of each
    byte, the layout of the K-quants' high bits (Q5_K: plane p is sub-block p; Q6_K: run p of 32 in a half)."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).view(-1, 1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's 32-bit little-endian high-bit mask [rows, blocks, 4] to one bit per element [.., 32]:
    element i's bit is bit i % 8 of byte i // 8."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def _constant_zeros(scales: torch.Tensor, zero: int) -> torch.Tensor:
    return torch.full(scales.shape, zero, dtype=torch.uint8)


def _q8_0(raw: torch.Tensor) -> _Decoded:
    d = _half(raw, 0)
    codes = raw[..., 2:34] ^ 0x80  # int8 q as uint8 q + 128: flipping the sign bit is exactly that shift
    return codes, d, _constant_zeros(d, 128)


def _q4_0(raw: torch.Tensor) -> _Decoded:
    d = _half(raw, 0)
    codes = _nibbles(raw[..., 2:18]).flatten(-2)
    return codes, d, _constant_zeros(d, 8)


def _q4_1(raw: torch.Tensor) -> _Decoded:
    codes = _nibbles(raw[..., 4:20]).flatten(-2)
    return codes, _half(raw, 0), _half(raw, 2)


def _q5_0(raw: torch.Tensor) -> _Decoded:
    d = _half(raw, 0)
    codes = _nibbles(raw[..., 6:22]).flatten(-2) | (_fifth_bits(raw[..., 2:6]) << 4)
    return codes, d, _constant_zeros(d, 16)


def _q5_1(raw: torch.Tensor) -> _Decoded:
    codes = _nibbles(raw[..., 8:24]).flatten(-2) | (_fifth_bits(raw[..., 4:8]) << 4)
    return codes, _half(raw, 0), _half(raw, 2)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes to the eight 6-bit sub-block scales and eight 6-bit minima [rows, blocks, 8].

    Bytes 0-3 and 4-7 hold scales 0-3 and minima 0-3 in their low six bits; sub-blocks 4-7 take their low
    four bits from the nibbles of bytes 8-11 and their top two from the spare top bits of bytes 0-7."""
    low_scales, low_mins, shared = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat((low_scales & 0x3F, (shared & 0x0F) | ((low_scales >> 2) & 0x30)), dim=-1)
    mins = torch.cat((low_mins & 0x3F, (shared >> 4) | ((low_mins >> 2) & 0x30)), dim=-1)
    return scales, mins


def _k_affine(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K group scales d * sc and offsets -(dmin * m), each product rounded to float32 as gguf-py
    rounds it, [rows, blocks * 8]."""
    sub_scales, sub_mins = _k_scales_mins(raw[..., 4:16])
    scales = _half(raw, 0).unsqueeze(-1) * sub_scales.float()
    offsets = -(_half(raw, 2).unsqueeze(-1) * sub_mins.float())
    return scales.flatten(-2), offsets.flatten(-2)


def _q4_k(raw: torch.Tensor) -> _Decoded:
    # 128 bytes in four runs of 32: run r's low nibbles are sub-block 2r, its high nibbles sub-block 2r + 1.
    qs = raw[..., 16:144].unflatten(-1, (4, 32))
    codes = _nibbles(qs).flatten(-3)
    return codes, *_k_affine(raw)


def _q5_k(raw: torch.Tensor) -> _Decoded:
    low = _nibbles(raw[..., 48:176].unflatten(-1, (4, 32))).flatten(-3, -2)  # [rows, blocks, 8, 32]
    high = _bit_planes(raw[..., 16:48], 1)  # bit s of byte j is the fifth bit of element j of sub-block s
    codes = (low | (high << 4)).flatten(-2)
    return codes, *_k_affine(raw)


def _q6_k(raw: torch.Tensor) -> _Decoded:
    # Two halves of 128 elements. In half h, the low nibbles of ql bytes 64h..64h+63 are the low four bits
    # of the half's elements 0-63 and their high nibbles those of 64-127; bit pair p of qh byte 32h + j holds
    # the top two bits of element 32p + j.
    low = _nibbles(raw[..., 0:128].unflatten(-1, (2, 64))).flatten(-3)
    high = _bit_planes(raw[..., 128:192].unflatten(-1, (2, 32)), 2).flatten(-3)
    codes = low | (high << 4)
    sub_scales = raw[..., 192:208].contiguous().view(torch.int8).float()
    scales = (_half(raw, 208).unsqueeze(-1) * sub_scales).flatten(-2)
    return codes, scales, _constant_zeros(scales, 32)


# qtype -> (decoder, codes' container bits, group size, whether the affine part is a zero point).
_FORMATS: dict[str, tuple[Callable[[torch.Tensor], _Decoded], int, int, bool]] = {
    "Q8_0": (_q8_0, 8, 32, True),
    "Q4_0": (_q4_0, 4, 32, True),
    "Q4_1": (_q4_1, 4, 32, False),
    "Q5_0": (_q5_0, 8, 32, True),
    "Q5_1": (_q5_1, 8, 32, False),
    "Q4_K": (_q4_k, 4, 32, False),
    "Q5_K": (_q5_k, 8, 32, False),
    "Q6_K": (_q6_k, 8, 16, True),
}

CONVERTIBLE: frozenset[str] = frozenset(_FORMATS)


def to_quantized_matrix(blocks: GGUFBlocks) -> QuantizedMatrix:
    """The GGUF matrix as codes with per-group scales, dequantizing bit-identically to gguf-py.

    The row count is taken from `blocks.data`, not `blocks.shape`, so that a slice of rows (a shard,
    or q/k/v cut out of one tensor) converts on its own; the column count comes from `blocks.shape`."""
    if blocks.qtype not in _FORMATS:
        raise ValueError(f"GGUF type {blocks.qtype} cannot be converted to a QuantizedMatrix "
                         f"(convertible: {', '.join(sorted(CONVERTIBLE))})")
    decode, bits, group_size, zero_form = _FORMATS[blocks.qtype]
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[blocks.qtype]]
    data, cols = blocks.data, blocks.shape[1]
    if data.dtype != torch.uint8 or data.dim() != 2:
        raise ValueError(f"GGUF blocks must be uint8 [rows, bytes per row], got {data.dtype} {list(data.shape)}")
    if cols % block_size or data.shape[1] != cols // block_size * type_size:
        raise ValueError(f"{blocks.qtype} rows of {cols} columns need {cols // block_size * type_size} bytes "
                         f"in blocks of {block_size}, got {data.shape[1]} bytes per row")
    rows = data.shape[0]
    codes, scales, affine = decode(data.reshape(rows, cols // block_size, type_size))
    codes = codes.reshape(rows, cols)
    if zero_form:
        return QuantizedMatrix(codes=codes, scales=scales, bits=bits, group_size=group_size, zeros=affine)
    return QuantizedMatrix(codes=codes, scales=scales, bits=bits, group_size=group_size, offsets=affine)
