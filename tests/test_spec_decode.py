"""Speculative decoding on the CPU: the same greedy tokens as without it, the target distribution when sampling,
and what it reports."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from paged import LLM, SamplingParams
from paged.core_protocol import EngineStats
from paged.errors import UserError
from paged.sampler import build_sampling_batch
from paged.sampling_params import SamplingParams as Params
from paged.server.stats_log import spec_decode_line
from paged.spec_decode import rejection
from paged.spec_decode.ngram import NgramProposer
from tests.models_factory import VOCAB, save_tiny_model

# Drafts for any batch size: the CPU backend's own limit (four sequences) would leave most steps of these batches
# without any.
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
         "disable_by_batch_size": 64}


def lookup_reference(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The proposer's rule, written plainly: longest suffix first, its latest earlier occurrence."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_ngram_lookup_matches_a_plain_search():
    rng = random.Random()
    for _ in range(500):
        tokens = [rng.randrange(4) for _ in range(rng.randint(0, 40))]
        k, min_n = rng.randint(1, 6), rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        limit = rng.randint(0, 8)
        assert NgramProposer(k, min_n, max_n).propose(tokens, limit) == \
            lookup_reference(tokens, min(k, limit), min_n, max_n), (tokens, k, min_n, max_n, limit)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-spec")
    save_tiny_model("llama", folder, seed=random.randrange(1 << 30))
    return str(folder)


def repetitive_prompts(count: int) -> list[dict]:
    """Prompts of mixed lengths that repeat a short random phrase, so prompt lookup finds matches."""
    prompts = []
    for _ in range(count):
        phrase = [random.randrange(3, VOCAB) for _ in range(random.randint(2, 9))]
        prompts.append({"prompt_token_ids": (phrase * 12)[: random.randint(3, 80)]})
    return prompts


class OracleProposer:
    """Drafts the reference continuation with every third token wrong: most drafts are kept, the rest
    refused at varying positions, so kept prefixes, bonus tokens and trimmed blocks all happen."""

    writes_kv = False

    def __init__(self, sequences: list[list[int]]) -> None:
        self.sequences = sequences

    def propose_all(self, requests, limits: list[int]) -> list[list[int]]:
        return [self.propose(request.token_ids, limit) for request, limit in zip(requests, limits)]

    def release(self, request_id: str, keeps_cache: bool) -> None:
        pass

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        n = len(token_ids)
        for full in self.sequences:
            if full[:n] == token_ids:
                draft = full[n : n + min(limit, 5)]
                return [(t + 1) % VOCAB if (n + j) % 3 == 0 else t for j, t in enumerate(draft)]
        raise AssertionError("the oracle was asked about a sequence it never saw")


def greedy(llm: LLM, prompts: list[dict], params: list[SamplingParams]) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


def test_ngram_gives_the_same_greedy_tokens(tiny_dir):
    prompts = repetitive_prompts(10)
    params = [SamplingParams(temperature=0, max_tokens=random.randint(1, 40), ignore_eos=True) for _ in prompts]
    kwargs = dict(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB", max_model_len=256)
    expected = greedy(LLM(**kwargs), prompts, params)
    llm = LLM(**kwargs, speculative_config=NGRAM)
    assert greedy(llm, prompts, params) == expected
    assert llm.engine.core.stats.spec_num_draft_tokens > 0


@pytest.mark.parametrize("layout", ["roomy", "tight"])
def test_kept_and_refused_drafts_give_the_same_greedy_tokens(tiny_dir, layout):
    """Drafts that cross block boundaries (blocks of 8), prompts sharing cached prefixes, logprobs, and (tight)
    a cache so small that requests are preempted: the tokens and logprobs are those without speculation, and
    every block comes back."""
    shared = [random.randrange(3, VOCAB) for _ in range(12)]
    prompts = [{"prompt_token_ids": shared[: random.randint(4, 12)] +
                [random.randrange(3, VOCAB) for _ in range(random.randint(1, 30))]} for _ in range(8)]
    params = [SamplingParams(temperature=0, max_tokens=random.randint(5 if layout == "roomy" else 24, 40),
                             ignore_eos=True, logprobs=2) for _ in prompts]
    kwargs = dict(model=tiny_dir, dtype="float32", device="cpu", max_model_len=96, block_size=8,
                  max_num_batched_tokens=64)
    kwargs |= {"num_gpu_blocks_override": 14} if layout == "tight" else {"kv_cache_memory": "64MiB"}
    plain = LLM(**kwargs).generate(prompts, params, use_tqdm=False)
    llm = LLM(**kwargs, speculative_config=NGRAM)
    core = llm.engine.core
    core.proposer = OracleProposer([p["prompt_token_ids"] + out.outputs[0].token_ids
                                    for p, out in zip(prompts, plain)])
    spec = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [lp[t].logprob for lp, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)] == pytest.approx(
            [lp[t].logprob for lp, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)], abs=1e-4)
    stats = core.stats
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert stats.spec_accepted_per_position[0] >= stats.spec_accepted_per_position[-1]
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    if layout == "tight":
        assert core.scheduler.num_preemptions > 0


def test_stop_strings_and_tokens_cut_as_without_speculation(tiny_dir):
    prompts = repetitive_prompts(6)
    kwargs = dict(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB", max_model_len=256)
    plain = LLM(**kwargs)
    free = [out.outputs[0] for out in plain.generate(prompts, SamplingParams(temperature=0, max_tokens=30,
                                                                            ignore_eos=True), use_tqdm=False)]
    # A stop string and a stop token from the middle of each free-running output.
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[o.text.split()[len(o.token_ids) // 2]])
              for o in free]
    params += [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                              stop_token_ids=[o.token_ids[len(o.token_ids) // 3]]) for o in free]
    spec = LLM(**kwargs, speculative_config=NGRAM)
    for a, b in zip(plain.generate(prompts * 2, params, use_tqdm=False),
                    spec.generate(prompts * 2, params, use_tqdm=False)):
        assert (a.outputs[0].text, a.outputs[0].finish_reason) == (b.outputs[0].text, b.outputs[0].finish_reason)


def test_smollm2_copying_keeps_drafts_and_the_same_tokens(smollm2_gguf):
    """Prompts of mixed lengths asking to repeat a text: most drafts are kept and the tokens are those without."""
    texts = ["The committee met on Tuesday to review the budget for the new library and agreed to extend its hours.",
             "Water boils at one hundred degrees Celsius at sea level, and at lower temperatures on mountains.",
             "Please send the signed contract back by Friday so that the work can start next month.",
             "Close the door quietly."]
    messages = [[{"role": "user", "content": f"Repeat this text exactly: {t}"}] for t in random.sample(texts, 4)]
    params = SamplingParams(temperature=0, max_tokens=40)
    kwargs = dict(model=smollm2_gguf, dtype="float32", device="cpu", kv_cache_memory="256MiB", max_model_len=512)
    expected = [o.outputs[0].token_ids for o in LLM(**kwargs).chat(messages, params, use_tqdm=False)]
    llm = LLM(**kwargs, speculative_config=NGRAM)
    assert [o.outputs[0].token_ids for o in llm.chat(messages, params, use_tqdm=False)] == expected
    stats = llm.engine.core.stats
    assert stats.spec_num_accepted_tokens > stats.spec_num_draft_tokens / 2


def test_sampling_with_a_seed_repeats(tiny_dir):
    prompts = repetitive_prompts(4)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, seed=7, ignore_eos=True)
    llm = LLM(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB", speculative_config=NGRAM)
    assert greedy(llm, prompts, [params] * 4) == greedy(llm, prompts, [params] * 4)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts under probabilities (cells of zero probability must be empty)."""
    expected = probs * counts.sum()
    if (counts[expected == 0] > 0).any():
        return 0.0
    cells = expected > 0
    statistic = ((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum()
    df = torch.tensor(cells.sum().item() - 1.0, dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, statistic / 2))


def sample_first_two(logits: torch.Tensor, params: Params, drafts: list[int], trials: int) -> torch.Tensor:
    """`trials` sequences with the same logits rows and drafts, verified at once: each one's tokens at the two
    first positions (-1 where it emitted only one)."""
    k = len(drafts)
    rows = logits.repeat(trials, 1)
    batch = build_sampling_batch([params] * rows.shape[0], [[]] * rows.shape[0], [[]] * rows.shape[0],
                                 [None] * rows.shape[0], logits.shape[1], torch.device("cpu"))
    draft_rows = torch.tensor(drafts + [-1]).repeat(trials)
    first_rows = torch.arange(trials) * (k + 1)
    out = rejection.verify(rows, batch, draft_rows, first_rows, torch.Generator().manual_seed(random.randrange(1 << 30)))
    tokens = out.token_ids.view(trials, k + 1)
    second = torch.where(out.num_accepted >= 1, tokens[:, 1], -1)
    return torch.stack([tokens[:, 0], second], dim=1)


@pytest.mark.parametrize("params", [Params(temperature=1.0), Params(temperature=0.7, top_k=5),
                                    Params(temperature=1.3, top_p=0.8)], ids=["t1", "top-k", "top-p"])
def test_rejection_sampling_keeps_the_target_distribution(params, monkeypatch):
    """On a vocabulary of 8: the first token after drafts [likely, unlikely] and the second (where the first
    kept the draft) follow the target's distributions at those positions; a sampler that keeps drafts a little
    too often is told apart."""
    vocab, trials = 8, 40000
    logits = torch.randn(3, vocab, dtype=torch.float64).float() * 1.5
    drafts = [int(logits[0].argmax()), int(logits[1].argmin())]
    from paged.sampler import target_distribution

    batch = build_sampling_batch([params] * 3, [[]] * 3, [[]] * 3, [None] * 3, vocab, torch.device("cpu"))
    _, target = target_distribution(logits.clone(), batch)
    samples = sample_first_two(logits, params, drafts, trials)
    first = torch.bincount(samples[:, 0], minlength=vocab).double()
    assert chi_square_p(first, target[0].double()) > 1e-3
    seconds = samples[samples[:, 0] == drafts[0], 1]
    assert chi_square_p(torch.bincount(seconds, minlength=vocab).double(), target[1].double()) > 1e-3

    real_uniform = rejection.uniform
    monkeypatch.setattr(rejection, "uniform", lambda *args: real_uniform(*args) * 0.8)
    biased = sample_first_two(logits, params, drafts, trials)
    assert chi_square_p(torch.bincount(biased[:, 0], minlength=vocab).double(), target[0].double()) < 1e-6


def test_bad_speculative_config_is_one_clear_error(tiny_dir):
    for config in ({"method": "ngram"}, {"method": "eagle", "num_speculative_tokens": 2},
                   {"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
                   {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
                   {"method": "draft_model", "num_speculative_tokens": 2},
                   {"model": "/no/such/draft", "num_speculative_tokens": 2},
                   "{not json"):
        with pytest.raises(UserError) as info:
            LLM(model=tiny_dir, device="cpu", kv_cache_memory="64MiB", speculative_config=config)
        assert "speculative_config" in str(info.value) and "\n" not in str(info.value)
    done = subprocess.run([sys.executable, "-m", "paged.cli.main", "generate", "hi", "--model", tiny_dir,
                           "--speculative-config", '{"method": "medusa", "num_speculative_tokens": 2}'],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("paged: error:")] == [
        "paged: error: invalid engine argument speculative_config: method 'medusa' is not implemented; "
        "this engine runs 'ngram' and 'draft_model'"]


def test_the_log_line_reports_acceptance():
    before, after = EngineStats(), EngineStats()
    after.count_drafts(4, 3)
    after.count_drafts(4, 1)
    line = spec_decode_line(before, after, 2.0)
    assert "Mean acceptance length: 3.00" in line and "Accepted: 4 tokens, Drafted: 8 tokens" in line
    assert "Per-position acceptance rate: 1.000, 0.500, 0.500, 0.000" in line
    assert "Avg Draft acceptance rate: 50.0%" in line
    assert spec_decode_line(after, after, 2.0) is None


@pytest.mark.parametrize("tp, pp, proposer", [(2, 1, "oracle"), (1, 2, "oracle"), (2, 1, "draft"), (1, 2, "draft")],
                         ids=["tp2", "pp2", "tp2-draft-model", "pp2-draft-model"])
def test_split_over_ranks_gives_one_ranks_tokens(tmp_path, tp, pp, proposer):
    """Drafts reach every rank with the step (real worker processes over gloo), a draft model running whole on
    rank 0: the tokens are one rank's."""
    from tests.models_factory import split_workload

    kwargs, prompts, params = split_workload("llama", tmp_path / "model", num_prompts=6)
    plain = greedy(LLM(**kwargs), prompts, params)
    spec = NGRAM if proposer == "oracle" else {"model": str(tmp_path / "model"), "num_speculative_tokens": 3,
                                               "disable_by_batch_size": 64}
    llm = LLM(**kwargs, tensor_parallel_size=tp, pipeline_parallel_size=pp, speculative_config=spec)
    if proposer == "oracle":
        llm.engine.core.proposer = OracleProposer([p["prompt_token_ids"] + out for p, out in zip(prompts, plain)])
    assert greedy(llm, prompts, params) == plain
    assert llm.engine.core.stats.spec_num_accepted_tokens > 0
    llm.engine.core.shutdown()


@pytest.fixture(scope="module")
def draft_dirs(tmp_path_factory):
    """A target, a draft that is the target itself (its drafts are nearly all kept), an unrelated draft of another
    shape (nearly all refused), and one whose vocabulary differs."""
    root = tmp_path_factory.mktemp("drafts")
    seed = random.randrange(1 << 30)
    save_tiny_model("llama", root / "target", seed=seed)
    save_tiny_model("llama", root / "other", seed=seed + 1, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                    num_key_value_heads=1)
    save_tiny_model("llama", root / "wide", seed=seed, vocab_size=VOCAB + 8)
    return root


@pytest.mark.parametrize("draft, layout", [("target", "roomy"), ("other", "roomy"), ("target", "tight")])
def test_draft_model_gives_the_same_greedy_tokens(draft_dirs, draft, layout):
    """A batch of mixed lengths sharing a cached prefix, blocks of 8, and (tight) preemption: the draft's K/V
    lives in the target's blocks, and the tokens are those without speculation."""
    shared = [random.randrange(3, VOCAB) for _ in range(12)]
    prompts = [{"prompt_token_ids": shared[: random.randint(4, 12)] +
                [random.randrange(3, VOCAB) for _ in range(random.randint(1, 40))]} for _ in range(8)]
    params = [SamplingParams(temperature=0, max_tokens=random.randint(1 if layout == "roomy" else 24, 40),
                             ignore_eos=True) for _ in prompts]
    kwargs = dict(model=str(draft_dirs / "target"), dtype="float32", device="cpu", max_model_len=96, block_size=8,
                  max_num_batched_tokens=64)
    kwargs |= {"num_gpu_blocks_override": 14} if layout == "tight" else {"kv_cache_memory": "64MiB"}
    expected = greedy(LLM(**kwargs), prompts, params)
    llm = LLM(**kwargs, speculative_config={"model": str(draft_dirs / draft), "num_speculative_tokens": 3,
                                                  "disable_by_batch_size": 64})
    assert greedy(llm, prompts, params) == expected
    core = llm.engine.core
    stats = core.stats
    if draft == "target":
        assert stats.spec_num_accepted_tokens > 0.9 * stats.spec_num_draft_tokens > 0
    else:
        assert stats.spec_num_draft_tokens > 0
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    if layout == "tight":
        assert core.scheduler.num_preemptions > 0


def test_draft_model_sampling_with_a_seed_repeats(draft_dirs):
    llm = LLM(model=str(draft_dirs / "target"), dtype="float32", device="cpu", kv_cache_memory="64MiB",
              speculative_config={"model": str(draft_dirs / "target"), "num_speculative_tokens": 3,
                                  "disable_by_batch_size": 64})
    prompts = repetitive_prompts(4)
    params = [SamplingParams(temperature=1.0, max_tokens=20, seed=seed, ignore_eos=True) for seed in range(4)]
    assert greedy(llm, prompts, params) == greedy(llm, prompts, params)


def test_draft_of_another_vocabulary_is_refused(draft_dirs):
    with pytest.raises(UserError) as info:
        LLM(model=str(draft_dirs / "target"), device="cpu", kv_cache_memory="64MiB",
            speculative_config={"model": str(draft_dirs / "wide"), "num_speculative_tokens": 2})
    assert "vocabulary" in str(info.value) and "\n" not in str(info.value)


def test_large_batches_draft_nothing_by_default(tiny_dir):
    """Above the backend's limit (the CPU's: four running sequences) no sequence is asked for drafts."""

    class Counting:
        writes_kv = False
        asked: list[int] = []

        def propose_all(self, requests, limits):
            self.asked.append(len(requests))
            return [[] for _ in requests]

        def release(self, request_id, keeps_cache):
            pass

    llm = LLM(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB",
              speculative_config={key: value for key, value in NGRAM.items() if key != "disable_by_batch_size"})
    llm.engine.core.proposer = proposer = Counting()
    prompts = [{"prompt_token_ids": [5, 6, 7] * 8} for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    assert proposer.asked and not any(proposer.asked)
    proposer.asked.clear()
    llm.generate(prompts[:2], params, use_tqdm=False)
    assert 2 in proposer.asked



def test_penalties_min_tokens_and_n_as_without_speculation(tiny_dir):
    """Rows of one check see their own histories: penalties and min_tokens count the drafts before them."""
    prompts = repetitive_prompts(4)
    params = [SamplingParams(temperature=0, max_tokens=24, repetition_penalty=3.0, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0),
              SamplingParams(temperature=0, max_tokens=24, min_tokens=20, stop_token_ids=[7, 9, 11]),
              SamplingParams(temperature=0, max_tokens=16, n=2, logit_bias={5: 3.0}, ignore_eos=True)]
    kwargs = dict(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB", max_model_len=256)

    def run(llm):
        return [[c.token_ids for c in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)]

    expected = run(LLM(**kwargs))
    llm = LLM(**kwargs, speculative_config=NGRAM)
    llm.engine.core.proposer = OracleProposer([p["prompt_token_ids"] + seq for p, out in zip(prompts, expected)
                                               for seq in out])
    assert run(llm) == expected
    assert llm.engine.core.stats.spec_num_accepted_tokens > 0


def test_requests_held_to_a_grammar_draft_and_keep_their_tokens(smollm2_gguf):
    """JSON-schema requests copying their prompt into the schema's fields, with and without speculation beside
    an unconstrained one: greedy tokens as without speculation, drafts kept (each position masked by the
    grammar's state after the drafts before it), sampled outputs still valid. The oracle drafts the plain
    run's tokens with every third one wrong, so the grammar cuts some drafts and the check refuses others."""
    import json

    import jsonschema

    from paged.structured_output import StructuredOutputsParams

    schema = {"type": "object", "properties": {"sender": {"type": "string", "maxLength": 40},
                                               "text": {"type": "string", "maxLength": 160}},
              "required": ["sender", "text"], "additionalProperties": False}
    letters = [("Ann", "Please send the signed contract back by Friday so that the work can start next month."),
               ("Bob", "The committee met on Tuesday to review the budget for the new library."),
               ("Cy", "Water boils at one hundred degrees Celsius at sea level.")]
    messages = [[{"role": "user", "content": f"From {who}: {text}\nReturn JSON with the sender and the text."}]
                for who, text in random.sample(letters, 3)]
    constraint = StructuredOutputsParams(json=schema)
    params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=constraint) for _ in messages[:2]]
    params.append(SamplingParams(temperature=0, max_tokens=30))
    kwargs = dict(model=smollm2_gguf, dtype="float32", device="cpu", kv_cache_memory="256MiB", max_model_len=512)
    plain = LLM(**kwargs).chat(messages, params, use_tqdm=False)
    for out in plain[:2]:
        jsonschema.validate(json.loads(out.outputs[0].text), schema)

    ngram = LLM(**kwargs, speculative_config=NGRAM)
    assert [o.outputs[0].token_ids for o in ngram.chat(messages, params, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in plain]
    stats = ngram.engine.core.stats
    assert stats.spec_num_accepted_tokens > 0

    oracle = LLM(**kwargs, speculative_config=NGRAM)
    core = oracle.engine.core
    core.proposer = OracleProposer([o.prompt_token_ids + o.outputs[0].token_ids for o in plain])
    assert [o.outputs[0].token_ids for o in oracle.chat(messages, params, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in plain]
    assert 0 < core.stats.spec_num_accepted_tokens < core.stats.spec_num_draft_tokens
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks

    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=120, structured_outputs=constraint)
    for out in ngram.chat(messages, sampled, use_tqdm=False):
        if out.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(out.outputs[0].text), schema)


@pytest.mark.parametrize("speculative", [False, True])
def test_a_request_ended_while_its_step_runs_leaves_the_others_rows_alone(tiny_dir, speculative):
    """A sequence can end while a step that holds it is in flight (a pipeline's micro-batch; the frontend's
    stop string): the step's rows for the sequences after it are still theirs (the ended one's rows are left out
    at collection and in applying alike)."""
    prompts = repetitive_prompts(4)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kwargs = dict(model=tiny_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB", max_model_len=256)
    if speculative:
        kwargs["speculative_config"] = NGRAM
    expected = greedy(LLM(**kwargs), prompts, [params] * 4)
    llm = LLM(**kwargs)
    engine, core = llm.engine, llm.engine.core
    if speculative:
        core.proposer = OracleProposer([p["prompt_token_ids"] + out for p, out in zip(prompts, expected)])
    ids = [engine.add_request(None, p, params) for p in prompts]
    sequences = [core.groups[i][0] for i in ids]
    engine.step()  # the prompts
    sched = core._schedule()
    assert len(sched.scheduled) == 4 and sched.scheduled[0].completes
    assert bool(sched.scheduled[0].draft_token_ids) == speculative
    submitted = core.runner.submit(sched)  # as a pipeline's micro-batch is: then it ends, then it is collected
    first = sequences.index(sched.scheduled[0].request)  # the step's first rows are this one's
    core.abort_requests([ids[first]])
    core._apply(sched, core.runner.collect(submitted))
    while engine.has_unfinished_requests():
        engine.step()
    others = [i for i in range(4) if i != first]
    assert [sequences[i].output_token_ids for i in others] == [expected[i] for i in others]
