"""The runner's graph path (padding to a captured batch size, static buffers) checked on the CPU.

A CPU backend that "captures" by keeping the closure stands in for a real graph: the padding rows, the
static buffers and the slicing of the logits are the runner's and are exercised all the same.
"""

from __future__ import annotations

import random


from paged import LLM, SamplingParams
from paged.backends.cpu.attention import TorchPagedAttention, build_padded_batch
from paged.backends.cpu.backend import CPUBackend
from tests.models_factory import VOCAB, save_tiny_model


class ValueFreeAttention(TorchPagedAttention):
    """A graph may precompute nothing from the metadata's values: they change between replays."""

    def prepare(self, meta):
        return None

    def forward(self, query, key, value, kv_cache, meta, scale, kv_scale=None, **layer):
        meta.prepared = build_padded_batch(meta)
        return super().forward(query, key, value, kv_cache, meta, scale, kv_scale, **layer)


class ReplayingCPUBackend(CPUBackend):
    supports_graphs = True
    runs_ahead = True  # device work is synchronous here, but the bookkeeping is exercised all the same

    def attention(self, max_model_len):
        return ValueFreeAttention()

    def capture_graph(self, fn):
        fn()
        return fn


def test_decode_graphs_give_the_eager_tokens(tmp_path, monkeypatch):
    save_tiny_model("qwen2", tmp_path, seed=random.randrange(1 << 30))
    prompts = [{"prompt_token_ids": [random.randrange(3, VOCAB) for _ in range(random.randint(3, 40))]}
               for _ in range(13)]
    # logprobs make the steps synchronous (not plain greedy): the replay path, not the run-ahead one
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    kwargs = dict(model=str(tmp_path), dtype="float32", device="cpu", kv_cache_memory="32MiB", max_num_seqs=16,
                  max_model_len=128)
    eager = LLM(**kwargs, enforce_eager=True).generate(prompts, params, use_tqdm=False)

    import paged.engine_core

    monkeypatch.setattr(paged.engine_core, "load_backend", lambda device: ReplayingCPUBackend())
    llm = LLM(**kwargs)
    assert sorted(llm.engine.runner.graphs) == [(1, 1), (2, 1), (4, 1), (8, 1), (16, 1)]
    replayed = record_replays(llm.engine.runner)
    graphed = llm.generate(prompts, params, use_tqdm=False)
    assert replayed and set(replayed) <= {(16, 1), (8, 1), (4, 1), (2, 1), (1, 1)}
    assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in eager]


def record_replays(runner) -> list[tuple[int, int]]:
    """The (batch size, tokens per request) of every graph the runner replays from now on."""
    replayed = []
    for key, graph in list(runner.graphs.items()):
        runner.graphs[key] = lambda key=key, graph=graph: replayed.append(key) or graph()
    return replayed


def test_steps_with_drafts_replay_multi_token_graphs(tmp_path, monkeypatch):
    """Checks of 1 + 3 tokens a request (fewer where a draft is short, padded in the graph) and a draft model's
    catching up replay graphs of 4 tokens a request: the tokens are the eager engine's."""
    save_tiny_model("llama", tmp_path / "target", seed=random.randrange(1 << 30))
    phrases = [[random.randrange(3, VOCAB) for _ in range(random.randint(2, 6))] for _ in range(9)]
    prompts = [{"prompt_token_ids": (p * 10)[: random.randint(3, 50)]} for p in phrases]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
    kwargs = dict(model=str(tmp_path / "target"), dtype="float32", device="cpu", kv_cache_memory="32MiB",
                  max_num_seqs=16, max_model_len=128)
    eager = [o.outputs[0].token_ids for o in LLM(**kwargs, enforce_eager=True).generate(prompts, params,
                                                                                         use_tqdm=False)]

    import paged.engine_core

    monkeypatch.setattr(paged.engine_core, "load_backend", lambda device: ReplayingCPUBackend())
    for spec in ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1},
                 {"model": str(tmp_path / "target"), "num_speculative_tokens": 3}):
        llm = LLM(**kwargs, speculative_config={**spec, "disable_by_batch_size": 16})
        runners = [llm.engine.runner] + ([llm.engine.core.draft_runner] if "model" in spec else [])
        assert all((16, 4) in runner.graphs for runner in runners)
        replays = [record_replays(runner) for runner in runners]
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == eager
        assert all(any(query_len == 4 for _, query_len in replayed) for replayed in replays)
        stats = llm.engine.core.stats  # a random model repeats its prompt only by chance; itself, always
        assert (stats.spec_num_accepted_tokens if "model" in spec else stats.spec_num_draft_tokens) > 0


def test_running_ahead_matches_eager_with_stops(tmp_path, monkeypatch):
    """Greedy steps launched before the previous one's tokens are read: lengths, EOS, stop strings and
    aborts must land exactly where the synchronous engine puts them."""
    save_tiny_model("llama", tmp_path, seed=random.randrange(1 << 30))
    prompts = [{"prompt_token_ids": [random.randrange(3, VOCAB) for _ in range(random.randint(3, 30))]}
               for _ in range(11)]
    kwargs = dict(model=str(tmp_path), dtype="float32", device="cpu", kv_cache_memory="32MiB", max_num_seqs=16,
                  max_model_len=128)
    eager = LLM(**kwargs, enforce_eager=True)
    free = eager.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    params = []
    for i, out in enumerate(free):
        words = out.outputs[0].text.split()
        stop = [" ".join(words[5:7])] if i % 3 == 0 else None  # some stop on a string spanning tokens
        stop_ids = [out.outputs[0].token_ids[4 + i % 5]] if i % 3 == 1 else None  # some on a token
        params.append(SamplingParams(temperature=0, max_tokens=4 + 3 * i, stop=stop, stop_token_ids=stop_ids))
    expected = eager.generate(prompts, params, use_tqdm=False)

    import paged.engine_core

    monkeypatch.setattr(paged.engine_core, "load_backend", lambda device: ReplayingCPUBackend())
    llm = LLM(**kwargs)
    launched = []
    original = llm.engine.runner.launch_greedy
    monkeypatch.setattr(llm.engine.runner, "launch_greedy",
                        lambda s, p, masked: launched.append(p) or original(s, p, masked))
    got = llm.generate(prompts, params, use_tqdm=False)
    assert any(p is not None for p in launched), "no step ran ahead of the previous one"
    for a, b in zip(got, expected):
        assert (a.outputs[0].token_ids, a.outputs[0].text, a.outputs[0].finish_reason, a.outputs[0].stop_reason) == (
            b.outputs[0].token_ids, b.outputs[0].text, b.outputs[0].finish_reason, b.outputs[0].stop_reason)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks
