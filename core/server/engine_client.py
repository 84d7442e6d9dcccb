"""The API server's engine client: the frontend halves of the engine, talking to a core in another process.

Tokenizing, chat templates and checks (InputProcessor) run in the handler that receives a request, so
a bad request is a 400 before the core hears of it. The checked request goes to the core over ZeroMQ;
each step's outputs come back on this client's own socket, are detokenized and checked for stop strings
here (OutputProcessor) and handed to the request's RequestStream. Everything runs on the event loop, so
nothing here is shared between threads. The core's death is seen at once through a pidfd (its process
exiting makes it readable): every open stream gets an error, /health answers 503.

This is the seam the HTTP layer sees; a data-parallel set of cores, or a core on another node, is another
set of addresses behind the same methods.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import zmq
import zmq.asyncio

from paged.core_protocol import (
    ENCODER,
    FACTS_DECODER,
    OUTPUTS_DECODER,
    TEXT_DECODER,
    CoreOutput,
    CoreRequest,
    EngineStats,
    InputKind,
    OutputKind,
)
from paged.errors import UserError
from paged.outputs import RequestOutput
from paged.processing import InputProcessor, OutputProcessor
from paged.sampling_params import SamplingParams
from paged.server.errors import APIError, EngineDeadError
from paged.server.processes import CoreAddresses

logger = logging.getLogger(__name__)

# Without a pidfd (not Linux), how often the core's liveness is polled.
_POLL_CORE_S = 0.5
# The core sends stats at least every second, busy or idle; this long without a word, /health says so.
HEARTBEAT_TIMEOUT_S = 30.0
# How often an API server says HELLO while the core loads the model.
_HELLO_EVERY_S = 0.5


class EngineObserver(Protocol):
    """Told about every step's outputs before any client sees them (metrics)."""

    def on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None: ...

    def on_abort(self, request_ids: list[str]) -> None: ...

    def on_refused(self, reason: str) -> None: ...


class RequestStream:
    """The engine requests of one HTTP request (one per prompt), their outputs delivered on the event loop.

    Iterating yields, for each wake-up, the newest output of every request that advanced, as
    (prompt index, RequestOutput) pairs. Outputs are cumulative, so older ones still queued are skipped:
    a slow reader falls behind by whole steps, never by a backlog of them.
    """

    def __init__(self, client: EngineClient, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self.outputs: list[RequestOutput | None] = [None] * len(request_ids)
        self._client = client
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._position = {request_id: i for i, request_id in enumerate(request_ids)}
        self._closed = False
        self._ending: BaseException | None = None

    @property
    def finished(self) -> bool:
        return all(out is not None and out.finished for out in self.outputs)

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def end(self, outputs: list[RequestOutput], why: BaseException) -> None:
        """Cut short: these final outputs (finish_reason "abort") are the last, then iterating raises `why`."""
        self._ending = why
        self._closed = True
        for out in outputs:
            self.put(out)

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
        if self._ending is not None:
            raise self._ending

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


class EngineClient:
    """One API server's connection to the engine core at `addresses`, as client number `index`."""

    def __init__(self, inputs: InputProcessor, addresses: CoreAddresses, index: int, core_pid: int,
                 observer: EngineObserver | None = None, log_requests: bool = False,
                 max_waiting_requests: int | None = None, max_log_len: int | None = None) -> None:
        self.inputs = inputs
        self.outputs = OutputProcessor(inputs.tokenizer)
        self.observer = observer
        self.error: BaseException | None = None
        self.stats = EngineStats()
        self.facts: dict | None = None  # the core's, from its READY: set once the model is loaded
        self.draining = False
        self.tokenizer = inputs.tokenizer
        self.max_model_len = inputs.max_model_len
        self.vocab_size = inputs.vocab_size
        self._addresses = addresses
        self._index = index
        self.core_pid = core_pid
        self._log_requests = log_requests
        self._max_log_len = max_log_len
        self._max_waiting = max_waiting_requests
        self._added_since_stats = 0
        self._last_heard = time.monotonic()
        self._streams: dict[str, RequestStream] = {}
        self._push: zmq.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._hello: asyncio.Task | None = None
        self._pidfd: int | None = None

    @property
    def dead(self) -> bool:
        return self.error is not None

    def health(self) -> str | None:
        """Why this server cannot serve now (loading, draining, the core gone or silent); None when it can.
        Read from state the core's messages keep fresh, so it answers at once however busy the core is."""
        if self.error is not None:
            return f"the engine is not running: {self.error}"
        if self.draining:
            return "the server is shutting down"
        if self.facts is None:
            return "the engine core is loading the model"
        silent = time.monotonic() - self._last_heard
        if silent > HEARTBEAT_TIMEOUT_S:
            return f"the engine core has not answered for {silent:.0f} s"
        return None

    # --- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to the core and start reading outputs on the running event loop."""
        self._context = zmq.Context()
        self._push = self._context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.connect(self._addresses.input)
        self._async_context = zmq.asyncio.Context()
        pull = self._async_context.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 0)
        pull.connect(self._addresses.output(self._index))
        self._reader = asyncio.ensure_future(self._read(pull))
        self._hello = asyncio.ensure_future(self._say_hello())
        self._watch_core()

    async def shutdown(self) -> None:
        """Abort what is still open (the core keeps serving other API servers) and disconnect."""
        if self._streams and not self.dead:
            self._send(InputKind.ABORT, list(self._streams))
        self._fail(EngineDeadError("the server is shutting down"))
        for task in (self._reader, self._watcher, self._hello):
            if task is not None:
                task.cancel()
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._push is not None:
            self._context.destroy(linger=1000)
            self._async_context.destroy(linger=0)
            self._push = None

    # --- requests -----------------------------------------------------------------------------

    async def submit(self, request_id: str, prompts: list[list[int]], params: SamplingParams) -> RequestStream:
        """Check and queue one engine request per prompt (a UserError here is a 400); outputs arrive on the stream.

        Refused with 503 while loading or draining, and with 429 once --max-waiting-requests wait in the core."""
        if self.error is not None:
            raise EngineDeadError(f"the engine is not running: {self.error}")
        if self.facts is None or self.draining:
            self._refuse("loading" if self.facts is None else "draining")
            raise APIError(503, self.health(), retry_after=5)
        waiting = self.stats.num_waiting + self._added_since_stats
        if self._max_waiting is not None and waiting + len(prompts) * params.n > self._max_waiting:
            self._refuse("queue_full")
            raise APIError(429, f"{waiting} requests are waiting for the engine (--max-waiting-requests "
                                f"{self._max_waiting}): try again shortly", retry_after=1)
        now = time.monotonic()
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        if any(engine_id in self._streams for engine_id in ids):
            raise APIError(400, f"request id {request_id} is in use by a request still running", param="X-Request-Id")
        requests = [self.inputs.make_request(engine_id, prompt, params, now, self._index)
                    for engine_id, prompt in zip(ids, prompts, strict=True)]
        stream = RequestStream(self, ids)
        self._added_since_stats += len(requests) * params.n
        for request in requests:
            self.outputs.add(request, None)
            self._streams[request.request_id] = stream
            self._send(InputKind.ADD, request)
            if self._log_requests:
                self._log_received(request)
        return stream

    def _log_received(self, request: CoreRequest) -> None:
        """The prompt's first --max-log-len tokens, as ids and as text (all of them without the flag)."""
        shown = request.prompt_token_ids[:self._max_log_len]
        logger.info("received request %s: %d prompt tokens, prompt: %r, prompt_token_ids: %s, %s",
                    request.request_id, len(request.prompt_token_ids),
                    self.tokenizer.decode(shown) if self.tokenizer is not None else None, shown, request.params)

    def abort(self, request_ids: Sequence[str]) -> None:
        ids = [i for i in request_ids if self._streams.pop(i, None) is not None]
        if not ids:
            return
        self.outputs.drop(ids)
        if not self.dead:
            self._send(InputKind.ABORT, ids)
        if self.observer is not None:
            self.observer.on_abort(ids)
        if self._log_requests:
            logger.info("aborted requests %s", ", ".join(ids))

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; give the open ones `timeout` seconds, then end each with finish_reason "abort"
        and an error, and abort them in the core."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self._streams:
            return
        logger.warning("shutting down: %d requests did not finish in %.0f s and are aborted", len(self._streams),
                       timeout)
        why = EngineDeadError(f"the server is shutting down: the request was aborted after {timeout:.0f} s")
        for stream in self._open_streams():
            finals = [self.outputs.abort(i) for i in stream.request_ids if self.outputs.has(i)]
            self.abort(stream.request_ids)
            stream.end(finals, why)

    def _refuse(self, reason: str) -> None:
        if self.observer is not None:
            self.observer.on_refused(reason)

    # --- tokenization, in the handler ---------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        return self.inputs.tokenize_prompt(prompt)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **template_kwargs) -> list[int]:
        return self.inputs.render_chat(messages, None, add_generation_prompt, tools, **template_kwargs)

    def check_prompt(self, token_ids: list[int]) -> None:
        self.inputs.check_prompt(token_ids)

    def check_params(self, params: SamplingParams) -> None:
        self.inputs.check_params(params)

    # --- the core's side ----------------------------------------------------------------------

    def _send(self, kind: InputKind, payload: CoreRequest | list[str] | int) -> None:
        self._push.send_multipart([kind.value, ENCODER.encode(payload)], flags=zmq.NOBLOCK, copy=False)

    async def _read(self, pull: zmq.asyncio.Socket) -> None:
        try:
            while True:
                kind, payload = await pull.recv_multipart(copy=False)
                self._last_heard = time.monotonic()
                if kind.bytes == OutputKind.FAILED.value:
                    self._fail(EngineDeadError(TEXT_DECODER.decode(payload.buffer)))
                    return
                if kind.bytes == OutputKind.READY.value:
                    if self.facts is None:
                        logger.info("API server %d: the engine core is ready", self._index)
                    self.facts = FACTS_DECODER.decode(payload.buffer)
                    continue
                message = OUTPUTS_DECODER.decode(payload.buffer)
                self.stats = message.stats
                self._added_since_stats = 0
                self._deliver(message.outputs)
        except asyncio.CancelledError:
            pass
        except Exception as error:  # a bug here must not leave requests waiting
            logger.exception("reading the engine core's outputs failed")
            self._fail(error)
        finally:
            pull.close(linger=0)

    def _deliver(self, outputs: list[CoreOutput]) -> None:
        for out in outputs:
            if out.error is not None:
                self._reject(out.group_id, UserError(out.error))
        outputs = [out for out in outputs if out.error is None]
        results, stopped = self.outputs.process(outputs)
        if stopped:
            self._send(InputKind.STOP, stopped)
        if self.observer is not None:
            self.observer.on_step(results, self.stats)
        for result in results:
            stream = self._streams.pop(result.request_id, None) if result.finished else \
                self._streams.get(result.request_id)
            if stream is not None:
                stream.put(result)
            if result.finished and self._log_requests:
                logger.info("finished request %s: %s", result.request_id,
                            ", ".join(f"{len(c.token_ids)} tokens ({c.finish_reason})" for c in result.outputs))

    def _reject(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            for sibling in stream.request_ids:
                self._streams.pop(sibling, None)
            self.outputs.drop(stream.request_ids)
            stream.put(error)

    async def _say_hello(self) -> None:
        """HELLO until the core answers READY (it reads its input only once the model is loaded)."""
        while self.facts is None:
            self._send(InputKind.HELLO, self._index)
            await asyncio.sleep(_HELLO_EVERY_S)

    def _watch_core(self) -> None:
        """Fail everything the moment the core's process exits, however it died."""
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.core_pid)
        except (AttributeError, OSError):
            self._watcher = asyncio.ensure_future(self._poll_core())
            return
        loop.add_reader(self._pidfd, self._core_exited)

    async def _poll_core(self) -> None:
        while True:
            await asyncio.sleep(_POLL_CORE_S)
            try:
                os.kill(self.core_pid, 0)
            except ProcessLookupError:
                self._core_exited()
                return

    def _core_exited(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
        if self.error is None:
            logger.error("the engine core process (pid %d) exited; failing every open request", self.core_pid)
            self._fail(EngineDeadError(f"the engine core process (pid {self.core_pid}) exited"))

    def _fail(self, error: BaseException) -> None:
        """Fail every open request with `error`; later submissions are refused with it."""
        if self.error is None:
            self.error = error
        streams = self._open_streams()
        self.outputs.drop(list(self._streams))
        self._streams.clear()
        for stream in streams:
            stream.put(error)

    def _open_streams(self) -> list[RequestStream]:
        """Each open stream once (a stream of several prompts holds several engine requests)."""
        return list({id(s): s for s in self._streams.values()}.values())
