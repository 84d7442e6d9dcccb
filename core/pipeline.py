"""One rank's place in a pipeline: where its stage's input comes from and where its output goes.

Stage 0 embeds and sends the hidden state and residual on; each stage runs its layers and passes them to the
same tensor-parallel slice of the next; the last stage returns its final hidden states to stage 0, which
computes the logits and samples. Every rank knows the step's token count from the scheduler's message, so
each transfer's shape is known on both sides without a header.
"""

from __future__ import annotations

import torch

from paged.backends.interface import Communicator
from paged.parallel import ParallelLayout


class StageLinks:
    def __init__(self, layout: ParallelLayout, world: Communicator, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.layout, self.world = layout, world
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device

    def _receive(self, shape: tuple[int, ...], stage: int) -> torch.Tensor:
        return self.world.recv(torch.empty(shape, dtype=self.dtype, device=self.device), self.layout.rank_at(stage))

    def forward(self, model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta) -> torch.Tensor | None:
        """This stage's part of one step: the final hidden states on stage 0 (once the last stage sent
        them back), None elsewhere."""
        layout, tokens = self.layout, input_ids.shape[0]
        carried = None if layout.is_first_stage else self._receive((2, tokens, self.hidden_size), layout.stage - 1)
        out = model(input_ids, positions, kv_caches, meta, carried)
        if not layout.is_last_stage:
            self.world.send(out, layout.rank_at(layout.stage + 1))
            return self._receive((tokens, self.hidden_size), layout.pipeline - 1) if layout.is_first_stage else None
        self.world.send(out, layout.rank_at(0))
        return None
