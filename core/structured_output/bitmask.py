"""A step's grammar bitmask, and applying it to the logits on their device with plain tensor ops."""

from __future__ import annotations

import functools
from collections.abc import Callable
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


class BitmaskStaging:
    """Pinned host buffers a step's bitmask and its row indices pass through on their way to the device, so
    that the copies do not wait for the work queued before them (the forward pass still running included),
    as copies from pageable memory do. A caller reuses them only once the previous step's copies are done."""

    def __init__(self, host_tensor: Callable[[tuple[int, ...], torch.dtype], torch.Tensor], max_rows: int,
                 vocab_size: int) -> None:
        self.words = host_tensor((max_rows, -(-vocab_size // 32)), torch.int32)
        self.rows = host_tensor((max_rows,), torch.int64)

    def upload(self, grammar: GrammarBitmask, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The bitmask words and row indices on `device`."""
        words = self.words[: len(grammar.rows), : grammar.bitmask.shape[1]]
        words.copy_(torch.from_numpy(grammar.bitmask))
        rows = self.rows[: len(grammar.rows)]
        rows.numpy()[...] = grammar.rows
        return words.to(device, non_blocking=True), rows.to(device, non_blocking=True)


def apply_grammar_bitmask(logits: torch.Tensor, grammar: GrammarBitmask, staging: BitmaskStaging | None = None
                          ) -> None:
    """Disallowed tokens of the constrained rows to -inf, in place; other rows are not touched.

    The words travel to the device (a few KiB a row) and are unpacked there with one lookup per byte (the
    words are little-endian, so byte k holds tokens 8k..8k+7): a gather and a fill over [rows, vocab],
    small next to the step, and the same ops on every backend.
    """
    device, vocab = logits.device, logits.shape[-1]
    if staging is None:
        words, rows = torch.from_numpy(grammar.bitmask).to(device), torch.tensor(grammar.rows, device=device)
    else:
        words, rows = staging.upload(grammar, device)
    allowed = _byte_bits(device)[words.view(torch.uint8).long()].view(len(grammar.rows), -1)[:, :vocab]
    if len(grammar.rows) == logits.shape[0]:
        logits.masked_fill_(~allowed, float("-inf"))
        return
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
