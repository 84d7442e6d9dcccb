"""The LinearMethod of quantized decoder layers: checkpoint parts in, the backend's kernel out.

Loading keeps each matrix's checkpoint tensors as they come (a layer packing q, k and v holds three
matrices' worth); once all are in, the method converts each to its form, cuts this rank's shard out of it
exactly as a dense weight is cut (the layer says how), stacks the parts, and hands the result to the
backend's LinearKernel, which packs it into its own layout once.
"""

from __future__ import annotations

import torch

from paged.backends.interface import LinearKernel
from paged.models.ops import LinearMethod
from paged.quant.base import Matrix, QuantMethod


class QuantizedLinearMethod(LinearMethod):
    def __init__(self, method: QuantMethod, kernel: LinearKernel) -> None:
        self.method = method
        self.kernel = kernel

    def create_weights(self, layer: torch.nn.Module, outputs: int, inputs: int) -> None:
        layer.checkpoint_parts: dict[int, dict[str, torch.Tensor]] = {}
        layer.device = torch.empty(0).device  # the device the model is being built on

    def takes_part(self, suffix: str) -> bool:
        return suffix in self.method.parts

    def keep_part(self, layer: torch.nn.Module, suffix: str, tensor: torch.Tensor, shard: int | None) -> None:
        layer.checkpoint_parts.setdefault(shard or 0, {})[suffix] = tensor.to(layer.device)
        needed = self.method.complete_parts
        if needed is not None and all(needed <= layer.checkpoint_parts.get(i, {}).keys()
                                      for i in range(len(layer.part_shapes))):
            self._convert(layer)

    def fill_random(self, layer: torch.nn.Module, generator: torch.Generator) -> None:
        layer.matrix = self._stack(layer, [self.method.random(shape, layer.device, generator)
                                           for shape in layer.part_shapes])
        layer.checkpoint_parts = {}

    def process_weights(self, layer: torch.nn.Module) -> None:
        if not hasattr(layer, "matrix"):
            self._convert(layer)
        layer.quant_state = self.kernel.prepare(layer.matrix)
        del layer.matrix

    def _convert(self, layer: torch.nn.Module) -> None:
        matrices = []
        for index, shape in enumerate(layer.part_shapes):
            parts = layer.checkpoint_parts.get(index)
            if not parts:
                raise ValueError(f"the checkpoint lacks part {index} of a {self.method.name} layer")
            matrices.append(self.method.convert(parts, shape))
        layer.matrix = self._stack(layer, matrices)
        layer.checkpoint_parts = {}

    @staticmethod
    def _stack(layer: torch.nn.Module, matrices: list[Matrix]) -> Matrix:
        shards = [layer.shard_of(m, part) for part, m in enumerate(matrices)]
        return shards[0] if len(shards) == 1 else type(shards[0]).stack(shards)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel.apply(layer.quant_state, x, bias)

    def storage(self, layer: torch.nn.Module) -> str:
        return f"{self.method.describe()} ({self.kernel.name})"

    def weight_bytes(self, layer: torch.nn.Module) -> int:
        return self.kernel.nbytes(layer.quant_state)
