"""FP8 weights: `--quantization fp8` on a dense checkpoint (per-channel weight scales computed at load,
per-token activation scales at each call), or a checkpoint saved in vLLM's plain fp8 format
(`"quant_method": "fp8"`: weight float8_e4m3fn with a per-tensor weight_scale, and an input_scale where
`activation_scheme` is static)."""

from __future__ import annotations

from typing import Any

import torch

from paged.quant.base import QuantMethod, quantize_rows, random_dense
from paged.quant.matrix import ScaledMatrix


class FP8(QuantMethod):
    name = "fp8"
    on_the_fly = True

    def __init__(self, serialized: bool, static_activations: bool) -> None:
        self.serialized = serialized
        self.static_activations = static_activations

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> FP8:
        if config is None:
            return cls(serialized=False, static_activations=False)
        if config.get("weight_block_size"):
            raise ValueError("block-wise FP8 (weight_block_size) checkpoints are not supported")
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 activation_scheme {scheme!r} is not supported (dynamic, static are)")
        method = cls(serialized=True, static_activations=scheme == "static")
        method.check_modules(config.get("ignored_layers") or [])
        return method

    @property
    def form(self) -> str:
        return "fp8"

    @property
    def parts(self) -> frozenset[str]:
        return frozenset({"weight", "weight_scale", "input_scale"} if self.serialized else {"weight"})

    @property
    def complete_parts(self) -> frozenset[str] | None:
        # Quantizing a dense checkpoint: each bf16 matrix is dropped once rounded, so the peak is one layer's.
        return None if self.serialized else frozenset({"weight"})

    def convert(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> ScaledMatrix:
        weight = parts["weight"]
        if tuple(weight.shape) != shape:
            raise ValueError(f"weight of {tuple(weight.shape)} where {shape} was expected")
        if not self.serialized:
            return quantize_rows(weight, torch.float8_e4m3fn)
        if weight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"an fp8 checkpoint's weight is {weight.dtype}, not float8_e4m3fn")
        scale = parts["weight_scale"].float().reshape(-1).expand(shape[0]).contiguous()
        static = parts.get("input_scale") if self.static_activations else None
        if self.static_activations and static is None:
            raise ValueError("activation_scheme static, but the checkpoint has no input_scale")
        return ScaledMatrix(weight, scale, None if static is None else static.float().reshape(()))

    def random(self, shape: tuple[int, int], device: torch.device, generator: torch.Generator) -> ScaledMatrix:
        return quantize_rows(random_dense(shape, device, generator), torch.float8_e4m3fn)

    def expert_dtype(self) -> torch.dtype | None:
        """Experts are quantized at load like the linears (FP8 checkpoints' expert scales are not read yet);
        the fused MoE op widens them per tile, so their activations stay in the compute dtype (W8A16)."""
        return None if self.serialized else torch.float8_e4m3fn

    def describe(self) -> str:
        if not self.serialized:
            return "fp8 W8A8 quantized at load (per-channel weights, per-token activations)"
        return f"fp8 W8A8 checkpoint ({'static' if self.static_activations else 'dynamic per-token'} activations)"
