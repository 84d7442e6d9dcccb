"""What a rank other than 0 runs, whichever way it was started (a process of ours, a Ray actor): join the
process group, build its shard of the model, then follow the engine core's messages.

The core sends one StepMessage a step: per request only what the worker has not seen yet (new tokens, new
block ids), so a step costs the same to send however long the contexts are. A worker keeps each running
request's tokens and blocks until the core releases it (finished, aborted or preempted: a preempted request
is sent whole again when it returns).
"""

from __future__ import annotations

import datetime
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from paged.backends.interface import Backend, Communicator, Precision
from paged.config import EngineConfig
from paged.model_runner import ModelRunner, SubmittedStep
from paged.model_source import ModelSource
from paged.parallel import ParallelLayout, build_communicators, layout_of
from paged.pipeline import StageLinks
from paged.scheduler import ScheduledRequest, SchedulerOutput

_COLLECTIVE_TIMEOUT_S = 120


@dataclass
class RequestDelta:
    """What a worker learns of one scheduled request this step."""

    request_id: str
    new_token_ids: list[int]  # appended to what it holds (every token known the first time)
    new_block_ids: list[int]
    num_computed_tokens: int
    num_new_tokens: int
    num_prompt_tokens: int = 0  # sent the first time only
    prompt_logprobs: int | None = None
    draft_token_ids: list[int] = field(default_factory=list)  # this step's only, computed after the tokens


@dataclass
class StepMessage:
    deltas: list[RequestDelta]
    released: list[str]


@dataclass
class _PromptLogprobs:
    prompt_logprobs: int | None


@dataclass
class WorkerRequest:
    """A worker's copy of a running request: the fields the model runner reads."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: _PromptLogprobs
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class WorkerSpec:
    """Everything a worker needs to build its shard, picklable for a spawned process or a Ray actor."""

    config: EngineConfig
    source: ModelSource
    precision: Precision
    max_model_len: int
    address: str  # host:port of rank 0's process-group store


def join_world(backend: Backend, layout: ParallelLayout, address: str, source: ModelSource, precision: Precision
               ) -> tuple[Communicator, StageLinks | None]:
    """Join the process group as `layout.rank`: this rank's tensor-parallel communicator, and its pipeline
    links where there are several stages."""
    # A collective waiting on a rank that died fails after this long instead of hanging.
    torch.distributed.init_process_group(backend.dist_backend, init_method=f"tcp://{address}", rank=layout.rank,
                                         world_size=layout.world_size,
                                         timeout=datetime.timedelta(seconds=_COLLECTIVE_TIMEOUT_S))
    comm, world = build_communicators(backend, layout)
    links = None if world is None else StageLinks(layout, world, source.hf_config.hidden_size, precision.compute,
                                                  backend.device())
    return comm, links


class Worker:
    """One rank's shard and runner, driven by the core's messages through `handle`."""

    def __init__(self, rank: int, spec: WorkerSpec, local_rank: int, local_ranks: int) -> None:
        """`local_rank` of `local_ranks`: this rank's place among the ranks sharing its machine (its device)."""
        from paged.backends.registry import load_backend
        from paged.model_loading import build_model

        config = self.config = spec.config
        self.spec = spec
        backend = self.backend = load_backend(config.device)
        backend.place_rank(local_rank, local_ranks)
        layout = layout_of(config, rank)
        comm, self.links = join_world(backend, layout, spec.address, spec.source, spec.precision)
        backend.seed(config.seed)
        self.model = build_model(spec.source, backend, spec.precision, spec.max_model_len, comm=comm, layout=layout,
                                 load_format=config.load_format, quantization=config.quantization)
        self.requests: dict[str, WorkerRequest] = {}
        self.runner: ModelRunner | None = None
        self.submitted: deque[SubmittedStep] = deque()

    def handle(self, kind: str, payload: Any) -> None:
        if kind == "runner":  # sized by the core once every shard is loaded
            config = self.config
            self.runner = ModelRunner(self.model, self.backend, config.block_size, payload, config.max_num_seqs,
                                      self.spec.max_model_len, self.spec.source.hf_config.vocab_size, config.seed,
                                      samples=False, links=self.links)
        elif kind == "kv_cache":
            shape, dtype = payload
            self.runner.kv_caches = [self.backend.allocate_kv_cache(shape, dtype) for _ in range(self.runner.num_layers)]
        elif kind == "profile":
            self.runner.profile_run(*payload)
        elif kind == "step":
            self.runner.execute(self._schedule(payload))
        elif kind == "submit":  # micro-batches in flight over pipeline stages, collected in order
            self.submitted.append(self.runner.submit(self._schedule(payload)))
        elif kind == "collect":
            self.runner.collect(self.submitted.popleft())
        else:
            raise ValueError(f"unknown message {kind!r}")

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _schedule(self, message: StepMessage) -> SchedulerOutput:
        requests, runner = self.requests, self.runner
        for request_id in message.released:
            requests.pop(request_id, None)
            runner.release(request_id)
        scheduled = []
        for delta in message.deltas:
            request = requests.get(delta.request_id)
            if request is None:
                request = requests[delta.request_id] = WorkerRequest(
                    delta.request_id, [], delta.num_prompt_tokens, _PromptLogprobs(delta.prompt_logprobs))
            request.token_ids += delta.new_token_ids
            request.block_ids += delta.new_block_ids
            request.num_computed_tokens = delta.num_computed_tokens
            scheduled.append(ScheduledRequest(request, delta.num_new_tokens, delta.draft_token_ids))
        return SchedulerOutput(scheduled)
