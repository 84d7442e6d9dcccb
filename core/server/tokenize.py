"""POST /tokenize and /detokenize, as vLLM serves them: the server's own tokenizer and chat template."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from paged.errors import UserError
from paged.server.deps import Engine, Settings
from paged.server.errors import ERROR_RESPONSES
from paged.server.protocol import ChatMessage, StrictModel, Text

router = APIRouter()


class TokenizeRequest(StrictModel):
    """Either a prompt (tokenized as /v1/completions does) or messages (rendered as /v1/chat/completions does)."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictModel):
    model: Text | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, engine: Engine, settings: Settings) -> TokenizeResponse:
    settings.resolve_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise UserError("give either prompt or messages", param="prompt")
    if body.messages is not None:
        tokens = engine.render_chat([m.for_template() for m in body.messages], body.add_generation_prompt)
    else:
        tokens = engine.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
    token_strs = engine.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens,
                            token_strs=token_strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, engine: Engine, settings: Settings) -> DetokenizeResponse:
    settings.resolve_model(body.model)
    bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{engine.vocab_size - 1})", param="tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))
