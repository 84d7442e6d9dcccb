"""Tool-call parsers for tool_choice "auto": each finds the calls in one model family's reply format.

Selected with --tool-call-parser, as vLLM names them:
- hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number, after optional text
  (Hermes, Qwen 2.5/3 and most ChatML-style tool templates);
- llama3_json: the reply is {"name": ..., "parameters": {...}} (Llama 3.1-3.3), optionally after
  <|python_tag|>, several separated by ";";
- mistral: [TOOL_CALLS] then a JSON list of {"name", "arguments"}, or name[ARGS]{...} (newer tokenizers);
- json: the reply is a JSON object {"name", "arguments" or "parameters"} or a list of them, optionally in a
  ```json fence: for models prompted to answer that way.
A required or named tool_choice's grammar output is read the same way (`constrained_parser`).

Every parser reads text that may stop anywhere (`calls` gives each call as far as it has come), so a stream
and a whole reply go through the same code: a stream sends content as it comes, holding back only what may be
the start of a marker, then each call's id and name once its name is complete and its arguments' JSON text in
fragments as the model writes it, as vLLM streams them; the arguments are the model's own text, so the
fragments always add up to the whole reply's. A reply whose calls do not parse is returned as plain content,
as vLLM does (a stream that has already sent a call's fragments cannot take them back: it ends without it).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from paged.server.tools import DeltaFunctionCall, DeltaToolCall, NamedToolChoice, ToolCall, ToolChoice, new_tool_call


@dataclass(frozen=True)
class PartialCall:
    """A call as far as the text goes."""

    name: str | None  # once its JSON string is complete
    arguments: str  # the arguments' JSON text so far ("{}" for a finished call that gave none)
    done: bool  # the call's text is complete

    @property
    def valid(self) -> bool:
        if not self.done or self.name is None:
            return False
        try:
            json.loads(self.arguments)
        except json.JSONDecodeError:
            return False
        return True


class ToolParser(ABC):
    name: str
    markers: tuple[str, ...]  # where calls begin
    anchored: bool = False  # calls can only begin the reply (after whitespace)

    @abstractmethod
    def calls(self, calls_text: str) -> list[PartialCall]:
        """The calls in the text from the first marker on, each as far as the text goes; ValueError once the
        text can no longer be calls."""

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


_WHITESPACE = " \t\n\r"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*("?)')  # group 1 empty: the text stops inside the string
_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*("?)|[\[\]{}]')
_SCALAR = re.compile(r"[^\s,\]}]+")


def _skip(text: str, i: int, also: str = "") -> int:
    while i < len(text) and (text[i] in _WHITESPACE or text[i] in also):
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    match = _STRING.match(text, i)
    return match.end() if match.group(1) else None


def _value_end(text: str, i: int) -> int | None:
    """Where the JSON value starting at text[i] ends, or None if the text stops inside it (the value itself is
    checked only once whole, by json.loads)."""
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] not in "{[":
        scalar = _SCALAR.match(text, i)
        if scalar is None:
            raise ValueError(f"no JSON value at {text[i]!r}")
        return None if scalar.end() == len(text) else scalar.end()
    depth = 0
    for match in _STRUCTURE.finditer(text, i):
        token = match.group()
        if token[0] == '"':
            if not match.group(1):
                return None
        elif token in "{[":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def _object(text: str, i: int, arguments_keys: tuple[str, ...]) -> tuple[PartialCall, int | None]:
    """The call in the JSON object at text[i] ("{"), and where the object ends (None: not yet)."""
    fields: dict[str, tuple[int, int | None]] = {}
    end = None
    j = _skip(text, i + 1)
    if text.startswith("}", j):
        end = j + 1
    while end is None and j < len(text):
        if text[j] != '"':
            raise ValueError("an object key is a string")
        key_end = _string_end(text, j)
        colon = len(text) if key_end is None else _skip(text, key_end)
        if colon == len(text):
            break
        if text[colon] != ":":
            raise ValueError("a key is followed by a colon")
        value = _skip(text, colon + 1)
        if value == len(text):
            break
        value_end = _value_end(text, value)
        fields[json.loads(text[j:key_end])] = (value, value_end)
        after = len(text) if value_end is None else _skip(text, value_end)
        if after == len(text):
            break
        if text[after] == "}":
            end = after + 1
        elif text[after] != ",":
            raise ValueError("object members are separated by commas")
        j = _skip(text, after + 1)
    return _call_of(text, fields, end is not None, arguments_keys), end


def _call_of(text: str, fields: dict[str, tuple[int, int | None]], done: bool, arguments_keys: tuple[str, ...]
             ) -> PartialCall:
    name = None
    if "name" in fields and fields["name"][1] is not None:
        name = json.loads(text[slice(*fields["name"])])
        if not isinstance(name, str):
            raise ValueError("a call's name is a string")
    key = next((k for k in arguments_keys if k in fields), None)
    if key is None:
        return PartialCall(name, "{}" if done else "", done)
    return PartialCall(name, _arguments_text(text, *fields[key]), done)


def _arguments_text(text: str, start: int, end: int | None) -> str:
    """The arguments' JSON text so far; arguments given as a JSON string (some models encode them so) are
    decoded, once whole."""
    raw = text[start:end]
    if raw.startswith('"'):
        return json.loads(raw) if end is not None else ""
    return raw


def _objects(text: str, i: int, arguments_keys: tuple[str, ...], separators: str) -> tuple[list[PartialCall], int]:
    """Calls as JSON objects one after another from text[i], between `separators` (and whitespace); also where
    they stop (at the first character that is neither, or at the end of the text)."""
    calls = []
    i = _skip(text, i, separators)
    while i < len(text) and text[i] == "{":
        call, end = _object(text, i, arguments_keys)
        calls.append(call)
        if end is None:
            return calls, len(text)
        i = _skip(text, end, separators)
    return calls, i


def _list_or_object(text: str, i: int, arguments_keys: tuple[str, ...]) -> list[PartialCall]:
    """A JSON list of call objects, or one call object, at text[i] (after whitespace)."""
    i = _skip(text, i)
    if i == len(text):
        return []
    if text[i] == "{":
        return [_object(text, i, arguments_keys)[0]]
    if text[i] != "[":
        raise ValueError("calls are a JSON list or object")
    calls, stop = _objects(text, i + 1, arguments_keys, ",")
    if stop < len(text) and text[stop] != "]":
        raise ValueError("a list of calls holds objects")
    return calls


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)

    def calls(self, calls_text: str) -> list[PartialCall]:
        calls = []
        for marker in re.finditer("<tool_call>", calls_text):
            found, stop = _objects(calls_text, marker.end(), ("arguments", "parameters"), "")
            if len(found) != 1 and stop < len(calls_text):
                raise ValueError("a <tool_call> holds one JSON object")
            calls += found
        return calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")
    anchored = True

    def calls(self, calls_text: str) -> list[PartialCall]:
        text = calls_text.lstrip().removeprefix("<|python_tag|>")
        calls, stop = _objects(text, 0, ("parameters", "arguments"), ";")
        if stop < len(text):
            raise ValueError("calls are JSON objects separated by ;")
        return calls


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    _NAMED = re.compile(r"\s*([^\[\]{}\s]+)\[ARGS\]")
    _MAYBE_NAMED = re.compile(r"\s*[^\[\]{}\s]*(\[(A(R(G(S)?)?)?)?)?")  # what may still become name[ARGS]

    def calls(self, calls_text: str) -> list[PartialCall]:
        calls = []
        for segment in calls_text.split("[TOOL_CALLS]")[1:]:
            named = self._NAMED.match(segment)
            if named:
                start = _skip(segment, named.end())
                end = _value_end(segment, start) if start < len(segment) else None
                arguments = _arguments_text(segment, start, end) if start < len(segment) else ""
                calls.append(PartialCall(named.group(1), arguments, end is not None))
            elif segment.lstrip()[:1] in ("[", "{"):
                calls += _list_or_object(segment, 0, ("arguments", "parameters"))
            elif not self._MAYBE_NAMED.fullmatch(segment):
                raise ValueError("[TOOL_CALLS] is followed by calls")
        return calls


class JsonParser(ToolParser):
    name = "json"
    markers = ("{", "[", "```")
    anchored = True

    def calls(self, calls_text: str) -> list[PartialCall]:
        text = calls_text.lstrip()
        if text.startswith("```"):
            text = text[3:]
            if "json".startswith(text):  # the fence's language may still be coming
                return []
            text = text.removeprefix("json")
        return _list_or_object(text, 0, ("arguments", "parameters"))


class RequiredCallsParser(ToolParser):
    """tool_choice "required": its grammar writes a JSON list of {"name", "parameters"}. (The two constrained
    readers need no markers: their calls begin the reply.)"""

    name = "required"

    def calls(self, calls_text: str) -> list[PartialCall]:
        return _list_or_object(calls_text, 0, ("parameters",))


class NamedCallParser(ToolParser):
    """A named tool_choice: its grammar writes that function's arguments object alone."""

    def __init__(self, function: str) -> None:
        self.name = function

    def calls(self, calls_text: str) -> list[PartialCall]:
        start = _skip(calls_text, 0)
        if start == len(calls_text):
            return [PartialCall(self.name, "", False)]
        end = _value_end(calls_text, start)
        return [PartialCall(self.name, calls_text[start:end], end is not None)]


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser,
                                                                  JsonParser)}


def constrained_parser(choice: ToolChoice) -> ToolParser:
    """The reader of a required or named tool_choice's grammar output."""
    return NamedCallParser(choice.function.name) if isinstance(choice, NamedToolChoice) else RequiredCallsParser()


@dataclass
class ToolCallStream:
    """One choice's reply as it streams: content deltas, then each call's deltas as its text comes.

    `constrained`: the reply is a grammar's calls from its first character (a required or named tool_choice),
    never content unless it was cut short. A whole reply (`streaming` False) falls back to content whenever its
    calls do not parse; a stream can do so only while no call has gone out."""

    parser: ToolParser
    streaming: bool = True
    constrained: bool = False
    text: str = ""
    sent: int = 0  # characters of text sent as content
    start: int | None = None  # where the calls begin, once seen
    settled: bool = False  # an anchored parser has seen that no calls begin the reply
    broken: bool = False  # the calls stopped parsing: nothing more of them goes out
    parsed: list[PartialCall] = field(default_factory=list)  # the calls as far as the text goes
    announced: list[ToolCall] = field(default_factory=list)  # each call whose id and name went out, with the
    # arguments sent so far
    calls: list[ToolCall] = field(default_factory=list)  # the reply's calls, once it has ended and they parse

    def __post_init__(self) -> None:
        if self.constrained:
            self.start = 0

    def feed(self, delta: str) -> tuple[str, list[DeltaToolCall]]:
        """The content and the call deltas this delta releases."""
        self.text += delta
        content = self._content() if self.start is None else ""
        return content, self._call_deltas() if self.start is not None else []

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        """What is still held; the calls are in `calls` afterwards."""
        if self.start is None:
            return self._release(len(self.text)), []
        deltas = self._call_deltas()
        if self.parsed and not self.broken and all(call.valid for call in self.parsed):
            self.calls = self.announced
            return "", deltas
        if self.announced and self.streaming:
            return "", deltas
        self.sent = min(self.sent, self.start)
        return self._release(len(self.text)), []

    def _content(self) -> str:
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

    def _call_deltas(self) -> list[DeltaToolCall]:
        if self.broken:
            return []
        try:
            self.parsed = self.parser.calls(self.text[self.start:])
        except ValueError:
            self.broken = True
            return []
        deltas = []
        for index, call in enumerate(self.parsed):
            if index == len(self.announced):
                if call.name is None:
                    break
                made = new_tool_call(call.name, call.arguments)
                self.announced.append(made)
                deltas.append(DeltaToolCall(index=index, id=made.id, type="function", function=DeltaFunctionCall(
                    name=call.name, arguments=call.arguments)))
                continue
            sent = self.announced[index].function
            if len(call.arguments) > len(sent.arguments):
                deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(
                    arguments=call.arguments[len(sent.arguments):])))
                sent.arguments = call.arguments
        return deltas

    def _release(self, end: int) -> str:
        released, self.sent = self.text[self.sent:end], max(self.sent, end)
        return released
