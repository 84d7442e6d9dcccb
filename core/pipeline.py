"""One rank's place in a pipeline: where its stage's input comes from and where its output goes.

Stage 0 embeds and sends the hidden state and residual on; each stage runs its layers and passes them to the
same tensor-parallel slice of the next; the last stage returns its final hidden states to stage 0, which
computes the logits and samples. Every rank knows the step's token count from the scheduler's message, so
each transfer's shape is known on both sides without a header.

A step is started and finished in two calls, so stage 0 can start the next micro-batch while the later
stages work on this one: each stage takes its micro-batches in the order stage 0 sent them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from paged.backends.interface import Communicator
from paged.parallel import ParallelLayout


@dataclass
class Handoff:
    """Stage 0's activations of one micro-batch, sent on and not yet come back."""

    sending: Any  # the transfer's handle (wait() returns once the tensor may be reused)
    activations: torch.Tensor  # kept alive until the transfer is done
    num_tokens: int


class StageLinks:
    def __init__(self, layout: ParallelLayout, world: Communicator, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.layout, self.world = layout, world
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device

    def _receive(self, shape: tuple[int, ...], stage: int) -> torch.Tensor:
        return self.world.recv(torch.empty(shape, dtype=self.dtype, device=self.device), self.layout.rank_at(stage))

    def start(self, model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
              kv_caches: list[torch.Tensor], meta) -> Handoff | None:
        """Run this stage's layers of a step and hand the result on: on stage 0, without waiting for the
        transfer (its Handoff); elsewhere, once done (None)."""
        layout, tokens = self.layout, input_ids.shape[0]
        carried = None if layout.is_first_stage else self._receive((2, tokens, self.hidden_size), layout.stage - 1)
        out = model(input_ids, positions, kv_caches, meta, carried)
        sending = self.world.isend(out, layout.rank_at(0 if layout.is_last_stage else layout.stage + 1))
        if layout.is_first_stage:
            return Handoff(sending, out, tokens)
        sending.wait()
        return None

    def finish(self, handoff: Handoff | None) -> torch.Tensor | None:
        """The step's final hidden states, back from the last stage (on stage 0; None elsewhere)."""
        if handoff is None:
            return None
        hidden = self._receive((handoff.num_tokens, self.hidden_size), self.layout.pipeline - 1)
        handoff.sending.wait()
        return hidden
