"""Tensor and pipeline parallel: rank 0 is the engine core's own model runner, ranks 1..N-1 are workers
(paged.worker) each holding its shard of the weights (its stage's layers, its slice of each) and of the KV
cache, on a device of its own. How the workers are started and reached is a transport's business: worker
processes on this machine (multiproc_executor) or Ray actors over a cluster's nodes (ray_executor).

Every rank runs its part of the same forward pass (the collectives inside the layers keep a stage's ranks in
step, each stage waits for the one before); only rank 0 samples. Each step the scheduler's output becomes one
message holding only what the workers have not seen, serialised once for all of them.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from paged.backends.interface import Backend, Precision
from paged.config import EngineConfig
from paged.errors import UserError
from paged.model_runner import InFlightStep, ModelRunner, StepResult, SubmittedStep
from paged.model_source import ModelSource
from paged.scheduler import SchedulerOutput
from paged.structured_output.bitmask import GrammarBitmask
from paged.parallel import layout_of
from paged.worker import RequestDelta, StepMessage, WorkerSpec, join_world

logger = logging.getLogger(__name__)


class RemoteRanks(Protocol):
    """Ranks 1..N-1, wherever they run."""

    host: str  # the address the workers reach this process at

    def start(self, spec: WorkerSpec) -> None:
        """Start every worker; each joins the process group at spec.address and loads its shard."""

    def place_core(self, backend: Backend) -> None:
        """Give rank 0 (this process) its device among the workers'."""

    def wait_ready(self) -> None:
        """Return once every worker has loaded its shard; UserError naming one that did not start."""

    def send(self, kind: str, payload: Any) -> None:
        """The same message to every worker, serialised once; OSError where a worker cannot be reached."""

    def dead(self) -> list[str]:
        """The workers found dead, as 'rank (why)', after giving them a moment to be seen so."""

    def describe(self) -> str:
        """Where the workers run, for the start-up log."""

    def stop(self) -> None:
        """Stop every worker and free what was held for them."""


@dataclass
class _Sent:
    tokens: int
    blocks: int


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ParallelExecutor:
    """Rank 0's model runner in this process, the other ranks fed one message a step."""

    def __init__(self, config: EngineConfig, source: ModelSource, backend: Backend, precision: Precision,
                 max_model_len: int, ranks: RemoteRanks) -> None:
        """Start the workers (each loads its shard meanwhile) and join the process group as rank 0."""
        if torch.distributed.is_initialized():
            raise UserError("one model-parallel engine per process: shut the previous one down first "
                            "(engine.core.shutdown())", param="tensor_parallel_size")
        self.layout = layout_of(config)
        self.ranks, self.backend = ranks, backend
        address = f"{ranks.host}:{free_port(ranks.host)}"
        ranks.start(WorkerSpec(config, source, precision, max_model_len, address))
        try:
            ranks.place_core(backend)
            self.comm, self.links = join_world(backend, self.layout, address, source, precision)
        except BaseException:
            ranks.stop()
            raise
        self.num_layers = source.hf_config.num_hidden_layers
        self._sent: dict[str, _Sent] = {}
        self._released: list[str] = []
        self.runner: ModelRunner | None = None

    def attach(self, runner: ModelRunner, max_num_batched_tokens: int) -> None:
        """Rank 0's runner, built once this process's shard is loaded: wait for the workers' shards, then
        have them build runners of the same size."""
        self.runner = runner
        self.ranks.wait_ready()
        self._send("runner", max_num_batched_tokens)
        logger.info("%s over %s: rank 0 in this process, %s", self.layout.describe(self.num_layers),
                    torch.distributed.get_backend(), self.ranks.describe())

    # --- the Executor interface ---------------------------------------------------------------

    @property
    def graph_sizes(self) -> list[int]:
        return []  # graphs and run-ahead steps stay single-rank for now

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        return self.runner.kv_caches

    @kv_caches.setter
    def kv_caches(self, caches: list[torch.Tensor]) -> None:
        self._send("kv_cache", (tuple(caches[0].shape), caches[0].dtype))
        self.runner.kv_caches = caches

    def profile_run(self, num_tokens: int, kv_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._send("profile", (num_tokens, kv_shape, dtype))
        self.runner.profile_run(num_tokens, kv_shape, dtype)

    def capture_graphs(self, multi_token: int = 1) -> list[int]:
        return []

    def execute(self, sched: SchedulerOutput) -> StepResult:
        self._send("step", self._message(sched))
        return self._on_rank_0(self.runner.execute, sched)

    def submit(self, sched: SchedulerOutput) -> SubmittedStep:
        self._send("submit", self._message(sched))
        return self._on_rank_0(self.runner.submit, sched)

    def collect(self, step: SubmittedStep) -> StepResult:
        self._send("collect", None)
        return self._on_rank_0(self.runner.collect, step)

    def _on_rank_0(self, call, arg):
        try:
            return call(arg)
        except RuntimeError as error:  # a collective or transfer whose peer went away
            raise self._failure(str(error)) from None

    def launch_greedy(self, sched: SchedulerOutput, previous: InFlightStep | None, masked: bool = False
                      ) -> InFlightStep | None:
        return None

    def finish_greedy(self, flight: InFlightStep, grammar: GrammarBitmask | None) -> None:
        raise RuntimeError("no step runs ahead over several ranks")

    def release(self, request_id: str) -> None:
        if self._sent.pop(request_id, None) is not None:
            self._released.append(request_id)
        self.runner.release(request_id)

    def shutdown(self) -> None:
        self.ranks.stop()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.backend.place_rank(0, 1)  # this process is a whole machine's only rank again

    # --- messages --------------------------------------------------------------------------------

    def _message(self, sched: SchedulerOutput) -> StepMessage:
        deltas = []
        for s in sched.scheduled:
            request = s.request
            sent = self._sent.get(request.request_id)
            first = sent is None
            if first:
                sent = self._sent[request.request_id] = _Sent(0, 0)
            # Every token known (so a worker sees the same "completes" as this rank; prompt logprobs score a
            # chunk against the token after it).
            end = request.num_tokens
            deltas.append(RequestDelta(
                request.request_id, request.token_ids[sent.tokens:end], request.block_ids[sent.blocks:],
                request.num_computed_tokens, s.num_new_tokens,
                request.num_prompt_tokens if first else 0,
                request.params.prompt_logprobs if first else None, s.draft_token_ids))
            sent.tokens, sent.blocks = end, len(request.block_ids)
        message, self._released = StepMessage(deltas, self._released), []
        return message

    def _send(self, kind: str, payload: Any) -> None:
        try:
            self.ranks.send(kind, payload)
        except OSError as error:
            raise self._failure(str(error)) from None

    def _failure(self, detail: str) -> RuntimeError:
        """The error that ends the engine when a rank fails; every worker is stopped first."""
        dead = self.ranks.dead()
        self.shutdown()
        if dead:
            return RuntimeError(f"model-parallel worker {', '.join(dead)} died; the engine stops")
        return RuntimeError(f"model-parallel step failed: {detail}")
