"""One chat choice's generated text shaped into the reply's parts: reasoning_content, content, tool_calls.

The same object serves a stream (fed each delta) and a whole reply (fed the text once), so the two agree.
Layers, in order: the reasoning parser takes the think block off the front; then a tool-call parser turns
the text into content and calls (for tool_choice "auto" the --tool-call-parser, for a required or named call
the reader of its grammar's output), or the text is content as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paged.server.reasoning import ReasoningParser, ReasoningStream
from paged.server.tool_parsers import ToolCallStream, ToolParser, constrained_parser
from paged.server.tools import DeltaToolCall, NamedToolChoice, ToolCall, ToolChoice


@dataclass
class ReplyPart:
    reasoning: str = ""
    content: str = ""
    tool_call_deltas: list[DeltaToolCall] = field(default_factory=list)  # what a stream sends of the calls
    tool_calls: list[ToolCall] = field(default_factory=list)  # the reply's calls, in the part that ends it

    def __add__(self, other: ReplyPart) -> ReplyPart:
        return ReplyPart(self.reasoning + other.reasoning, self.content + other.content,
                         self.tool_call_deltas + other.tool_call_deltas, self.tool_calls + other.tool_calls)


class ReplyShaper:
    def __init__(self, reasoning: ReasoningParser | None, tool_choice: ToolChoice, tool_parser: ToolParser | None,
                 streaming: bool) -> None:
        self.reasoning = ReasoningStream(reasoning) if reasoning is not None else None
        self.tool_choice = tool_choice
        self.tools = None
        if tool_choice == "required" or isinstance(tool_choice, NamedToolChoice):
            self.tools = ToolCallStream(constrained_parser(tool_choice), streaming, constrained=True)
        elif tool_choice == "auto" and tool_parser is not None:
            self.tools = ToolCallStream(tool_parser, streaming)

    def feed(self, text: str) -> ReplyPart:
        reasoning, content = self.reasoning.feed(text) if self.reasoning is not None else ("", text)
        return ReplyPart(reasoning, *self._content(content))

    def finish(self) -> ReplyPart:
        reasoning, content = self.reasoning.finish() if self.reasoning is not None else ("", "")
        part = ReplyPart(reasoning, *self._content(content))
        if self.tools is None:
            return part
        content, deltas = self.tools.finish()
        return part + ReplyPart(content=content, tool_call_deltas=deltas, tool_calls=self.tools.calls)

    def whole(self, text: str) -> ReplyPart:
        return self.feed(text) + self.finish()

    def finish_reason(self, engine_reason: str | None, part: ReplyPart) -> str | None:
        """OpenAI's: "tool_calls" when the model chose to call (auto or required), "stop" for a named call."""
        if part.tool_calls and engine_reason == "stop" and not isinstance(self.tool_choice, NamedToolChoice):
            return "tool_calls"
        return engine_reason

    def _content(self, content: str) -> tuple[str, list[DeltaToolCall]]:
        return self.tools.feed(content) if self.tools is not None else (content, [])
