"""AWQ checkpoints in AutoAWQ's GEMM layout (`"quant_method": "awq"`, `"version": "gemm"`).

Per linear: qweight int32 [inputs, outputs / 8] holds 4-bit codes packed along the outputs in AWQ's
interleaved order (the word's nibbles hold columns 0, 2, 4, 6, 1, 3, 5, 7), qzeros int32
[groups, outputs / 8] the zero points packed the same way, scales float16 [groups, outputs];
W[k, n] = (code - zero) * scale of k's group.
"""

from __future__ import annotations

from typing import Any

import torch

from paged.quant.base import QuantMethod, groups_of, random_codes, unpack_int32
from paged.quant.matrix import QuantizedMatrix

# Column j of a packed word sits in nibble AWQ_ORDER[j] (the inverse of the packer's 0, 2, 4, 6, 1, 3, 5, 7).
AWQ_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


class AWQ(QuantMethod):
    name = "awq"

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQ:
        bits = config.get("bits", config.get("w_bit"))
        version = str(config.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or not config.get("zero_point", True):
            raise ValueError(f"AWQ with bits={bits}, version={version!r}, zero_point={config.get('zero_point')} is "
                             "not supported (4-bit GEMM with zero points is)")
        method = cls(int(config.get("group_size", config.get("q_group_size", 128))))
        method.check_modules(config.get("modules_to_not_convert") or [])
        return method

    @property
    def form(self) -> str:
        return "int"

    @property
    def parts(self) -> frozenset[str]:
        return frozenset({"qweight", "qzeros", "scales"})

    def convert(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> QuantizedMatrix:
        outputs, inputs = shape
        groups = groups_of(inputs, self.group_size)
        expected = {"qweight": (inputs, outputs // 8), "qzeros": (groups, outputs // 8), "scales": (groups, outputs)}
        for name, size in expected.items():
            if tuple(parts[name].shape) != size:
                raise ValueError(f"AWQ {name} of a {outputs}x{inputs} matrix is {tuple(parts[name].shape)}, not {size}")
        codes = unpack_int32(parts["qweight"], 4, outputs, AWQ_ORDER).t().contiguous()
        zeros = unpack_int32(parts["qzeros"], 4, outputs, AWQ_ORDER).t().float().contiguous()
        return QuantizedMatrix(codes, parts["scales"].t().float().contiguous(), 4, self.group_size, zeros=zeros)

    def random(self, shape: tuple[int, int], device: torch.device, generator: torch.Generator) -> QuantizedMatrix:
        return random_codes(shape, 4, self.group_size, device, generator)

    def describe(self) -> str:
        return f"awq 4-bit, groups of {self.group_size}"
