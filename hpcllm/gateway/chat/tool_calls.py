"""Tool calls in a chat model's output: which format a model writes them in, and parsing them out of its text.

The formats are vLLM's `--tool-call-parser` ones (vllm/tool_parsers/), chosen here from the chat template's text:
  hermes       Qwen2.5/Qwen3, Hermes 2 Pro/3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block
               per call, possibly after some text (the content). A last block cut off before its closing tag still
               counts when its JSON is whole (the model stopped, or hit max_tokens, right after it).
  llama3_json  Llama 3.1/3.2: the answer is `{"name": ..., "parameters": {...}}` (or "arguments"), possibly after
               `<|python_tag|>`, several separated by ';'. A call must start the answer: vLLM's streaming parser
               reads it so, and streamed and whole answers must agree (vLLM's non-streaming one looks anywhere).
Output that starts a call but does not parse (bad JSON, no name) is returned as plain content, as vLLM does.

A forced call (tool_choice a named function, or "required") is no format of the model's: the answer was constrained
to JSON by the request's schema (ChatCompletionRequest.forced_calls_schema), read here as vLLM's serving_chat reads
it: NamedCall takes the whole answer for the function's arguments, RequiredCalls a JSON list of {"name",
"parameters"} objects.

Streaming (ToolCallStream): text is sent as it comes until a call could be starting; only the tail that may still
become a call's start marker (and the whitespace before it, which a call's answer leaves out) is held back. Once a
call has started, the rest is held to the end and parsed whole, so a streamed answer is always the non-streamed one.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from hpcllm.gateway.errors import InvalidRequest


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    calls: tuple[ParsedCall, ...] = ()


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_of(obj: object, arguments_keys: tuple[str, ...]) -> ParsedCall | None:
    """The call a decoded JSON value names, or None when it is not {"name": str, <arguments key>: object}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = next((obj[key] for key in arguments_keys if key in obj), None)
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (it may still become the marker)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


class ToolCallParser(ABC):
    name = ""
    # An answer with calls ends with this finish_reason (None: the generation's own, as OpenAI and vLLM end a named
    # function's call with "stop").
    finish_reason: str | None = "tool_calls"

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """The whole answer's content and calls (a call that does not parse leaves it all content)."""

    @abstractmethod
    def sendable(self, text: str, sent: int) -> int | None:
        """How much of `text` (an answer so far, whose first `sent` characters were content for sure) is content for
        sure; None once a call has started. Asked at every token: it looks at the new text only."""


class HermesParser(ToolCallParser):
    name = "hermes"
    START = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def parse(self, text: str) -> ParsedOutput:
        start = text.find(self.START)
        if start < 0:
            return ParsedOutput(text)
        calls = []
        for closed, unclosed in self._BLOCK.findall(text, start):
            try:
                call = _call_of(json.loads(closed or unclosed), ("arguments",))
            except ValueError:
                call = None
            if call is None:
                return ParsedOutput(text)
            calls.append(call)
        return ParsedOutput(text[:start].rstrip() or None, tuple(calls))

    def sendable(self, text: str, sent: int) -> int | None:
        if self.START in text[max(0, sent - len(self.START)):]:
            return None
        end = len(text) - partial_suffix(text, self.START)
        while end > sent and text[end - 1].isspace():
            end -= 1
        return end


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"
    _decoder = json.JSONDecoder()

    def parse(self, text: str) -> ParsedOutput:
        body = text.lstrip().removeprefix(self.PYTHON_TAG).lstrip()
        if not body.startswith("{"):
            return ParsedOutput(text)
        calls, at = [], 0
        try:
            while at < len(body):
                obj, at = self._decoder.raw_decode(body, at)
                call = _call_of(obj, ("parameters", "arguments"))
                if call is None:
                    return ParsedOutput(text)
                calls.append(call)
                at = _skip(body, at, " \t\r\n")
                if at < len(body) and body[at] == ";":
                    at = _skip(body, at + 1, " \t\r\n")
                elif at < len(body):
                    return ParsedOutput(text)
        except ValueError:
            return ParsedOutput(text)
        return ParsedOutput(None, tuple(calls))

    def sendable(self, text: str, sent: int) -> int | None:
        if sent:  # the answer began with text: it is no call
            return len(text)
        body = text.lstrip()
        if body.startswith("{") or body.startswith(self.PYTHON_TAG):
            return None
        if self.PYTHON_TAG.startswith(body):  # nothing yet, or the tag coming in pieces
            return 0
        return len(text)


def _skip(text: str, at: int, chars: str) -> int:
    while at < len(text) and text[at] in chars:
        at += 1
    return at


class NamedCall(ToolCallParser):
    """tool_choice {"type": "function", "function": {"name": ...}}: the answer is that function's arguments (cut
    short when the answer hit max_tokens: finish_reason "length" says so, as vLLM returns it)."""

    name = "named"
    finish_reason = None

    def __init__(self, function: str):
        self.function = function

    def parse(self, text: str) -> ParsedOutput:
        return ParsedOutput(None, (ParsedCall(self.function, text),))

    def sendable(self, text: str, sent: int) -> int | None:
        return None  # all of it is the call


class RequiredCalls(ToolCallParser):
    """tool_choice "required": the answer is a JSON list of {"name": ..., "parameters": {...}}; one cut short (at
    max_tokens) is no list: it is returned as content, with finish_reason "length"."""

    name = "required"

    def parse(self, text: str) -> ParsedOutput:
        try:
            items = json.loads(text)
        except ValueError:
            return ParsedOutput(text)
        calls = [_call_of(item, ("parameters",)) for item in items] if isinstance(items, list) else [None]
        if not calls or None in calls:
            return ParsedOutput(text)
        return ParsedOutput(None, tuple(calls))

    def sendable(self, text: str, sent: int) -> int | None:
        return None


PARSERS: dict[str, ToolCallParser] = {p.name: p for p in (HermesParser(), Llama3JsonParser())}
# Formats that also hold "<tool_call>" but write something else inside (Qwen3-Coder's XML calls).
_OTHER_FORMAT_MARKERS = ("<function=",)


def parser_for_template(template: str) -> ToolCallParser:
    """The tool-call format of a chat template (that renders tools) when its text names exactly one known format;
    else a 400: guessing wrong would return a model's calls as plain text."""
    found = []
    if "<tool_call>" in template and not any(marker in template for marker in _OTHER_FORMAT_MARKERS):
        found.append(PARSERS["hermes"])
    if "<|start_header_id|>" in template and ("<|python_tag|>" in template or '"parameters"' in template):
        found.append(PARSERS["llama3_json"])
    if len(found) != 1:
        raise InvalidRequest(
            "this model's chat template renders tools but writes tool calls in no format this server knows "
            f"(it reads {' and '.join(PARSERS)}); send the request without 'tools'", param="tools",
            code="unsupported_parameter")
    return found[0]


class ToolCallStream:
    """One streamed choice's text through a parser: feed() gives the content that can be sent now, finish() the
    rest of the answer once the generation ended."""

    def __init__(self, parser: ToolCallParser):
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.in_call = False

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.in_call:
            return ""
        sendable = self.parser.sendable(self.text, self.sent)
        if sendable is None:
            self.in_call = True
            return ""
        if sendable <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:sendable], sendable
        return out

    def finish(self) -> ParsedOutput:
        """The content not sent yet and the calls: the whole answer parsed, minus what was sent."""
        parsed = self.parser.parse(self.text)
        content = parsed.content if parsed.calls else self.text
        rest = (content or "")[self.sent:]
        return ParsedOutput(rest or None, parsed.calls)
