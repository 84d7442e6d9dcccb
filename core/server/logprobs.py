"""Log-probabilities in the two shapes OpenAI uses: the legacy completions one and the chat one."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from paged.outputs import Logprob, PositionLogprobs

# -inf is not JSON; vLLM reports this floor instead.
_FLOOR = -9999.0


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, _FLOOR)


def _top(position: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """The position's k most likely tokens, most likely first."""
    ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 0)
    return [(token, lp) for token, lp in ranked if lp.rank is not None and lp.rank <= k][:k]


def completion_logprobs(
    token_ids: list[int],
    positions: list[PositionLogprobs | None],
    text_offset: int,
    k: int,
    decode: Callable[[int], str],
) -> CompletionLogprobs:
    """Legacy shape: parallel lists. A position without logprobs (the first prompt token) gets None."""
    out = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    for token, position in zip(token_ids, positions, strict=True):
        chosen = position.get(token) if position is not None else None
        text = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None else decode(token)
        out.tokens.append(text)
        out.text_offset.append(text_offset)
        text_offset += len(text)
        out.token_logprobs.append(_value(chosen) if chosen is not None else None)
        if position is None:
            out.top_logprobs.append(None)
            continue
        top = {lp.decoded_token or decode(t): _value(lp) for t, lp in _top(position, k)}
        top.setdefault(text, _value(chosen))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(
    token_ids: list[int], positions: list[PositionLogprobs], k: int, decode: Callable[[int], str]
) -> ChatLogprobs:
    """Chat shape: one entry per token with its k most likely alternatives."""

    def entry(token: int, lp: Logprob) -> TopLogprob:
        text = lp.decoded_token if lp.decoded_token is not None else decode(token)
        return TopLogprob(token=text, logprob=_value(lp), bytes=list(text.encode("utf-8")))

    content = []
    for token, position in zip(token_ids, positions, strict=True):
        chosen = entry(token, position[token])
        top = [entry(t, lp) for t, lp in _top(position, k)]
        content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)
