"""Constrained decoding in the engine, on the real default model (SmolLM2-135M-Instruct): outputs parse and
validate against their schema (random schemas from hypothesis), regexes and choices match, the mask is exactly
the set of tokens that can continue a match (checked by brute force against the `regex` module), and
unconstrained requests sharing a batch are untouched."""

from __future__ import annotations

import json
import random
import string

import jsonschema
import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paged import LLM, SamplingParams
from paged.errors import UserError
from paged.structured_output import StructuredOutputsParams
from paged.structured_output.backend import load_backend_class
from paged.structured_output.bitmask import GrammarBitmask, apply_grammar_bitmask
from paged.structured_output.manager import StructuredOutputManager

import torch

BACKENDS = ["xgrammar", "guidance"]


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return LLM(model=smollm2_gguf, device="cpu", dtype="float32", max_model_len=1024, kv_cache_memory="256MiB")


def chat(llm, texts: list[str]) -> list[dict]:
    return [{"prompt_token_ids": llm.engine.render_chat([{"role": "user", "content": t}])} for t in texts]


# --- schemas ---------------------------------------------------------------------------------------------

names = st.text(string.ascii_lowercase, min_size=1, max_size=8)
words = st.text(string.ascii_letters, min_size=1, max_size=6)


@st.composite
def bounded(draw, kind: str) -> dict:
    low = draw(st.integers(-1000, 1000))
    return {"type": kind, "minimum": low, "maximum": low + draw(st.integers(0, 1000))}


leaves = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
    bounded("integer"),
    bounded("number"),
    st.just({"type": "boolean"}),
    st.lists(words, min_size=1, max_size=4, unique=True).map(lambda e: {"enum": e}),
)


@st.composite
def objects(draw, depth: int = 0) -> dict:
    keys = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    children = leaves if depth >= 1 else st.one_of(leaves, st.deferred(lambda: objects(depth + 1)), arrays)
    properties = {key: draw(children) for key in keys}
    required = [key for key in keys if draw(st.booleans())] or keys[:1]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


arrays = st.builds(lambda item, high: {"type": "array", "items": item, "minItems": 1, "maxItems": high},
                   leaves, st.integers(1, 3))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                               HealthCheck.too_slow])
@given(batch=st.lists(objects(), min_size=6, max_size=6), seed=st.integers(0, 2**31))
def test_json_schema_outputs_validate(llm, batch, seed):
    """Greedy and sampled outputs of random schemas, in one batch: each parses, validates, and stops."""
    params = []
    for i, schema in enumerate(batch):
        constraint = StructuredOutputsParams(json=schema)
        params.append(SamplingParams(temperature=0, max_tokens=400, structured_outputs=constraint))
        params.append(SamplingParams(temperature=1.0, seed=seed + i, max_tokens=400, structured_outputs=constraint))
    prompts = chat(llm, [f"Fill in this JSON schema with an example: {json.dumps(s)}" for s in batch for _ in "gs"])
    for out, p, schema in zip(llm.generate(prompts, params, use_tqdm=False), params, [s for s in batch for _ in "gs"]):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regex_and_choice_outputs_match(llm, backend):
    llm.engine.config.structured_outputs_backend = backend
    try:
        patterns = [r"\(\d{3}\) \d{3}-\d{4}", r"[A-Z][a-z]{2,8}, [A-Z]{2} \d{5}", r"(yes|no)( because [a-z ]{3,30})?\."]
        choices = ["red", "green", "blue or cyan", "été"]
        params = [SamplingParams(temperature=t, seed=s, max_tokens=60, structured_outputs=StructuredOutputsParams(
            regex=p)) for p in patterns for t, s in ((0, None), (1.0, 3))]
        params += [SamplingParams(temperature=t, seed=s, max_tokens=20, structured_outputs=StructuredOutputsParams(
            choice=choices)) for t, s in ((0, None), (1.0, 5), (1.5, 6))]
        outs = llm.generate(chat(llm, ["Give me an example."] * len(params)), params, use_tqdm=False)
        for out, p in zip(outs[:6], params):
            assert regex.fullmatch(p.structured_outputs.regex, out.outputs[0].text), out.outputs[0].text
            assert out.outputs[0].finish_reason == "stop"
        for out in outs[6:]:
            assert out.outputs[0].text in choices and out.outputs[0].finish_reason == "stop"
    finally:
        llm.engine.config.structured_outputs_backend = "auto"


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_is_every_token_that_continues_a_match(llm, backend):
    """For a walk through a regex's language, each step's mask (through the engine's bitmask and its
    apply function) allows exactly the tokens whose text keeps a full match possible, as the `regex`
    module's partial matching finds them (the end-of-sequence token: exactly when the text matches)."""
    tokenizer = llm.engine.tokenizer
    vocab = llm.engine.vocab_size
    eos = tokenizer.eos_token_id
    texts = {t: tokenizer.decode([t]) for t in range(len(tokenizer))}
    plain = [t for t, s in texts.items()
             if s.isascii() and s and not tokenizer.convert_ids_to_tokens(t).startswith("<")]
    pattern = r"[a-c]{1,3}(-[0-9]{2})?x"
    compiled = regex.compile(pattern)
    grammar_backend = load_backend_class(backend)(tokenizer, vocab, [eos], False)
    matcher = grammar_backend.matcher(grammar_backend.compile(StructuredOutputsParams(regex=pattern).spec))
    rng = random.Random()
    text = ""
    for _ in range(8):
        bitmask = np.zeros((1, -(-vocab // 32)), np.int32)
        grammar_backend.fill_bitmask([matcher], bitmask, [0])
        logits = torch.zeros(2, vocab)
        apply_grammar_bitmask(logits, GrammarBitmask(torch.from_numpy(bitmask), torch.tensor([1])))
        assert torch.equal(logits[0], torch.zeros(vocab))  # the unconstrained row
        allowed = {t for t in plain if logits[1, t] == 0}
        expected = {t for t in plain if compiled.fullmatch(text + texts[t], partial=True)}
        assert allowed == expected
        assert (logits[1, eos] == 0) == bool(compiled.fullmatch(text))
        if not expected:
            break
        token = rng.choice(sorted(expected))
        assert matcher.accept_token(token)
        text += texts[token]


@pytest.mark.parametrize("backend", BACKENDS)
def test_objects_are_closed_unless_the_schema_opens_them(llm, backend):
    """Both libraries read a schema as OpenAI's strict mode does: an object that does not say otherwise takes
    only the properties it names (llguidance alone would leave it open), nested and under $defs too."""
    tokenizer = llm.engine.tokenizer
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/inner"}}, "required": ["a"],
              "$defs": {"inner": {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}}}
    grammar_backend = load_backend_class(backend)(tokenizer, llm.engine.vocab_size, [tokenizer.eos_token_id], False)
    open_too = {**schema, "$defs": {"inner": {**schema["$defs"]["inner"], "additionalProperties": True}}}
    comma, brace = (tokenizer.encode(text, add_special_tokens=False)[0] for text in (",", "}"))
    allowed = []
    for s in (schema, open_too):
        matcher = grammar_backend.matcher(grammar_backend.compile(StructuredOutputsParams(json=s).spec))
        for token in tokenizer.encode('{"a": {"b": 7', add_special_tokens=False):
            assert matcher.accept_token(token)
        bitmask = np.zeros((1, -(-llm.engine.vocab_size // 32)), np.int32)
        grammar_backend.fill_bitmask([matcher], bitmask, [0])
        allowed.append([bool(bitmask[0, t // 32] >> (t % 32) & 1) for t in (comma, brace)])
    assert allowed == [[False, True], [True, True]]


def test_unconstrained_requests_in_the_batch_are_untouched(llm):
    free = chat(llm, ["Name three rivers.", "Count to five."])
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(free, params, use_tqdm=False)]
    constrained = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(**c))
                   for c in ({"json": {"type": "object", "properties": {"a": {"type": "integer"}}}},
                             {"regex": "[a-z]{20}"})]
    outs = llm.generate(free + chat(llm, ["JSON please.", "Letters please."]), [params, params] + constrained,
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:2]] == alone


def test_seeds_logprobs_and_n(llm):
    word = {"type": "object", "properties": {"w": {"type": "string", "maxLength": 8}}, "required": ["w"],
            "additionalProperties": False}
    constraint = StructuredOutputsParams(json=word)
    params = SamplingParams(n=3, temperature=1.2, seed=11, max_tokens=40, logprobs=2, structured_outputs=constraint)
    first, again = (llm.generate(chat(llm, ["A word as JSON."]), params, use_tqdm=False)[0] for _ in range(2))
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    for completion in first.outputs:
        json.loads(completion.text)
        chosen = [position[token].logprob for token, position in zip(completion.token_ids, completion.logprobs)]
        assert all(np.isfinite(chosen))  # a sampled token is always one the grammar allowed


def test_preemption_and_prefix_caching_keep_outputs(smollm2_gguf):
    """A KV cache so small that requests are preempted (and recomputed, matcher kept) gives the tokens a roomy
    one gives; a repeated prompt served from the prefix cache gives them again."""
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                         "maxItems": 6}}, "required": ["items"]}
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=schema))
    results = []
    for memory in ("256MiB", "9MiB"):
        small = LLM(model=smollm2_gguf, device="cpu", dtype="float32", max_model_len=192, kv_cache_memory=memory)
        prompts = chat(small, [f"List {i} fruits as JSON." for i in range(1, 9)])
        results.append([o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)])
        if memory == "9MiB":
            assert small.engine.scheduler.num_preemptions > 0
            cached = small.generate(prompts[:1], params, use_tqdm=False)[0]
            assert cached.num_cached_tokens > 0 and cached.outputs[0].token_ids == results[-1][0]
    assert results[0] == results[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_ahead_gives_the_synchronous_tokens(llm, smollm2_gguf, monkeypatch, backend):
    """Greedy steps launched before the previous one's tokens are read, with rows under a grammar (their mask
    filled once those tokens are in, then applied to the launched step's logits): each
    request gets the tokens of the synchronous engine, constrained rows and their unconstrained neighbours alike,
    stops included."""
    import paged.engine_core
    from tests.test_graph_replay import ReplayingCPUBackend

    texts = ["A colour as JSON.", "Name three rivers.", "A date please.", "Pick one.", "Count to five."]
    constraints = [{"json": {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}},
                             "required": ["colour"], "additionalProperties": False}},
                   None, {"regex": r"\d{4}-\d{2}-\d{2}"}, {"choice": ["left", "right", "straight on"]}, None]
    params = [SamplingParams(temperature=0, max_tokens=12 + 5 * i, stop=["river"] if i == 1 else None,
                             structured_outputs=StructuredOutputsParams(**c) if c else None)
              for i, c in enumerate(constraints)]
    llm.engine.config.structured_outputs_backend = backend
    try:
        expected = [o.outputs[0].token_ids for o in llm.generate(chat(llm, texts), params, use_tqdm=False)]
    finally:
        llm.engine.config.structured_outputs_backend = "auto"

    monkeypatch.setattr(paged.engine_core, "load_backend", lambda device: ReplayingCPUBackend())
    ahead = LLM(model=smollm2_gguf, device="cpu", dtype="float32", max_model_len=1024, kv_cache_memory="256MiB",
                max_num_seqs=8, structured_outputs_backend=backend)
    masked = []
    launch = ahead.engine.runner.launch_greedy
    monkeypatch.setattr(ahead.engine.runner, "launch_greedy",
                        lambda sched, previous, mask: masked.append(mask) or launch(sched, previous, mask))
    outs = ahead.generate(chat(ahead, texts), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    # Many steps ran ahead with masks, the last ones without. How many had masks depends on when each grammar
    # finished compiling (in a thread), so on the machine's load: 10 in one loaded run on two cores.
    assert sum(masked) >= 5 and not all(masked)


def test_bad_constraints_are_user_errors(llm):
    for constraint, message in [
        (StructuredOutputsParams(json='{"type": "object", "properties": []}'), "invalid JSON schema"),
        (StructuredOutputsParams(json="{nope"), "not valid JSON"),
        (StructuredOutputsParams(regex="(unclosed"), "invalid regex"),
        (StructuredOutputsParams(grammar="root ::= missing"), "invalid EBNF grammar"),
    ]:
        with pytest.raises(UserError, match=message):
            llm.generate(["x"], SamplingParams(structured_outputs=constraint), use_tqdm=False)
    with pytest.raises(UserError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    assert not llm.engine.has_unfinished_requests()


def test_grammar_waits_for_the_end_of_reasoning(llm):
    """With reasoning_end_token_id set, tokens pass unconstrained (no bitmask row) until that token; the
    grammar starts after it."""
    tokenizer = llm.engine.tokenizer
    manager = StructuredOutputManager(llm.engine.source, llm.engine.vocab_size, any_whitespace=False)
    sampling = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9]+", reasoning_end_token_id=2),
                              eos_token_ids=frozenset([tokenizer.eos_token_id]))
    state = manager.start(manager.compile(sampling).result(), sampling.structured_outputs)
    letters = tokenizer.encode("abc", add_special_tokens=False)
    assert not state.active
    for token in letters:
        assert manager.advance(state, token)  # not constrained yet
    assert manager.advance(state, 2) and state.active
    assert manager.bitmask([None, state]).rows.tolist() == [1]
    assert manager.advance(state, tokenizer.encode("7", add_special_tokens=False)[0])
    assert not manager.advance(state, letters[0])
    manager.close()


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_draft_positions_get_the_masks_of_the_states_after_them(llm, backend):
    """A check of draft tokens: each row's mask is what a fresh matcher fed the tokens before it allows, the
    drafts the grammar refuses (or that would end it) are cut, and the matcher is left where it was."""
    tokenizer, vocab = llm.engine.tokenizer, llm.engine.vocab_size
    eos = tokenizer.eos_token_id
    manager = StructuredOutputManager(llm.engine.source, vocab, any_whitespace=False, max_rows=16)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer"}}, "required": ["name", "n"],
              "additionalProperties": False}
    sampling = SamplingParams(structured_outputs=StructuredOutputsParams(json=schema, backend=backend),
                              eos_token_ids=frozenset([eos]))
    compiled = manager.compile(sampling).result()
    text = tokenizer.encode('{"name": "Ada Lovelace", "n": 1815}', add_special_tokens=False)
    rng = random.Random()
    for _ in range(6):
        known = rng.randrange(len(text))
        drafts = text[known : known + rng.randint(1, 5)]
        if rng.random() < 0.5 and drafts:  # a token the grammar refuses, somewhere in the drafts
            drafts[rng.randrange(len(drafts))] = tokenizer.encode("}", add_special_tokens=False)[0]
        if known + len(drafts) == len(text):
            drafts.append(eos)  # ends the grammar: never drafted through
        states = [manager.start(compiled, sampling.structured_outputs) for _ in range(2)]
        for state in states:
            for token in text[:known]:
                assert manager.advance(state, token)
        allowed = manager.allowed_drafts(states[1], drafts)
        fresh = manager.start(compiled, sampling.structured_outputs)
        expected_allowed = 0
        for token in text[:known]:
            manager.advance(fresh, token)
        for token in drafts:
            if not fresh.matcher.accept_token(token) or fresh.matcher.is_terminated():
                break
            expected_allowed += 1
        assert allowed == expected_allowed
        kept = drafts[:allowed]
        grammar = manager.bitmask([None, states[0], states[1]], [[7, 8], [], kept])
        masks = grammar.bitmask.numpy().copy()
        assert grammar.rows.tolist() == [3] + [4 + j for j in range(len(kept) + 1)]
        reference = manager.start(compiled, sampling.structured_outputs)
        for token in text[:known]:
            manager.advance(reference, token)
        expected = []
        for j in range(len(kept) + 1):
            expected.append(manager.bitmask([reference]).bitmask.numpy()[0].copy())
            if j < len(kept):
                assert manager.advance(reference, kept[j])
        assert np.array_equal(masks[0], expected[0])
        assert all(np.array_equal(masks[1 + j], mask) for j, mask in enumerate(expected)), (known, drafts)
        again = manager.bitmask([states[1]]).bitmask.numpy()[0]
        assert np.array_equal(again, masks[1])  # the drafts were rolled back
    manager.close()


def test_a_structural_tag_is_free_text_until_its_trigger(llm):
    """The older structural tag: any text, then after the trigger only what the structure's schema allows,
    then free text again after its end."""
    tokenizer, vocab = llm.engine.tokenizer, llm.engine.vocab_size
    manager = StructuredOutputManager(llm.engine.source, vocab, any_whitespace=False)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    tag = {"structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}], "triggers": ["<f>"]}
    sampling = SamplingParams(structured_outputs=StructuredOutputsParams(structural_tag=tag),
                              eos_token_ids=frozenset([tokenizer.eos_token_id]))
    state = manager.start(manager.compile(sampling).result(), sampling.structured_outputs)

    def allowed(text: str) -> bool:
        tokens = tokenizer.encode(text, add_special_tokens=False)
        mask = manager.bitmask([state]).bitmask.numpy()[0]
        return bool(mask[tokens[0] // 32] >> (tokens[0] % 32) & 1)

    assert allowed("Hello") and allowed("{")
    for token in tokenizer.encode("Sure: <f>", add_special_tokens=False):
        assert manager.advance(state, token)
    assert allowed("{") and not allowed("Hello")
    for token in tokenizer.encode('{"n": 3}</f>', add_special_tokens=False):
        assert manager.advance(state, token)
    assert allowed("Hello")
    manager.close()
