"""Weights regrouped once, at load, into the panel layouts of kernels_avx2.c (its header describes them).

Three formats: bfloat16 (any dense weight, rounded once), and GGUF's Q4_0, Q4_1 and Q8_0 blocks kept as they
are in the file, 4 or 8 bits a weight plus a float16 scale (and minimum) per 32. The block formats change no
value: the kernel widens each weight to exactly what gguf-py's dequantization gives, so a model computes as
its float32 dequantized form does, while decoding reads a quarter (Q4) or half (Q8) of bfloat16's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paged.quant.gguf import GGUFBlocks

PANEL = 16
PAD_COLUMNS = 64  # four panels: the widest tile
BLOCK = 32  # weights per GGUF block of the formats below

# kernels_avx2.c's format numbers
BF16W, Q4W, Q8W = 0, 1, 2
BLOCK_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0"})


@dataclass
class PackedWeight:
    """An [n, k] weight in one of the kernel's formats; d and m are the block formats' scales and minimums."""

    format: int
    source: str  # what it was packed from: "bfloat16" or the GGUF type
    n: int
    k: int
    q: torch.Tensor
    d: torch.Tensor | None = None
    m: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m) if t is not None)


def _panels(rows: torch.Tensor) -> torch.Tensor:
    """[n, ...] -> [n padded to PAD_COLUMNS with zeros, ...] viewed as [panels, 16, ...]."""
    padded = rows.new_zeros((-(-rows.shape[0] // PAD_COLUMNS) * PAD_COLUMNS, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    return padded.view(-1, PANEL, *rows.shape[1:])


def pack_bf16(weight: torch.Tensor) -> PackedWeight:
    """Columns of a panel stored in the order 0-3, 8-11, 4-7, 12-15 (column b * 8 + a * 4 + j goes to
    a * 8 + b * 4 + j), so that the kernel's interleave with zeros yields them in order."""
    n, k = weight.shape
    panels = _panels(weight.to(torch.bfloat16)).view(-1, 2, 2, 4, k)
    return PackedWeight(BF16W, "bfloat16", n, k, panels.permute(0, 4, 2, 1, 3).contiguous().view(-1, k, PANEL))


def _scales(values: torch.Tensor) -> torch.Tensor:
    """Per-block float16 values [n, k / 32] -> [panels, k / 32, 16]."""
    return _panels(values).transpose(1, 2).contiguous()


def pack_gguf(blocks: GGUFBlocks) -> PackedWeight:
    """Q4_0 / Q4_1 / Q8_0 blocks of an [n, k] matrix, regrouped by panel; no value changes."""
    n, k = blocks.shape
    raw = blocks.data.view(n, k // BLOCK, -1)
    d = raw[..., :2].contiguous().view(torch.float16)[..., 0]
    if blocks.qtype == "Q8_0":
        q = raw[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return PackedWeight(Q8W, blocks.qtype, n, k, _panels(q).transpose(1, 2).contiguous(), _scales(d))
    if blocks.qtype == "Q4_1":
        m, nibbles = raw[..., 2:4].contiguous().view(torch.float16)[..., 0], raw[..., 4:]
    elif blocks.qtype == "Q4_0":
        m, nibbles = (d.float() * -8).half(), raw[..., 2:]  # w = d (q - 8); -8 d is exact in float16
    else:
        raise ValueError(f"no CPU kernel for GGUF {blocks.qtype} blocks (it takes {', '.join(sorted(BLOCK_TYPES))})")
    # A block's byte i holds weight i in its low nibble and weight i + 16 in its high one.
    q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).reshape(n, k)
    columns = _panels(q).transpose(1, 2)  # [panels, k, 16]
    packed = (columns[..., :8] | (columns[..., 8:] << 4)).contiguous()
    return PackedWeight(Q4W, blocks.qtype, n, k, packed, _scales(d), _scales(m))
