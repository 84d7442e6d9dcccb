"""The offline engine: a frontend (InputProcessor, OutputProcessor) and the engine core, in one process.

`step()` steps the core once and turns its token-level outputs into RequestOutputs; a sequence the
frontend ends at a stop string is aborted in the core at once. The offline LLM API drives this; the
API servers of `paged serve` run the same frontend half against the core in its own process
(server/engine_client.py, server/core_process.py).
"""

from __future__ import annotations

from paged.config import EngineConfig
from paged.engine_core import EngineCore
from paged.errors import UserError
from paged.model_source import source_of
from paged.backends.registry import require_device
from paged.outputs import RequestOutput
from paged.processing import InputProcessor, OutputProcessor
from paged.request import RequestStatus
from paged.sampling_params import SamplingParams

class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        require_device(config.device)
        self.source = source_of(config)
        self.inputs = InputProcessor(config, self.source)
        self.core = EngineCore(config, self.source)
        self.outputs = OutputProcessor(self.inputs.tokenizer)
        self._next_id = 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(**kwargs))

    # What callers read of either half, under the names they had when both were one class.
    tokenizer = property(lambda self: self.inputs.tokenizer)
    max_model_len = property(lambda self: self.inputs.max_model_len)
    vocab_size = property(lambda self: self.inputs.vocab_size)
    sampling_defaults = property(lambda self: self.inputs.sampling_defaults)
    backend = property(lambda self: self.core.backend)
    precision = property(lambda self: self.core.precision)
    dtype = property(lambda self: self.core.dtype)
    model = property(lambda self: self.core.model)
    runner = property(lambda self: self.core.runner)
    scheduler = property(lambda self: self.core.scheduler)
    block_manager = property(lambda self: self.core.block_manager)
    num_blocks = property(lambda self: self.core.num_blocks)
    max_num_batched_tokens = property(lambda self: self.core.max_num_batched_tokens)
    stats = property(lambda self: self.core.stats)

    def tokenize_prompt(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        return self.inputs.tokenize_prompt(prompt)

    def render_chat(self, messages: list[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **template_kwargs) -> list[int]:
        return self.inputs.render_chat(messages, chat_template, add_generation_prompt, tools, **template_kwargs)

    def check_prompt(self, token_ids: list[int]) -> None:
        self.inputs.check_prompt(token_ids)

    def check_params(self, params: SamplingParams) -> None:
        self.inputs.check_params(params)

    def add_request(self, request_id: str | None, prompt: str | list[int] | dict,
                    params: SamplingParams | None = None, arrival_time: float | None = None) -> str:
        """Queue a request; arrival_time (time.monotonic) is when it reached the server, for latency metrics."""
        text, token_ids = self.inputs.tokenize_prompt(prompt)
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        if self.outputs.has(request_id):
            raise UserError(f"request id {request_id!r} is already in use")
        request = self.inputs.make_request(request_id, token_ids, params or SamplingParams(), arrival_time)
        self.core.add_request(request)
        self.outputs.add(request, text)
        return request_id

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.core.abort_requests(ids)
        self.outputs.drop(ids)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        outputs, stopped = self.outputs.process(self.core.step())
        if stopped:
            self.core.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs
