"""POST /v1/completions: raw prompts (text or token ids, one or many), OpenAI's legacy completions API."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import Field

from paged.errors import UserError
from paged.outputs import PositionLogprobs
from paged.server.deps import Engine, Settings, engine_request_id
from paged.server.errors import ERROR_RESPONSES
from paged.server.generation import (
    ChoiceDelta,
    DeltaTracker,
    final_outputs,
    sse_response,
    stream_chunks,
    usage_of,
)
from paged.server.logprobs import CompletionLogprobs, completion_logprobs
from paged.server.protocol import ChoiceEnd, ResponseHead, SamplingFields, Text, UsageInfo, created_now
from paged.server.sampling import build_sampling_params, check_context_length, check_request, check_sampling_params

router = APIRouter()


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, token ids, or a list of token-id lists"
    )
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class CompletionChoice(ChoiceEnd):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(ResponseHead):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


@dataclass
class _Prompt:
    text: str
    token_ids: list[int]


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request, engine: Engine, settings: Settings):
    model = settings.resolve_model(body.model)
    check_request(body)
    prompts = [_tokenize(engine, prompt, body.max_tokens) for prompt in _split_prompts(body.prompt)]
    params = build_sampling_params(
        body,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None,
        defaults=settings.generation_defaults,
    )
    check_sampling_params(engine, params, body)
    request_id = engine_request_id("cmpl", request)
    stream = await engine.submit(request_id, [p.token_ids for p in prompts], params)
    response = CompletionResponse(id=request_id, created=created_now(), model=model, choices=[])

    def decode(token: int) -> str:
        return engine.tokenizer.decode([token])

    def choice(delta: ChoiceDelta, prompt_logprobs: list[PositionLogprobs | None] | None) -> CompletionChoice:
        return _choice(delta, prompts[delta.prompt_index], body, prompt_logprobs, decode)

    if body.stream:
        def to_chunk(deltas: list[ChoiceDelta]) -> CompletionResponse:
            choices = [choice(d, stream.outputs[d.prompt_index].prompt_logprobs) for d in deltas]
            return response.model_copy(update={"choices": choices})

        def usage_chunk(usage: UsageInfo) -> CompletionResponse:
            return response.model_copy(update={"usage": usage})

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return sse_response(stream_chunks(stream, body.n, to_chunk, usage_chunk if include_usage else None), stream)

    outputs = await final_outputs(request, stream)
    choices = [
        choice(delta, out.prompt_logprobs)
        for prompt_index, out in enumerate(outputs)
        for delta in DeltaTracker(body.n).update(prompt_index, out)
    ]
    return response.model_copy(update={"choices": choices, "usage": usage_of(outputs)})


def _split_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise UserError("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _tokenize(engine: Engine, prompt: str | list[int], max_tokens: int | None) -> _Prompt:
    text, token_ids = engine.tokenize_prompt(prompt)
    engine.check_prompt(token_ids)
    check_context_length(len(token_ids), max_tokens, engine.max_model_len, param="max_tokens")
    return _Prompt(text if text is not None else engine.tokenizer.decode(token_ids), token_ids)


def _choice(
    delta: ChoiceDelta,
    prompt: _Prompt,
    body: CompletionRequest,
    prompt_logprobs: list[PositionLogprobs | None] | None,
    decode: Callable[[int], str],
) -> CompletionChoice:
    """One choice of a response or chunk; with echo, the prompt (and its logprobs) leads the first one."""
    text, token_ids, positions, offset = delta.text, delta.token_ids, delta.logprobs, delta.text_offset
    if body.echo and delta.first:
        text = prompt.text + text
        token_ids = prompt.token_ids + token_ids
        positions = (prompt_logprobs or [None] * len(prompt.token_ids)) + (positions or [])
    elif body.echo:
        offset += len(prompt.text)
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(token_ids, positions or [], offset, body.logprobs, decode)
    return CompletionChoice(index=delta.index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason,
                            stop_reason=delta.stop_reason)
