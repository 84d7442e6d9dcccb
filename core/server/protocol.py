"""Request and response pieces shared by the completion and chat endpoints.

Field names, types and defaults follow OpenAI's API, plus the sampling extras vLLM accepts in the
body, so clients written for either send the same JSON here. Types are checked here; the ranges of
sampling values are checked once, by `SamplingParams`, so the two can never disagree.
"""

from __future__ import annotations

import json
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
    "functions": [],
    "function_call": "none",
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


class JsonSchemaFormat(StrictModel):
    name: Text = "response"
    description: Text | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is enforced either way


class TagStructure(StrictModel):
    begin: Text
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    end: Text


class ResponseFormat(StrictModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON matching a schema; and vLLM's
    structural_tag (xgrammar's `format`, or the older `structures` begun by `triggers`)."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    format: dict[str, Any] | None = None
    structures: list[TagStructure] | None = None
    triggers: list[Text] | None = None


class StructuredOutputsRequest(StrictModel):
    """vLLM's structured_outputs body field: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")  # a misspelt constraint must not pass as no constraint

    json_schema: dict[str, Any] | Text | None = Field(None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | Text | None = None


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
    # Constrained outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None

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


class MessageFunctionCall(StrictModel):
    name: Text
    arguments: Text  # JSON text


class MessageToolCall(StrictModel):
    id: Text
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(StrictModel):
    model_config = ConfigDict(extra="allow")  # e.g. a client echoing back an assistant's reasoning_content

    role: Text
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls, in the history
    tool_call_id: Text | None = None  # a tool's answer, to which call

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text parts joined, no content as '', a call's arguments
        as a dict (what Hugging Face templates index into), where they parse."""
        if isinstance(self.content, list):
            content = "\n".join(part.text for part in self.content)
        else:
            content = self.content or ""
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": call.type, "function": {
                "name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


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
