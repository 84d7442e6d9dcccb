"""POST /v1/chat/completions: a conversation rendered with the chat template, one assistant reply per choice."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from paged.errors import UserError
from paged.server.deps import Engine, Settings
from paged.server.errors import ERROR_RESPONSES
from paged.server.generation import ChoiceDelta, DeltaTracker, final_outputs, sse_response, stream_chunks, usage_of
from paged.server.logprobs import ChatLogprobs, chat_logprobs
from paged.server.protocol import ChatMessage, ChoiceEnd, ResponseHead, SamplingFields, UsageInfo, created_now
from paged.server.sampling import build_sampling_params, check_context_length, check_request

router = APIRouter()


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    max_tokens: int | None = Field(None, description="deprecated by OpenAI in favour of max_completion_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="OpenAI's range; --max-logprobs may cap it lower")
    add_generation_prompt: bool = True


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ChoiceEnd):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(ResponseHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(ChoiceEnd):
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(ResponseHead):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, engine: Engine, settings: Settings):
    model = settings.resolve_model(body.model)
    check_request(body)
    if body.top_logprobs and not body.logprobs:
        raise UserError("top_logprobs needs logprobs to be true", param="top_logprobs")
    max_tokens, max_tokens_param = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_tokens_param = body.max_tokens, "max_tokens"
    token_ids = engine.render_chat([m.for_template() for m in body.messages], body.add_generation_prompt)
    try:
        engine.check_prompt(token_ids)
    except UserError as error:
        raise UserError(str(error), param="messages") from None
    check_context_length(len(token_ids), max_tokens, engine.max_model_len, param=max_tokens_param)
    top_logprobs = body.top_logprobs or 0
    params = build_sampling_params(
        body,
        max_tokens=max_tokens,
        logprobs=top_logprobs if body.logprobs else None,
        prompt_logprobs=None,
        defaults=settings.generation_defaults,
    )
    engine.check_params(params)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    stream = await engine.submit(request_id, [token_ids], params)
    created = created_now()

    def logprobs(delta: ChoiceDelta) -> ChatLogprobs | None:
        if delta.logprobs is None:
            return None
        return chat_logprobs(delta.token_ids, delta.logprobs, top_logprobs, lambda t: engine.tokenizer.decode([t]))

    if body.stream:
        chunk = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[])

        def to_chunk(deltas: list[ChoiceDelta]) -> ChatCompletionChunk:
            choices = [
                ChatStreamChoice(index=d.index, delta=DeltaMessage(content=d.text or None), logprobs=logprobs(d),
                                 finish_reason=d.finish_reason, stop_reason=d.stop_reason)
                for d in deltas
            ]
            return chunk.model_copy(update={"choices": choices})

        def usage_chunk(usage: UsageInfo) -> ChatCompletionChunk:
            return chunk.model_copy(update={"usage": usage})

        async def chunks() -> AsyncIterator[ChatCompletionChunk]:
            # As OpenAI does: the role first, before any content.
            yield chunk.model_copy(update={"choices": [
                ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(body.n)
            ]})
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            async for c in stream_chunks(stream, body.n, to_chunk, usage_chunk if include_usage else None):
                yield c

        return sse_response(chunks(), stream)

    outputs = await final_outputs(request, stream)
    choices = [
        ChatChoice(index=d.index, message=AssistantMessage(content=d.text), logprobs=logprobs(d),
                   finish_reason=d.finish_reason, stop_reason=d.stop_reason)
        for d in DeltaTracker(body.n).update(0, outputs[0])
    ]
    return ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                  usage=usage_of(outputs))
