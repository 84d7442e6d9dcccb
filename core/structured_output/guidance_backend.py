"""Grammars through llguidance ("guidance", as vLLM calls it): JSON schema, JSON object, regex, choice and
Lark (EBNF is converted to Lark by the library)."""

from __future__ import annotations

import json
import os
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from paged.structured_output.backend import GrammarBackend, GrammarMatcher, choice_literals
from paged.structured_output.params import GrammarSpec

_ANY_JSON_OBJECT = json.dumps({"type": "object"})


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _closed(node: Any) -> Any:
    """The schema with every object that does not say otherwise closed to properties it does not name, as
    xgrammar's strict mode and OpenAI's strict schemas have it (llguidance leaves them open)."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    closed = {key: ({name: _closed(schema) for name, schema in value.items()}
                    if key in _SCHEMA_MAPS and isinstance(value, dict) else _closed(value))
              for key, value in node.items()}
    if (node.get("type") == "object" or "properties" in node) and "additionalProperties" not in node:
        closed["additionalProperties"] = False
    return closed


def _grammar(spec: GrammarSpec, any_whitespace: bool) -> str:
    """llguidance's grammar text for `spec` (its constructors check nothing; validate_grammar does)."""
    if spec.kind in ("json", "json_object"):
        schema = json.dumps(_closed(spec.schema())) if spec.kind == "json" else _ANY_JSON_OBJECT
        options = {"whitespace_flexible": any_whitespace, "item_separator": ", ", "key_separator": ": "}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(choice_literals(spec)))
    if spec.kind == "structural_tag":
        raise ValueError("structural tags are xgrammar's: use --structured-outputs-backend xgrammar or auto")
    if spec.kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(llguidance.gbnf_to_lark.gbnf_to_lark(spec.text))
    return llguidance.LLMatcher.grammar_from_lark(spec.text)


class GuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher: llguidance.LLMatcher, stop_token_ids: frozenset[int]) -> None:
        super().__init__(matcher)
        self.stop_token_ids = stop_token_ids

    def accept_token(self, token: int) -> bool:
        # One call, not a validate_tokens check first: a refused token leaves the matcher in its error
        # state, and the engine stops that sequence anyway.
        return self.matcher.consume_token(token)

    def is_terminated(self) -> bool:
        return self.matcher.is_stopped()

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def safe_to_try(self, tokens: list[int]) -> int:
        # A refused token leaves the matcher in its error state, and a stop token ends the grammar unrecorded
        # (it cannot be rolled back): only the valid tokens before the first stop token are tried.
        valid = self.matcher.validate_tokens(tokens)
        return next((i for i, token in enumerate(tokens[:valid]) if token in self.stop_token_ids), valid)


class GuidanceBackend(GrammarBackend):
    name = "guidance"

    @classmethod
    def validate(cls, spec: GrammarSpec, any_whitespace: bool) -> None:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(_grammar(spec, any_whitespace))
        if failed:
            raise ValueError("; ".join(messages))

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], any_whitespace: bool) -> None:
        self.any_whitespace = any_whitespace
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stop_token_ids)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.executor = llguidance.LLExecutor(num_threads=min(8, os.cpu_count() or 1))

    def compile(self, spec: GrammarSpec) -> str:
        return _grammar(spec, self.any_whitespace)

    def matcher(self, compiled: str) -> GuidanceMatcher:
        return GuidanceMatcher(llguidance.LLMatcher(self.tokenizer, compiled, log_level=0), self.stop_token_ids)

    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: np.ndarray, rows: list[int]) -> None:
        llguidance.numpy.fill_next_token_bitmask_par(self.executor, [(m.matcher, row) for m, row in zip(matchers, rows)],
                                                     bitmask)
