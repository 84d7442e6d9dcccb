"""Next-token sampling for every request of an engine step at once, on the logits' device.

One step samples a row per request. Each stage runs as one batched tensor op over all rows, with
per-row parameters as [N, 1] tensors; a stage no row needs is skipped entirely (its field in
`SamplingBatch` is None), because this runs thousands of times per second and most batches use only
a few of the knobs. The one Python loop left is drawing noise for seeded rows, since a seed must
give the same tokens whatever else shares the batch.

Semantics follow vLLM: logprobs come from the raw logits; logit_bias, min_tokens and the penalties
shape the logits that greedy rows take the argmax of; random rows then apply temperature, min_p,
top-k and top-p, and sample with the exponential race.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from paged.errors import UserError
from paged.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """One step's sampling parameters as device tensors, built once per step by `build_sampling_batch`.

    A field is None when no row needs that stage, which is how the sampler knows to skip it. Greedy
    rows carry neutral values for the random-only stages (temperature, min_p, top-k, top-p) so they
    never switch those stages on.
    """

    all_greedy: bool
    greedy_mask: torch.Tensor | None  # [N] bool, only when greedy and random rows are mixed
    temperature: torch.Tensor | None  # [N, 1] float32, 1.0 on greedy rows
    min_p: torch.Tensor | None  # [N, 1] float32
    top_k: torch.Tensor | None  # [N, 1] int64, vocab_size where off
    max_top_k: int  # the largest top_k in use, so a top-k-only batch needs no full sort
    top_p: torch.Tensor | None  # [N, 1] float32
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None  # ([2, M] int64 (row, token), [M] float32)
    banned: torch.Tensor | None  # [2, M] int64 (row, token): stop/eos ids while short of min_tokens
    repetition_penalty: torch.Tensor | None  # [N, 1] float32
    seen_mask: torch.Tensor | None  # [N, V] bool: in the prompt or output (repetition_penalty)
    frequency_penalty: torch.Tensor | None  # [N, 1] float32
    presence_penalty: torch.Tensor | None  # [N, 1] float32
    output_counts: torch.Tensor | None  # [N, V] float32 occurrences in the output, for either penalty
    generators: tuple[tuple[int, torch.Generator], ...]  # (row, generator) of seeded random rows
    max_num_logprobs: int | None  # K, the most alternatives any row asked for; None: no row asked

    @property
    def shapes_logits(self) -> bool:
        """Whether any stage before the greedy argmax changes the logits."""
        return any(
            stage is not None
            for stage in (
                self.logit_bias,
                self.banned,
                self.repetition_penalty,
                self.frequency_penalty,
                self.presence_penalty,
            )
        )


@dataclass
class SamplerOutput:
    """Sampled ids and, when any row asked, their logprobs from the raw logits.

    The logprob columns cover every row, since computing them batched is cheaper than picking rows:
    a row that asked for fewer than K alternatives takes a prefix of the top columns, one that asked
    for none ignores them.
    """

    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N] float32 logprob of the sampled token
    ranks: torch.Tensor | None  # [N] int64, 1 = most likely
    top_ids: torch.Tensor | None  # [N, K] int64, None when K == 0
    top_logprobs: torch.Tensor | None  # [N, K] float32
    # A verification step's (spec_decode.rejection): how many of each sequence's draft tokens were kept; its
    # rows then hold a sequence's kept drafts and one token more, then rows not to read.
    num_accepted: torch.Tensor | None = None  # [sequences] int64


def build_sampling_batch(
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    generators: list[torch.Generator | None],
    vocab_size: int,
    device: torch.device,
) -> SamplingBatch:
    """Gather per-row parameters into device tensors, leaving out every stage no row needs.

    All per-row scalars travel to the device in one copy; token histories travel only for rows whose
    penalties read them. A generator is kept only for random rows: greedy rows draw no noise.
    """
    greedy = [p.greedy for p in params]
    # (values, neutral value): a column whose every value is neutral is never sent. The greedy mask's
    # neutral value is the batch's common one, so it is sent only when greedy and random rows mix.
    columns: dict[str, tuple[list[float], float]] = {
        "greedy_mask": ([float(g) for g in greedy], float(all(greedy))),
        "temperature": ([1.0 if g else p.temperature for p, g in zip(params, greedy)], 1.0),
        "min_p": ([0.0 if g else p.min_p for p, g in zip(params, greedy)], 0.0),
        "top_k": ([p.top_k if not g and 0 < p.top_k < vocab_size else vocab_size for p, g in zip(params, greedy)],
                  vocab_size),
        "top_p": ([1.0 if g else p.top_p for p, g in zip(params, greedy)], 1.0),
        "repetition_penalty": ([p.repetition_penalty for p in params], 1.0),
        "frequency_penalty": ([p.frequency_penalty for p in params], 0.0),
        "presence_penalty": ([p.presence_penalty for p in params], 0.0),
    }

    def rows_using(*names: str) -> list[bool]:
        return [any(columns[name][0][row] != columns[name][1] for name in names) for row in range(len(params))]

    col: dict[str, torch.Tensor] = {}
    used = [name for name in columns if any(rows_using(name))]
    if used:
        # float32 holds every top_k exactly: vocabularies are far below 2**24.
        packed = torch.tensor([columns[name][0] for name in used], dtype=torch.float32).to(device)
        col = {name: packed[i].unsqueeze(1) for i, name in enumerate(used)}

    penalized = rows_using("repetition_penalty", "frequency_penalty", "presence_penalty")
    output_counts = _token_counts(output_token_ids, penalized, vocab_size, device) if any(penalized) else None
    seen_mask = None
    if "repetition_penalty" in col:
        prompt_counts = _token_counts(prompt_token_ids, rows_using("repetition_penalty"), vocab_size, device)
        seen_mask = (prompt_counts + output_counts) > 0

    return SamplingBatch(
        all_greedy=all(greedy),
        greedy_mask=col["greedy_mask"].squeeze(1).bool() if "greedy_mask" in col else None,
        temperature=col.get("temperature"),
        min_p=col.get("min_p"),
        top_k=col["top_k"].long() if "top_k" in col else None,
        max_top_k=max((k for k in columns["top_k"][0] if k < vocab_size), default=0),
        top_p=col.get("top_p"),
        logit_bias=_logit_bias(params, vocab_size, device),
        banned=_min_tokens_bans(params, output_token_ids, vocab_size, device),
        repetition_penalty=col.get("repetition_penalty"),
        seen_mask=seen_mask,
        frequency_penalty=col.get("frequency_penalty"),
        presence_penalty=col.get("presence_penalty"),
        output_counts=output_counts,
        generators=tuple(
            (row, gen) for row, (gen, g) in enumerate(zip(generators, greedy, strict=True)) if gen is not None and not g
        ),
        max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=None),
    )


# The batch of rows that are all plain greedy (SamplingParams.plain_greedy): the common serving case,
# which needs no per-row work at all.
PLAIN_GREEDY = SamplingBatch(
    all_greedy=True, greedy_mask=None, temperature=None, min_p=None, top_k=None, max_top_k=0, top_p=None,
    logit_bias=None, banned=None, repetition_penalty=None, seen_mask=None, frequency_penalty=None,
    presence_penalty=None, output_counts=None, generators=(), max_num_logprobs=None,
)


def _token_counts(
    token_ids: list[list[int]], rows: list[bool], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[N, V] float32 occurrence counts of the selected rows' tokens (zero elsewhere).

    Tokens are padded with vocab_size into one [N, L] tensor and counted with a single scatter_add
    into V + 1 bins; the padding bin is dropped.
    """
    width = max((len(t) for t, keep in zip(token_ids, rows, strict=True) if keep), default=0)
    padded = np.full((len(rows), width), vocab_size, dtype=np.int64)
    for row, (tokens, keep) in enumerate(zip(token_ids, rows)):
        if keep:
            padded[row, : len(tokens)] = tokens
    index = torch.from_numpy(padded).to(device)
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def _logit_bias(
    params: list[SamplingParams], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sparse (row, token) -> bias, so a handful of biased tokens costs nothing per vocabulary entry."""
    entries = [(row, token, bias) for row, p in enumerate(params) for token, bias in (p.logit_bias or {}).items()]
    if not entries:
        return None
    bad = sorted({token for _, token, _ in entries if not 0 <= token < vocab_size})
    if bad:
        raise UserError(f"logit_bias has token ids outside the vocabulary of {vocab_size}: {bad}", param="logit_bias")
    rows, tokens, biases = zip(*entries)
    index = torch.tensor([rows, tokens], dtype=torch.int64, device=device)
    return index, torch.tensor(biases, dtype=torch.float32, device=device)


def _min_tokens_bans(
    params: list[SamplingParams], output_token_ids: list[list[int]], vocab_size: int, device: torch.device
) -> torch.Tensor | None:
    """(row, token) pairs that must not be sampled yet: a row short of min_tokens cannot stop.

    Ids outside the vocabulary are dropped: the model can never produce them anyway.
    """
    pairs: list[tuple[int, int]] = []
    for row, (p, output) in enumerate(zip(params, output_token_ids, strict=True)):
        if len(output) < p.min_tokens:
            stops = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | p.eos_token_ids
            pairs.extend((row, token) for token in sorted(stops) if token < vocab_size)
    if not pairs:
        return None
    return torch.tensor(pairs, dtype=torch.int64, device=device).T


class Sampler:
    """Samples one token per row from [N, V] logits.

    It never writes to the caller's logits, which the engine may still need (prompt logprobs,
    speculative decoding): stages run in place on one float32 copy, made only when some stage runs.
    """

    def __call__(
        self, logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None = None
    ) -> SamplerOutput:
        """Sample, with logprobs from the raw logits when any row asked for them.

        `generator` feeds the noise of rows without their own generator (torch's default when None).
        """
        raw_logprobs = None if batch.max_num_logprobs is None else torch.log_softmax(logits.float(), dim=-1)
        if batch.all_greedy and not batch.shapes_logits:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = _sample(logits.to(torch.float32, copy=True), batch, generator)
        if raw_logprobs is None:
            return SamplerOutput(token_ids, None, None, None, None)
        return SamplerOutput(token_ids, *gather_logprobs(raw_logprobs, token_ids, batch.max_num_logprobs))


def _sample(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None) -> torch.Tensor:
    """Shape the logits (in place, on the sampler's own copy), then argmax or sample each row."""
    greedy_ids, probs = target_distribution(logits, batch)
    if probs is None:
        return greedy_ids
    sampled = exponential_race(probs, batch.generators, generator)
    return sampled if greedy_ids is None else torch.where(batch.greedy_mask, greedy_ids, sampled)


def target_distribution(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What each row draws from once every stage has run on `logits` (float32, changed in place): the greedy
    rows' ids (None where no row is greedy) and the random rows' probabilities [N, V] (None where every row
    is greedy; greedy rows' values there are not meant to be used)."""
    _shape_logits(logits, batch)
    greedy_ids = logits.argmax(dim=-1) if batch.all_greedy or batch.greedy_mask is not None else None
    if batch.all_greedy:
        return greedy_ids, None
    if batch.temperature is not None:
        logits.div_(batch.temperature)
    if batch.min_p is not None:
        # prob < min_p * max_prob  <=>  logit < max_logit + log(min_p): no softmax needed.
        threshold = logits.amax(dim=-1, keepdim=True) + batch.min_p.log()
        logits.masked_fill_(logits < threshold, float("-inf"))
    if batch.top_p is not None:
        _top_k_top_p(logits, batch.top_k, batch.top_p)
    elif batch.top_k is not None:
        _top_k(logits, batch.top_k, batch.max_top_k)
    return greedy_ids, logits.softmax(dim=-1)


def _shape_logits(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """logit_bias, min_tokens bans, then repetition / frequency / presence penalties, in place."""
    if batch.logit_bias is not None:
        index, biases = batch.logit_bias
        logits.index_put_(tuple(index), biases, accumulate=True)
    if batch.banned is not None:
        logits[tuple(batch.banned)] = float("-inf")
    if batch.repetition_penalty is not None:
        # As HF and vLLM: a seen token's logit moves toward "less likely" whatever its sign.
        penalty = torch.where(batch.seen_mask, batch.repetition_penalty, 1.0)
        logits.mul_(torch.where(logits > 0, 1.0 / penalty, penalty))
    if batch.frequency_penalty is not None:
        logits.sub_(batch.frequency_penalty * batch.output_counts)
    if batch.presence_penalty is not None:
        logits.sub_(batch.presence_penalty * (batch.output_counts > 0))


def _top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """Keep each row's top_k logits (ties with the k-th included); a partial topk, not a full sort."""
    vocab_size = logits.shape[-1]
    kth = logits.topk(max_top_k, dim=-1).values.gather(1, top_k.clamp(max=max_top_k) - 1)
    kth.masked_fill_(top_k == vocab_size, float("-inf"))  # rows with top-k off keep everything
    logits.masked_fill_(logits < kth, float("-inf"))


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> None:
    """top-k, then nucleus over the renormalised survivors, with one ascending sort.

    Both cut a prefix of the ascending order, so the row's kept set is everything at or above one
    cutoff logit. Removing the longest prefix whose mass is <= 1 - top_p keeps the smallest set
    with mass >= top_p; with top_p = 1 only zero-probability tokens go, so the stage is a no-op
    there, and the top token always stays.
    """
    vocab_size = logits.shape[-1]
    ascending = logits.sort(dim=-1).values
    if top_k is not None:
        positions = torch.arange(vocab_size, device=logits.device)
        ascending.masked_fill_(positions < vocab_size - top_k, float("-inf"))
    cumulative = ascending.softmax(dim=-1).cumsum_(dim=-1)
    removed = (cumulative <= 1 - top_p).sum(dim=-1, keepdim=True).clamp_(max=vocab_size - 1)
    logits.masked_fill_(logits < ascending.gather(1, removed), float("-inf"))


def exponential_race(
    probs: torch.Tensor, generators: tuple[tuple[int, torch.Generator], ...], generator: torch.Generator | None
) -> torch.Tensor:
    """argmax(probs / E) with E ~ Exp(1) i.i.d. picks token i with probability probs[i] (probs need not sum
    to 1: the pick is proportional to them). Overwrites probs.

    Rows with their own generator redraw their noise from it, so a seeded row sees the same noise
    wherever it sits and whatever shares the batch.
    """
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, row_generator in generators:
        noise[row].exponential_(generator=row_generator)
    return probs.div_(noise).argmax(dim=-1)


def uniform(rows: int, generators: tuple[tuple[int, torch.Generator], ...], generator: torch.Generator | None,
            device: torch.device) -> torch.Tensor:
    """[rows] float32 draws from U[0, 1), seeded rows' from their own generator (as exponential_race's noise)."""
    draws = torch.rand(rows, generator=generator, device=device)
    for row, row_generator in generators:
        draws[row : row + 1].uniform_(generator=row_generator)
    return draws


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """For [N, V] logprobs and [N] chosen ids: (logprob [N], rank [N], top_ids [N, k], top_logprobs [N, k]).

    Shared by sampled tokens and prompt logprobs. The rank is 1 + the number of strictly more
    likely tokens, so ties share a rank. The top columns are None when k == 0.
    """
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1).add_(1)
    if k == 0:
        return chosen.squeeze(1), ranks, None, None
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    return chosen.squeeze(1), ranks, top_ids, top_logprobs
