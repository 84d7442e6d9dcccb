"""Sampler tests: every stage against a plain per-row NumPy reference, sampling against its distribution."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paged.errors import UserError
from paged.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    _shape_logits,  # the pre-argmax logits are not observable through the public API
    build_sampling_batch,
    gather_logprobs,
)
from paged.sampling_params import SamplingParams

CPU = torch.device("cpu")
sampler = Sampler()


def make_batch(
    params: list[SamplingParams],
    vocab: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingBatch:
    empty: list[list[int]] = [[] for _ in params]
    generators = generators or [None] * len(params)
    return build_sampling_batch(params, prompts or empty, outputs or empty, generators, vocab, CPU)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, scale, (rows, vocab)).astype(np.float32))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- per-row references


def ref_shape(row: np.ndarray, p: SamplingParams, prompt: list[int], output: list[int]) -> np.ndarray:
    """logit_bias, min_tokens, repetition / frequency / presence penalties, one token at a time."""
    x = row.astype(np.float64).copy()
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    if len(output) < p.min_tokens:
        for token in list(p.stop_token_ids) + ([] if p.ignore_eos else list(p.eos_token_ids)):
            x[token] = -np.inf
    for token in set(prompt) | set(output):
        x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token in set(output):
        x[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return x


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_distribution(row: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution a random row samples from: temperature, min_p, top_k, top_p, renormalised."""
    x = row.astype(np.float64) / p.temperature
    probs = softmax(x)
    keep = probs >= p.min_p * probs.max()
    if p.top_k:
        survivors = np.sort(x[keep])[::-1]
        keep &= x >= survivors[min(p.top_k, len(survivors)) - 1]
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    smallest = np.searchsorted(np.cumsum(probs[order]), p.top_p) + 1  # smallest prefix with mass >= top_p
    nucleus = np.zeros_like(probs)
    nucleus[order[:smallest]] = probs[order[:smallest]]
    return nucleus / nucleus.sum()


def chi_square_bound(dof: int, z: float = 3.72) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at upper tail ~1e-4."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


# ---------------------------------------------------------------- greedy and logit shaping


def test_greedy_is_argmax_and_logits_untouched() -> None:
    logits = random_logits(16, 1000, seed=0)
    before = logits.clone()
    params = [SamplingParams(temperature=t) for t in (0.0, 1e-6) * 8]
    out = sampler(logits, make_batch(params, 1000))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.ranks is None and out.top_ids is None and out.top_logprobs is None
    assert torch.equal(logits, before)


@st.composite
def shaping_rows(draw: st.DrawFn, vocab: int) -> tuple[SamplingParams, list[int], list[int]]:
    tokens = st.integers(0, vocab - 1)
    params = SamplingParams(
        temperature=draw(st.sampled_from([0.0, 1.0])),
        repetition_penalty=draw(st.just(1.0) | st.floats(0.5, 2.0)),
        frequency_penalty=draw(st.just(0.0) | st.floats(-2.0, 2.0)),
        presence_penalty=draw(st.just(0.0) | st.floats(-2.0, 2.0)),
        logit_bias=draw(st.none() | st.dictionaries(tokens, st.floats(-10.0, 10.0), max_size=4)),
        min_tokens=draw(st.integers(0, 4)),
        stop_token_ids=draw(st.lists(tokens, max_size=2)),
        eos_token_ids=frozenset(draw(st.sets(tokens, max_size=2))),
        ignore_eos=draw(st.booleans()),
    )
    return params, draw(st.lists(tokens, max_size=12)), draw(st.lists(tokens, max_size=8))


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(shaping_rows(vocab=24), min_size=1, max_size=6), seed=st.integers(0, 2**32 - 1))
def test_shaping_matches_reference(rows: list[tuple[SamplingParams, list[int], list[int]]], seed: int) -> None:
    params, prompts, outputs = map(list, zip(*rows))
    logits = random_logits(len(rows), 24, seed)
    batch = make_batch(params, 24, prompts, outputs)
    expected = np.stack([ref_shape(logits[i].numpy(), *row) for i, row in enumerate(rows)])

    shaped = logits.clone()
    _shape_logits(shaped, batch)
    np.testing.assert_allclose(shaped.numpy(), expected, rtol=1e-5, atol=1e-5)

    out = sampler(logits, batch)
    greedy = [p.greedy for p in params]
    np.testing.assert_array_equal(out.token_ids.numpy()[greedy], expected.argmax(-1)[greedy])


def test_min_tokens_bans_stops_only_while_short() -> None:
    vocab, eos, stop = 10, 3, 7
    logits = torch.zeros(1, vocab)
    logits[0, eos] = logits[0, stop] = 50.0  # the model wants to stop right away

    def greedy_token(output_len: int, **kw: object) -> int:
        params = SamplingParams(
            temperature=0.0, min_tokens=2, stop_token_ids=[stop], eos_token_ids=frozenset({eos}), **kw
        )
        return int(sampler(logits, make_batch([params], vocab, outputs=[[0] * output_len])).token_ids)

    assert greedy_token(0) not in (eos, stop)
    assert greedy_token(1) not in (eos, stop)
    assert greedy_token(2) in (eos, stop)
    logits[0, eos] = 60.0
    assert greedy_token(0, ignore_eos=True) == eos  # ignore_eos frees eos, but stop ids stay banned
    logits[0, eos] = 0.0
    assert greedy_token(0, ignore_eos=True) not in (eos, stop)


def test_logit_bias_outside_vocab_is_a_user_error() -> None:
    with pytest.raises(UserError) as info:
        make_batch([SamplingParams(logit_bias={12: 1.0})], vocab=10)
    assert info.value.param == "logit_bias"


def test_batch_leaves_out_unneeded_stages() -> None:
    plain = make_batch([SamplingParams(temperature=0.0)] * 3, 50)
    assert plain.all_greedy and not plain.shapes_logits and plain.greedy_mask is None
    assert plain.temperature is None and plain.top_k is None and plain.top_p is None and plain.min_p is None
    assert plain.output_counts is None and plain.seen_mask is None and plain.max_num_logprobs is None

    # Greedy rows never switch random-only stages on; presence alone needs counts but no seen mask.
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.5), SamplingParams(top_k=5, presence_penalty=0.5)]
    batch = make_batch(params, 50, outputs=[[1], [2, 2]])
    assert batch.top_p is None and batch.top_k is not None and batch.max_top_k == 5
    assert batch.repetition_penalty is None and batch.seen_mask is None and batch.frequency_penalty is None
    assert batch.output_counts is not None and batch.output_counts[0].sum() == 0 and batch.output_counts[1, 2] == 2
    assert batch.greedy_mask.tolist() == [True, False]


def test_empty_batch() -> None:
    out = sampler(torch.empty(0, 8), make_batch([], 8))
    assert out.token_ids.shape == (0,)


# ---------------------------------------------------------------- temperature, min_p, top-k, top-p


@st.composite
def filter_params(draw: st.DrawFn) -> SamplingParams:
    return SamplingParams(
        temperature=draw(st.floats(0.05, 3.0)),
        top_k=draw(st.sampled_from([0, 1, 2, 5, 20, 63, 64, 100])),
        top_p=draw(st.sampled_from([1.0, 1e-9]) | st.floats(1e-3, 1.0)),
        min_p=draw(st.just(0.0) | st.floats(0.0, 1.0)),
        seed=draw(st.none() | st.integers(0, 2**31)),
    )


@settings(max_examples=100, deadline=None)
@given(params=st.lists(filter_params(), min_size=1, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_samples_stay_inside_the_allowed_set(params: list[SamplingParams], seed: int) -> None:
    vocab, repeats = 64, 64
    logits = random_logits(len(params), vocab, seed).repeat_interleave(repeats, dim=0)
    rows = [p for p in params for _ in range(repeats)]
    generators = [None if p.seed is None else seeded(p.seed + i) for i, p in enumerate(rows)]
    out = sampler(logits, make_batch(rows, vocab, generators=generators), seeded(seed))
    for i, p in enumerate(params):
        allowed = ref_distribution(logits[i * repeats].numpy(), p) > 0
        assert allowed[out.token_ids[i * repeats : (i + 1) * repeats].numpy()].all()


# (sampled settings, the other row sharing the batch): a top_p companion sends every row down the
# sorted top-k/top-p path, any other keeps a top-k row on the partial-topk path.
DISTRIBUTION_CASES = {
    "plain": (SamplingParams(), SamplingParams(temperature=0.0)),
    "temperature-0.5": (SamplingParams(temperature=0.5), SamplingParams()),
    "temperature-2": (SamplingParams(temperature=2.0), SamplingParams()),
    "top_k": (SamplingParams(top_k=4), SamplingParams(min_p=0.3)),
    "top_k-sorted": (SamplingParams(top_k=4), SamplingParams(top_p=0.3)),
    "top_p": (SamplingParams(top_p=0.7), SamplingParams(top_k=2)),
    "min_p": (SamplingParams(min_p=0.1), SamplingParams(top_p=0.3)),
    "all": (SamplingParams(temperature=1.5, top_k=6, top_p=0.9, min_p=0.05), SamplingParams(temperature=0.0)),
    "seeded": (SamplingParams(top_k=5, seed=1), SamplingParams(top_k=2, seed=2)),
}


@pytest.mark.parametrize("params,companion", DISTRIBUTION_CASES.values(), ids=DISTRIBUTION_CASES.keys())
def test_empirical_distribution_matches_reference(params: SamplingParams, companion: SamplingParams) -> None:
    vocab, draws = 12, 30_000
    row = random_logits(1, vocab, seed=7, scale=1.0)
    logits = torch.cat([row.expand(draws, vocab), random_logits(1, vocab, seed=8)])
    rows = [params] * draws + [companion]
    generators = [None if p.seed is None else seeded(p.seed + i) for i, p in enumerate(rows)]
    tokens = sampler(logits, make_batch(rows, vocab, generators=generators), seeded(0)).token_ids[:draws]

    expected = ref_distribution(row[0].numpy(), params)
    counts = np.bincount(tokens.numpy(), minlength=vocab)
    assert counts[expected == 0].sum() == 0
    allowed = expected > 0
    chi2 = (((counts - draws * expected) ** 2)[allowed] / (draws * expected[allowed])).sum()
    assert chi2 < chi_square_bound(max(int(allowed.sum()) - 1, 1))


def test_temperature_sharpens_and_flattens() -> None:
    vocab, draws = 32, 4000
    logits = random_logits(1, vocab, seed=3, scale=1.0).expand(draws, vocab)

    def entropy(temperature: float) -> float:
        tokens = sampler(logits, make_batch([SamplingParams(temperature=temperature)] * draws, vocab), seeded(1))
        freq = np.bincount(tokens.token_ids.numpy(), minlength=vocab) / draws
        return float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())

    cold, warm, hot = entropy(0.01), entropy(1.0), entropy(100.0)
    assert cold == 0.0  # at 0.01 the gaps between logits dwarf the noise: always the argmax
    assert cold < warm < hot
    assert hot > 0.98 * math.log(vocab)  # near uniform


# ---------------------------------------------------------------- seeds and mixed batches


def run_steps(params: list[SamplingParams], row: int, steps: list[torch.Tensor], base_seed: int) -> list[int]:
    """Tokens of one row over several steps, each request keeping its generator across steps."""
    generators = [None if p.seed is None else seeded(p.seed) for p in params]
    batch = make_batch(params, steps[0].shape[1], generators=generators)
    return [int(sampler(logits, batch, seeded(base_seed + i)).token_ids[row]) for i, logits in enumerate(steps)]


def test_seeded_row_ignores_batch_composition_and_position() -> None:
    vocab = 500
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone_steps = [random_logits(1, vocab, seed=s, scale=1.0) for s in range(6)]
    alone = run_steps([target], 0, alone_steps, base_seed=0)

    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=99),
        SamplingParams(top_k=3),
        SamplingParams(min_p=0.2, presence_penalty=1.0),
        SamplingParams(),
        SamplingParams(temperature=0.0, seed=5),
    ]
    for position in (0, 3, 6):
        params = others[:position] + [target] + others[position:]
        steps = [
            torch.cat([random_logits(position, vocab, 100 + s), own, random_logits(6 - position, vocab, 200 + s)])
            for s, own in enumerate(alone_steps)
        ]
        assert run_steps(params, position, steps, base_seed=1000 * position + 17) == alone


def test_different_seeds_give_different_tokens() -> None:
    vocab, seeds = 1000, 16
    steps = [torch.zeros(seeds, vocab) for _ in range(8)]  # uniform: the noise alone decides
    params = [SamplingParams(seed=s) for s in range(seeds)]
    sequences = {tuple(run_steps(params, row, steps, base_seed=0)) for row in range(seeds)}
    assert len(sequences) == seeds


def test_mixed_batch() -> None:
    vocab = 300
    params = [
        SamplingParams(temperature=0.0, logit_bias={5: 100.0}),
        SamplingParams(top_k=3),
        SamplingParams(temperature=0.7, seed=42),
        SamplingParams(temperature=0.0, seed=7),  # a seed on a greedy row changes nothing
        SamplingParams(top_p=0.2, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, frequency_penalty=2.0),
    ]
    prompts = [[], [], [], [], [1, 2, 3], []]
    outputs = [[], [], [], [], [4], [9, 9, 9]]
    logits = random_logits(len(params), vocab, seed=11)
    generators = [None if p.seed is None else seeded(p.seed) for p in params]
    out = sampler(logits, make_batch(params, vocab, prompts, outputs, generators))
    tokens = out.token_ids.tolist()

    assert tokens[0] == 5
    assert tokens[1] in logits[1].topk(3).indices.tolist()
    alone = sampler(logits[2:3], make_batch([params[2]], vocab, generators=[seeded(42)]))
    assert tokens[2] == int(alone.token_ids)
    assert tokens[3] == int(logits[3].argmax())
    shaped = ref_shape(logits[4].numpy(), params[4], prompts[4], outputs[4])
    assert ref_distribution(shaped.astype(np.float32), params[4])[tokens[4]] > 0
    assert tokens[5] == int(ref_shape(logits[5].numpy(), params[5], prompts[5], outputs[5]).argmax())


# ---------------------------------------------------------------- logprobs


def check_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int, got: tuple) -> None:
    """Compare gather_logprobs-shaped results with argsort over the given logprobs."""
    chosen, ranks, top_ids, top_vals = got
    order = torch.argsort(logprobs, dim=-1, descending=True)
    for i, token in enumerate(token_ids.tolist()):
        assert chosen[i] == logprobs[i, token]
        assert ranks[i] == order[i].tolist().index(token) + 1
    if k == 0:
        assert top_ids is None and top_vals is None
        return
    assert torch.equal(top_ids, order[:, :k])
    assert torch.equal(top_vals, logprobs.gather(1, order[:, :k]))


@pytest.mark.parametrize("asked", [[None, 0], [3, None, 0, 1], [5, 5, 5, 5]])
def test_logprobs_come_from_raw_logits(asked: list[int | None]) -> None:
    vocab = 400
    variants = [
        SamplingParams(temperature=0.0, logit_bias={0: 30.0}),
        SamplingParams(temperature=0.5, top_k=10, presence_penalty=2.0),
        SamplingParams(seed=3, top_p=0.5),
        SamplingParams(repetition_penalty=2.0, min_p=0.3),
    ]
    params = [replace(v, logprobs=a) for v, a in zip(variants, asked)]
    logits = random_logits(len(params), vocab, seed=5)
    generators = [None if p.seed is None else seeded(p.seed) for p in params]
    batch = make_batch(params, vocab, [[1, 2]] * len(params), [[3]] * len(params), generators)
    out: SamplerOutput = sampler(logits, batch)

    k = max(a for a in asked if a is not None)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs.dtype == torch.float32 and out.ranks.dtype == torch.int64
    check_logprobs(raw, out.token_ids, k, (out.logprobs, out.ranks, out.top_ids, out.top_logprobs))
    assert out.top_ids is None or out.top_ids.shape == (len(params), k)


def test_no_logprobs_when_none_asked() -> None:
    out = sampler(random_logits(2, 50, seed=0), make_batch([SamplingParams(), SamplingParams(temperature=0.0)], 50))
    assert out.logprobs is None and out.ranks is None and out.top_ids is None


def test_tied_tokens_share_a_rank() -> None:
    logprobs = torch.log(torch.tensor([[0.3, 0.3, 0.4], [0.4, 0.4, 0.2]]))
    _, ranks, _, _ = gather_logprobs(logprobs, torch.tensor([1, 1]), 0)
    assert ranks.tolist() == [2, 1]


@pytest.mark.parametrize("k", [0, 1, 7])
def test_gather_logprobs_for_prompt_tokens(k: int) -> None:
    logprobs = torch.log_softmax(random_logits(9, 64, seed=k), dim=-1)
    token_ids = torch.from_numpy(np.random.default_rng(k).integers(0, 64, 9))
    check_logprobs(logprobs, token_ids, k, gather_logprobs(logprobs, token_ids, k))
