"""Request and response pieces shared by the completion and chat endpoints.

Field names, types and defaults follow OpenAI's API, plus the sampling extras vLLM accepts in the
body, so clients written for either send the same JSON here. Types are checked here; the ranges of
sampling values are checked once, by `SamplingParams`, so the two can never disagree.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# Seeds seed a torch.Generator, which takes a 64-bit integer.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class StrictModel(BaseModel):
    """No NaN or infinity: JSON has neither, and a NaN temperature would sample garbage, not fail."""

    model_config = ConfigDict(allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """The body fields that become `SamplingParams`, common to /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="a served model name; omitted: the first one")
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling parameters.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """The message as chat templates expect it: text parts joined, no content as ''."""
        if isinstance(self.content, list):
            content = "\n".join(part.text for part in self.content)
        else:
            content = self.content or ""
        message = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChoiceEnd(BaseModel):
    """The fields every kind of choice shares: its place and why it ended (None while streaming)."""

    index: int
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ResponseHead(BaseModel):
    """The fields every completion response and stream chunk shares."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None


def created_now() -> int:
    return int(time.time())
