"""Tool calling in chat: the request's tools and tool_choice, the grammars that enforce a required or named
call, and tool calls as responses and stream deltas carry them.

tool_choice, as OpenAI and vLLM define it: "none" (tools are shown to the template, the reply is text),
"auto" (the model decides; a --tool-call-parser finds calls in its text, so the server must run with
--enable-auto-tool-choice), "required" (at least one call) or a named function (exactly that one). The
last two are enforced by a JSON-schema grammar, so the arguments always parse and match the function's
parameters: "required" generates a JSON list of {"name", "parameters"}, a named function its arguments
object alone.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel

from paged.errors import UserError
from paged.server.protocol import StrictModel, Text
from paged.structured_output import StructuredOutputsParams


class FunctionDefinition(StrictModel):
    name: Text
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the parameters' schema is enforced for required and named calls either way


class ChatTool(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: Text


class NamedToolChoice(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


def new_tool_call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"chatcmpl-tool-{uuid.uuid4().hex}", function=FunctionCall(name=name, arguments=arguments))


def resolve_tool_choice(tools: list[ChatTool] | None, choice: ToolChoice | None, auto_enabled: bool) -> ToolChoice:
    """The effective tool_choice ("auto" when tools come without one, as OpenAI defaults it); 400s for a choice
    that cannot be served."""
    if not tools:
        if choice not in (None, "none"):
            raise UserError("tool_choice needs tools", param="tool_choice")
        return "none"
    choice = choice or "auto"
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
        raise UserError(f"tool_choice names {choice.function.name!r}, which is not one of the tools",
                        param="tool_choice")
    if choice == "auto" and not auto_enabled:
        raise UserError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                        param="tool_choice")
    return choice


def tool_call_constraint(tools: list[ChatTool], choice: ToolChoice, parallel: bool) -> StructuredOutputsParams | None:
    """The grammar of a required or named call; None for "none" and "auto"."""
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return StructuredOutputsParams(json=_parameters(tool))
    if choice != "required":
        return None
    calls = {"anyOf": [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": _parameters(t)},
        "required": ["name", "parameters"], "additionalProperties": False,
    } for t in tools]}
    schema = {"type": "array", "items": calls, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    return StructuredOutputsParams(json=schema)


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}
