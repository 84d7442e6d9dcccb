"""A small model of the same vocabulary drafts tokens for the target: k greedy steps of its own per check.

It runs in the engine's process through a model runner of its own, and keeps its K/V in caches of its own
laid over the target's blocks: slot s of the draft's cache belongs to whatever sequence owns slot s of the
target's, so the block manager hands out one set of blocks for both and frees them together. Before it
drafts, the engine has taken blocks for the sequence's drafts (the draft writes K/V at those positions).

Each check, a sequence's draft first catches up on the tokens it has not seen (the whole prompt the first
time, then the tokens the last check kept), which gives its first guess; then k - 1 one-token steps, which
replay decode graphs where the backend has them. Greedy drafts name one token each, which is what
rejection.verify assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

from paged.model_runner import ModelRunner
from paged.request import Request
from paged.sampling_params import SamplingParams
from paged.scheduler import ScheduledRequest, SchedulerOutput

_GREEDY = SamplingParams(temperature=0)


@dataclass(eq=False)
class _DraftView:
    """What the draft's runner reads of a sequence: its tokens so far, drafts included, and its blocks."""

    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    params = _GREEDY  # shared by every view, not a field

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return 1  # never scores prompt logprobs


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, num_tokens: int, max_num_batched_tokens: int) -> None:
        self.runner = runner
        self.num_tokens = num_tokens
        self.max_num_batched_tokens = max_num_batched_tokens
        self.seen: dict[str, int] = {}  # request id -> leading tokens whose K/V the draft's cache holds

    writes_kv = True  # the engine takes blocks for the drafts before asking

    def propose_all(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        """Drafts of up to min(limit, num_tokens) tokens for each request. Sequences whose catching up would
        pass the step's token budget draft nothing this time (they catch up in a later step)."""
        views, budget = [], self.max_num_batched_tokens
        for request, limit in zip(requests, limits):
            seen = min(self.seen.get(request.request_id, 0), request.num_computed_tokens)
            behind = request.num_tokens - seen
            if min(limit, self.num_tokens) <= 0 or behind > budget:
                continue
            budget -= behind
            views.append((_DraftView(request.request_id, list(request.token_ids), request.block_ids, seen),
                          min(limit, self.num_tokens)))
        drafts: dict[str, list[int]] = {}
        step = [view for view, _ in views]
        while step:
            sampled = self.runner.execute(SchedulerOutput(
                [ScheduledRequest(view, view.num_tokens - view.num_computed_tokens) for view in step])).sampled
            for view, token in zip(step, sampled.token_ids.tolist()):
                if view.request_id not in drafts:  # its first pass: every real token is in the cache now
                    self.seen[view.request_id] = view.num_tokens
                    drafts[view.request_id] = []
                drafts[view.request_id].append(token)
                view.num_computed_tokens = view.num_tokens
                view.token_ids.append(token)
            step = [view for view, limit in views if len(drafts[view.request_id]) < limit]
        return [drafts.get(request.request_id, []) for request in requests]

    def release(self, request_id: str, keeps_cache: bool) -> None:
        """The request's blocks changed (`keeps_cache`: only refused drafts' blocks went back) or are gone."""
        self.runner.release(request_id)
        if not keeps_cache:
            self.seen.pop(request_id, None)
