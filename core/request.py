"""The state of one sequence as it moves through the scheduler and the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from paged.sampling_params import SamplingParams
from paged.structured_output.manager import GrammarState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(eq=False)
class Request:
    """One sequence. With n > 1 the engine makes n of these sharing a prompt (and, cached, its blocks)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    group_id: str = ""  # the user's request id; n > 1 makes several sequences under one
    index: int = 0  # which of the group's n sequences this is
    client_index: int = 0  # the frontend (API server) it came from
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    # Prompt + generated tokens; the first num_computed_tokens of them have K/V in the cache.
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks of token_ids
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_released_blocks: int = 0  # leading blocks handed back once out of every layer's sliding window
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    stop_reason: int | None = None
    grammar: GrammarState | None = None  # the matcher of a structured-output request, once compiled
    draft_token_ids: list[int] = field(default_factory=list)  # guesses for the next step to check (spec_decode)
    # Not yet sent to the frontend: logprobs of new tokens (when asked for), a chunk of prompt logprobs.
    new_logprobs: list[Any] | None = None
    prompt_logprobs: Any = None
    num_emitted: int = 0  # output tokens already sent
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.group_id = self.group_id or self.request_id
        if self.params.logprobs is not None:
            self.new_logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
