"""Prompt lookup: guess that a sequence goes on as it did after the last earlier occurrence of its suffix.

Costs no model: summaries, edits and code changes copy long runs of their prompt, which this finds.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from paged.request import Request


class NgramProposer:
    writes_kv = False

    def __init__(self, num_tokens: int, min_n: int, max_n: int) -> None:
        self.num_tokens = num_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose_all(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        return [self.propose(request.token_ids, limit) for request, limit in zip(requests, limits)]

    def release(self, request_id: str, keeps_cache: bool) -> None:
        """Nothing is held per request."""

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """Up to min(limit, num_tokens) tokens that followed the latest earlier occurrence of the longest
        suffix of max_n .. min_n tokens; none where no such suffix occurred before."""
        limit = min(limit, self.num_tokens)
        length = len(token_ids)
        if limit <= 0 or length <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # Windows that end before the last token, so each has at least one token after it.
            windows = sliding_window_view(tokens[: length - 1], n)
            hits = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return token_ids[start : start + limit]
        return []
