"""Tensor and pipeline parallel over worker processes: rank 0 is the engine core's own model runner, ranks
1..N-1 run in processes this module starts, one per device, each holding its shard of the weights (its
stage's layers, its slice of each) and of the KV cache (paged.parallel says which).

Every rank runs its part of the same forward pass (the collectives inside the layers keep a stage's ranks in
step, each stage waits for the one before); only rank 0 samples. Each step the core's scheduler output is turned into one message, pickled once and written to every
worker's pipe: per request only what the worker has not seen yet (new tokens, new block ids), so a step costs
the same to send however long the contexts are. A worker keeps each running request's tokens and blocks until
the core releases it (finished, aborted or preempted: a preempted request is sent whole again when it returns).
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
from dataclasses import dataclass, field
from typing import Any

import torch

from paged.backends.interface import Backend, Communicator, Precision
from paged.config import EngineConfig
from paged.errors import UserError
from paged.model_runner import InFlightStep, ModelRunner, StepResult
from paged.model_source import ModelSource
from paged.parallel import ParallelLayout, build_communicators
from paged.pipeline import StageLinks
from paged.scheduler import ScheduledRequest, SchedulerOutput
from paged.structured_output.bitmask import GrammarBitmask

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 300.0
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
class _Sent:
    tokens: int
    blocks: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout_of(config: EngineConfig, rank: int = 0) -> ParallelLayout:
    return ParallelLayout(config.tensor_parallel_size, config.pipeline_parallel_size, rank)


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


@dataclass
class WorkerSpec:
    """Everything a worker needs to build its shard, picklable for a spawned process."""

    config: EngineConfig
    source: ModelSource
    precision: Precision
    max_model_len: int
    address: str  # host:port of rank 0's process-group store


def worker_main(rank: int, spec: WorkerSpec, conn: multiprocessing.connection.Connection, parent_pid: int,
                log_level: str) -> None:
    """A worker process: join the process group, build this rank's shard and runner, then follow the core.
    It dies with the process that started it, even a SIGKILLed one."""
    from paged.backends.registry import load_backend
    from paged.model_loading import build_model
    from paged.server.processes import become_child

    become_child(f"Worker{rank}", log_level, parent_pid)
    config = spec.config
    backend = load_backend(config.device)
    backend.set_device(rank % max(backend.device_count(), 1))
    layout = layout_of(config, rank)
    comm, links = join_world(backend, layout, spec.address, spec.source, spec.precision)
    try:
        backend.seed(config.seed)
        model = build_model(spec.source, backend, spec.precision, spec.max_model_len, comm=comm, layout=layout,
                            load_format=config.load_format, quantization=config.quantization)
        conn.send("ready")
        requests: dict[str, WorkerRequest] = {}
        runner: ModelRunner | None = None
        while True:
            try:
                kind, payload = pickle.loads(conn.recv_bytes())
            except EOFError:  # the engine core is gone
                return
            if kind == "stop":
                return
            if kind == "runner":  # sized by the core once every shard is loaded
                runner = ModelRunner(model, backend, config.block_size, payload, config.max_num_seqs,
                                     spec.max_model_len, spec.source.hf_config.vocab_size, config.seed, samples=False,
                                     links=links)
            elif kind == "kv_cache":
                shape, dtype = payload
                runner.kv_caches = [backend.allocate_kv_cache(shape, dtype) for _ in range(runner.num_layers)]
            elif kind == "profile":
                runner.profile_run(*payload)
            elif kind == "step":
                runner.execute(_worker_schedule(payload, requests, runner))
    finally:
        torch.distributed.destroy_process_group()


def _worker_schedule(message: StepMessage, requests: dict[str, WorkerRequest], runner: ModelRunner
                     ) -> SchedulerOutput:
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
        scheduled.append(ScheduledRequest(request, delta.num_new_tokens))
    return SchedulerOutput(scheduled)


class MultiprocExecutor:
    """Rank 0's model runner in this process, the other ranks in worker processes fed one message a step."""

    def __init__(self, config: EngineConfig, source: ModelSource, backend: Backend, precision: Precision,
                 max_model_len: int) -> None:
        """Start the workers (each loads its shard meanwhile) and join the process group as rank 0."""
        if torch.distributed.is_initialized():
            raise UserError("one model-parallel engine per process: shut the previous one down first "
                            "(engine.core.shutdown())", param="tensor_parallel_size")
        self.layout = layout_of(config)
        world_size = self.layout.world_size
        address = f"127.0.0.1:{_free_port()}"
        spec = WorkerSpec(config, source, precision, max_model_len, address)
        context = multiprocessing.get_context("spawn")
        self.conns: list[multiprocessing.connection.Connection] = []
        self.processes: list[multiprocessing.Process] = []
        for rank in range(1, world_size):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, name=f"paged-worker{rank}", daemon=True,
                                      args=(rank, spec, child, os.getpid(),
                                            logging.getLevelName(logging.getLogger().getEffectiveLevel())))
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)
        self.comm, self.links = join_world(backend, self.layout, address, source, precision)
        self.num_layers = source.hf_config.num_hidden_layers
        self._sent: dict[str, _Sent] = {}
        self._released: list[str] = []
        self.runner: ModelRunner | None = None

    def attach(self, runner: ModelRunner, max_num_batched_tokens: int) -> None:
        """Rank 0's runner, built once this process's shard is loaded: wait for the workers' shards, then
        have them build runners of the same size."""
        self.runner = runner
        for rank, conn in enumerate(self.conns, start=1):
            if not conn.poll(_START_TIMEOUT_S) or conn.recv() != "ready":
                raise UserError(f"model-parallel worker {rank} did not start (exit code "
                                f"{self.processes[rank - 1].exitcode})")
        self._send("runner", max_num_batched_tokens)
        logger.info("%s over %s: rank 0 in this process, worker pids %s", self.layout.describe(self.num_layers),
                    torch.distributed.get_backend(), [process.pid for process in self.processes])

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

    def capture_graphs(self) -> list[int]:
        return []

    def execute(self, sched: SchedulerOutput) -> StepResult:
        self._send("step", self._message(sched))
        try:
            return self.runner.execute(sched)
        except RuntimeError as error:  # a collective whose peer went away
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
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(("stop", None)))
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

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
                request.params.prompt_logprobs if first else None))
            sent.tokens, sent.blocks = end, len(request.block_ids)
        message, self._released = StepMessage(deltas, self._released), []
        return message

    def _send(self, kind: str, payload: Any) -> None:
        data = pickle.dumps((kind, payload))  # once for every worker
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except OSError as error:
            raise self._failure(str(error)) from None

    def _failure(self, detail: str) -> RuntimeError:
        """The error that ends the engine when a rank fails; every worker is stopped first."""
        for process in self.processes:
            process.join(timeout=2)
        dead = [f"{rank} (exit code {p.exitcode})" for rank, p in enumerate(self.processes, start=1)
                if p.exitcode is not None]
        self.shutdown()
        if dead:
            return RuntimeError(f"model-parallel worker {', '.join(dead)} died; the engine stops")
        return RuntimeError(f"model-parallel step failed: {detail}")
