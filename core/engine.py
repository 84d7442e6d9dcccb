"""The engine: requests in, one scheduled step at a time, outputs out.

`step()` schedules, runs the model once, samples, detokenizes and checks stop conditions. Everything
that touches a device goes through the backend picked at start-up; nothing here knows which it is.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

import torch
from pydantic import ValidationError
from torch.profiler import record_function

from paged.backends.interface import Backend, Precision
from paged.backends.registry import load_backend
from paged.block_manager import BlockManager
from paged.config import EngineConfig
from paged.detokenizer import IncrementalDetokenizer
from paged.errors import UserError
from paged.model_loading import build_model
from paged.model_runner import PENDING_TOKEN, InFlightStep, ModelRunner, StepResult
from paged.model_source import resolve_model, sampling_defaults
from paged.outputs import CompletionOutput, Logprob, RequestOutput
from paged.request import Request, RequestStatus
from paged.sampling_params import RequestOutputKind, SamplingParams
from paged.scheduler import Scheduler

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RequestGroup:
    """One user request: n sequences sampled from the same prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    prompt_logprobs: list | None = None
    finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(c.status.finished for c in self.children)


@dataclass
class EngineStats:
    """Counters and gauges the server turns into metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    finished_reasons: dict[str, int] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.tensor_parallel_size != 1:
            # The layers are written for it (column/row-parallel over the communicator); launching one
            # worker per device is not there yet.
            raise UserError("tensor_parallel_size > 1 is not supported yet", param="tensor_parallel_size")
        self.backend: Backend = load_backend(config.device)
        self.source = resolve_model(config.model, config.tokenizer)
        hf_config = self.source.hf_config
        self.tokenizer = None if config.skip_tokenizer_init else self.source.load_tokenizer()
        self.precision = self._resolve_precision()
        self.dtype = self.precision.compute
        self.kv_dtype = self.backend.kv_cache_dtype(self.dtype)
        self.max_model_len = self._resolve_max_model_len(hf_config)
        problems = self.backend.validate(self._head_dim(hf_config), config.block_size, self.dtype)
        if problems:
            raise UserError(f"backend {self.backend.name} cannot run this model: {'; '.join(problems)}")
        self.backend.seed(config.seed)
        self.model = build_model(self.source, self.backend, self.precision, self.max_model_len,
                                 load_format=config.load_format)
        self.max_num_batched_tokens = config.max_num_batched_tokens or self.backend.max_num_batched_tokens(
            self.model.num_parameters, config.max_num_seqs)
        logger.info("model: %.0fM parameters in %s; up to %d tokens per step%s", self.model.num_parameters / 1e6,
                    self.precision, self.max_num_batched_tokens,
                    "" if config.max_num_batched_tokens else f" (the {self.backend.name} backend's default)")
        self.runner = ModelRunner(
            self.model, self.backend, config.block_size, self.max_num_batched_tokens, config.max_num_seqs,
            self.max_model_len, hf_config.vocab_size, config.seed,
        )
        self.num_blocks = self._size_kv_cache(hf_config)
        self.runner.kv_caches = self._allocate_kv_cache(hf_config, self.num_blocks)
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, self.max_num_batched_tokens,
                                   self.max_model_len)
        self._in_flight: InFlightStep | None = None
        if self.backend.supports_graphs and not config.enforce_eager:
            start = time.monotonic()
            sizes = self.runner.capture_graphs()
            logger.info("captured decode graphs for %d batch sizes up to %d in %.1f s", len(sizes), sizes[-1],
                        time.monotonic() - start)
        self.vocab_size = hf_config.vocab_size
        self.eos_token_ids = self._eos_token_ids()
        self.sampling_defaults = sampling_defaults(config.generation_config, self.source)
        self.groups: dict[str, RequestGroup] = {}
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._next_id = 0
        tokens = self.num_blocks * config.block_size
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens; up to %.1f requests of %d tokens at once",
            self.num_blocks, config.block_size, tokens, tokens / self.max_model_len, self.max_model_len,
        )

    @classmethod
    def from_kwargs(cls, **kwargs) -> LLMEngine:
        try:
            config = EngineConfig(**kwargs)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserError(f"invalid engine argument {where}: {first['msg']}", param=where) from None
        return cls(config)

    # --- start-up -----------------------------------------------------------------------------

    def _resolve_precision(self) -> Precision:
        requested = None if self.config.dtype == "auto" else DTYPES[self.config.dtype]
        precision = self.backend.precision(requested, self.source.stored_as())
        logger.info("dtype %s: %s (%s)", self.config.dtype, precision, precision.why)
        return precision

    @staticmethod
    def _head_dim(hf_config) -> int:
        return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads

    def _resolve_max_model_len(self, hf_config) -> int:
        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True) and window < limit:
            logger.warning("sliding-window attention is not implemented: context capped at the window, %d", window)
            limit = window
        asked = self.config.max_model_len
        if asked is not None and asked > limit:
            raise UserError(f"max_model_len {asked} exceeds the model's context of {limit} tokens", param="max_model_len")
        return asked or limit

    def _kv_heads(self, hf_config) -> int:
        return hf_config.num_key_value_heads // self.config.tensor_parallel_size

    def _bytes_per_block(self, hf_config) -> int:
        per_layer = 2 * self.config.block_size * self._kv_heads(hf_config) * self._head_dim(hf_config)
        return per_layer * hf_config.num_hidden_layers * self.kv_dtype.itemsize

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
        self.runner.profile_run(self.max_num_batched_tokens, hf_config.num_hidden_layers, one_block,
                                self.kv_dtype)
        peak = backend.peak_memory()
        others = max(used_before - ours_before, 0)  # other processes and the runtime's own context
        budget = int(total * self.config.gpu_memory_utilization) - peak - others
        backend.empty_cache()
        logger.info("device memory: %.1f GiB total, weights %.2f GiB, peak step %.2f GiB, others %.2f GiB; "
                    "%.2f GiB for the KV cache", total / 2**30, ours_before / 2**30, (peak - ours_before) / 2**30,
                    others / 2**30, budget / 2**30)
        return budget

    def _allocate_kv_cache(self, hf_config, num_blocks: int) -> list[torch.Tensor]:
        shape = self.backend.kv_cache_shape(
            num_blocks, self.config.block_size, self._kv_heads(hf_config), self._head_dim(hf_config)
        )
        return [self.backend.allocate_kv_cache(shape, self.kv_dtype) for _ in range(hf_config.num_hidden_layers)]

    def _eos_token_ids(self) -> frozenset[int]:
        ids = set()
        for found in (
            self.tokenizer.eos_token_id if self.tokenizer is not None else None,
            getattr(self.source.hf_config, "eos_token_id", None),
            self.source.generation_eos_token_ids(),
        ):
            ids.update(found if isinstance(found, list) else [found] if found is not None else [])
        return frozenset(ids)

    # --- requests -----------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        """A prompt as text, token ids or {"prompt_token_ids": [...]} / {"prompt": "..."}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise UserError("a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("text prompts need a tokenizer; this engine runs with skip_tokenizer_init",
                                param="prompt")
            return prompt, self.tokenizer(prompt).input_ids
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise UserError("a prompt is a string or a list of token ids", param="prompt")
        return None, list(prompt)

    def render_chat(
        self, messages: list[dict], chat_template: str | None = None, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the chat template (the model's, or a given one)."""
        template = chat_template or self.config.chat_template
        if template and os.path.isfile(template):
            with open(template) as f:
                template = f.read()
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja2 and transformers raise many types for a bad template or messages
            raise UserError(f"cannot apply the chat template: {e}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise UserError("the prompt is empty", param="prompt")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", param="prompt")
        if len(token_ids) >= self.max_model_len:
            raise UserError(
                f"the prompt is {len(token_ids)} tokens, which leaves no room to generate within "
                f"max_model_len={self.max_model_len}",
                param="prompt",
            )

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: limits of this engine and ids of this vocabulary."""
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.config.max_logprobs:
                raise UserError(f"at most {self.config.max_logprobs} logprobs may be asked for, got {k}", param=name)
        for name, ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise UserError(f"{name} token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                                param=name)

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int] | dict,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request; arrival_time (time.monotonic) is when it reached the server, for latency metrics."""
        params = params or SamplingParams()
        text, token_ids = self.tokenize_prompt(prompt)
        self.check_prompt(token_ids)
        self.check_params(params)
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        params = replace(params, max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens),
                         eos_token_ids=self.eos_token_ids)
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        if request_id in self.groups:
            raise UserError(f"request id {request_id!r} is already in use")
        children = []
        for index in range(params.n):
            child_params = params.for_child(index)
            child = Request(f"{request_id}#{index}" if params.n > 1 else request_id, token_ids, child_params, text,
                            group_id=request_id, index=index)
            if arrival_time is not None:
                child.arrival_time = arrival_time
            if params.detokenize and self.tokenizer is not None:
                child.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, child_params)
            if child_params.seed is not None:
                child.generator = self.backend.generator(child_params.seed)
            if child_params.logprobs is not None:
                child.logprobs = []
            children.append(child)
        self.groups[request_id] = RequestGroup(request_id, text, token_ids, children,
                                               [None] if params.prompt_logprobs is not None else None)
        for child in children:
            self.requests[child.request_id] = child
            self.scheduler.add(child)
        self.stats.prompt_tokens += len(token_ids)
        return request_id

    def abort_request(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self.groups.pop(request_id, None)
            for child in group.children if group else []:
                if not child.status.finished:
                    self._finish(child, RequestStatus.FINISHED_ABORTED)
                self.requests.pop(child.request_id, None)
        self._refresh_gauges()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # --- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduled forward pass; returns the outputs of the requests it advanced (or finished).

        Plain greedy decoding on a backend with graphs runs one step ahead: step N+1 is launched before
        step N's tokens are read back (its inputs come from N's on the device), so the host's work of
        reading, detokenizing and scheduling overlaps the device's work instead of adding to it.
        """
        touched: list[str] = []
        ahead = self._can_run_ahead()
        if self._in_flight is not None and not ahead:
            touched += self._retire()
        with record_function("paged.schedule"):
            sched = self.scheduler.schedule()
        for request in sched.preempted:
            self.runner.release(request.request_id)
        flight = None
        if not sched.is_empty and ahead:
            with record_function("paged.launch"):
                flight = self.runner.launch_greedy(sched, self._in_flight)
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
        if flight is None and not sched.is_empty:
            with record_function("paged.execute"):
                result = self.runner.execute(sched)
            with record_function("paged.apply"):
                touched += self._apply(sched, result)
        return self._outputs(touched)

    def _can_run_ahead(self) -> bool:
        """Whether the next step is sure to be a graph-replayed, plain-greedy decode of every running request."""
        running = self.scheduler.running
        sizes = self.runner.graph_sizes
        return self.backend.runs_ahead and bool(sizes) and not self.scheduler.waiting \
            and len(running) <= sizes[-1] and all(
            r.params.plain_greedy and r.params.prompt_logprobs is None and r.num_tokens - r.num_computed_tokens <= 1
            for r in running
        )

    def _retire(self) -> list[str]:
        """Read back the step in flight and put its tokens in place of their placeholders."""
        flight, self._in_flight = self._in_flight, None
        now = time.monotonic()
        touched: dict[str, None] = {}
        for request, index, token in zip(flight.requests, flight.indices, flight.token_ids()):
            if request.status.finished:
                continue  # aborted, or finished by the token before: this one was computed in vain
            request.token_ids[index] = token
            self._accept_token(request, token, index + 1, None, 0, now)
            touched[request.group_id] = None
        self._refresh_gauges()
        return list(touched)

    def _outputs(self, touched: list[str]) -> list[RequestOutput]:
        outputs = [self._output(group) for group in map(self.groups.__getitem__, dict.fromkeys(touched))
                   if group.finished or group.children[0].params.output_kind is not RequestOutputKind.FINAL_ONLY]
        for out in outputs:
            if out.finished:
                self._forget(out.request_id)
        return outputs

    def _apply(self, sched, result: StepResult) -> list[str]:
        """Advance every scheduled request by what the step computed; returns the touched group ids."""
        now = time.monotonic()
        sampled = result.sampled
        host = {}
        if sampled is not None:
            host["tokens"] = sampled.token_ids.tolist()
            if sampled.logprobs is not None:
                host["logprobs"] = sampled.logprobs.tolist()
                host["ranks"] = sampled.ranks.tolist()
                host["top_ids"] = sampled.top_ids.tolist() if sampled.top_ids is not None else None
                host["top_logprobs"] = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
        touched: dict[str, None] = {}
        row = 0
        for s in sched.scheduled:
            request = s.request
            if request.status.finished:
                continue  # finished while this step was being prepared
            completes = s.completes
            request.num_computed_tokens += s.num_new_tokens
            chunk = result.prompt_logprobs.get(request.request_id)
            if chunk is not None:
                self._add_prompt_logprobs(self.groups[request.group_id], chunk)
            if not completes:
                continue
            request.token_ids.append(host["tokens"][row])
            self._accept_token(request, host["tokens"][row], request.num_tokens, host, row, now)
            row += 1
            touched[request.group_id] = None
        self._refresh_gauges()
        return list(touched)

    def _refresh_gauges(self) -> None:
        self.stats.num_running = len(self.scheduler.running)
        self.stats.num_waiting = len(self.scheduler.waiting)
        self.stats.kv_cache_usage = self.block_manager.usage()
        self.stats.num_preemptions = self.scheduler.num_preemptions
        self.stats.prefix_cache_queries = self.block_manager.prefix_queries
        self.stats.prefix_cache_hits = self.block_manager.prefix_hits

    def _accept_token(self, request: Request, token: int, length: int, host: dict | None, row: int, now: float) -> None:
        """Account for the token just placed at token_ids[length - 1]: timing, logprobs, text, stop conditions."""
        self.stats.generation_tokens += 1
        if request.first_token_time is None:
            request.first_token_time = now
        request.last_token_time = now
        if request.logprobs is not None:
            request.logprobs.append(self._position_logprobs(token, host, row, request.params.logprobs))
        stop_string = request.detokenizer.append(token) if request.detokenizer is not None else None
        status = self._stop_status(request, token, stop_string, length)
        if status is not None:
            del request.token_ids[length:]  # a token launched after this one is dropped
            self._finish(request, status)

    def _stop_status(self, request: Request, token: int, stop_string: str | None, length: int
                     ) -> RequestStatus | None:
        """Whether the sequence stops at this token, the length-th of its token list."""
        params = request.params
        num_output = length - request.num_prompt_tokens
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token in params.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if stop_string is not None:
                request.stop_reason = stop_string
                return RequestStatus.FINISHED_STOPPED
        if num_output >= params.max_tokens or length >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        self.runner.release(request.request_id)
        reason = request.finish_reason
        self.stats.finished_reasons[reason] = self.stats.finished_reasons.get(reason, 0) + 1

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _position_logprobs(self, token: int, host: dict, row: int, k: int) -> dict[int, Logprob]:
        out = {token: Logprob(host["logprobs"][row], host["ranks"][row], self._decode_token(token))}
        if host.get("top_ids") is not None:
            for rank, (tid, lp) in enumerate(zip(host["top_ids"][row][:k], host["top_logprobs"][row][:k]), start=1):
                out.setdefault(tid, Logprob(lp, rank, self._decode_token(tid)))
        return out

    def _add_prompt_logprobs(self, group: RequestGroup, chunk) -> None:
        if group.prompt_logprobs is None or len(group.prompt_logprobs) != chunk.first_position:
            return  # another child of the group already scored these positions
        lps, ranks = chunk.token_logprobs.tolist(), chunk.ranks.tolist()
        top_ids = chunk.top_ids.tolist() if chunk.top_ids is not None else None
        top_lps = chunk.top_logprobs.tolist() if chunk.top_logprobs is not None else None
        for i, (lp, rank) in enumerate(zip(lps, ranks)):
            token = group.prompt_token_ids[chunk.first_position + i]
            entry = {token: Logprob(lp, rank, self._decode_token(token))}
            for r, (tid, tlp) in enumerate(zip(top_ids[i], top_lps[i]) if top_ids else (), start=1):
                entry.setdefault(tid, Logprob(tlp, r, self._decode_token(tid)))
            group.prompt_logprobs.append(entry)

    def _output(self, group: RequestGroup) -> RequestOutput:
        finished = group.finished
        completions = []
        for child in group.children:
            logprobs = list(child.logprobs) if child.logprobs is not None else None
            cumulative = sum(next(iter(p.values())).logprob for p in logprobs) if logprobs else None
            detok = child.detokenizer
            completions.append(CompletionOutput(
                index=child.index,
                text=detok.visible_text(child.status.finished) if detok is not None else "",
                token_ids=child.output_token_ids,
                cumulative_logprob=cumulative,
                logprobs=logprobs,
                finish_reason=child.finish_reason,
                stop_reason=child.stop_reason,
            ))
        first = group.children[0]
        metrics = {
            "arrival_time": first.arrival_time,
            "first_scheduled_time": first.first_scheduled_time or 0.0,
            "first_token_time": first.first_token_time or 0.0,
            "last_token_time": max((c.last_token_time or 0.0) for c in group.children),
        }
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=list(group.prompt_logprobs) if group.prompt_logprobs is not None else None,
            num_cached_tokens=first.num_cached_tokens,
            metrics=metrics,
        )

    def _forget(self, request_id: str) -> None:
        group = self.groups.pop(request_id)
        for child in group.children:
            self.requests.pop(child.request_id, None)
