"""The Gaudi backend's static-shape attention and bucketing, on the CPU (no Gaudi here: its probe says why)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from paged import LLM, SamplingParams
from paged.backends.common.buckets import bucket
from paged.backends.cpu.backend import CPUBackend
from paged.backends.gaudi.attention import GaudiPagedAttention, build_static_batch
from paged.backends.gaudi.backend import GaudiBackend
from tests.backends.attention_cases import build_case, check, run_attention, tolerance
from tests.models_factory import VOCAB, save_tiny_model


class GaudiAttentionOnCPU(CPUBackend):
    """The CPU backend with Gaudi's attention and cache layout: what runs on the hpu device, run on the host."""

    kv_cache_shape = GaudiBackend.kv_cache_shape

    def attention(self, max_model_len: int) -> GaudiPagedAttention:
        return GaudiPagedAttention()


def test_probe_says_why_not():
    probe = GaudiBackend.is_available()
    assert not probe and "habana_frameworks" in probe.reason


def test_buckets():
    assert [bucket(n) for n in (0, 1, 8, 9, 100)] == [8, 8, 8, 16, 128]
    assert [bucket(n, floor=1) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]
    with pytest.raises(ValueError):
        bucket(3, floor=3)


@pytest.mark.parametrize("context_lens,query_lens", [
    ([5, 23, 1, 16], [5, 23, 1, 16]), ([30, 9, 17], [4, 9, 1]), ([1, 40, 4, 8, 9], [1] * 5), ([17, 5, 33], [17, 1, 4]),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_reference(context_lens, query_lens, dtype):
    case = build_case(context_lens, query_lens, 8, 2, dtype=dtype)
    check(case, *run_attention(case, GaudiAttentionOnCPU()), tolerance(dtype))


@pytest.mark.parametrize("window,softcap", [(6, None), (1, 4.0), (None, 2.5)])
def test_sliding_window_and_softcap(window, softcap):
    case = build_case([30, 9, 17, 3], [4, 9, 1, 1], 8, 2)
    case.window, case.softcap = window, softcap
    check(case, *run_attention(case, GaudiAttentionOnCPU()), tolerance(torch.float32))


def test_padded_decode_rows_write_nothing_and_stay_finite():
    """The runner pads decode steps to a captured batch size: the extra rows have slot -1 and no context."""
    case = build_case([7, 19, 4], [1, 1, 1], 8, 2)
    meta, pad = case.meta, 2
    padded = replace(
        meta,
        slot_mapping=torch.cat([meta.slot_mapping, torch.full((pad,), -1)]),
        query_start_loc=torch.arange(len(meta.seq_lens) + pad + 1, dtype=torch.int32),
        seq_lens=torch.cat([meta.seq_lens, torch.zeros(pad, dtype=torch.int32)]),
        block_tables=torch.cat([meta.block_tables, torch.zeros(pad, meta.block_tables.shape[1], dtype=torch.int32)]),
    )
    extra = lambda t: torch.cat([t, torch.randn(pad, *t.shape[1:])])  # noqa: E731
    cache = case.cache.clone()
    attention = GaudiPagedAttention()
    padded.prepared = attention.prepare(padded)
    out = attention.forward(extra(case.query), extra(case.key), extra(case.value), cache, padded, case.scale)
    assert torch.isfinite(out[-pad:]).all()  # dropped by the runner, but NaN there would be a hazard
    check(case, out[:-pad], cache, tolerance(torch.float32))
    filled = cache[0].flatten(0, 1).abs().sum((-1, -2)) > 0  # per slot
    assert int(filled.sum()) == int(meta.seq_lens.sum())  # the padding rows' keys went nowhere


def test_shapes_depend_only_on_buckets():
    """Steps of 5 and 7 sequences, of different widths and query lengths within one bucket, share every shape."""
    shapes = set()
    for seqs, width, query in ((5, 3, 3), (7, 4, 4)):
        lens = [width * 4] * seqs
        meta = build_case(lens, [query] * seqs, 4, 2).meta
        batch = build_static_batch(meta)
        shapes.add((batch.mask.shape, batch.block_ids.shape, batch.seqs, batch.query_len))
    assert len(shapes) == 1


def test_greedy_in_the_engine_matches_cpu(tmp_path, monkeypatch):
    save_tiny_model("llama", tmp_path, seed=random.randrange(1 << 30))
    prompts = [{"prompt_token_ids": [random.randrange(3, VOCAB) for _ in range(n)]} for n in (3, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kwargs = dict(model=str(tmp_path), dtype="float32", device="cpu", kv_cache_memory="16MiB", max_model_len=128)
    expected = LLM(**kwargs).generate(prompts, params, use_tqdm=False)

    import paged.engine_core

    monkeypatch.setattr(paged.engine_core, "load_backend", lambda device: GaudiAttentionOnCPU())
    got = LLM(**kwargs).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
