"""POST /v1/chat/completions: a conversation rendered with the chat template, one assistant reply per choice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from paged.errors import UserError
from paged.server.deps import Engine, Settings, engine_request_id
from paged.server.errors import ERROR_RESPONSES
from paged.server.generation import ChoiceDelta, DeltaTracker, final_outputs, sse_response, stream_chunks, usage_of
from paged.server.logprobs import ChatLogprobs, chat_logprobs
from paged.server.protocol import ChatMessage, ChoiceEnd, ResponseHead, SamplingFields, UsageInfo, created_now
from paged.server.chat_replies import ReplyShaper
from paged.server.reasoning import ReasoningParser
from paged.server.sampling import (build_sampling_params, check_context_length, check_request, check_sampling_params,
                                   structured_outputs_of)
from paged.server.tool_parsers import TOOL_PARSERS
from paged.server.tools import ChatTool, DeltaToolCall, ToolCall, ToolChoice, resolve_tool_choice, \
    tool_call_constraint

router = APIRouter()


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    max_tokens: int | None = Field(None, description="deprecated by OpenAI in favour of max_completion_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="OpenAI's range; --max-logprobs may cap it lower")
    add_generation_prompt: bool = True
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra variables for the chat template, "
                                                        "e.g. enable_thinking")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


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
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(ChoiceEnd):
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(ResponseHead):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# Names apply_chat_template takes itself: chat_template_kwargs may not override them.
_TEMPLATE_ARGUMENTS = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                       "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                       "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, engine: Engine, settings: Settings):
    model = settings.resolve_model(body.model)
    check_request(body)
    if body.top_logprobs and not body.logprobs:
        raise UserError("top_logprobs needs logprobs to be true", param="top_logprobs")
    max_tokens, max_tokens_param = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_tokens_param = body.max_tokens, "max_tokens"
    tool_choice = resolve_tool_choice(body.tools, body.tool_choice, settings.tool_call_parser is not None
                                      and settings.enable_auto_tool_choice)
    tool_constraint = tool_call_constraint(body.tools or [], tool_choice, body.parallel_tool_calls is not False)
    if tool_constraint is not None and structured_outputs_of(body) is not None:
        raise UserError("a required or named tool_choice cannot be combined with another output constraint",
                        param="tool_choice")
    extra = body.chat_template_kwargs or {}
    if _TEMPLATE_ARGUMENTS & set(extra):
        raise UserError(f"chat_template_kwargs may not set {sorted(_TEMPLATE_ARGUMENTS & set(extra))[0]}",
                        param="chat_template_kwargs")
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    token_ids = engine.render_chat([m.for_template() for m in body.messages], body.add_generation_prompt,
                                   tools=tools, **extra)
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
        structured_outputs=tool_constraint,
    )
    reasoning = ReasoningParser.load(settings.reasoning_parser, engine.tokenizer) if settings.reasoning_parser \
        else None
    if reasoning is not None and params.structured_outputs is not None and reasoning.still_thinking(token_ids):
        params = replace(params, structured_outputs=replace(params.structured_outputs,
                                                            reasoning_end_token_id=reasoning.end_id))
    check_sampling_params(engine, params, body)
    tool_parser = TOOL_PARSERS[settings.tool_call_parser]() if settings.tool_call_parser else None
    request_id = engine_request_id("chatcmpl", request)
    stream = await engine.submit(request_id, [token_ids], params)
    created = created_now()

    def shaper(streaming: bool) -> ReplyShaper:
        return ReplyShaper(reasoning, tool_choice, tool_parser, streaming)

    def logprobs(delta: ChoiceDelta) -> ChatLogprobs | None:
        if delta.logprobs is None:
            return None
        return chat_logprobs(delta.token_ids, delta.logprobs, top_logprobs, lambda t: engine.tokenizer.decode([t]))

    if body.stream:
        chunk = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[])
        shapers = [shaper(streaming=True) for _ in range(body.n)]

        def stream_choice(d: ChoiceDelta) -> ChatStreamChoice | None:
            """The choice's part of a chunk; None while it has nothing to show (text that may begin a tool
            call is held until it shows whether it does)."""
            shaping = shapers[d.index]
            part = shaping.feed(d.text)
            if d.finish_reason is not None:
                part += shaping.finish()
            delta = DeltaMessage(content=part.content or None, reasoning_content=part.reasoning or None,
                                 tool_calls=part.tool_call_deltas or None)
            choice = ChatStreamChoice(index=d.index, delta=delta, logprobs=logprobs(d),
                                      finish_reason=shaping.finish_reason(d.finish_reason, part),
                                      stop_reason=d.stop_reason)
            empty = delta == DeltaMessage() and choice.logprobs is None and choice.finish_reason is None
            return None if empty else choice

        def to_chunk(deltas: list[ChoiceDelta]) -> ChatCompletionChunk | None:
            choices = [c for c in map(stream_choice, deltas) if c is not None]
            return chunk.model_copy(update={"choices": choices}) if choices else None

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
    choices = []
    for d in DeltaTracker(body.n).update(0, outputs[0]):
        shaping = shaper(streaming=False)
        part = shaping.whole(d.text)
        message = AssistantMessage(content=part.content or (None if part.tool_calls or part.reasoning else ""),
                                   reasoning_content=part.reasoning or None, tool_calls=part.tool_calls or None)
        choices.append(ChatChoice(index=d.index, message=message, logprobs=logprobs(d),
                                  finish_reason=shaping.finish_reason(d.finish_reason, part),
                                  stop_reason=d.stop_reason))
    return ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                  usage=usage_of(outputs))
