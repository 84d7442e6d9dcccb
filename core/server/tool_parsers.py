"""Tool-call parsers for tool_choice "auto": each finds the calls in one model family's reply format.

Selected with --tool-call-parser, as vLLM names them:
- hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number, after optional text
  (Hermes, Qwen 2.5/3 and most ChatML-style tool templates);
- llama3_json: the reply is {"name": ..., "parameters": {...}} (Llama 3.1-3.3), optionally after
  <|python_tag|>, several separated by ";";
- mistral: [TOOL_CALLS] then a JSON list of {"name", "arguments"}, or name[ARGS]{...} (newer tokenizers);
- json: the reply is a JSON object {"name", "arguments" or "parameters"} or a list of them, optionally in a
  ```json fence: for models prompted to answer that way.

A reply whose calls do not parse is returned as plain content, as vLLM does. Streaming (ToolCallStream)
sends content as it comes, holding back only what may be the start of a marker, and the calls once the
reply ends, each as one complete delta.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from paged.server.tools import ToolCall, new_tool_call


class ToolParser(ABC):
    name: str
    markers: tuple[str, ...]  # where calls begin
    anchored: bool = False  # calls can only begin the reply (after whitespace)

    @abstractmethod
    def parse(self, calls_text: str) -> list[tuple[str, Any]]:
        """(name, arguments) of each call in the text from the first marker on; ValueError if malformed."""

    def find_start(self, text: str) -> int | None:
        """Where the calls begin in `text`, or None."""
        if self.anchored:
            stripped = len(text) - len(text.lstrip())
            return stripped if text.startswith(self.markers, stripped) else None
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def undecided(self, text: str) -> int:
        """How many trailing characters of `text` could still become a marker (to hold back while streaming)."""
        if self.anchored:
            rest = text.lstrip()
            return len(text) if any(m.startswith(rest) for m in self.markers) else 0
        return max((k for m in self.markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole reply."""
        start = self.find_start(text)
        if start is None:
            return text, []
        try:
            calls = [new_tool_call(name, _arguments_text(arguments)) for name, arguments in self.parse(text[start:])]
        except (ValueError, KeyError, TypeError, AttributeError):
            return text, []
        content = text[:start].strip()
        return content or None, calls


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _json_values(text: str) -> list[Any]:
    """Every JSON value in `text`, in order, separated by whitespace or ";" (a Llama 3 reply may hold several)."""
    decoder, values, index = json.JSONDecoder(), [], 0
    while True:
        while index < len(text) and (text[index].isspace() or text[index] == ";"):
            index += 1
        if index == len(text):
            return values
        value, index = decoder.raw_decode(text, index)
        values.append(value)


def _call(value: dict, arguments_key: str) -> tuple[str, Any]:
    name = value["name"]
    if not isinstance(name, str):
        raise ValueError("a call's name is a string")
    return name, value.get(arguments_key, value.get("arguments", value.get("parameters", {})))


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, calls_text: str) -> list[tuple[str, Any]]:
        return [_call(json.loads(body), "arguments") for body in self._CALL.findall(calls_text)]


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")
    anchored = True

    def parse(self, calls_text: str) -> list[tuple[str, Any]]:
        return [_call(value, "parameters") for value in _json_values(calls_text.replace("<|python_tag|>", ""))]


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    _NAMED = re.compile(r"\s*([^\[\]{}\s]+)\[ARGS\]")

    def parse(self, calls_text: str) -> list[tuple[str, Any]]:
        calls = []
        for segment in calls_text.split("[TOOL_CALLS]")[1:]:
            named = self._NAMED.match(segment)
            if named:
                (arguments,) = _json_values(segment[named.end():])
                calls.append((named.group(1), arguments))
                continue
            for value in _json_values(segment):
                calls += [_call(v, "arguments") for v in (value if isinstance(value, list) else [value])]
        return calls


class JsonParser(ToolParser):
    name = "json"
    markers = ("{", "[", "```")
    anchored = True

    def parse(self, calls_text: str) -> list[tuple[str, Any]]:
        text = calls_text.strip()
        if text.startswith("```"):
            text = text.removeprefix("```").removeprefix("json").rsplit("```", 1)[0]
        (value,) = _json_values(text)
        return [_call(v, "arguments") for v in (value if isinstance(value, list) else [value])]


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser,
                                                                  JsonParser)}


@dataclass
class ToolCallStream:
    """One choice's reply as it streams: content deltas now, the calls at the end."""

    parser: ToolParser
    text: str = ""
    sent: int = 0  # characters of text sent as content
    start: int | None = None  # where the calls begin, once seen
    settled: bool = False  # an anchored parser has seen that no calls begin the reply
    calls: list[ToolCall] = field(default_factory=list)

    def feed(self, delta: str) -> str:
        """The content this delta releases."""
        self.text += delta
        if self.start is not None:
            return ""
        if not self.settled:
            self.start = self.parser.find_start(self.text)
        if self.start is not None:
            if self.parser.anchored:  # only whitespace precedes: not content
                self.sent = self.start
            return self._release(self.start)
        held = 0 if self.settled else self.parser.undecided(self.text)
        if self.parser.anchored and held == 0:
            self.settled = True
        return self._release(len(self.text) - held)

    def finish(self) -> str:
        """The content still held; the calls are in `calls` afterwards."""
        if self.start is None:
            return self._release(len(self.text))
        _, self.calls = self.parser.extract(self.text)
        if not self.calls:
            return self._release(len(self.text))
        return ""

    def _release(self, end: int) -> str:
        released, self.sent = self.text[self.sent:end], max(self.sent, end)
        return released
