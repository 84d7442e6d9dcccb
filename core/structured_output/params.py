"""What a request asks its output to match, as vLLM's StructuredOutputsParams names it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from paged.errors import UserError

# The kinds of constraint, each compiled by a grammar backend from one string.
KINDS = ("json", "json_object", "regex", "choice", "grammar", "lark", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Exactly one of json (a JSON schema), json_object, regex, choice, grammar (EBNF, or Lark: both are
    recognised), structural_tag (xgrammar's structural tag as JSON: {"type": "structural_tag", "format": ...},
    or the older {"structures": [{"begin", "schema", "end"}], "triggers": [...]}) may be set.

    `backend` is filled in by the frontend once a grammar backend has accepted the constraint, so the core
    compiles it with the same one; `reasoning_end_token_id` is set when a reasoning parser is on and the
    prompt leaves the model thinking: the constraint then starts after that token.
    """

    json: str | dict | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | dict | None = None
    backend: str | None = None
    reasoning_end_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            self.json = json.dumps(self.json)
        if isinstance(self.structural_tag, dict):
            self.structural_tag = json.dumps(self.structural_tag)
        asked = [name for name in ("json", "regex", "choice", "grammar", "structural_tag")
                 if getattr(self, name) is not None]
        if self.json_object:
            asked.append("json_object")
        if len(asked) != 1:
            found = ", ".join(asked) or "none"
            raise UserError(f"structured_outputs takes exactly one of json, json_object, regex, choice, grammar, "
                            f"structural_tag (got {found})", param="structured_outputs")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise UserError("structured_outputs.choice is a non-empty list of strings", param="structured_outputs")

    @property
    def spec(self) -> GrammarSpec:
        if self.json is not None:
            return GrammarSpec("json", self.json)
        if self.json_object:
            return GrammarSpec("json_object", "")
        if self.regex is not None:
            return GrammarSpec("regex", self.regex)
        if self.choice is not None:
            return GrammarSpec("choice", json.dumps(self.choice))
        if self.structural_tag is not None:
            return GrammarSpec("structural_tag", self.structural_tag)
        return GrammarSpec("lark" if looks_like_lark(self.grammar) else "grammar", self.grammar)


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint as a (kind, text) pair: what a backend compiles and what compiled grammars are cached by."""

    kind: str
    text: str

    def schema(self) -> Any:
        """The JSON of a "json" or "structural_tag" spec, parsed; a 400 naming the field when it is not JSON."""
        try:
            return json.loads(self.text)
        except json.JSONDecodeError as error:
            what = "JSON schema" if self.kind == "json" else "structural tag"
            raise UserError(f"the {what} is not valid JSON: {error}", param="structured_outputs") from None


def looks_like_lark(grammar: str) -> bool:
    """Lark writes rules as `name: ...`, GBNF/EBNF as `name ::= ...` (the two grammar dialects vLLM accepts)."""
    return "::=" not in grammar
