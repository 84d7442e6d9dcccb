"""GPTQ checkpoints as AutoGPTQ and GPTQModel write them (`"quant_method": "gptq"`).

Per linear: qweight int32 [inputs / (32 / bits), outputs] holds codes packed along the inputs, qzeros
int32 [groups, outputs / (32 / bits)] the zero points packed along the outputs (the original "gptq"
checkpoint format stores zero - 1; "gptq_v2" the zero itself), scales float16 [groups, outputs], g_idx
int32 [inputs] each input's group. With act order (desc_act) the groups are not contiguous inputs; the
inputs are then reordered so that they are (QuantizedMatrix.perm).
"""

from __future__ import annotations

from typing import Any

import torch

from paged.quant.base import QuantMethod, groups_of, random_codes, unpack_int32
from paged.quant.matrix import QuantizedMatrix


class GPTQ(QuantMethod):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, zeros_stored_minus_one: bool) -> None:
        self.bits = bits
        self.group_size = group_size  # -1: one group per row
        self.zeros_stored_minus_one = zeros_stored_minus_one

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQ:
        bits = int(config.get("bits", 4))
        if bits not in (4, 8):
            raise ValueError(f"GPTQ with {bits}-bit weights is not supported (4 and 8 are)")
        checkpoint_format = config.get("checkpoint_format", "gptq")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported (gptq, gptq_v2 are)")
        method = cls(bits, int(config.get("group_size", 128)), checkpoint_format == "gptq")
        method.check_modules(config.get("modules_to_not_convert") or [])
        return method

    @property
    def form(self) -> str:
        return "int"

    @property
    def parts(self) -> frozenset[str]:
        return frozenset({"qweight", "qzeros", "scales", "g_idx"})

    def groups(self, inputs: int) -> int:
        return inputs if self.group_size == -1 else self.group_size

    def convert(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> QuantizedMatrix:
        outputs, inputs = shape
        group_size, per_word = self.groups(inputs), 32 // self.bits
        groups = groups_of(inputs, group_size)
        expected = {"qweight": (-(-inputs // per_word), outputs), "qzeros": (groups, -(-outputs // per_word)),
                    "scales": (groups, outputs)}
        for name, size in expected.items():
            if tuple(parts[name].shape) != size:
                raise ValueError(f"GPTQ {name} of a {outputs}x{inputs} matrix is {tuple(parts[name].shape)}, "
                                 f"not {size}")
        codes = unpack_int32(parts["qweight"].t(), self.bits, inputs)
        zeros = unpack_int32(parts["qzeros"], self.bits, outputs).t().float() + float(self.zeros_stored_minus_one)
        perm = act_order(parts.get("g_idx"), inputs, group_size)
        if perm is not None:
            codes = codes[:, perm]
        return QuantizedMatrix(codes.contiguous(), parts["scales"].t().float().contiguous(), self.bits, group_size,
                               zeros=zeros.contiguous(), perm=perm)

    def random(self, shape: tuple[int, int], device: torch.device, generator: torch.Generator) -> QuantizedMatrix:
        return random_codes(shape, self.bits, self.groups(shape[1]), device, generator)

    def describe(self) -> str:
        groups = "one group per row" if self.group_size == -1 else f"groups of {self.group_size}"
        return f"gptq {self.bits}-bit, {groups}"


def act_order(g_idx: torch.Tensor | None, inputs: int, group_size: int) -> torch.Tensor | None:
    """The input order that makes each group contiguous (None when it already is). GPTQ's act order
    quantizes inputs by decreasing activation size, so each group has exactly group_size members; any
    other grouping cannot be stored in contiguous groups and is refused."""
    if g_idx is None:
        return None
    if g_idx.shape != (inputs,):
        raise ValueError(f"g_idx of {tuple(g_idx.shape)} for {inputs} inputs")
    contiguous = torch.arange(inputs, device=g_idx.device) // group_size
    if torch.equal(g_idx.long(), contiguous):
        return None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], contiguous):
        raise ValueError(f"g_idx puts other than {group_size} inputs into some group")
    return perm
