"""The engine core: requests of token ids in, one scheduled step at a time, token-level outputs out.

`step()` schedules, runs the model once, samples and applies every stop condition that needs no text
(EOS, stop tokens, lengths); text, stop strings and response shapes are the frontend's (processing.py).
Everything that touches a device goes through the backend picked at start-up; nothing here knows which
it is. In `paged serve` this object lives in its own process (server/core_process.py), so stepping never
waits on HTTP; the offline LLMEngine calls it in-process.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait

import torch
from torch.profiler import record_function

from paged.backends.interface import Backend, Precision
from paged.backends.registry import load_backend
from paged.block_manager import BlockManager
from paged.config import EngineConfig
from paged.core_protocol import CoreOutput, CoreRequest, EngineStats, PromptLogprobs, TokenLogprobs
from paged.errors import UserError
from paged.model_loading import build_model
from paged.models.layers import kv_head_splits, uniform_window
from paged.executor import Executor, check_parallelism, create_executor, remote_ranks
from paged.model_runner import PENDING_TOKEN, InFlightStep, ModelRunner, StepResult, SubmittedStep
from paged.model_source import ModelSource, resolve_model
from paged.parallel_executor import ParallelExecutor
from paged.parallel import layout_of
from paged.processing import resolve_max_model_len
from paged.request import Request, RequestStatus
from paged.sampling_params import RequestOutputKind
from paged.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from paged.spec_decode.draft_model import DraftModelProposer
from paged.spec_decode.ngram import NgramProposer
from paged.spec_decode.proposer import Proposer
from paged.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineCore:
    def __init__(self, config: EngineConfig, source: ModelSource, backend: Backend | None = None) -> None:
        """`backend`: one already loaded for config.device (the core process reports it before the model loads)."""
        self.config = config
        self.backend: Backend = backend or load_backend(config.device)
        check_parallelism(config, self.backend, source.hf_config)
        self.source = source
        hf_config = source.hf_config
        self.precision = self._resolve_precision()
        self.dtype = self.precision.compute
        try:
            self.kv_dtype = self.backend.kv_cache_dtype(self.dtype, config.kv_cache_dtype)
        except ValueError as e:
            raise UserError(f"--kv-cache-dtype {config.kv_cache_dtype}: {e}", param="kv_cache_dtype") from None
        self.max_model_len = resolve_max_model_len(source, config.max_model_len)
        problems = self.backend.validate(self._head_dim(hf_config), config.block_size, self.dtype)
        if problems:
            raise UserError(f"backend {self.backend.name} cannot run this model: {'; '.join(problems)}")
        self.backend.seed(config.seed)
        self.layout = layout_of(config)
        workers = None
        if self.layout.world_size > 1:  # their processes load their shards while this one loads rank 0's
            workers = ParallelExecutor(config, source, self.backend, self.precision, self.max_model_len,
                                       remote_ranks(config, self.backend))
        self.model = build_model(source, self.backend, self.precision, self.max_model_len,
                                 comm=workers.comm if workers else None, layout=self.layout,
                                 load_format=config.load_format, quantization=config.quantization)
        self.max_num_batched_tokens = config.max_num_batched_tokens or self.backend.max_num_batched_tokens(
            self.model.num_parameters, config.max_num_seqs)
        logger.info("model: %.0fM parameters in %s; quantization: %s; weights %.2f GiB; up to %d tokens per step%s",
                    self.model.num_parameters / 1e6, self.precision, self.model.quantization,
                    self.model.weight_bytes / 2**30, self.max_num_batched_tokens,
                    "" if config.max_num_batched_tokens else f" (the {self.backend.name} backend's default)")
        self.runner: Executor = create_executor(config, self.model, self.backend, self.max_num_batched_tokens,
                                                self.max_model_len, hf_config.vocab_size, workers)
        spec = config.speculative_config
        self.draft_runner, self.draft_hf_config = (self._build_draft() if spec is not None and spec.method == "draft_model"
                                                   else (None, None))
        self.num_blocks = self._size_kv_cache(hf_config)
        self.kv_cache_bytes = self.num_blocks * self._bytes_per_block(hf_config)
        self.runner.kv_caches = self._allocate_kv_cache(hf_config, self.num_blocks)
        if self.draft_runner is not None:
            self.draft_runner.kv_caches = self._allocate_kv_cache(self.draft_hf_config, self.num_blocks,
                                                                  self.draft_runner.num_layers)
        window = uniform_window(hf_config, self.max_model_len)
        if window is not None:
            logger.info("every layer slides over %d tokens: blocks behind the window are freed", window)
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching, window)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, self.max_num_batched_tokens,
                                   self.max_model_len)
        self.proposer: Proposer | None = None
        if self.draft_runner is not None:
            self.proposer = DraftModelProposer(self.draft_runner, spec.num_speculative_tokens,
                                               self.max_num_batched_tokens)
        elif spec is not None:
            self.proposer = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)
        if spec is not None:
            limit = spec.disable_by_batch_size or self.backend.speculation_max_batch
            logger.info("speculative decoding: %s, up to %d tokens a step%s", spec.method, spec.num_speculative_tokens,
                        f", off above {limit} running sequences" if limit else "")
        self._in_flight: InFlightStep | None = None
        self._micro_batches: deque[tuple[SchedulerOutput, SubmittedStep]] = deque()  # pipeline stages' work
        if self.backend.supports_graphs and not config.enforce_eager:
            start = time.monotonic()
            checked = 1 + spec.num_speculative_tokens if spec is not None else 1  # a last token and its drafts
            sizes = self.runner.capture_graphs(checked)
            if self.draft_runner is not None:
                self.draft_runner.capture_graphs(checked)
            logger.info("captured decode graphs for %d batch sizes up to %d%s in %.1f s", len(sizes), sizes[-1],
                        f", and of {checked} tokens a request" if checked > 1 else "", time.monotonic() - start)
        self.vocab_size = hf_config.vocab_size
        self.groups: dict[str, list[Request]] = {}  # user request id -> its sequences
        self.requests: dict[str, Request] = {}
        rows_a_sequence = 1 + (spec.num_speculative_tokens if spec is not None else 0)  # a check's: drafts and one
        self.structured = StructuredOutputManager(source, hf_config.vocab_size,
                                                  config.structured_outputs_any_whitespace,
                                                  config.max_num_seqs * rows_a_sequence, self.backend.host_tensor)
        self.compiling: dict[str, Future] = {}  # user request id -> its grammar, still compiling
        self._rejected: list[CoreOutput] = []  # requests whose grammar failed to compile, not yet reported
        self.stats = EngineStats()
        tokens = self.num_blocks * config.block_size
        logger.info(
            "KV cache (%s): %d blocks of %d tokens = %d tokens in %.2f GiB, reserved now; up to %.1f requests of %d "
            "tokens at once", str(self.kv_dtype).removeprefix("torch."), self.num_blocks, config.block_size, tokens,
            self.kv_cache_bytes / 2**30,
            tokens / self.max_model_len, self.max_model_len,
        )

    # --- start-up -----------------------------------------------------------------------------

    def _resolve_precision(self) -> Precision:
        requested = None if self.config.dtype == "auto" else DTYPES[self.config.dtype]
        precision = self.backend.precision(requested, self.source.stored_as())
        logger.info("dtype %s: %s (%s)", self.config.dtype, precision, precision.why)
        return precision

    @staticmethod
    def _head_dim(hf_config) -> int:
        return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads

    def _kv_heads(self, hf_config) -> int:
        kv_heads, tp = hf_config.num_key_value_heads, self.config.tensor_parallel_size
        return kv_heads // kv_head_splits(hf_config.num_attention_heads, kv_heads, tp)

    def _bytes_per_block(self, hf_config) -> int:
        """On each rank: its stage's layers (the largest stage's, which every rank's cache must match); on rank
        0, the draft model's layers too."""
        per_layer = 2 * self.config.block_size * self._kv_heads(hf_config) * self._head_dim(hf_config)
        target = per_layer * self.layout.most_layers(hf_config.num_hidden_layers) * self.kv_dtype.itemsize
        if self.draft_runner is None:
            return target
        draft = self.draft_hf_config
        return target + 2 * self.config.block_size * draft.num_key_value_heads * self._head_dim(draft) * \
            self.draft_runner.num_layers * self.kv_dtype.itemsize

    def _build_draft(self) -> tuple[ModelRunner, object]:
        """The draft model, whole on this rank's device, in the target's precision, with a runner of its own; and
        its config."""
        config = self.config
        try:
            source = resolve_model(config.speculative_config.model, load_format=config.load_format,
                                   trust_remote_code=config.trust_remote_code)
        except UserError as error:
            raise UserError(f"speculative_config: the draft {error}", param="speculative_config") from None
        target_vocab = self.source.hf_config.vocab_size
        if source.hf_config.vocab_size != target_vocab:
            raise UserError(f"the draft model's vocabulary has {source.hf_config.vocab_size} tokens, the model's "
                            f"{target_vocab}: a draft must share the tokenizer", param="speculative_config")
        model = build_model(source, self.backend, self.precision, self.max_model_len, load_format=config.load_format)
        logger.info("draft model: %.0fM parameters, weights %.2f GiB", model.num_parameters / 1e6,
                    model.weight_bytes / 2**30)
        return ModelRunner(model, self.backend, config.block_size, self.max_num_batched_tokens, config.max_num_seqs,
                           self.max_model_len, target_vocab, config.seed), source.hf_config

    def _size_kv_cache(self, hf_config) -> int:
        if self.config.num_gpu_blocks_override:
            return self.config.num_gpu_blocks_override
        if self.backend.kv_cache_from_device_memory:
            budget = self._device_kv_budget()
        else:
            budget = self.config.kv_cache_memory
        num_blocks = budget // self._bytes_per_block(hf_config)
        needed = -(-self.max_model_len // self.config.block_size)
        if num_blocks < needed:
            raise UserError(
                f"the KV cache holds {num_blocks * self.config.block_size} tokens, fewer than one request of "
                f"max_model_len={self.max_model_len}: give it more memory or lower max_model_len"
            )
        return int(num_blocks)

    def _device_kv_budget(self) -> int:
        """Device memory left for KV blocks under gpu_memory_utilization, after the weights, the peak
        activations of the largest step the scheduler can make, and whatever other processes hold."""
        backend, hf_config = self.backend, self.source.hf_config
        backend.synchronize()
        backend.empty_cache()
        backend.reset_peak_memory()
        total = backend.total_memory()
        used_before = total - backend.free_memory()
        ours_before = backend.peak_memory()  # the weights
        one_block = backend.kv_cache_shape(-(-self.max_model_len // self.config.block_size), self.config.block_size,
                                           self._kv_heads(hf_config), self._head_dim(hf_config))
        self.runner.profile_run(self.max_num_batched_tokens, one_block, self.kv_dtype)
        peak = backend.peak_memory()
        others = max(used_before - ours_before, 0)  # other processes and the runtime's own context
        budget = int(total * self.config.gpu_memory_utilization) - peak - others
        backend.empty_cache()
        logger.info("device memory: %.1f GiB total, weights %.2f GiB, peak step %.2f GiB, others %.2f GiB; "
                    "%.2f GiB for the KV cache", total / 2**30, ours_before / 2**30, (peak - ours_before) / 2**30,
                    others / 2**30, budget / 2**30)
        return budget

    def _allocate_kv_cache(self, hf_config, num_blocks: int, num_layers: int | None = None) -> list[torch.Tensor]:
        """The target's caches (its stage's layers, its share of KV heads), or `num_layers` whole ones (the draft's)."""
        kv_heads = self._kv_heads(hf_config) if num_layers is None else hf_config.num_key_value_heads
        shape = self.backend.kv_cache_shape(num_blocks, self.config.block_size, kv_heads, self._head_dim(hf_config))
        layers = len(self.model.model.stage_layers) if num_layers is None else num_layers
        return [self.backend.allocate_kv_cache(shape, self.kv_dtype) for _ in range(layers)]

    # --- requests -----------------------------------------------------------------------------

    def add_request(self, request: CoreRequest) -> None:
        """Queue a checked request (InputProcessor.make_request): params.n sequences of its prompt."""
        params = request.params
        if request.request_id in self.groups:
            raise UserError(f"request id {request.request_id!r} is already in use")
        children = []
        for index in range(params.n):
            child_params = params.for_child(index)
            child = Request(f"{request.request_id}#{index}" if params.n > 1 else request.request_id,
                            request.prompt_token_ids, child_params, group_id=request.request_id, index=index,
                            client_index=request.client_index, arrival_time=request.arrival_time)
            if child_params.seed is not None:
                child.generator = self.backend.generator(child_params.seed)
            children.append(child)
        self.groups[request.request_id] = children
        for child in children:
            self.requests[child.request_id] = child
        self.stats.prompt_tokens += len(request.prompt_token_ids)
        if params.structured_outputs is None:
            for child in children:
                self.scheduler.add(child)
        else:
            self.compiling[request.request_id] = self.structured.compile(params)
            self._admit_compiled()

    def _admit_compiled(self, timeout: float = 0.0) -> None:
        """Schedule the requests whose grammar is ready (waiting up to `timeout` for one); a grammar that
        failed to compile ends its request with the reason."""
        if timeout and self.compiling:
            wait(self.compiling.values(), timeout=timeout, return_when=FIRST_COMPLETED)
        for request_id, future in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[request_id]
            children = self.groups[request_id]
            if future.exception() is not None:
                logger.warning("request %s: its grammar did not compile: %s", request_id, future.exception())
                for child in children:
                    child.status = RequestStatus.FINISHED_ABORTED
                    self._forget(child)
                self._rejected.append(CoreOutput(request_id, request_id, 0, client_index=children[0].client_index,
                                                 error=f"the grammar did not compile: {future.exception()}"))
                continue
            for child in children:
                child.grammar = self.structured.start(future.result(), child.params.structured_outputs)
                self.scheduler.add(child)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """End user requests (by their id) or single sequences of them (by the sequence's id): aborted, or
        stopped where the frontend found a stop string."""
        for request_id in request_ids:
            sequences = self.groups.get(request_id) or [r for r in [self.requests.get(request_id)] if r]
            compiling = self.compiling.pop(request_id, None)
            for sequence in sequences:
                if compiling is not None:  # never scheduled
                    sequence.status = status
                elif not sequence.status.finished:
                    self._finish(sequence, status)
                self._forget(sequence)
        self._refresh_gauges()

    def _forget(self, sequence: Request) -> None:
        self.requests.pop(sequence.request_id, None)
        group = self.groups.get(sequence.group_id)
        if group is not None and all(s.status.finished for s in group):
            del self.groups[sequence.group_id]

    def shutdown(self) -> None:
        """Stop the executor's worker processes and the grammar threads."""
        self.runner.shutdown()
        self.structured.close()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None or bool(self.compiling) \
            or bool(self._micro_batches)

    # --- the step -----------------------------------------------------------------------------

    def step(self) -> list[CoreOutput]:
        """One scheduled forward pass; returns what the sequences it advanced (or finished) gained."""
        if self.compiling:
            # With nothing else to run, wait (off the GIL) for a grammar rather than spin.
            busy = self.scheduler.has_unfinished() or self._in_flight or self._micro_batches
            self._admit_compiled(timeout=0.0 if busy else 0.05)
        touched = self._pipeline_step() if self.layout.pipeline > 1 else self._one_stage_step()
        outputs = self._outputs(touched)
        if self._rejected:
            outputs, self._rejected = self._rejected + outputs, []
        return outputs

    def _one_stage_step(self) -> list[Request]:
        """Plain greedy decoding on a backend with graphs runs one step ahead: step N+1 is launched before
        step N's tokens are read back (its inputs come from N's on the device), so the host's work of
        reading, detokenizing and scheduling overlaps the device's work instead of adding to it. Where
        rows follow a grammar, step N+1's mask needs step N's tokens: it is filled once they are read
        back, while N+1's forward pass runs, and N+1's tokens are taken from the masked logits.
        """
        touched: list[Request] = []
        ahead = self._can_run_ahead()
        if self._in_flight is not None and not ahead:
            touched += self._retire()
        with record_function("paged.schedule"):
            sched = self._schedule()
        flight = None
        if not sched.is_empty and ahead:
            masked = any(s.request.grammar is not None for s in sched.scheduled)
            with record_function("paged.launch"):
                flight = self.runner.launch_greedy(sched, self._in_flight, masked)
            if flight is None:  # _can_run_ahead promised a graph-sized decode step: the two disagree
                raise RuntimeError("a step predicted to run ahead could not be launched")
        if flight is not None:
            for s in sched.scheduled:
                s.request.num_computed_tokens += 1
                flight.indices.append(s.request.num_tokens)
                s.request.token_ids.append(PENDING_TOKEN)
        if self._in_flight is not None:
            with record_function("paged.apply"):
                touched += self._retire()
        self._in_flight = flight
        if flight is not None and flight.logits is not None:
            with record_function("paged.grammar"):
                states = self._grammar_states(flight.requests)
                self.runner.finish_greedy(flight, states and self.structured.bitmask(states))
        if flight is None and not sched.is_empty:
            self._attach_grammar(sched)
            with record_function("paged.execute"):
                result = self.runner.execute(sched)
            with record_function("paged.apply"):
                touched += self._apply(sched, result)
        return touched

    def _pipeline_step(self) -> list[Request]:
        """With pipeline stages, up to one micro-batch per stage is in flight: each step submits a new one
        (of requests not already in flight, an even share of them all) and, once every stage has one or
        nothing more can be scheduled, collects the oldest, so stage 0 works on one micro-batch while the later
        stages work on others."""
        unfinished = len(self.scheduler.running) + len(self.scheduler.waiting)
        sched = self._schedule(max_rows=-(-unfinished // self.layout.pipeline))
        if not sched.is_empty:
            self._attach_grammar(sched)
            self._micro_batches.append((sched, self.runner.submit(sched)))
            self.scheduler.in_flight.update(s.request.request_id for s in sched.scheduled)
        if not self._micro_batches or (len(self._micro_batches) < self.layout.pipeline and not sched.is_empty):
            return []
        sched, submitted = self._micro_batches.popleft()
        result = self.runner.collect(submitted)
        self.scheduler.in_flight.difference_update(s.request.request_id for s in sched.scheduled)
        return self._apply(sched, result)

    def _schedule(self, max_rows: int | None = None) -> SchedulerOutput:
        if self.proposer is not None:
            self._propose()
        sched = self.scheduler.schedule(max_rows)
        if not sched.is_empty:
            self.stats.count_iteration(sum(s.num_new_tokens for s in sched.scheduled))
        for request in sched.preempted:
            self._release(request.request_id)
        return sched

    def _speculating(self) -> bool:
        """Whether this step drafts: speculation is configured and not off for the batch's size."""
        if self.proposer is None:
            return False
        limit = self.config.speculative_config.disable_by_batch_size or self.backend.speculation_max_batch
        return limit is None or len(self.scheduler.running) <= limit

    def _propose(self) -> None:
        """Draft tokens for every running sequence that decodes next (none while speculation is off under
        load). A sequence following a grammar keeps the drafts its grammar lets through: the check masks
        each position by the grammar's state after the drafts before it."""
        spec, requests, limits = self.config.speculative_config, [], []
        speculating = self._speculating()
        for request in self.scheduler.running:
            request.draft_token_ids = []
            if speculating and request.num_tokens - request.num_computed_tokens == 1 \
                    and request.request_id not in self.scheduler.in_flight:  # a pipeline's micro-batch has it
                # Room for the drafts and the token the check adds, within max_tokens and the context.
                room = min(request.params.max_tokens - request.num_output_tokens,
                           self.max_model_len - request.num_tokens, spec.num_speculative_tokens + 1) - 1
                if room > 0 and (not self.proposer.writes_kv or self.block_manager.allocate(request, 1 + room)):
                    requests.append(request)
                    limits.append(room)
        for request, drafts in zip(requests, self.proposer.propose_all(requests, limits)):
            if request.grammar is not None and drafts:
                drafts = drafts[: self.structured.allowed_drafts(request.grammar, drafts)]
            request.draft_token_ids = drafts

    def _attach_grammar(self, sched: SchedulerOutput) -> None:
        """The bitmask of the constrained rows among those that complete (and of their drafts' positions),
        filled when the runner asks."""
        completing = [s for s in sched.scheduled if s.completes]
        states = self._grammar_states([s.request for s in completing])
        if states:
            drafts = [s.draft_token_ids for s in completing]
            sched.grammar = functools.partial(self.structured.bitmask, states, drafts)

    @staticmethod
    def _grammar_states(rows: list[Request]) -> list | None:
        """Each sampling row's grammar state (None for an unconstrained or finished row), or None where no
        row's grammar is active: that step takes no mask."""
        states = [None if r.status.finished else r.grammar for r in rows]
        return states if any(state is not None and state.active for state in states) else None

    def _can_run_ahead(self) -> bool:
        """Whether the next step is sure to be a graph-replayed, plain-greedy decode of every running request."""
        running = self.scheduler.running
        sizes = self.runner.graph_sizes
        return self.backend.runs_ahead and bool(sizes) and not self.scheduler.waiting and not self._speculating() \
            and len(running) <= sizes[-1] and all(
            r.params.plain_greedy and r.params.prompt_logprobs is None
            and r.num_tokens - r.num_computed_tokens <= 1
            for r in running
        )

    def _retire(self) -> list[Request]:
        """Read back the step in flight and put its tokens in place of their placeholders."""
        flight, self._in_flight = self._in_flight, None
        now = time.monotonic()
        touched = []
        for request, index, token in zip(flight.requests, flight.indices, flight.token_ids()):
            if request.status.finished:
                continue  # aborted, or finished by the token before: this one was computed in vain
            request.token_ids[index] = token
            self._accept_token(request, token, index + 1, None, 0, now)
            touched.append(request)
        self._refresh_gauges()
        return touched

    def _outputs(self, touched: list[Request]) -> list[CoreOutput]:
        """The new tokens of each sequence advanced; a final-only sequence with no stop strings (the
        frontend checks those token by token) says nothing until it ends."""
        outputs = []
        for request in dict.fromkeys(touched):
            finished = request.status.finished
            params = request.params
            if not finished and params.output_kind is RequestOutputKind.FINAL_ONLY and not params.stop:
                continue
            known = request.num_tokens - (1 if request.token_ids[-1] == PENDING_TOKEN else 0)
            new = request.token_ids[request.num_prompt_tokens + request.num_emitted : known]
            request.num_emitted += len(new)
            logprobs, request.new_logprobs = request.new_logprobs, [] if request.new_logprobs is not None else None
            prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None
            outputs.append(CoreOutput(
                request.request_id, request.group_id, request.index, new, logprobs, prompt_logprobs,
                request.finish_reason, request.stop_reason, request.num_cached_tokens,
                (request.arrival_time, request.first_scheduled_time or 0.0, request.first_token_time or 0.0,
                 request.last_token_time or 0.0), client_index=request.client_index,
            ))
            if finished:
                self._forget(request)
        return outputs

    def _apply(self, sched, result: StepResult) -> list[Request]:
        """Advance every scheduled sequence by what the step computed; returns those that gained a token or
        prompt logprobs."""
        now = time.monotonic()
        sampled = result.sampled
        host, accepted = {}, None
        if sampled is not None:
            host["tokens"] = sampled.token_ids.tolist()
            if sampled.num_accepted is not None:  # a verification step: rows of drafts and the token after them
                accepted = sampled.num_accepted.tolist()
            if sampled.logprobs is not None:
                host["logprobs"] = sampled.logprobs.tolist()
                host["ranks"] = sampled.ranks.tolist()
                host["top_ids"] = sampled.top_ids.tolist() if sampled.top_ids is not None else None
                host["top_logprobs"] = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
        touched = []
        row = sequence = 0
        for s in sched.scheduled:
            request = s.request
            if request.status.finished:
                continue  # finished while this step was being prepared
            completes = s.completes  # read before the count below moves
            request.num_computed_tokens += s.num_new_tokens
            chunk = result.prompt_logprobs.get(request.request_id)
            if chunk is not None:
                scored, held = _prompt_logprobs(chunk), request.prompt_logprobs
                if held is None:
                    request.prompt_logprobs = scored
                else:  # earlier chunks', unsent (final-only outputs wait); a recomputed prefix is scored again
                    already = held.first_position + len(held.positions) - scored.first_position
                    held.positions.extend(scored.positions[already:])
                touched.append(request)
            if not completes:
                continue
            if accepted is None:
                request.token_ids.append(host["tokens"][row])
                self._accept_token(request, host["tokens"][row], request.num_tokens, host, row, now)
                row += 1
            else:
                row = self._accept_checked(s, accepted[sequence], host, row, now)
                sequence += 1
            touched.append(request)
        self._refresh_gauges()
        return touched

    def _accept_checked(self, s: ScheduledRequest, num_accepted: int, host: dict, row: int, now: float) -> int:
        """Apply one request's share of a verification step: its kept drafts and the token after them, the
        refused drafts' positions computed in vain (their blocks handed back). Returns the next request's
        first row."""
        request, num_drafts = s.request, len(s.draft_token_ids)
        request.num_computed_tokens -= num_drafts - num_accepted
        if num_drafts:
            self.stats.count_drafts(num_drafts, num_accepted)
        for j in range(num_accepted + 1):
            request.token_ids.append(host["tokens"][row + j])
            self._accept_token(request, host["tokens"][row + j], request.num_tokens, host, row + j, now)
            if request.status.finished:
                break
        if not request.status.finished and self.block_manager.trim(request):
            self._release(request.request_id, keeps_cache=True)  # block-table rows rebuilt from the shorter list
        return row + num_drafts + 1

    def _refresh_gauges(self) -> None:
        self.stats.num_running = len(self.scheduler.running)
        self.stats.num_waiting = len(self.scheduler.waiting)
        self.stats.kv_cache_usage = self.block_manager.usage()
        self.stats.num_preemptions = self.scheduler.num_preemptions
        self.stats.prefix_cache_queries = self.block_manager.prefix_queries
        self.stats.prefix_cache_hits = self.block_manager.prefix_hits

    def _accept_token(self, request: Request, token: int, length: int, host: dict | None, row: int, now: float) -> None:
        """Account for the token just placed at token_ids[length - 1]: timing, logprobs, stop conditions."""
        self.stats.generation_tokens += 1
        if request.first_token_time is None:
            request.first_token_time = now
        request.last_token_time = now
        if request.new_logprobs is not None:
            k = request.params.logprobs
            top_ids, top_lps = host.get("top_ids"), host.get("top_logprobs")
            request.new_logprobs.append(TokenLogprobs(
                host["logprobs"][row], host["ranks"][row], top_ids[row][:k] if top_ids else [],
                top_lps[row][:k] if top_lps else []))
        status = self._stop_status(request, token, length)
        if request.grammar is not None and status is None:
            if not self.structured.advance(request.grammar, token):
                logger.warning("request %s: token %d is outside its grammar; it stops here", request.request_id, token)
                status = RequestStatus.FINISHED_STOPPED
            elif request.grammar.matcher.is_terminated():
                status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            del request.token_ids[length:]  # a token launched after this one is dropped
            self._finish(request, status)

    def _stop_status(self, request: Request, token: int, length: int) -> RequestStatus | None:
        """Whether the sequence stops at this token, the length-th of its token list (stop strings are the
        frontend's: they need the text)."""
        params = request.params
        num_output = length - request.num_prompt_tokens
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token in params.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if num_output >= params.max_tokens or length >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _release(self, request_id: str, keeps_cache: bool = False) -> None:
        """The request's blocks changed (`keeps_cache`: refused drafts' went back) or are gone: what the runners
        hold for it is stale."""
        self.runner.release(request_id)
        if self.proposer is not None:
            self.proposer.release(request_id, keeps_cache)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        self._release(request.request_id)
        reason = request.finish_reason
        self.stats.finished_reasons[reason] = self.stats.finished_reasons.get(reason, 0) + 1



def _prompt_logprobs(chunk) -> PromptLogprobs:
    """The runner's chunk of prompt logprobs as plain lists."""
    top_ids = chunk.top_ids.tolist() if chunk.top_ids is not None else None
    top_lps = chunk.top_logprobs.tolist() if chunk.top_logprobs is not None else None
    return PromptLogprobs(chunk.first_position, [
        TokenLogprobs(lp, rank, top_ids[i] if top_ids else [], top_lps[i] if top_lps else [])
        for i, (lp, rank) in enumerate(zip(chunk.token_logprobs.tolist(), chunk.ranks.tolist()))
    ])
