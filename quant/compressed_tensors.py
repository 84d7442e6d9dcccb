"""compressed-tensors checkpoints (llm-compressor's output, `"quant_method": "compressed-tensors"`).

One config group must cover the decoder's linear layers; its weight scheme picks the form:
- pack-quantized int weights (W4A16, W8A16): weight_packed int32 [outputs, inputs / (32 / bits)] holds the
  signed codes plus 2**(bits-1), packed along the inputs; weight_scale [outputs, groups]; weight_zero_point
  (asymmetric only) packed the same way along the outputs; weight_g_idx with act order;
- float-quantized FP8 weights (weight float8_e4m3fn, weight_scale per channel [outputs, 1] or per tensor),
  with dynamic per-token or static (input_scale) FP8 activations, or none (weight-only);
- int-quantized INT8 W8A8: weight int8, weight_scale per channel, dynamic per-token int8 activations.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from paged.quant.base import QuantMethod, groups_of, quantize_rows, random_codes, random_dense, unpack_int32
from paged.quant.gptq import act_order
from paged.quant.matrix import QuantizedMatrix, ScaledMatrix


class CompressedTensors(QuantMethod):
    name = "compressed-tensors"

    def __init__(self, weights: dict[str, Any], activations: dict[str, Any] | None, storage: str) -> None:
        self.weights = weights
        self.activations = activations
        self.storage = storage
        self.bits = int(weights.get("num_bits", 8))
        self.symmetric = bool(weights.get("symmetric", True))
        self.strategy = weights.get("strategy", "tensor")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensors:
        groups = [g for g in (config.get("config_groups") or {}).values() if g.get("weights")]
        if len(groups) != 1:
            raise ValueError(f"compressed-tensors checkpoints with {len(groups)} weight schemes are not supported "
                             "(one scheme for every linear layer is)")
        group = groups[0]
        storage = group.get("format") or config.get("format")
        method = cls(group["weights"], group.get("input_activations"), storage)
        method.check_modules(config.get("ignore") or [])
        method.form  # refuses what has no form here
        return method

    @property
    def form(self) -> str:
        kind, bits = self.weights.get("type", "int"), self.bits
        if kind == "float" and bits == 8 and self.storage in ("float-quantized", "naive-quantized"):
            self._check_activations("float")
            return "fp8"
        if kind == "int" and bits in (4, 8) and self.storage == "pack-quantized" and self.activations is None:
            if self.strategy not in ("group", "channel"):
                raise ValueError(f"pack-quantized weights with strategy {self.strategy!r} are not supported")
            return "int"
        if kind == "int" and bits == 8 and self.storage in ("int-quantized", "naive-quantized") and self.symmetric:
            self._check_activations("int")
            if self.activations is None:
                raise ValueError("int-quantized weights without activation quantization are not supported")
            return "int8"
        raise ValueError(f"compressed-tensors {self.storage} {kind}{bits} weights (symmetric={self.symmetric}, "
                         f"activations={self.activations}) are not supported")

    def _check_activations(self, kind: str) -> None:
        act = self.activations
        if act is None:
            return
        dynamic_token = act.get("dynamic") is True and act.get("strategy") == "token"
        static_tensor = act.get("dynamic") is False and act.get("strategy") == "tensor"
        if act.get("type", kind) != kind or int(act.get("num_bits", 8)) != 8 or not (dynamic_token or static_tensor):
            raise ValueError(f"compressed-tensors input activations {act} are not supported (8-bit {kind}, dynamic "
                             "per token or static per tensor are)")
        if kind == "int" and not dynamic_token:
            raise ValueError("static int8 activation scales are not supported (dynamic per token are)")

    @property
    def parts(self) -> frozenset[str]:
        if self.form == "int":
            return frozenset({"weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"})
        return frozenset({"weight", "weight_scale", "input_scale", "weight_zero_point"})

    def group_size(self, inputs: int) -> int:
        return int(self.weights["group_size"]) if self.strategy == "group" else inputs

    def convert(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> QuantizedMatrix | ScaledMatrix:
        outputs, inputs = shape
        if self.form != "int":
            weight = parts["weight"]
            if tuple(weight.shape) != shape:
                raise ValueError(f"weight of {tuple(weight.shape)} where {shape} was expected")
            scale = parts["weight_scale"].float().reshape(-1).expand(outputs).contiguous()
            static = parts.get("input_scale") if self.activations is not None else None
            return ScaledMatrix(weight, scale, None if static is None else static.float().reshape(()),
                                weight_only=self.activations is None)
        if "weight_shape" in parts and tuple(parts["weight_shape"].tolist()) != shape:
            raise ValueError(f"weight_shape {parts['weight_shape'].tolist()} where {list(shape)} was expected")
        group_size = self.group_size(inputs)
        middle = float(1 << (self.bits - 1))
        codes = unpack_int32(parts["weight_packed"], self.bits, inputs)
        scales = parts["weight_scale"].float().reshape(outputs, groups_of(inputs, group_size))
        if self.symmetric:
            zeros = torch.full_like(scales, middle)
        else:
            zeros = unpack_int32(parts["weight_zero_point"].t(), self.bits, outputs).t().float()
        perm = act_order(parts.get("weight_g_idx"), inputs, group_size)
        if perm is not None:
            codes = codes[:, perm]
        return QuantizedMatrix(codes.contiguous(), scales.contiguous(), self.bits, group_size,
                               zeros=zeros.contiguous(), perm=perm)

    def random(self, shape: tuple[int, int], device: torch.device, generator: torch.Generator
               ) -> QuantizedMatrix | ScaledMatrix:
        if self.form != "int":
            matrix = quantize_rows(random_dense(shape, device, generator),
                                   torch.float8_e4m3fn if self.form == "fp8" else torch.int8)
            return replace(matrix, weight_only=self.activations is None)
        return random_codes(shape, self.bits, self.group_size(shape[1]), device, generator)

    def describe(self) -> str:
        form = self.form
        if form == "int":
            groups = f"groups of {self.weights['group_size']}" if self.strategy == "group" else "per channel"
            return f"compressed-tensors W{self.bits}A16 ({groups})"
        activations = "weight-only" if self.activations is None else (
            "dynamic per-token activations" if self.activations.get("dynamic") else "static activation scales")
        return f"compressed-tensors {'FP8' if form == 'fp8' else 'INT8'} W8A8 ({activations})"
