"""What the engine asks of a proposer, whichever way it guesses."""

from __future__ import annotations

from typing import Protocol

from paged.request import Request


class Proposer(Protocol):
    # Whether it writes K/V at the drafts' positions (a draft model): the engine takes their blocks first.
    writes_kv: bool

    def propose_all(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        """Each request's draft tokens, at most its limit (fewer, or none, where it has no good guess)."""

    def release(self, request_id: str, keeps_cache: bool) -> None:
        """The request's blocks changed: only refused drafts' blocks went back (`keeps_cache`), or all of them
        (finished, aborted, preempted)."""
