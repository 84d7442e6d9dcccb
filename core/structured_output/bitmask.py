"""A step's grammar bitmask, and applying it to the logits on their device with plain tensor ops."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class GrammarBitmask:
    """One step's allowed tokens: bitmask row i is for the rows[i]-th sequence sampled this step, bit t % 32
    of word t // 32 set where token t is allowed. The tensors live on the host (pinned where the backend
    pins: the engine's manager fills them in place), so their copies to the device wait for nothing queued."""

    bitmask: torch.Tensor  # int32 [len(rows), ceil(vocab / 32)]
    rows: torch.Tensor  # int64: the sampled rows constrained


@functools.cache
def _byte_bits(device: torch.device) -> torch.Tensor:
    """bool [256, 8]: the bits of each byte value, lowest first."""
    return ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1).bool()


def apply_grammar_bitmask(logits: torch.Tensor, grammar: GrammarBitmask) -> None:
    """Disallowed tokens of the constrained rows to -inf, in place; other rows are not touched.

    The words travel to the device (a few KiB a row) and are unpacked there with one lookup per byte (the
    words are little-endian, so byte k holds tokens 8k..8k+7): a gather and a fill over [rows, vocab],
    small next to the step, and the same ops on every backend.
    """
    device, vocab = logits.device, logits.shape[-1]
    words = grammar.bitmask.to(device, non_blocking=True)
    allowed = _byte_bits(device)[words.view(torch.uint8).long()].view(words.shape[0], -1)[:, :vocab]
    if words.shape[0] == logits.shape[0]:
        logits.masked_fill_(~allowed, float("-inf"))
        return
    rows = grammar.rows.to(device, non_blocking=True)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
