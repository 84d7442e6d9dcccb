"""The seam between the engine and a grammar library: compile a constraint against the vocabulary, then
match tokens one at a time and say which tokens may come next, as one bit per vocabulary entry.

Two libraries sit behind it (xgrammar, the default: the faster per-token mask; llguidance as "guidance").
A frontend checks a constraint with `check` (no tokenizer needed: quick, so a bad schema is a 400 before
anything is queued); the engine core builds the backend with its tokenizer and compiles off its step loop.
"""

from __future__ import annotations

import importlib
import json
import re
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from paged.errors import UserError
from paged.structured_output.params import GrammarSpec

# Backend name -> "module:class", imported on first use (each library is an optional dependency).
BACKENDS = {
    "xgrammar": "paged.structured_output.xgrammar_backend:XGrammarBackend",
    "guidance": "paged.structured_output.guidance_backend:GuidanceBackend",
}
BACKEND_CHOICES = ("auto", *BACKENDS)


class GrammarMatcher(ABC):
    """One sequence's position in its grammar: a library's matcher behind a few calls."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    @abstractmethod
    def accept_token(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it (the sequence then stops: the
        matcher may be left unusable)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """Whether the grammar is complete and its stop token accepted: nothing may follow."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (draft tokens are accepted to find the masks after them,
        then taken back until the check keeps them)."""

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many leading `tokens` the grammar takes one after another without ending (a token after which
        nothing may follow is not counted: no mask exists after it); the matcher is left as it was."""
        taken, limit = 0, self.safe_to_try(tokens)
        while taken < limit and self.accept_token(tokens[taken]):
            taken += 1
            if self.is_terminated():
                self.rollback(taken)
                return taken - 1
        self.rollback(taken)
        return taken

    @abstractmethod
    def safe_to_try(self, tokens: list[int]) -> int:
        """How many leading `tokens` valid_prefix may feed to accept_token: a library whose refusal or stop
        cannot be undone says how far that cannot happen."""


class GrammarBackend(ABC):
    name: str

    @classmethod
    def check(cls, spec: GrammarSpec, any_whitespace: bool) -> None:
        """Raise UserError (naming the field) if the library cannot compile `spec`; no vocabulary needed."""
        if spec.kind in ("json", "structural_tag"):
            spec.schema()
        try:
            cls.validate(spec, any_whitespace)
        except Exception as error:  # the libraries raise RuntimeError, ValueError or their own types
            raise bad_constraint(spec, error) from None

    @classmethod
    @abstractmethod
    def validate(cls, spec: GrammarSpec, any_whitespace: bool) -> None:
        """Raise whatever the library raises for a constraint it cannot compile."""

    @abstractmethod
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], any_whitespace: bool) -> None:
        """Build the library's view of the vocabulary (a fraction of a second: once per engine); a grammar
        ends with one of `stop_token_ids` (the model's EOS ids)."""

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar (checked already); runs on a worker thread, never the step loop."""

    @abstractmethod
    def matcher(self, compiled: Any) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar."""

    @abstractmethod
    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: np.ndarray, rows: list[int]) -> None:
        """Row rows[i] of the int32 [rows, ceil(V / 32)] bitmask: the tokens matchers[i] allows next (bit t % 32
        of word t // 32 set); other rows are left as they are."""


def load_backend_class(name: str) -> type[GrammarBackend]:
    module, _, cls = BACKENDS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as error:
        raise UserError(f"the {name} structured-output backend needs its library: {error}") from None


def resolve_backend(spec: GrammarSpec, configured: str, any_whitespace: bool) -> str:
    """The backend that will compile `spec`: the configured one, or for "auto" xgrammar unless it refuses
    the constraint and llguidance takes it. A constraint neither takes is a 400 with xgrammar's reason."""
    if configured != "auto":
        load_backend_class(configured).check(spec, any_whitespace)
        return configured
    try:
        load_backend_class("xgrammar").check(spec, any_whitespace)
        return "xgrammar"
    except UserError as refused:
        try:
            load_backend_class("guidance").check(spec, any_whitespace)
        except UserError:
            raise refused from None
        return "guidance"


def choice_literals(spec: GrammarSpec) -> list[str]:
    """A "choice" spec's strings as double-quoted literals, which EBNF and Lark read alike."""
    return [json.dumps(choice, ensure_ascii=False) for choice in json.loads(spec.text)]


def bad_constraint(spec: GrammarSpec, error: Exception) -> UserError:
    """A library's refusal as a 400 that names the kind of constraint."""
    what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice list",
            "grammar": "EBNF grammar", "lark": "Lark grammar", "structural_tag": "structural tag"}[spec.kind]
    lines = str(error).strip().splitlines()
    # xgrammar prefixes its messages with a time and a C++ source location: neither helps the client.
    message = re.sub(r"^\[[0-9:]+\] \S+:[0-9]+: ", "", lines[0]) if lines else type(error).__name__
    return UserError(f"invalid {what}: {message}", param="structured_outputs")
