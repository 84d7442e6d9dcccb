"""The engine core's side of structured output: grammars compiled off the step loop, one matcher per
sequence, and each step's bitmask for the constrained rows only.

Compiling takes milliseconds to (for large schemas) seconds, so it runs on one worker thread, and a
request waits outside the scheduler until its grammar is ready; compiled grammars are cached by
(backend, constraint), the tokenizer being the engine's one. Matchers advance with every accepted token
and keep their state through preemption (a preempted sequence keeps its tokens and recomputes only
their KV), so nothing needs rebuilding.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from paged.model_source import ModelSource
from paged.sampling_params import SamplingParams
from paged.structured_output.backend import GrammarBackend, GrammarMatcher, load_backend_class
from paged.structured_output.bitmask import GrammarBitmask
from paged.structured_output.params import StructuredOutputsParams

_CACHE_SIZE = 256
HostTensor = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


@dataclass
class GrammarState:
    """A sequence's matcher. While `waiting_for` is set (a reasoning model still thinking) the grammar is
    not applied; the token after that one is the first it constrains."""

    matcher: GrammarMatcher
    backend: GrammarBackend
    waiting_for: int | None = None

    @property
    def active(self) -> bool:
        return self.waiting_for is None


class StructuredOutputManager:
    def __init__(self, source: ModelSource, vocab_size: int, any_whitespace: bool, max_rows: int = 256,
                 host_tensor: HostTensor | None = None) -> None:
        """`host_tensor` allocates the bitmask buffers (the backend's, pinned where it pins); `max_rows`: the
        most sequences sampled in one step."""
        self.source = source
        self.vocab_size = vocab_size
        self.any_whitespace = any_whitespace
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paged-grammar")
        self._tokenizer: Any = None
        self._backends: dict[str, GrammarBackend] = {}
        self._compiled: OrderedDict[tuple[str, Any], Future] = OrderedDict()
        host_tensor = host_tensor or (lambda shape, dtype: torch.zeros(shape, dtype=dtype))
        self._words = host_tensor((max_rows, -(-vocab_size // 32)), torch.int32)
        self._rows = host_tensor((max_rows,), torch.int64)

    def compile(self, params: SamplingParams) -> Future:
        """The grammar of a request's constraint, compiling on the worker thread (or cached)."""
        constraint = params.structured_outputs
        key = (constraint.backend or "xgrammar", constraint.spec)
        future = self._compiled.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self._pool.submit(self._compile, key[0], constraint, sorted(params.eos_token_ids))
            self._compiled[key] = future
            if len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return future

    def _compile(self, name: str, constraint: StructuredOutputsParams, stop_token_ids: list[int]
                 ) -> tuple[GrammarBackend, Any]:
        backend = self._backends.get(name)
        if backend is None:
            if self._tokenizer is None:
                self._tokenizer = self.source.load_tokenizer()
            backend = load_backend_class(name)(self._tokenizer, self.vocab_size, stop_token_ids, self.any_whitespace)
            self._backends[name] = backend
        return backend, backend.compile(constraint.spec)

    @staticmethod
    def start(compiled: tuple[GrammarBackend, Any], constraint: StructuredOutputsParams) -> GrammarState:
        """A sequence's matcher, at the start of its grammar."""
        backend, grammar = compiled
        return GrammarState(backend.matcher(grammar), backend, constraint.reasoning_end_token_id)

    @staticmethod
    def advance(state: GrammarState, token: int) -> bool:
        """Take a sampled token; False if the grammar refuses it (it cannot, unless the mask was overridden:
        a request that must stop yet cannot, say, by min_tokens)."""
        if not state.active:
            if token == state.waiting_for:
                state.waiting_for = None
            return True
        return state.matcher.accept_token(token)

    @staticmethod
    def allowed_drafts(state: GrammarState, drafts: list[int]) -> int:
        """How many leading draft tokens the grammar lets through (GrammarMatcher.valid_prefix). While it
        waits (a model still thinking), the drafts before its first token: the rows after that one would need
        the grammar."""
        if not state.active:
            return drafts.index(state.waiting_for) if state.waiting_for in drafts else len(drafts)
        return state.matcher.valid_prefix(drafts)

    def bitmask(self, states: list[GrammarState | None], drafts: list[list[int]] | None = None) -> GrammarBitmask:
        """The bitmask of the rows whose grammar is active (at least one is: a step without any passes no
        bitmask and pays nothing), filled in place in this manager's buffers: valid until the next call, which
        the caller makes only once the device has copied this one.

        With `drafts` (a check of draft tokens), sequence i has len(drafts[i]) + 1 rows in a row: the first
        scores its last known token, row j + 1 the position after its draft j; each row's mask is its
        matcher's after the drafts before it (accepted for the fill, then rolled back; the drafts were
        checked by allowed_drafts). Fills go round by round, one batch per backend and draft position."""
        drafts = drafts or [[] for _ in states]
        firsts = list(itertools.accumulate((len(d) + 1 for d in drafts), initial=0))  # each sequence's first row
        active = [i for i, state in enumerate(states) if state is not None and state.active]
        slots, rows = {}, []  # sequence -> where its rows start in the bitmask; the logits row of each
        for i in active:
            slots[i] = len(rows)
            rows.extend(range(firsts[i], firsts[i + 1]))
        bitmask = self._words[: len(rows)].numpy()
        for j in range(max(len(drafts[i]) for i in active) + 1):
            here = [i for i in active if len(drafts[i]) >= j]
            for members in _by_backend(states, here):
                states[members[0]].backend.fill_bitmask([states[i].matcher for i in members], bitmask,
                                                        [slots[i] + j for i in members])
            for i in here:
                if j < len(drafts[i]):
                    states[i].matcher.accept_token(drafts[i][j])
        for i in active:
            if drafts[i]:
                states[i].matcher.rollback(len(drafts[i]))
        row_index = self._rows[: len(rows)]
        row_index.numpy()[...] = rows
        return GrammarBitmask(self._words[: len(rows)], row_index)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _by_backend(states: list[GrammarState | None], indices: list[int]) -> list[list[int]]:
    """`indices` grouped by their states' grammar library, for one batched fill per library."""
    groups: dict[int, list[int]] = {}
    for i in indices:
        groups.setdefault(id(states[i].backend), []).append(i)
    return list(groups.values())
