"""Checking draft tokens against the target model: keep the longest prefix it accepts, add one token of its own.

A sequence with k drafts d_1..d_k has k + 1 rows of logits, row j scoring the token after d_1..d_j. Greedy
rows accept d_j where it is the argmax. Random rows run rejection sampling: d_j is kept with probability
p_j(d_j) (a proposer that names one token puts all of its probability there, so min(1, p / q) = p), and the
first refused one is replaced by a draw from p_j with d_j taken out; a token drawn this way is distributed
as p_j exactly. Where all k are kept the last row adds a token drawn from p_{k+1}. Every row is decided at
once on the device; one small read tells the host how many tokens each sequence gained.
"""

from __future__ import annotations

import torch

from paged.sampler import (
    SamplerOutput,
    SamplingBatch,
    exponential_race,
    gather_logprobs,
    target_distribution,
    uniform,
)


def verify(logits: torch.Tensor, batch: SamplingBatch, drafts: torch.Tensor, first_rows: torch.Tensor,
           generator: torch.Generator | None) -> SamplerOutput:
    """`logits` [R, V], the rows of each sequence in turn; `batch` its sampling parameters per row; `drafts`
    [R] int64, the draft token each row checks (-1 on each sequence's last row, which checks none);
    `first_rows` [S] int64, where each sequence's rows begin. Returns per row the token it emits (its draft
    where kept) and per sequence the number of drafts kept."""
    rows, device = logits.shape[0], logits.device
    raw_logprobs = None if batch.max_num_logprobs is None else torch.log_softmax(logits.float(), dim=-1)
    checks = drafts >= 0
    draft = drafts.clamp(min=0)
    if batch.all_greedy and not batch.shapes_logits:
        greedy_ids, probs = logits.argmax(dim=-1), None
    else:
        greedy_ids, probs = target_distribution(logits.to(torch.float32, copy=True), batch)
    if probs is None:
        kept, emitted = checks & (greedy_ids == draft), greedy_ids
    else:
        p_draft = probs.gather(1, draft[:, None]).squeeze(1)
        kept = checks & (uniform(rows, batch.generators, generator, device) < p_draft)
        # The draft's probability taken out: what a refused row draws from (its mass is 1 - p_draft).
        residual = probs.scatter_(1, draft[:, None], torch.where(checks, 0.0, p_draft)[:, None])
        emitted = exponential_race(residual, batch.generators, generator)
        if greedy_ids is not None:
            kept = torch.where(batch.greedy_mask, checks & (greedy_ids == draft), kept)
            emitted = torch.where(batch.greedy_mask, greedy_ids, emitted)
    sequence = torch.zeros(rows, dtype=torch.int64, device=device)
    sequence[first_rows[1:]] = 1
    sequence = sequence.cumsum_(0)
    index = torch.arange(rows, device=device)
    # Each sequence's first row that is not kept (its last row at the latest).
    first_refused = torch.full_like(first_rows, rows).scatter_reduce_(
        0, sequence, torch.where(kept, rows, index), reduce="amin")
    num_accepted = first_refused - first_rows
    tokens = torch.where(index - first_rows[sequence] < num_accepted[sequence], draft, emitted)
    if raw_logprobs is None:
        return SamplerOutput(tokens, None, None, None, None, num_accepted)
    return SamplerOutput(tokens, *gather_logprobs(raw_logprobs, tokens, batch.max_num_logprobs), num_accepted)
