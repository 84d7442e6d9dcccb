"""Layer ops with fewer torch calls for the CPU, where each call's overhead is a large share of a decode
step. Same math as models/ops.py (which stays the reference), in the model's dtype like the reference
implementations. (torch's fused rms_norm measured slower than the plain version here, so it is not used.)"""

from __future__ import annotations

import torch


class Rotary:
    """Rotary embedding whose cos/sin rows are gathered once per step, not once per layer.

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
