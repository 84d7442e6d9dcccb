"""The engine behind an event loop: `LLMEngine.step()` runs on its own thread, HTTP handling on the loop.

LLMEngine is not thread-safe, so every call that changes it happens on the engine thread: handlers put
add and abort commands on a queue that the thread drains between steps, and the thread hands outputs
back to each request's asyncio.Queue through `loop.call_soon_threadsafe`. A step therefore never blocks
the loop, and requests arriving while one runs join the batch at the next. Reads of facts fixed at
start-up (tokenizer, context length, vocabulary) are safe from any thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import time
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from paged.core_protocol import EngineStats
from paged.engine import LLMEngine
from paged.errors import UserError
from paged.outputs import RequestOutput
from paged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed or was shut down; no request can be served any more."""


class EngineObserver(Protocol):
    """Told about every step on the engine thread, before any client sees the outputs (metrics)."""

    def on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None: ...

    def on_abort(self, request_ids: list[str]) -> None: ...


@dataclass
class _Add:
    stream: RequestStream
    prompts: list[list[int]]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class _Abort:
    request_ids: list[str]


_STOP = object()
_ACCEPTED = object()


class RequestStream:
    """The engine requests of one HTTP request (one per prompt), their outputs delivered on the event loop.

    Iterating yields, for each wake-up, the newest output of every request that advanced, as
    (prompt index, RequestOutput) pairs. Outputs are cumulative, so older ones still queued are skipped:
    a slow reader falls behind by whole steps, never by a backlog of them.
    """

    def __init__(self, client: AsyncEngine, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self.outputs: list[RequestOutput | None] = [None] * len(request_ids)
        self._client = client
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._position = {request_id: i for i, request_id in enumerate(request_ids)}
        self._closed = False

    @property
    def finished(self) -> bool:
        return all(out is not None and out.finished for out in self.outputs)

    def put(self, item: Any) -> None:
        """Called on the event loop with an output, an exception, or the acceptance marker."""
        self._queue.put_nowait(item)

    async def accepted(self) -> None:
        """Wait until the engine took every request, or raise why it did not (a UserError: a 400)."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._closed = True
            raise item

    async def __aiter__(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        while not self.finished:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            fresh: dict[int, RequestOutput] = {}
            for item in items:
                if isinstance(item, BaseException):
                    self._closed = True
                    raise item
                index = self._position[item.request_id]
                self.outputs[index] = fresh[index] = item
            yield sorted(fresh.items())

    async def collect(self) -> list[RequestOutput]:
        """Wait for every request to finish; their final outputs in prompt order."""
        async for _ in self:
            pass
        return [out for out in self.outputs if out is not None]

    def abort(self) -> None:
        """Stop generating and free the blocks; a no-op once finished. Safe to call more than once."""
        if not self._closed and not self.finished:
            self._closed = True
            self._client.abort(self.request_ids)


class AsyncEngine:
    """Owns an LLMEngine and the thread that steps it while there is work."""

    def __init__(self, engine: LLMEngine, observer: EngineObserver | None = None) -> None:
        self.observer = observer
        self.error: BaseException | None = None
        # Fixed at start-up, so readable from the event loop while the engine thread works.
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self._engine: LLMEngine | None = engine
        # The current device is per thread (CUDA's is): the engine thread takes the one the engine was built on.
        self._device_index = engine.backend.device().index or 0
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def dead(self) -> bool:
        return self.error is not None

    # --- on the event loop --------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; outputs are delivered to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="paged-engine", daemon=True)
        self._thread.start()

    async def submit(self, request_id: str, prompts: list[list[int]], params: SamplingParams) -> RequestStream:
        """Queue one engine request per prompt; returns once the engine accepted them all.

        An error from the engine's own checks comes back here, so the handler can still answer 400.
        """
        if self.error is not None:
            raise EngineDeadError(f"the engine is not running: {self.error}")
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        stream = RequestStream(self, ids)
        self._commands.put(_Add(stream, prompts, params))
        try:
            await stream.accepted()
        except asyncio.CancelledError:
            stream.abort()
            raise
        return stream

    def abort(self, request_ids: Sequence[str]) -> None:
        self._commands.put(_Abort(list(request_ids)))

    async def shutdown(self) -> None:
        """Abort what is still running, stop the thread and free the engine and its KV cache."""
        if self._thread is not None:
            self._commands.put(_STOP)
            await asyncio.to_thread(self._thread.join)
        engine, self._engine = self._engine, None
        if engine is not None:
            backend = engine.backend
            del engine
            gc.collect()
            backend.empty_cache()

    # --- tokenization, on the caller's thread -------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        return self._require_engine().tokenize_prompt(prompt)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self._require_engine().render_chat(messages, None, add_generation_prompt)

    def check_prompt(self, token_ids: list[int]) -> None:
        self._require_engine().check_prompt(token_ids)

    def check_params(self, params: SamplingParams) -> None:
        self._require_engine().check_params(params)

    def _require_engine(self) -> LLMEngine:
        if self._engine is None:
            raise EngineDeadError("the engine has been shut down")
        return self._engine

    # --- on the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        engine = self._require_engine()
        engine.backend.set_device(self._device_index)
        try:
            while self._drain(block=not engine.has_unfinished_requests()):
                if engine.has_unfinished_requests():
                    self._publish(engine.step())
        except Exception as error:
            logger.exception("the engine failed; no further requests can be served")
            self._fail(error)
            while self._drain(block=True):  # answer late submissions until shutdown
                pass
        else:
            self._fail(EngineDeadError("the server is shutting down"), abort=True)

    def _drain(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False once asked to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is _STOP:
                return False
            if isinstance(command, _Add):
                self._add(command)
            else:
                self._abort(command.request_ids)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        if self.error is None:
            self._publish([])
        return True

    def _add(self, command: _Add) -> None:
        stream = command.stream
        if self.error is not None:
            self._deliver([(stream, EngineDeadError(f"the engine is not running: {self.error}"))])
            return
        engine = self._require_engine()
        added = []
        try:
            for request_id, prompt in zip(stream.request_ids, command.prompts, strict=True):
                engine.add_request(request_id, {"prompt_token_ids": prompt}, command.params, command.arrival_time)
                added.append(request_id)
        except Exception as error:  # UserError is the client's fault; anything else still fails only this request
            if not isinstance(error, UserError):
                logger.exception("adding request %s failed", stream.request_ids[0])
            engine.abort_request(added)
            self._deliver([(stream, error)])
            return
        for request_id in added:
            self._streams[request_id] = stream
        self._deliver([(stream, _ACCEPTED)])

    def _abort(self, request_ids: list[str]) -> None:
        if self.error is None:  # a failed engine is left alone
            self._require_engine().abort_request(request_ids)
        for request_id in request_ids:
            self._streams.pop(request_id, None)
        if self.observer is not None:
            self.observer.on_abort(request_ids)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Tell the observer (with fresh stats), then hand each output to its stream."""
        if self.observer is not None:
            self.observer.on_step(outputs, self._snapshot())
        deliveries = []
        for out in outputs:
            stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
            if stream is not None:
                deliveries.append((stream, out))
        if deliveries:
            self._deliver(deliveries)

    def _snapshot(self) -> EngineStats:
        """A copy of the engine's stats for other threads to read."""
        stats = self._require_engine().stats
        return replace(stats, finished_reasons=dict(stats.finished_reasons))

    def _deliver(self, items: list[tuple[RequestStream, Any]]) -> None:
        def put_all() -> None:
            for stream, item in items:
                stream.put(item)

        try:
            self._loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _fail(self, error: BaseException, abort: bool = False) -> None:
        """Fail every open request with `error`; with `abort`, also abort them in the (healthy) engine."""
        self.error = error
        streams = {id(s): s for s in self._streams.values()}.values()
        if abort and self._streams:
            self._require_engine().abort_request(list(self._streams))
        self._streams.clear()
        self._deliver([(stream, error) for stream in streams])
