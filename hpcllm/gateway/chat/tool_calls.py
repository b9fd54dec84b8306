"""Tool calls in a chat model's output: which format a model writes them in, and parsing them out of its text.

The formats are vLLM's `--tool-call-parser` ones (vllm/tool_parsers/), chosen here from the chat template's text
(parser_for_template), or named by the model's config (tool_call_parser, hpcllm.config.ToolCallFormat):
  hermes       Qwen2.5/Qwen3, Hermes 2 Pro/3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block
               per call, possibly after some text (the content). A last block cut off before its closing tag still
               counts when its JSON is whole (the model stopped, or hit max_tokens, right after it).
  llama3_json  Llama 3.1/3.2 and Llama 4 (vLLM's llama4_json): the answer is `{"name": ..., "parameters": {...}}`
               (or "arguments"), possibly after `<|python_tag|>`, several separated by ';'. A call must start the
               answer: vLLM's streaming parser reads it so, and streamed and whole answers must agree (vLLM's
               non-streaming one looks anywhere).
  qwen3_coder  Qwen3-Coder, Qwen3-Next, Qwen3.5: XML calls, `<tool_call><function=NAME><parameter=KEY>VALUE</parameter>
               </function></tool_call>` with newlines between the tags (a `<function=` without `<tool_call>` counts
               too, as in vLLM), after optional text. Values are text: each is read as its parameter's schema type
               (vLLM's coerce_to_schema_type); a parameter the schema does not describe stays a string.
  mistral      Mistral (7B v0.3, Small 3.x, Devstral, Magistral): `[TOOL_CALLS]` before the calls, after optional
               text: a JSON list of {"name", "arguments"} (tokenizers before v11), or `NAME[ARGS]{...}` (also
               `NAME{...}`) after each marker (v11 on). The markers are special tokens, which workers decode without:
               the gateway puts their text back into the answer (special_markers, Generation's kept_tokens), as vLLM
               keeps special tokens for this parser.
  pythonic     Llama 3.2 / Llama 4 with vLLM's pythonic templates: the answer is a Python list of calls,
               `[get_weather(city="Paris"), get_time()]` (keyword arguments, literal values), nothing else.
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

import ast
import json
import math
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from hpcllm.config import ToolCallFormat
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
    # Special tokens of the format, which the answer's text must keep (workers decode skipping special tokens).
    special_markers: tuple[str, ...] = ()

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """The whole answer's content and calls (a call that does not parse leaves it all content)."""

    @abstractmethod
    def sendable(self, text: str, sent: int) -> int | None:
        """How much of `text` (an answer so far, whose first `sent` characters were content for sure) is content for
        sure; None once a call has started. Asked at every token: it looks at the new text only."""

    def for_tools(self, parameters: dict[str, dict]) -> ToolCallParser:
        """The parser for one request, whose functions take these parameters (schemas by function name): a format
        whose values are text reads them by their schema types."""
        return self


def sendable_before(text: str, sent: int, markers: tuple[str, ...]) -> int | None:
    """For a format whose calls start with one of `markers`, anywhere after some text: None once one is in `text`;
    else all of it but a tail that may still become one (and the whitespace before it, which the content of an
    answer with calls leaves out)."""
    new = text[max(0, sent - max(map(len, markers))):]
    if any(marker in new for marker in markers):
        return None
    end = len(text) - max(partial_suffix(text, marker) for marker in markers)
    while end > sent and text[end - 1].isspace():
        end -= 1
    return end


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
            except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
                call = None
            if call is None:
                return ParsedOutput(text)
            calls.append(call)
        return ParsedOutput(text[:start].rstrip() or None, tuple(calls))

    def sendable(self, text: str, sent: int) -> int | None:
        return sendable_before(text, sent, (self.START,))


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
        except (ValueError, RecursionError):
            return ParsedOutput(text)
        return ParsedOutput(None, tuple(calls))

    def sendable(self, text: str, sent: int) -> int | None:
        return sendable_unless_starting(text, sent, "{", self.PYTHON_TAG)


def sendable_unless_starting(text: str, sent: int, opening: str, tag: str) -> int | None:
    """For a format whose calls are the whole answer (after whitespace, and `tag` where the model writes one),
    beginning with `opening`: None when the answer begins so, else all of it once it cannot."""
    if sent:  # the answer began with text: it is no call
        return len(text)
    body = text.lstrip()
    if body.startswith(opening) or body.startswith(tag):
        return None
    if tag.startswith(body):  # nothing yet, or the tag coming in pieces
        return 0
    return len(text)


class MistralParser(ToolCallParser):
    name = "mistral"
    START, ARGS = "[TOOL_CALLS]", "[ARGS]"
    special_markers = (START, ARGS)
    _decoder = json.JSONDecoder()
    _NAME_END = re.compile(r"\[ARGS\]|\{")  # a call's name ends at [ARGS], or (vLLM's fallback) at its arguments' {

    def parse(self, text: str) -> ParsedOutput:
        content, *segments = text.split(self.START)
        if not segments:
            return ParsedOutput(text)
        calls = []
        try:
            for segment in filter(str.strip, segments):  # markers with nothing between them count as one
                calls.extend(self._calls(segment.strip()))
        except (ValueError, RecursionError):
            return ParsedOutput(text)
        if not calls:
            return ParsedOutput(text)
        return ParsedOutput(content.rstrip() or None, tuple(calls))

    def _calls(self, segment: str) -> list[ParsedCall]:
        """One marker's calls: a JSON list of them (or one object), or NAME[ARGS]{...} / NAME{...}; the text after
        the JSON is dropped (vLLM's raw_decode); a ValueError when they do not parse."""
        if segment[0] in "[{":
            value, _ = self._decoder.raw_decode(segment)
            calls = [_call_of(item, ("arguments",)) for item in (value if isinstance(value, list) else [value])]
        else:
            end = self._NAME_END.search(segment)
            name = segment[:end.start()].strip() if end else ""
            if not name or any(c.isspace() for c in name):
                raise ValueError(f"no function's name in {segment[:64]!r}")
            arguments = segment[end.end():].lstrip() if end[0] == self.ARGS else segment[end.start():]
            calls = [_call_of({"name": name, "arguments": self._decoder.raw_decode(arguments)[0]}, ("arguments",))]
        if not calls or None in calls:
            raise ValueError("not a call")
        return calls

    def sendable(self, text: str, sent: int) -> int | None:
        return sendable_before(text, sent, (self.START,))


class PythonicParser(ToolCallParser):
    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"  # Llama 4's, when its special tokens are kept

    def parse(self, text: str) -> ParsedOutput:
        body = text.strip().removeprefix(self.START).replace(self.END, "").strip()
        if not body.startswith("["):
            return ParsedOutput(text)
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return ParsedOutput(text)
            calls = tuple(_python_call(call) for call in tree.elts)
        except (SyntaxError, ValueError, RecursionError):  # RecursionError: nested too deep for ast
            return ParsedOutput(text)
        return ParsedOutput(None, calls)

    def sendable(self, text: str, sent: int) -> int | None:
        return sendable_unless_starting(text, sent, "[", self.START)


def _python_call(node: ast.expr) -> ParsedCall:
    """`name(key=value, ...)` (a dotted name too, and positional arguments ignored, as vLLM's handle_single_tool
    reads it); a ValueError for anything else."""
    if not isinstance(node, ast.Call):
        raise ValueError("not a call")
    arguments = {keyword.arg: _python_value(keyword.value) for keyword in node.keywords}
    if None in arguments:
        raise ValueError("**arguments")
    return ParsedCall(_dotted_name(node.func), json.dumps(arguments, ensure_ascii=False))


def _dotted_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise ValueError("a call of no function name")


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _python_value(node: ast.expr) -> object:
    """A literal argument as JSON takes it (vLLM's get_parameter_value): constants, lists, tuples and sets as
    lists, dicts with literal keys, JSON's true/false/null, signed numbers; a ValueError for anything else."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float))):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_python_value(item) for item in node.elts]
    if isinstance(node, ast.Dict) and all(isinstance(key, ast.Constant) for key in node.keys):
        return {key.value: _python_value(value) for key, value in zip(node.keys, node.values)}
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    raise ValueError(f"{type(node).__name__} is no literal")


class Qwen3CoderParser(ToolCallParser):
    name = "qwen3_coder"
    MARKERS = ("<tool_call>", "<function=")
    _FUNCTION = re.compile(r"<function=([^>]*)>(.*?)</function>", re.DOTALL)
    # vLLM's: a value ends at its closing tag or where the next parameter opens.
    _PARAMETER = re.compile(r"<\s*parameter\s*=\s*([^>]*)>(.*?)(?:<\s*/\s*parameter\s*>|(?=<\s*parameter\s*=))",
                            re.DOTALL)

    def __init__(self, parameters: dict[str, dict] | None = None):
        self.parameters = parameters or {}

    def for_tools(self, parameters: dict[str, dict]) -> ToolCallParser:
        return Qwen3CoderParser(parameters)

    def parse(self, text: str) -> ParsedOutput:
        start = min((at for at in map(text.find, self.MARKERS) if at >= 0), default=-1)
        if start < 0:
            return ParsedOutput(text)
        calls, end = [], start
        for function in self._FUNCTION.finditer(text, start):
            name = function[1].strip()
            if not name:
                return ParsedOutput(text)
            calls.append(ParsedCall(name, json.dumps(self._arguments(name, function[2]), ensure_ascii=False)))
            end = function.end()
        if not calls or "<function=" in text[end:]:  # no function, or the last one cut off before </function>
            return ParsedOutput(text)
        return ParsedOutput(text[:start].rstrip() or None, tuple(calls))

    def _arguments(self, function: str, body: str) -> dict[str, object]:
        properties = self.parameters.get(function, {}).get("properties")
        properties = properties if isinstance(properties, dict) else {}
        arguments = {}
        for parameter in self._PARAMETER.finditer(body):
            value = parameter[2].removeprefix("\n").removesuffix("\n")  # the template's own newlines
            schema = properties.get(parameter[1])
            arguments[parameter[1]] = value if schema is None else _as_schema_type(value, _schema_types(schema))
        return arguments

    def sendable(self, text: str, sent: int) -> int | None:
        return sendable_before(text, sent, self.MARKERS)


def _schema_types(schema: object) -> set[str]:
    """The JSON types a schema allows (`type`, an enum's values, anyOf/oneOf/allOf), as vLLM's
    extract_types_from_schema reads them; "string" when it names none."""
    if not isinstance(schema, dict):
        return {"string"}
    kinds = schema.get("type")
    types = {kinds} if isinstance(kinds, str) else {t for t in _list(kinds) if isinstance(t, str)}
    types |= {_JSON_TYPE_OF.get(type(value), "string") for value in _list(schema.get("enum"))}
    for choice in ("anyOf", "oneOf", "allOf"):
        for option in _list(schema.get(choice)):
            types |= _schema_types(option)
    return types or {"string"}


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


_JSON_TYPE_OF = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
                 dict: "object"}
_NOT_JSON = object()


def _as_schema_type(value: str, types: set[str]) -> object:
    """A parameter's text as the first of its types it reads as (vLLM's coerce_to_schema_type: null, integer,
    number, boolean, object, array, string); JSON, else the text itself, when it reads as none."""
    for kind in ("null", "integer", "number", "boolean", "object", "array"):
        if kind not in types:
            continue
        if kind == "null" and value.lower() == "null":
            return None
        if kind == "integer":
            try:
                return int(value)
            except ValueError:
                continue
        if kind == "number":
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                return int(number) if number == int(number) else number
        if kind == "boolean" and value.strip().lower() in ("true", "1", "false", "0"):
            return value.strip().lower() in ("true", "1")
        if kind in ("object", "array") and (parsed := _finite_json(value)) is not _NOT_JSON:
            return parsed
    if "string" in types:
        return value
    parsed = _finite_json(value)
    return value if parsed is _NOT_JSON else parsed


def _finite_json(text: str) -> object:
    """The JSON value `text` holds; _NOT_JSON when it is none, or holds a number JSON cannot write back (NaN,
    1e999)."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _no_constant(name: str) -> float:
    raise ValueError(name)


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(text)
    return number


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


PARSERS: dict[ToolCallFormat, ToolCallParser] = {p.name: p for p in (
    HermesParser(), Llama3JsonParser(), Qwen3CoderParser(), PythonicParser(), MistralParser())}
# Llama 3's turn headers, Llama 4's (whose JSON calls vLLM's llama4_json reads as llama3_json does).
_LLAMA_HEADERS = ("<|start_header_id|>", "<|header_start|>")
# vLLM's pythonic templates (Llama 3.2, Llama 4) tell the model to answer so.
_PYTHONIC_EXAMPLE = "[func_name1(params_name1=params_value1"


def parser_for_template(template: str) -> ToolCallParser:
    """The tool-call format of a chat template (that renders tools) when its text names exactly one known format;
    else a 400: guessing wrong would return a model's calls as plain text."""
    found = []
    if "<tool_call>" in template:  # Qwen3-Coder's XML calls are inside <tool_call> too
        found.append(PARSERS["qwen3_coder" if "<function=" in template else "hermes"])
    if "[TOOL_CALLS]" in template:
        found.append(PARSERS["mistral"])
    if _PYTHONIC_EXAMPLE in template:
        found.append(PARSERS["pythonic"])
    elif any(header in template for header in _LLAMA_HEADERS) and (
            "<|python_tag|>" in template or '"parameters"' in template):
        found.append(PARSERS["llama3_json"])
    if len(found) != 1:
        raise InvalidRequest(
            "this model's chat template renders tools but writes tool calls in no format this server knows "
            f"(it reads {', '.join(PARSERS)}); send the request without 'tools'", param="tools",
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
