"""What completions and chat share once a request is queued: deltas, usage, SSE and disconnects."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from paged.outputs import PositionLogprobs, RequestOutput
from paged.server.engine_client import RequestStream
from paged.server.errors import ClientDisconnected, EngineDeadError, describe_error, error_json
from paged.server.protocol import UsageInfo

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ChoiceDelta:
    """What one choice gained since its previous chunk."""

    index: int  # prompt index * n + sample index, as OpenAI numbers choices
    prompt_index: int
    text: str
    text_offset: int  # characters of this choice's text sent before `text`
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None
    first: bool


class DeltaTracker:
    """Turns cumulative outputs into per-choice deltas; each choice reports its finish_reason once.

    A choice whose visible text did not grow (a stop string may still be forming) is left out until it
    does; the token ids and logprobs it accumulated meanwhile travel with its next delta.
    """

    def __init__(self, n: int) -> None:
        self._n = n
        self._sent: dict[int, tuple[int, int]] = {}  # choice index -> (characters, tokens) sent
        self._finished: set[int] = set()

    def update(self, prompt_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        deltas = []
        for completion in output.outputs:
            index = prompt_index * self._n + completion.index
            if index in self._finished:
                continue
            chars, tokens = self._sent.get(index, (0, 0))
            if len(completion.text) == chars and completion.finish_reason is None:
                continue
            end = len(completion.token_ids)
            # The engine appends to the logprobs list in place, so only the positions of token_ids are read.
            logprobs = completion.logprobs[tokens:end] if completion.logprobs is not None else None
            deltas.append(ChoiceDelta(
                index=index, prompt_index=prompt_index, text=completion.text[chars:], text_offset=chars,
                token_ids=completion.token_ids[tokens:end], logprobs=logprobs,
                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                first=index not in self._sent,
            ))
            self._sent[index] = (len(completion.text), end)
            if completion.finish_reason is not None:
                self._finished.add(index)
        return deltas


async def iterate_deltas(stream: RequestStream, n: int) -> AsyncIterator[list[ChoiceDelta]]:
    """The stream's progress as lists of choice deltas, skipping wake-ups that changed nothing visible."""
    tracker = DeltaTracker(n)
    async for batch in stream:
        deltas = [d for prompt_index, out in batch for d in tracker.update(prompt_index, out)]
        if deltas:
            yield deltas


async def stream_chunks(
    stream: RequestStream,
    n: int,
    to_chunk: Callable[[list[ChoiceDelta]], BaseModel | None],
    usage_chunk: Callable[[UsageInfo], BaseModel] | None,
) -> AsyncIterator[BaseModel]:
    """One chunk per step that changed something visible (to_chunk may still find nothing to send: None),
    then the usage chunk when the client asked."""
    async for deltas in iterate_deltas(stream, n):
        chunk = to_chunk(deltas)
        if chunk is not None:
            yield chunk
    if usage_chunk is not None:
        yield usage_chunk(usage_of(out for out in stream.outputs if out is not None))


def usage_of(outputs: Iterable[RequestOutput]) -> UsageInfo:
    """Prompt tokens once per prompt (its n samples share it), completion tokens of every sample."""
    outputs = list(outputs)
    prompt = sum(len(out.prompt_token_ids) for out in outputs)
    completion = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse_response(chunks: AsyncIterator[BaseModel], stream: RequestStream) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: `data: {json}` per chunk, `data: [DONE]` last.

    A failure mid-stream becomes an error event; leaving early (the client disconnected) aborts the
    generation so its blocks are freed at once.
    """

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except Exception as error:
            status, message, param = describe_error(error)
            if status >= 500 and not isinstance(error, EngineDeadError):  # a dead or stopping engine is logged once
                logger.error("stream %s failed: %s", stream.request_ids[0], message)
            yield f"data: {error_json(status, message, param)}\n\n"
        finally:
            stream.abort()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def final_outputs(request: Request, stream: RequestStream) -> list[RequestOutput]:
    """Every prompt's final output; aborts the generation if the client disconnects first."""
    try:
        return await until_disconnected(request, stream.collect())
    finally:
        stream.abort()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client goes away first; then cancel it and raise ClientDisconnected.

    The body has been read by now, so the next ASGI message can only be the disconnect.
    """

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientDisconnected()
    return task.result()
