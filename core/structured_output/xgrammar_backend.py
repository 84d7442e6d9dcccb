"""Grammars through xgrammar: JSON schema, JSON object, regex, choice, EBNF and Lark; batched masks."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
import xgrammar as xgr

from paged.structured_output.backend import GrammarBackend, GrammarMatcher, choice_literals
from paged.structured_output.params import GrammarSpec


def _grammar(spec: GrammarSpec, any_whitespace: bool) -> xgr.Grammar:
    """The uncompiled grammar of `spec`; compact JSON (", " and ": " separators) unless any_whitespace."""
    if spec.kind == "json":
        return xgr.Grammar.from_json_schema(spec.text, any_whitespace=any_whitespace, strict_mode=True)
    if spec.kind == "json_object":  # any object: a schema without strict mode's closed objects
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=any_whitespace, strict_mode=False)
    if spec.kind == "regex":
        return xgr.Grammar.from_regex(spec.text)
    if spec.kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(choice_literals(spec)))
    if spec.kind == "lark":
        return xgr.Grammar.from_lark(spec.text)
    if spec.kind == "structural_tag":
        return _structural_tag(spec.schema())
    return xgr.Grammar.from_ebnf(spec.text)


def _structural_tag(tag: dict) -> xgr.Grammar:
    """xgrammar's structural tag; the older form (structures begun by triggers), as vLLM still takes it, too."""
    if isinstance(tag, dict) and "structures" in tag:
        if not all(isinstance(s, dict) and {"begin", "end"} <= s.keys() for s in tag["structures"]):
            raise ValueError("each of structures needs a begin and an end")
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema") or {}), end=s["end"])
                 for s in tag["structures"]]
        return xgr.Grammar.from_structural_tag(items, tag.get("triggers") or [])
    return xgr.Grammar.from_structural_tag(json.dumps(tag))


class XGrammarMatcher(GrammarMatcher):
    def accept_token(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def safe_to_try(self, tokens: list[int]) -> int:
        return len(tokens)  # a refused token leaves xgrammar's matcher as it was, and a stop rolls back


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    @classmethod
    def validate(cls, spec: GrammarSpec, any_whitespace: bool) -> None:
        _grammar(spec, any_whitespace)

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], any_whitespace: bool) -> None:
        self.any_whitespace = any_whitespace
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        # The fill runs while the device computes the step (or, on a CPU, while nothing else does).
        self.batch = xgr.BatchGrammarMatcher(max_threads=min(8, os.cpu_count() or 1))

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        return self.compiler.compile_grammar(_grammar(spec, self.any_whitespace))

    def matcher(self, compiled: xgr.CompiledGrammar) -> XGrammarMatcher:
        return XGrammarMatcher(xgr.GrammarMatcher(compiled))

    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: np.ndarray, rows: list[int]) -> None:
        self.batch.batch_fill_next_token_bitmask([m.matcher for m in matchers], torch.from_numpy(bitmask), rows)
