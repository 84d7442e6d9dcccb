"""Reasoning parsers (--reasoning-parser): a thinking model's <think>...</think> block becomes the reply's
reasoning_content, and what follows it the content.

- deepseek_r1: DeepSeek-R1 and its distills, whose template opens <think> in the prompt: everything up to
  </think> is reasoning, all of it while </think> has not come.
- qwen3: Qwen3 (and QwQ), which opens <think> itself, or not at all (enable_thinking=False puts an empty
  block in the prompt): a reply is reasoning only from a leading <think>.

A grammar (response_format, a required tool call) constrains the answer only: while the prompt leaves the
model thinking, the engine applies it from the token after </think> (StructuredOutputsParams.
reasoning_end_token_id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paged.errors import UserError

THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    opened_by_prompt: bool  # the template opens the block, so a reply starts inside it
    start_id: int
    end_id: int

    @classmethod
    def load(cls, name: str, tokenizer: Any) -> ReasoningParser:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in (THINK_START, THINK_END)]
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise UserError(f"--reasoning-parser {name}: the tokenizer has no {THINK_START} and {THINK_END} tokens",
                            param="reasoning_parser")
        return cls(name, name == "deepseek_r1", *ids)

    def still_thinking(self, prompt_token_ids: list[int]) -> bool:
        """Whether the reply will start inside a think block: no block closed after the prompt's last opening."""
        last_start = _last_index(prompt_token_ids, self.start_id)
        last_end = _last_index(prompt_token_ids, self.end_id)
        return last_end < last_start or last_end < 0

    def thinks(self, text: str) -> bool:
        return self.opened_by_prompt or text.lstrip().startswith(THINK_START)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a whole reply."""
        if not self.thinks(text):
            return None, text
        body = text.lstrip().removeprefix(THINK_START)
        reasoning, ended, content = body.partition(THINK_END)
        return reasoning or None, (content.lstrip() or None) if ended else None


REASONING_PARSERS = ("deepseek_r1", "qwen3")


def _last_index(tokens: list[int], token: int) -> int:
    for i in range(len(tokens) - 1, -1, -1):
        if tokens[i] == token:
            return i
    return -1


@dataclass
class ReasoningStream:
    """One choice's reply as it streams: reasoning deltas until </think>, then content deltas."""

    parser: ReasoningParser
    text: str = ""
    sent: int = 0  # characters of text already sent, as either kind
    decided: bool = False  # whether the reply thinks is known
    thinking: bool = False
    ended: bool = False
    answering: bool = False  # content after </think> has begun (its leading whitespace is dropped, as split does)

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning, content) this delta releases."""
        self.text += delta
        if not self.decided and not self._decide(final=False):
            return "", ""
        if not self.thinking:
            return "", self._take(len(self.text))
        if self.ended:
            return "", self._answer()
        end = self.text.find(THINK_END, self.sent)
        if end < 0:
            held = max((k for k in range(1, len(THINK_END)) if self.text.endswith(THINK_END[:k])), default=0)
            return self._take(len(self.text) - held), ""
        reasoning = self._take(end)
        self.sent, self.ended = end + len(THINK_END), True
        return reasoning, self._answer()

    def _decide(self, final: bool) -> bool:
        """Whether the reply thinks, once its start shows it (a reply may begin with <think> in pieces)."""
        stripped = self.text.lstrip()
        if not final and len(stripped) < len(THINK_START) and THINK_START.startswith(stripped):
            return False
        self.decided, self.thinking = True, self.parser.thinks(self.text)
        if self.thinking and stripped.startswith(THINK_START):
            self.sent = self.text.index(THINK_START) + len(THINK_START)
        return True

    def finish(self) -> tuple[str, str]:
        """What is still held, as (reasoning, content)."""
        if not self.decided:
            self._decide(final=True)
        if self.thinking and not self.ended:
            return self._take(len(self.text)), ""
        return "", self._answer() if self.thinking else self._take(len(self.text))

    def _answer(self) -> str:
        piece = self._take(len(self.text))
        if not self.answering:
            piece = piece.lstrip()
            self.answering = bool(piece)
        return piece

    def _take(self, end: int) -> str:
        taken, self.sent = self.text[self.sent:end], max(self.sent, end)
        return taken
