"""A step's grammar bitmask, and applying it to the logits on their device with plain tensor ops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GrammarBitmask:
    """One step's allowed tokens: bitmask row i is for the rows[i]-th sequence sampled this step, bit t % 32
    of word t // 32 set where token t is allowed."""

    rows: list[int]
    bitmask: np.ndarray  # int32 [len(rows), ceil(vocab / 32)]


def apply_grammar_bitmask(logits: torch.Tensor, grammar: GrammarBitmask) -> None:
    """Disallowed tokens of the constrained rows to -inf, in place; other rows are not touched.

    The words travel to the device (a few KiB a row) and are unpacked there: one shift and one AND over
    [rows, vocab], which is small next to the step, and the same ops on every backend.
    """
    device, vocab = logits.device, logits.shape[-1]
    words = torch.from_numpy(grammar.bitmask).to(device)
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(len(grammar.rows), -1)[:, :vocab].bool()
    if len(grammar.rows) == logits.shape[0]:
        logits.masked_fill_(~allowed, float("-inf"))
        return
    rows = torch.tensor(grammar.rows, device=device)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
