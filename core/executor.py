"""What the engine core runs the model through: an executor.

The core schedules, applies tokens and stop conditions; the executor runs each scheduled step on the
device(s) and owns their state (KV cache tensors, captured graphs, block-table rows). With one device
the model runner on this process's device is the executor by itself; split over several (tensor or
pipeline parallel), a ParallelExecutor runs rank 0 here and the other ranks in worker processes or Ray
actors (`remote_ranks` picks which), answering these same calls for their shards, so the core does not
change with the layout.
"""

from __future__ import annotations

from typing import Protocol

import torch

from paged.backends.interface import Backend
from paged.config import EngineConfig
from paged.errors import UserError
from paged.model_runner import InFlightStep, ModelRunner, StepResult, SubmittedStep
from paged.models.layers import kv_head_splits
from paged.multiproc_executor import ProcessRanks
from paged.parallel_executor import ParallelExecutor, RemoteRanks
from paged.parallel import layout_of
from paged.scheduler import SchedulerOutput
from paged.structured_output.bitmask import GrammarBitmask


class Executor(Protocol):
    graph_sizes: list[int]  # batch sizes with captured decode graphs, ascending
    kv_caches: list[torch.Tensor]  # one per layer, allocated by the core once it sized the cache

    def profile_run(self, num_tokens: int, kv_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """One forward pass of the largest step, so the peak of device memory can be read."""

    def capture_graphs(self, multi_token: int = 1) -> list[int]:
        """Capture decode graphs (and, with multi_token > 1, graphs of up to that many tokens a request); the
        decode batch sizes captured."""

    def execute(self, sched: SchedulerOutput) -> StepResult:
        """Run one scheduled step and sample its completing sequences."""

    def submit(self, sched: SchedulerOutput) -> SubmittedStep:
        """Launch a step (a micro-batch, with pipeline stages) without taking its logits."""

    def collect(self, step: SubmittedStep) -> StepResult:
        """Sample a submitted step, in the order submitted."""

    def launch_greedy(self, sched: SchedulerOutput, previous: InFlightStep | None, masked: bool = False
                      ) -> InFlightStep | None:
        """Launch a graph-sized greedy decode step without waiting for it (None: it does not fit a graph);
        `masked`: its tokens wait for finish_greedy."""

    def finish_greedy(self, flight: InFlightStep, grammar: GrammarBitmask | None) -> None:
        """Take a masked step's tokens from its logits under the grammar's bitmask."""

    def release(self, request_id: str) -> None:
        """The request left the running batch: free what the executor holds for it."""

    def shutdown(self) -> None:
        """Stop whatever processes the executor started."""


def distributed_backend(config: EngineConfig, backend: Backend) -> str:
    """Where ranks beyond the core's run, as vLLM chooses: the one asked for, else worker processes where
    this machine has the devices, else Ray (where it is installed)."""
    if config.distributed_executor_backend is not None:
        return config.distributed_executor_backend
    most = backend.max_ranks()
    if most is None or config.tensor_parallel_size * config.pipeline_parallel_size <= most:
        return "mp"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "mp"
    return "ray"


def remote_ranks(config: EngineConfig, backend: Backend) -> RemoteRanks:
    if distributed_backend(config, backend) == "ray":
        from paged.ray_executor import RayRanks

        return RayRanks(layout_of(config), backend.ray_resource)
    return ProcessRanks(layout_of(config).world_size)


def check_parallelism(config: EngineConfig, backend: Backend, hf_config) -> None:
    """Before anything loads: whether this backend and this model can run the parallelism asked for."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if tp * pp == 1:
        return
    most = backend.max_ranks()
    if most is not None and tp * pp > most and distributed_backend(config, backend) == "mp":
        what = f"tensor_parallel_size {tp} x pipeline_parallel_size {pp}" if pp > 1 else f"tensor_parallel_size {tp}"
        raise UserError(f"{what} needs {tp * pp} devices; the {backend.name} backend sees {most} on this machine "
                        "(--distributed-executor-backend ray spreads ranks over a Ray cluster's nodes)",
                        param="tensor_parallel_size" if pp == 1 else "pipeline_parallel_size")
    if pp > 1 and not backend.supports_pipeline:
        raise UserError(f"the {backend.name} backend does not run pipeline parallel", param="pipeline_parallel_size")
    if pp > hf_config.num_hidden_layers:
        raise UserError(f"pipeline_parallel_size {pp}: the model has only {hf_config.num_hidden_layers} layers",
                        param="pipeline_parallel_size")
    try:
        kv_head_splits(hf_config.num_attention_heads, hf_config.num_key_value_heads, tp)
    except ValueError as error:
        raise UserError(f"tensor_parallel_size {tp}: {error}", param="tensor_parallel_size") from None


def create_executor(config: EngineConfig, model: torch.nn.Module, backend: Backend, max_num_batched_tokens: int,
                    max_model_len: int, vocab_size: int, workers: ParallelExecutor | None = None) -> Executor:
    """The executor for `config`: the model runner in this process, which is rank 0 of `workers` when the
    model is split over several (their processes started before this rank's shard was built)."""
    runner = ModelRunner(model, backend, config.block_size, max_num_batched_tokens, config.max_num_seqs,
                         max_model_len, vocab_size, config.seed, links=workers.links if workers else None)
    if workers is None:
        return runner
    workers.attach(runner, max_num_batched_tokens)
    return workers
