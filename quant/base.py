"""The quantization-method seam: a checkpoint format (or an on-the-fly method) as vLLM names it.

A method reads its config (the checkpoint's `quantization_config`, or `--quantization NAME`), says which
checkpoint tensors a quantized linear layer holds (`parts`), and converts one matrix's parts into one of
the forms in quant/matrix.py. The backend computes from that form through the LinearKernel it offers for
it (`Backend.linear_kernel`), so a format is written once, and a kernel once per backend and form.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from paged.quant.matrix import QuantizedMatrix, ScaledMatrix

Matrix = QuantizedMatrix | ScaledMatrix

# Kernel forms: "int" is a QuantizedMatrix (weight-only, 4- or 8-bit codes), "fp8" and "int8" a ScaledMatrix
# of that weight type (W8A8 where the backend has the units).
FORMS = ("int", "fp8", "int8")


class QuantMethod(ABC):
    name: ClassVar[str]
    # Whether `--quantization NAME` can quantize a dense checkpoint at load (FP8) rather than read a quantized one.
    on_the_fly: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any] | None) -> QuantMethod:
        """The method for a checkpoint's quantization_config; None (on the fly from a dense checkpoint) only
        reaches methods that are on_the_fly (quant/registry.py refuses the others first)."""

    @property
    @abstractmethod
    def form(self) -> str:
        """Which of FORMS its matrices convert to."""

    @property
    @abstractmethod
    def parts(self) -> frozenset[str]:
        """Suffixes of the checkpoint tensors one quantized linear holds ("qweight", "scales", ...)."""

    @property
    def complete_parts(self) -> frozenset[str] | None:
        """Parts that make a matrix complete, where known (its others optional): the layer converts it as soon
        as they are in, freeing them, rather than after the whole checkpoint is read."""
        return None

    @abstractmethod
    def convert(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> Matrix:
        """One matrix of `shape` [outputs, inputs] from its checkpoint tensors (already on the device)."""

    @abstractmethod
    def random(self, shape: tuple[int, int], device: torch.device, generator: torch.Generator) -> Matrix:
        """A matrix of realistic values for `load_format="dummy"` (benchmarks of a shape)."""

    @abstractmethod
    def describe(self) -> str:
        """For the start-up log, e.g. "awq 4-bit, groups of 128"."""

    def expert_dtype(self) -> torch.dtype | None:
        """The type a mixture of experts' stacked matrices are quantized to at load, per expert and output
        channel, for the fused MoE op to compute from; None where this method has no form for experts."""
        return None

    def check_modules(self, ignored: list[str]) -> None:
        """Refuse configs that leave decoder layers unquantized: every decoder linear shares one method here,
        and only the LM head (always computed densely) may be left out."""
        others = [name for name in ignored if "lm_head" not in name]
        if others:
            raise ValueError(f"{self.name} checkpoints that leave {others[:3]} unquantized are not supported")


def random_codes(shape: tuple[int, int], bits: int, group_size: int, device: torch.device,
                 generator: torch.Generator) -> QuantizedMatrix:
    """Uniform codes around a zero in the middle, scaled to the spread init_random gives dense weights (std
    0.02): uniform 4-bit codes spread ~4.6 around 8, 8-bit ones ~74 around 128."""
    groups = (shape[0], groups_of(shape[1], group_size))
    spread = 4.6 if bits == 4 else 74.0
    return QuantizedMatrix(torch.randint(0, 1 << bits, shape, dtype=torch.uint8, device=device, generator=generator),
                           torch.full(groups, 0.02 / spread, device=device), bits, group_size,
                           zeros=torch.full(groups, float(1 << (bits - 1)), device=device))


def random_dense(shape: tuple[int, int], device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """The spread init_random gives dense weights (std 0.02)."""
    return torch.empty(shape, device=device).normal_(0.0, 0.02, generator=generator)


def groups_of(columns: int, group_size: int) -> int:
    return -(-columns // group_size)


def unpack_int32(packed: torch.Tensor, bits: int, count: int, order: list[int] | None = None) -> torch.Tensor:
    """Codes packed `32 // bits` to an int32 along the last dim (value i at bits i*bits, or at order[i]'s
    place for AWQ's interleaved order) as uint8, cut to `count` values per row."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if order is not None:
        values = values[..., order]
    return values.reshape(*packed.shape[:-1], -1)[..., :count].to(torch.uint8)


def quantize_rows(dense: torch.Tensor, dtype: torch.dtype) -> ScaledMatrix:
    """Per-output-channel symmetric quantization to fp8 or int8 (a scale per row from its largest magnitude):
    how `--quantization fp8` turns a dense checkpoint into FP8 weights."""
    top = torch.finfo(dtype).max if dtype.is_floating_point else torch.iinfo(dtype).max
    scale = dense.float().abs().amax(dim=1).clamp(min=1e-12) / top
    values = dense.float() / scale[:, None]
    values = values.clamp(-top, top) if dtype.is_floating_point else values.round().clamp(-top - 1, top)
    return ScaledMatrix(values.to(dtype), scale)
