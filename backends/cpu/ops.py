"""Layer ops of the CPU backend: the compiled kernels (native.py) of the activations' dtype, torch otherwise.

A decode step's time outside the matrix products is mostly the dispatch of many small torch calls, so
each op here is one call where the kernels are built, and as few torch calls as the math allows where
they are not. Same math as models/ops.py (which stays the reference), in the model's dtype like the
reference implementations. (torch's fused rms_norm measured slower than the plain version here.)
"""

from __future__ import annotations

from typing import Any

import torch

from paged.backends.cpu.native import LayerKernels
from paged.models import ops as reference


class Rotary:
    """Rotary embedding in torch whose cos/sin rows are gathered once per step, not once per layer.

    Every layer of a step passes the same positions; the key (storage, version) changes whenever the
    runner writes new positions into its buffer, so a reused buffer never serves stale rows.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def _cos_sin(self, positions: torch.Tensor, cos_sin: torch.Tensor, dtype: torch.dtype):
        key = (positions.data_ptr(), positions._version, positions.numel(), cos_sin.data_ptr(), dtype)
        if key != self._key:
            cos, sin = cos_sin[positions].chunk(2, dim=-1)
            # Full-width rows; the sign of rotate_half is folded into sin.
            self._rows = (torch.cat((cos, cos), -1).to(dtype).unsqueeze(1),
                          torch.cat((-sin, sin), -1).to(dtype).unsqueeze(1))
            self._key = key
        return self._rows

    def __call__(self, positions, query, key, cos_sin):
        cos, sin = self._cos_sin(positions, cos_sin, query.dtype)
        half = cos_sin.shape[-1] // 2

        def rotate(x: torch.Tensor) -> torch.Tensor:
            heads = x.view(x.shape[0], -1, 2 * half)
            return (heads * cos + heads.roll(half, dims=-1) * sin).view(x.shape)

        return rotate(query), rotate(key)


class LayerOps:
    """The CPU backend's entries of the op table."""

    def __init__(self, kernels: list[LayerKernels]) -> None:
        self.by_dtype = {k.dtype: k for k in kernels}
        self._torch_rotary = Rotary()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        kernels = self.by_dtype.get(x.dtype)
        if kernels is None or weight.dtype != x.dtype:
            return reference.rms_norm(x, weight, eps)
        return kernels.rms_norm(x, None, weight, eps)[0]

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        kernels = self.by_dtype.get(x.dtype)
        if kernels is None or weight.dtype != x.dtype:
            return reference.add_rms_norm(x, residual, weight, eps)
        return kernels.rms_norm(x, residual, weight, eps)

    def rotary(self, positions, query, key, cos_sin):
        kernels = self.by_dtype.get(query.dtype)
        if kernels is None or cos_sin.dtype != torch.float32:
            return self._torch_rotary(positions, query, key, cos_sin)
        return kernels.rotary(positions, query, cos_sin), kernels.rotary(positions, key, cos_sin)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self.by_dtype.get(x.dtype)
        if kernels is None or not hasattr(kernels, "silu_and_mul"):
            return reference.silu_and_mul(x)
        return kernels.silu_and_mul(x)

    def table(self) -> dict[str, Any]:
        return {"rms_norm": self.rms_norm, "add_rms_norm": self.add_rms_norm, "rotary": self.rotary,
                "silu_and_mul": self.silu_and_mul}
