"""What crosses the seam between the engine core and its frontends: requests in, token-level outputs out.

The core computes tokens; a frontend (the offline LLMEngine in the same process, or an API server in
another) tokenizes, detokenizes, checks stop strings and shapes responses. These messages are msgspec
structs, sent as msgpack over ZeroMQ between processes (no pickling), and used as plain objects in-process.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import Enum

import msgspec

from paged.sampling_params import SamplingParams


# vLLM's bounds for vllm:iteration_tokens_total.
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class EngineStats:
    """Counters and gauges of the core, for metrics and the periodic stats log."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    finished_reasons: dict[str, int] = field(default_factory=dict)
    # Tokens per engine step, as a histogram over ITERATION_TOKEN_BUCKETS: per bucket (not cumulative), the
    # last one above the largest bound. Kept by the core, so every API server exports the same totals.
    iteration_token_counts: list[int] = field(default_factory=lambda: [0] * (len(ITERATION_TOKEN_BUCKETS) + 1))
    iteration_tokens_sum: int = 0

    # Speculative decoding, as vLLM's spec_decode counters: draft steps (a sequence's drafts checked once),
    # tokens drafted and kept, and how often the draft at each position (0 = first) was kept.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)

    def count_iteration(self, tokens: int) -> None:
        self.iteration_token_counts[bisect.bisect_left(ITERATION_TOKEN_BUCKETS, tokens)] += 1
        self.iteration_tokens_sum += tokens

    def count_drafts(self, drafted: int, accepted: int) -> None:
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += drafted
        self.spec_num_accepted_tokens += accepted
        per_position = self.spec_accepted_per_position
        per_position.extend([0] * (drafted - len(per_position)))
        for position in range(accepted):
            per_position[position] += 1


class CoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One user request, tokenized and checked: the core runs params.n sequences of it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    client_index: int = 0  # which API server sent it, so its outputs go back there


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Log-probabilities at one position: the token's own, its rank, and the top alternatives."""

    logprob: float
    rank: int
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class PromptLogprobs(msgspec.Struct, array_like=True):
    """Log-probabilities of the prompt positions one step scored, from first_position on."""

    first_position: int
    positions: list[TokenLogprobs]


class CoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one sequence gained in a step: its new tokens, and whether (and why) it ended."""

    request_id: str  # the sequence's own id: the request's, or "{request}#{i}" for its i-th of n
    group_id: str  # the user request's id
    index: int  # which of the request's n sequences
    new_token_ids: list[int] = []
    new_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | None = None  # the stop token, when one ended it
    num_cached_tokens: int = 0
    # time.monotonic() of arrival, first schedule, first and latest token (one clock for every process)
    times: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    error: str | None = None  # set when the core could not take the request at all
    client_index: int = 0  # the API server it goes back to


class CoreOutputs(msgspec.Struct, array_like=True):
    """One step's outputs for one frontend, with the core's stats after the step."""

    outputs: list[CoreOutput]
    stats: EngineStats


class InputKind(bytes, Enum):
    """The first frame of a message to the core; the second is its msgpack payload."""

    ADD = b"A"  # a CoreRequest
    ABORT = b"X"  # user request or sequence ids the client gave up
    STOP = b"S"  # sequence ids the frontend ended at a stop string
    CLIENT_DEAD = b"D"  # the index of an API server that died: its requests are aborted
    HELLO = b"H"  # an API server's index, until the core answers READY


class OutputKind(bytes, Enum):
    """The first frame of a message from the core."""

    OUTPUTS = b"O"  # CoreOutputs
    FAILED = b"F"  # why the core stopped: every open request fails with it
    READY = b"R"  # the model is loaded: a dict of the core's facts (KV cache size and layout)


ENCODER = msgspec.msgpack.Encoder()
REQUEST_DECODER = msgspec.msgpack.Decoder(CoreRequest)
OUTPUTS_DECODER = msgspec.msgpack.Decoder(CoreOutputs)
IDS_DECODER = msgspec.msgpack.Decoder(list[str])
INDEX_DECODER = msgspec.msgpack.Decoder(int)
TEXT_DECODER = msgspec.msgpack.Decoder(str)
FACTS_DECODER = msgspec.msgpack.Decoder(dict)
