"""Continuous batching under one token budget.

There are no separate prefill and decode phases: every step, each scheduled request's computed-token
count catches up with its token count as far as the budget allows. A decode is a request one token
behind; a long prompt is prefilled in chunks; a cached prefix simply starts the count further on.
Running requests go first; when blocks run out the newest running request is preempted (its blocks
freed, its tokens recomputed later).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from paged.block_manager import BlockManager
from paged.request import Request, RequestStatus
from paged.structured_output.bitmask import GrammarBitmask


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens from request.num_computed_tokens on that this step computes, drafts included
    # Guessed tokens after the request's last one, computed with it for the target model to check.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def completes(self) -> bool:
        """Whether this step reaches the end of the request's tokens, so a next token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == \
            self.request.num_tokens + len(self.draft_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # The allowed tokens of the constrained rows among those that complete, filled when called: the runner
    # calls it once the forward pass is launched, so the host fills it while an accelerator computes.
    grammar: Callable[[], GrammarBitmask] | None = None

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None) -> None:
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Requests in a micro-batch still going through the pipeline stages: not scheduled again, nor
        # preempted, until it comes back.
        self.in_flight: set[str] = set()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, max_rows: int | None = None) -> SchedulerOutput:
        """`max_rows`: at most this many requests (a micro-batch's share, with pipeline stages)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        rows = max_rows or self.max_num_seqs
        index = 0
        while index < len(self.running) and budget > 0 and len(out.scheduled) < rows:
            request = self.running[index]
            if self._at_limit(request) or request.request_id in self.in_flight:
                index += 1  # its last token is still in flight: nothing more to compute
                continue
            behind = request.num_tokens - request.num_computed_tokens
            num_new = min(behind + len(request.draft_token_ids), budget)
            drafts = request.draft_token_ids[: max(num_new - behind, 0)]
            while not self.block_manager.allocate(request, num_new):
                victim = self._newest_preemptible()  # at worst the request itself
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new, drafts))
                budget -= num_new
                index += 1
                continue
            break

        # Waiting requests join only on a step that preempted nobody: otherwise they would take the
        # blocks the preempted ones are about to need back.
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_num_seqs \
                and len(out.scheduled) < rows:
            request = self.waiting[0]
            cached = self.block_manager.find_cached_prefix(request)
            num_new = min(request.num_tokens - len(cached) * self.block_manager.block_size, budget)
            if not self.block_manager.allocate(request, num_new, cached):
                break
            self.waiting.popleft()
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = len(cached) * self.block_manager.block_size
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return out

    def _newest_preemptible(self) -> Request:
        return next(r for r in reversed(self.running) if r.request_id not in self.in_flight)

    def _at_limit(self, request: Request) -> bool:
        return request.num_output_tokens >= request.params.max_tokens or (
            self.max_model_len is not None and request.num_tokens >= self.max_model_len
        )

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the schedule and give its blocks back."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.block_manager.free(request)
