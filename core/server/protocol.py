"""Request and response pieces shared by the completion and chat endpoints.

Field names, types and defaults follow OpenAI's API, plus the sampling extras vLLM accepts in the
body, so clients written for either send the same JSON here. Types are checked here; the ranges of
sampling values are checked once, by `SamplingParams`, so the two can never disagree.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from paged.errors import UserError

logger = logging.getLogger(__name__)


def _encodable(value: str) -> str:
    """JSON may carry a lone UTF-16 surrogate ("\\ud800"); no tokenizer or response encoder takes one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid Unicode text: a lone surrogate at character {error.start}") from None
    return value


# Every string of a request body: checked once, where the body is parsed, so odd text is a 400 naming the field.
Text = Annotated[str, AfterValidator(_encodable)]
# Seeds seed a torch.Generator, which takes a 64-bit integer.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class StrictModel(BaseModel):
    """No NaN or infinity: JSON has neither, and a NaN temperature would sample garbage, not fail."""

    model_config = ConfigDict(allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = False


# Fields of OpenAI's or vLLM's API that would change the output and are not implemented yet, with the value
# that asks for nothing (sent by clients that fill every field). Any other value is a 400 naming the field:
# a client must not get plain text where it asked for JSON or a tool call.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "parallel_tool_calls": None,
    "structured_outputs": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "guided_decoding_backend": None,
    "guided_whitespace_pattern": None,
    "suffix": "",
    "best_of": 1,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "bad_words": [],
    "allowed_token_ids": None,
    "logits_processors": None,
    "truncate_prompt_tokens": None,
    "prompt_embeds": None,
    "return_tokens_as_token_ids": False,
    "continue_final_message": False,
    "chat_template": None,
    "chat_template_kwargs": None,
    "documents": None,
    "audio": None,
    "modalities": ["text"],
    "prediction": None,
    "reasoning_effort": None,
    "mm_processor_kwargs": None,
}


class SamplingFields(StrictModel):
    """The body fields that become `SamplingParams`, common to /v1/completions and /v1/chat/completions.

    Fields beyond these are kept (extra="allow") so they can be reported rather than dropped: see
    `check_extra_fields`.
    """

    model_config = ConfigDict(extra="allow")  # merged with StrictModel's

    model: Text | None = Field(None, description="a served model name; omitted: the first one")
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[Text, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
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


    def check_extra_fields(self) -> None:
        """A 400 for an output-changing field that is not implemented; a log warning for any other unknown one
        (harmless: `metadata`, `store`, a client's own additions), as vLLM treats them."""
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name in UNSUPPORTED_FIELDS and value != UNSUPPORTED_FIELDS[name] and value is not None:
                raise UserError(f"{name} is not supported by this server yet", param=name)
        ignored = sorted(ascii(name)[1:-1] for name in extra if name not in UNSUPPORTED_FIELDS)
        if ignored:
            logger.warning("request fields ignored (not part of the API this server implements): %s",
                           ", ".join(ignored))


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text


class ChatMessage(StrictModel):
    role: Text
    content: Text | list[TextPart] | None = None
    name: Text | None = None

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
