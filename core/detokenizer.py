"""Incremental detokenization and stop strings.

Text is rebuilt from a short window of tokens each step, so a character split across tokens (a byte-
fallback emoji, say) appears only once complete. While a stop string might still be forming at the
end of the text, that tail is held back: what has been shown is never taken back.
"""

from __future__ import annotations

from paged.sampling_params import SamplingParams

# Tokens of context decoded before the new ones, so word-initial spaces come out right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""
        self.hold_back = max((len(s) for s in params.stop), default=1) - 1 if not params.include_stop_str_in_output else 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
        )

    def append(self, token_id: int) -> str | None:
        """Add one generated token; returns the stop string it completed, if any (the text is cut there)."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        delta_start = len(self.text)
        self.text += delta
        return self._cut_at_stop(delta_start)

    def _cut_at_stop(self, delta_start: int) -> str | None:
        """Cut the text at the earliest stop string that overlaps the newest delta."""
        found = [(at, stop) for stop in self.params.stop
                 if (at := self.text.find(stop, max(0, delta_start - len(stop) + 1))) != -1]
        if not found:
            return None
        at, stop = min(found)
        self.text = self.text[: at + len(stop) if self.params.include_stop_str_in_output else at]
        return stop

    def visible_text(self, finished: bool) -> str:
        """Text safe to show: all of it once finished, else without a tail a stop string could still claim."""
        if finished or not self.hold_back:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold_back)]
