"""A step's grammar bitmask, and applying it to the logits on their device with plain tensor ops."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GrammarBitmask:
    """One step's allowed tokens: bitmask row i is for the rows[i]-th sequence sampled this step, bit t % 32
    of word t // 32 set where token t is allowed."""

    rows: list[int]
    bitmask: np.ndarray  # int32 [len(rows), ceil(vocab / 32)]


@functools.cache
def _byte_bits(device: torch.device) -> torch.Tensor:
    """bool [256, 8]: the bits of each byte value, lowest first."""
    return ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1).bool()


def apply_grammar_bitmask(logits: torch.Tensor, grammar: GrammarBitmask, staging: torch.Tensor | None = None
                          ) -> None:
    """Disallowed tokens of the constrained rows to -inf, in place; other rows are not touched.

    The words travel to the device (a few KiB a row) and are unpacked there with one lookup per byte (the
    words are little-endian, so byte k holds tokens 8k..8k+7): a gather and a fill over [rows, vocab],
    small next to the step, and the same ops on every backend. `staging` (pinned, at least as large as the
    bitmask) makes the copy asynchronous: from pageable memory it would first wait for the work queued on
    the device, the forward pass still running included. The caller must know the previous copy from it done.
    """
    device, vocab = logits.device, logits.shape[-1]
    host = torch.from_numpy(grammar.bitmask)
    if staging is not None:
        staging = staging[: host.shape[0], : host.shape[1]]
        staging.copy_(host)
        host = staging
    words = host.to(device, non_blocking=staging is not None)
    allowed = _byte_bits(device)[words.view(torch.uint8).long()].view(len(grammar.rows), -1)[:, :vocab]
    if len(grammar.rows) == logits.shape[0]:
        logits.masked_fill_(~allowed, float("-inf"))
        return
    rows = torch.tensor(grammar.rows, device=device)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
