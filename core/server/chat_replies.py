"""One chat choice's generated text shaped into the reply's parts: reasoning_content, content, tool_calls.

The same object serves a stream (fed each delta) and a whole reply (fed the text once), so the two agree.
Layers, in order: the reasoning parser takes the think block off the front; then either the grammar's
output of a required or named tool call is held and turned into calls at the end, or a tool-call parser
(tool_choice "auto") lets content through and keeps the calls, or the text is content as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paged.server.reasoning import ReasoningParser, ReasoningStream
from paged.server.tool_parsers import ToolCallStream, ToolParser
from paged.server.tools import NamedToolChoice, ToolCall, ToolChoice, constrained_calls


@dataclass
class ReplyPart:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __add__(self, other: ReplyPart) -> ReplyPart:
        return ReplyPart(self.reasoning + other.reasoning, self.content + other.content,
                         self.tool_calls + other.tool_calls)


class ReplyShaper:
    def __init__(self, reasoning: ReasoningParser | None, tool_choice: ToolChoice, tool_parser: ToolParser | None
                 ) -> None:
        self.reasoning = ReasoningStream(reasoning) if reasoning is not None else None
        self.tool_choice = tool_choice
        self.constrained = tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)
        self.tools = ToolCallStream(tool_parser) if tool_choice == "auto" and tool_parser is not None else None
        self.answer = ""  # a required or named call's grammar output, held until the end

    def feed(self, text: str) -> ReplyPart:
        reasoning, content = self.reasoning.feed(text) if self.reasoning is not None else ("", text)
        return ReplyPart(reasoning, self._content(content))

    def finish(self) -> ReplyPart:
        reasoning, content = self.reasoning.finish() if self.reasoning is not None else ("", "")
        content = self._content(content)
        if self.constrained:
            calls = constrained_calls(self.answer, self.tool_choice)
            return ReplyPart(reasoning, "" if calls else self.answer, calls)  # no calls: cut short, sent as text
        if self.tools is not None:
            content += self.tools.finish()
            return ReplyPart(reasoning, content, self.tools.calls)
        return ReplyPart(reasoning, content)

    def whole(self, text: str) -> ReplyPart:
        return self.feed(text) + self.finish()

    def finish_reason(self, engine_reason: str | None, part: ReplyPart) -> str | None:
        """OpenAI's: "tool_calls" when the model chose to call (auto or required), "stop" for a named call."""
        if part.tool_calls and engine_reason == "stop" and not isinstance(self.tool_choice, NamedToolChoice):
            return "tool_calls"
        return engine_reason

    def _content(self, content: str) -> str:
        if self.constrained:
            self.answer += content
            return ""
        return self.tools.feed(content) if self.tools is not None else content
