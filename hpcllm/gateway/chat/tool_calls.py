"""Tool calls in a chat model's output: which format a model writes them in, and parsing them out of its text.

The formats are vLLM's `--tool-call-parser` ones (vllm/tool_parsers/), chosen here from the chat template's text
(parser_for_template), or named by the model's config (tool_call_parser, hpcllm.config.ToolCallFormat):
  hermes       Qwen2.5/Qwen3, Hermes 2 Pro/3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block
               per call, possibly after some text (the content).
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
A call is one from the moment its start and its whole name are written (each format's reader below says where):
what comes after, cut short (max_tokens, a stop string) or malformed, stays its arguments as written (possibly
invalid JSON, as OpenAI's may be; ParsedCall.complete False), as a streamed call was already sent. Output that
starts a call but does not get to its name (bad JSON, no name) is returned as plain content, as vLLM does. The
JSON formats' arguments are the raw text the model wrote; the others' (qwen3_coder, pythonic) are converted to JSON
one parameter at a time.

A forced call (tool_choice a named function, or "required") is no format of the model's: the answer was constrained
to JSON by the request's schema (ChatCompletionRequest.forced_calls_schema), read here as vLLM's serving_chat reads
it: NamedCall takes the whole answer for the function's arguments, RequiredCalls a JSON list of {"name",
"parameters"} objects.

Streaming (ToolCallStream): text is sent as it comes until a call could be starting; only the tail that may still
become a call's start marker (and the whitespace before it, which a call's answer leaves out) is held back. Then
each call is sent as it is read: its name once whole, then its arguments as they grow (a JSON format's as the text
comes, a tail that may be a marker ending a malformed call held; a converted format's per parameter). The whole
answer is read by the same code, so a streamed answer is always the non-streamed one.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import secrets
import string
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from hpcllm.config import ToolCallFormat
from hpcllm.gateway.errors import InvalidRequest


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it (as far as it came, for a call cut short or malformed)
    complete: bool = True  # False: its text ends before the call does (max_tokens, a stop string, malformed)


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    calls: tuple[ParsedCall, ...] = ()


# Mistral's call ids: 9 of these (MistralParser.new_call_id).
MISTRAL_ID_CHARACTERS = string.ascii_letters + string.digits
MISTRAL_ID_LENGTH = 9


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


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


# ------------------------------------------------------------------------------------- reading calls as they grow
# Every format reads the calls of an answer so far (calls(text, Progress(final=False)), a stream's) and of a whole
# one (Progress()) with the same code, and what it reads of a prefix is a prefix of what it reads of the whole: a
# call is one from the moment its name is complete, and its arguments grow only by text that is final. So a streamed
# answer, sent as the differences, is the whole one.

@dataclass
class Progress:
    """How an answer's calls are read: `final` (the answer is whole: what may still become a marker is not held
    back), and where the scans stopped last time (`memo`): the text of a stream only grows, so each token's reading
    resumes there and costs its new text only, not the whole call again."""

    final: bool = True
    memo: dict[tuple, tuple] = field(default_factory=dict)


class Nesting:
    """A scan of JSON or Python text for where a bracketed stretch ends, outside strings; resumable (Progress)."""

    def __init__(self, name: str, quotes: str, opens: str, closes: str, triple_quotes: bool):
        self.name, self.quotes, self.opens, self.closes = name, quotes, opens, closes
        self.triple_quotes = triple_quotes
        self._plain = re.compile(f"[^{re.escape(quotes + opens + closes)},<]*")  # '<': a stop marker's start
        self._string_rest = {q: re.compile(rf"[^{q}\\]*(?:\\.[^{q}\\]*)*", re.DOTALL) for q in quotes}

    def end(self, text: str, at: int, depth: int, progress: Progress, stops: tuple[str, ...] = (),
            separator: str = "") -> tuple[int, str] | None:
        """From `at`, inside `depth` brackets: (the position of the bracket that closes them, "close"), of a
        `separator` inside only those ("separator"), of a stop marker ("stop": a malformed call ends there); None
        while none is in the text yet."""
        key = (self.name, at, depth)
        at, depth, quote = progress.memo.get(key, (at, depth, ""))
        while True:
            if quote:  # in a string: to its end, or (the text ends in it) where to go on next time
                at = self._string_rest[quote[0]].match(text, at).end()
                if at == len(text) or text[at] == "\\":
                    break
                if len(quote) == 1 or text.startswith(quote, at):
                    at, quote = at + len(quote), ""
                elif quote.startswith(text[at:]):  # may be a triple-quoted string's end
                    break
                else:
                    at += 1
                continue
            at = self._plain.match(text, at).end()
            if at == len(text):
                break
            char = text[at]
            if char in self.quotes:
                if self.triple_quotes and (char * 3).startswith(text[at:at + 3]) and len(text) - at < 3:
                    break  # "" or " at the end: may still open a triple-quoted string
                quote = char * 3 if self.triple_quotes and text.startswith(char * 3, at) else char
                at += len(quote)
                continue
            if any(text.startswith(stop, at) for stop in stops):
                return at, "stop"
            if any(stop.startswith(text[at:]) for stop in stops):
                break  # may still become a stop marker
            if char in self.opens:
                depth += 1
            elif char in self.closes:
                depth -= 1
                if depth <= 0:
                    return at, "close"
            elif char == separator and depth == 1:
                return at, "separator"
            at += 1
        progress.memo[key] = (at, depth, quote)
        return None


JSON = Nesting("json", '"', "{[", "}]", triple_quotes=False)
PYTHON = Nesting("python", "\"'", "([{", ")]}", triple_quotes=True)


def json_end(text: str, at: int, progress: Progress, depth: int = 0,
             stops: tuple[str, ...] = ()) -> tuple[int, bool] | None:
    """Where the JSON text from `at` (inside `depth` brackets) closes its brackets: (one past the closing one,
    True), or (where one of `stops` stands outside a string, False: a malformed call ends there); None while
    neither is in `text` yet."""
    end = JSON.end(text, at, depth, progress, stops)
    if end is None:
        return None
    return (end[0] + 1, True) if end[1] == "close" else (end[0], False)


@dataclass(frozen=True)
class Read:
    """One call read out of an answer so far: None for a call not (yet) one; where its text ends (None: it goes
    on to the end of the answer so far)."""
    call: ParsedCall | None
    end: int | None = None


# `{"name": "X", "<arguments key>": {`, after `"type": "function", ` as Llama 3.2 models often begin.
_NAMED_CALL = re.compile(r'\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?'
                         r'"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(\w+)"\s*:\s*(?=\{)')


def read_json_call(text: str, at: int, arguments_keys: tuple[str, ...], stops: tuple[str, ...],
                   progress: Progress) -> Read:
    """The call in the JSON object at `at`: once `{"name": "X", "<arguments key>": {` is written, a call whose
    arguments are the raw text of that object (read_arguments); another object, once whole, when it is {"name",
    <arguments key>: {...}} (its arguments re-encoded)."""
    named = _NAMED_CALL.match(text, at)
    name = _json_string(named[1]) if named and named[2] in arguments_keys else None
    if not name:
        end = json_end(text, at, progress, stops=stops)
        if end is None or not end[1]:
            return Read(None)
        try:
            return Read(_call_of(json.loads(text[at:end[0]]), arguments_keys), end[0])
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
            return Read(None)
    read = read_arguments(name, text, named.end(), stops, progress)
    if read.end is None or not read.call.complete:
        return read
    rest = json_end(text, read.end, progress, depth=1, stops=stops)  # the rest of the call's object
    return Read(read.call, rest[0] if rest else None)


def read_arguments(name: str, text: str, at: int, stops: tuple[str, ...], progress: Progress) -> Read:
    """A call's JSON arguments from their `{` at `at`: the raw text as far as it is written, to its closing `}`,
    or (malformed) to a stop marker outside a string; a tail that may still become a stop marker held back until
    the answer is whole."""
    end = json_end(text, at, progress, stops=stops)
    if end is None:
        held = 0 if progress.final else max((partial_suffix(text, stop) for stop in stops), default=0)
        return Read(ParsedCall(name, text[at:len(text) - held], complete=False))
    arguments_end, closed = end
    return Read(ParsedCall(name, text[at:arguments_end], complete=closed), arguments_end)


def _json_string(literal: str) -> str | None:
    try:
        return json.loads(literal)
    except ValueError:  # a bad escape
        return None


def read_json_list(text: str, at: int, arguments_keys: tuple[str, ...], stops: tuple[str, ...],
                   progress: Progress) -> list[Read]:
    """The calls in a JSON list of call objects at `at` (its `[`), as far as they are written; a last Read(None)
    for what is not a call."""
    reads, at = [], _skip_space(text, at + 1)
    while at < len(text):
        if text[at] != "{":
            return reads + [Read(None)] if text[at] != "]" else reads
        read = read_json_call(text, at, arguments_keys, stops, progress)
        reads.append(read)
        if read.call is None or read.end is None:
            return reads
        at = _skip_space(text, read.end)
        if at < len(text) and text[at] == ",":
            at = _skip_space(text, at + 1)
        elif at < len(text) and text[at] != "]":
            return reads + [Read(None)]
    return reads


def calls_of(reads: list[Read]) -> tuple[ParsedCall, ...]:
    """The calls up to the first that is not (yet) one."""
    calls = []
    for read in reads:
        if read.call is None:
            break
        calls.append(read.call)
    return tuple(calls)


class ToolCallParser(ABC):
    name = ""
    # An answer with calls ends with this finish_reason (None: the generation's own, as OpenAI and vLLM end a named
    # function's call with "stop").
    finish_reason: str | None = "tool_calls"
    # The answer is nothing but its list of calls (a forced "required" one): cut by max_tokens before the list
    # closed, more calls may have followed, and its finish_reason stays "length" (vLLM's) even after a whole call.
    cut_lists_end_with_length = False
    # Special tokens of the format, which the answer's text must keep (workers decode skipping special tokens).
    special_markers: tuple[str, ...] = ()

    @abstractmethod
    def calls(self, text: str, progress: Progress) -> tuple[ParsedCall, ...]:
        """The calls of an answer so far (final: of the whole answer), each as far as it is final; none while the
        first is not one yet (and, final, when it is none: the answer is all content)."""

    @abstractmethod
    def sendable(self, text: str, sent: int) -> int | None:
        """How much of `text` (an answer so far, whose first `sent` characters were content for sure) is content for
        sure; None once a call may have started. Asked at every token: it looks at the new text only."""

    def calls_start(self, text: str) -> int:
        """Where the calls of an answer with calls begin: the text before them (trailing whitespace dropped) is its
        content."""
        return 0

    def parse(self, text: str) -> ParsedOutput:
        """The whole answer's content and calls (no call: it is all content)."""
        calls = self.calls(text, Progress())
        if not calls:
            return ParsedOutput(text)
        return ParsedOutput(text[:self.calls_start(text)].rstrip() or None, calls)

    def for_tools(self, parameters: dict[str, dict]) -> ToolCallParser:
        """The parser for one request, whose functions take these parameters (schemas by function name): a format
        whose values are text reads them by their schema types."""
        return self

    def new_call_id(self) -> str:
        """A new id for one of the answer's calls."""
        return new_tool_call_id()

    def template_call_ids(self, call_ids: list[str]) -> dict[str, str]:
        """The call ids of the request's history (in their order) as the model's chat template takes them back: one
        for each, the same for the same id (an assistant's call and the tool's answer to it)."""
        return {call_id: call_id for call_id in call_ids}


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


def first_marker(text: str, markers: tuple[str, ...]) -> int:
    return min((at for at in map(text.find, markers) if at >= 0), default=-1)


class HermesParser(ToolCallParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def calls(self, text: str, progress: Progress) -> tuple[ParsedCall, ...]:
        reads, at = [], text.find(self.START)
        while at >= 0:
            body = _skip_space(text, at + len(self.START))
            if body == len(text) or text[body] != "{":
                break
            read = read_json_call(text, body, ("arguments",), (self.END,), progress)
            reads.append(read)
            if read.end is None:
                break
            at = text.find(self.START, read.end)  # the text between calls is dropped, as vLLM drops it
        return calls_of(reads)

    def calls_start(self, text: str) -> int:
        return text.find(self.START)

    def sendable(self, text: str, sent: int) -> int | None:
        return sendable_before(text, sent, (self.START,))


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    def calls(self, text: str, progress: Progress) -> tuple[ParsedCall, ...]:
        at = _skip_space(text, 0)
        if text.startswith(self.PYTHON_TAG, at):
            at = _skip_space(text, at + len(self.PYTHON_TAG))
        reads = []
        while at < len(text) and text[at] == "{":
            read = read_json_call(text, at, ("parameters", "arguments"), (), progress)
            reads.append(read)
            if read.end is None:
                break
            at = _skip_space(text, read.end)
            if not text.startswith(";", at):  # text after the calls is dropped
                break
            at = _skip_space(text, at + 1)
        return calls_of(reads)

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
    _NAME_END = re.compile(r"\[ARGS\]|\{")  # a call's name ends at [ARGS], or (vLLM's fallback) at its arguments' {

    def calls(self, text: str, progress: Progress) -> tuple[ParsedCall, ...]:
        """After each marker a JSON list of calls (or one object), or NAME[ARGS]{...} / NAME{...}; markers with
        nothing between them count as one; the text after a call's JSON is dropped (vLLM's raw_decode)."""
        reads, at = [], text.find(self.START)
        while at >= 0:
            body = _skip_space(text, at + len(self.START))
            if text.startswith(self.START, body):
                at = body
                continue
            if body == len(text):
                break
            if text[body] == "[":
                read = read_json_list(text, body, ("arguments",), (self.START,), progress) or [Read(None)]
            elif text[body] == "{":
                read = [read_json_call(text, body, ("arguments",), (self.START,), progress)]
            else:
                read = [self._named(text, body, progress)]
            reads += read
            if read[-1].call is None or read[-1].end is None:
                break
            at = text.find(self.START, reads[-1].end)
        return calls_of(reads)

    def _named(self, text: str, at: int, progress: Progress) -> Read:
        """NAME[ARGS]{...} (or NAME{...}): a call once its name is followed by its arguments' `{`."""
        end = self._NAME_END.search(text, at)
        if end is None:
            return Read(None)
        name = text[at:end.start()].strip()
        arguments = _skip_space(text, end.end()) if end[0] == self.ARGS else end.start()
        if not name or any(c.isspace() for c in name) or self.START in name or arguments == len(text):
            return Read(None)
        if text[arguments] != "{":
            return Read(None)
        return read_arguments(name, text, arguments, (self.START,), progress)

    def calls_start(self, text: str) -> int:
        return text.find(self.START)

    def sendable(self, text: str, sent: int) -> int | None:
        return sendable_before(text, sent, (self.START,))

    def new_call_id(self) -> str:
        """9 letters or digits: Mistral's templates (and mistral_common) refuse any other id when the call comes back
        in the next turn's history (vLLM's MistralToolCall ids)."""
        return "".join(secrets.choice(MISTRAL_ID_CHARACTERS) for _ in range(MISTRAL_ID_LENGTH))

    def template_call_ids(self, call_ids: list[str]) -> dict[str, str]:
        """Ids of another shape (OpenAI's "call_...", another server's) as 9 letters or digits, which Mistral's
        templates take: a longer id's last 9 characters (vLLM's truncate_tool_call_ids), unless another id of the
        request has them (the template would pair a tool's answer with the wrong call) or they are not letters and
        digits; then, as for a shorter id, 9 derived from the id's hash."""
        taken = {call_id for call_id in call_ids if _is_mistral_id(call_id)}
        mapped: dict[str, str] = {}
        for call_id in call_ids:
            if call_id in mapped:
                continue
            if _is_mistral_id(call_id):
                mapped[call_id] = call_id
                continue
            candidate, attempt = call_id[-MISTRAL_ID_LENGTH:], 0
            while not _is_mistral_id(candidate) or candidate in taken:
                digest = hashlib.sha256(f"{attempt}:{call_id}".encode()).digest()
                candidate = "".join(MISTRAL_ID_CHARACTERS[byte % len(MISTRAL_ID_CHARACTERS)]
                                    for byte in digest[:MISTRAL_ID_LENGTH])
                attempt += 1
            taken.add(candidate)
            mapped[call_id] = candidate
        return mapped


def _is_mistral_id(call_id: str) -> bool:
    return len(call_id) == MISTRAL_ID_LENGTH and all(c in MISTRAL_ID_CHARACTERS for c in call_id)


class PythonicParser(ToolCallParser):
    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"  # Llama 4's, when its special tokens are kept
    _NAME = re.compile(r"[^\W\d][\w.]*\s*")

    def calls(self, text: str, progress: Progress) -> tuple[ParsedCall, ...]:
        """A Python list of `name(key=value, ...)` calls (keyword arguments with literal values; positional ones
        ignored, as vLLM's handle_single_tool reads them); the text after it is dropped."""
        at = _skip_space(text, 0)
        if text.startswith(self.START, at):
            at = _skip_space(text, at + len(self.START))
        if not text.startswith("[", at):
            return ()
        reads, at = [], _skip_space(text, at + 1)
        while at < len(text):
            read = self._call(text, at, progress)
            reads.append(read)
            if read.end is None:
                break
            at = _skip_space(text, read.end)
            if not text.startswith(",", at):
                break
            at = _skip_space(text, at + 1)
        return calls_of(reads)

    def _call(self, text: str, at: int, progress: Progress) -> Read:
        """A call once its name and `(` are written; its arguments JSON, each keyword argument added once its value
        is written, `}` at its `)`. A value that is no literal (or `**arguments`) ends it there."""
        name = self._NAME.match(text, at)
        if name is None or name.end() == len(text) or text[name.end()] != "(":
            return Read(None)
        function, key = name[0].strip(), ("pythonic", name.end())
        pieces, at = progress.memo.get(key, ((), name.end() + 1))  # the arguments read so far
        while True:
            at = _skip_space(text, at)
            end = PYTHON.end(text, at, 1, progress, separator=",")
            if end is None:
                progress.memo[key] = (pieces, at)
                cut = _cut_argument(text[at:]) if progress.final else ""
                return Read(ParsedCall(function, "{" + ", ".join(pieces + (cut,) * bool(cut)), complete=False))
            end, kind = end
            if end > at:
                try:
                    pieces += _keyword_piece(text[at:end])
                except (SyntaxError, ValueError, RecursionError):  # RecursionError: nested too deep for ast
                    return Read(ParsedCall(function, "{" + ", ".join(pieces), complete=False), end)
            if kind != "separator":
                closed = text[end] == ")"
                return Read(ParsedCall(function, "{" + ", ".join(pieces) + "}" * closed, closed), end + 1)
            at = end + 1

    def sendable(self, text: str, sent: int) -> int | None:
        return sendable_unless_starting(text, sent, "[", self.START)


def _keyword_piece(argument: str) -> tuple[str, ...]:
    """`key=value` as JSON's `"key": value`; nothing for a positional argument."""
    node = ast.parse(f"f({argument})", mode="eval").body
    if len(node.args) + len(node.keywords) != 1:
        raise ValueError(f"not one argument: {argument[:64]!r}")
    if node.args:
        return ()
    keyword, = node.keywords
    if keyword.arg is None:
        raise ValueError("**arguments")
    return (f"{json.dumps(keyword.arg, ensure_ascii=False)}: "
            f"{json.dumps(_python_value(keyword.value), ensure_ascii=False)}",)


def _cut_argument(argument: str) -> str:
    """A keyword argument cut short, as the text it got to: `"key": <its value's text>`."""
    key, equals, value = argument.partition("=")
    return f"{json.dumps(key.strip(), ensure_ascii=False)}: {value.lstrip()}" if equals else ""



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
    FUNCTION, FUNCTION_END = "<function=", "</function>"
    # vLLM's: a value ends at its closing tag or where the next parameter opens.
    _PARAMETER = re.compile(r"<\s*parameter\s*=\s*([^>]*)>")
    _VALUE_END = re.compile(r"(<\s*/\s*parameter\s*>)|<\s*parameter\s*=")

    def __init__(self, parameters: dict[str, dict] | None = None):
        self.parameters = parameters or {}

    def for_tools(self, parameters: dict[str, dict]) -> ToolCallParser:
        return Qwen3CoderParser(parameters)

    def calls(self, text: str, progress: Progress) -> tuple[ParsedCall, ...]:
        """A call per `<function=NAME>` (the text between them dropped) once its `>` is written; its arguments JSON,
        each parameter added once its value ends, `}` at `</function>`."""
        calls, at = [], text.find(self.FUNCTION, max(first_marker(text, self.MARKERS), 0))
        while at >= 0:
            name_end = text.find(">", at)
            name = text[at + len(self.FUNCTION):name_end].strip() if name_end >= 0 else ""
            if not name:
                break
            end = self._call_end(text, name_end, progress)
            calls.append(self._call(name, text, name_end + 1, end, progress))
            if end < 0:
                break
            at = text.find(self.FUNCTION, end)
        return tuple(calls)

    def _call_end(self, text: str, name_end: int, progress: Progress) -> int:
        """Where the call whose name ends at `name_end` is closed (-1: not yet), looked for only in the text that
        came since the last look (a whole file's call is thousands of tokens: each would scan it all again)."""
        key = ("qwen3_coder end", name_end)
        end = text.find(self.FUNCTION_END, progress.memo.get(key, (name_end,))[0])
        if end < 0:  # the next look starts where a closing tag may have begun
            progress.memo[key] = (max(name_end, len(text) - len(self.FUNCTION_END) + 1),)
        return end

    def _call(self, name: str, text: str, at: int, end: int, progress: Progress) -> ParsedCall:
        """The call whose body is text[at:end] (end -1: not closed yet), its parameters read on from where the last
        reading stopped (Progress: the parameters read, where the open one starts, and where its value's end may
        still be: its last `<`)."""
        closed, end = end >= 0, end if end >= 0 else len(text)
        key = ("qwen3_coder", at)
        pieces, at, looked = progress.memo.get(key, ((), at, at))
        while (opened := self._PARAMETER.search(text, at, end)) is not None:
            value_end = self._VALUE_END.search(text, max(looked, opened.end()), end)
            if value_end is None:
                # The value's last `<` (where its end may still begin): none before `looked` can be, so only the
                # text since is looked at (text[looked] itself is that `<`, if one was found).
                last = text.rfind("<", max(looked, opened.end()), end)
                progress.memo[key] = (pieces, opened.start(), last if last >= 0 else end)
                if progress.final and not closed:  # a value cut short: its text so far, as an unclosed JSON string
                    value = json.dumps(text[opened.end():end].removeprefix("\n"), ensure_ascii=False)[:-1]
                    pieces += (f"{json.dumps(opened[1], ensure_ascii=False)}: {value}",)
                break
            pieces += (self._piece(name, opened[1], text[opened.end():value_end.start()]),)
            at = looked = value_end.end() if value_end[1] else value_end.start()
        return ParsedCall(name, "{" + ", ".join(pieces) + "}" * closed, closed)

    def _piece(self, function: str, parameter: str, value: str) -> str:
        """`"parameter": value`, the value read as its schema's type."""
        properties = self.parameters.get(function, {}).get("properties")
        schema = properties.get(parameter) if isinstance(properties, dict) else None
        value = value.removeprefix("\n").removesuffix("\n")  # the template's own newlines
        typed = value if schema is None else _as_schema_type(value, _schema_types(schema))
        return f"{json.dumps(parameter, ensure_ascii=False)}: {json.dumps(typed, ensure_ascii=False)}"

    def calls_start(self, text: str) -> int:
        return first_marker(text, self.MARKERS)

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


class ForcedCalls(ToolCallParser):
    """A forced answer's calls (tool_choice "required" or a named function), their ids in the shape of the model's
    own format (`ids`; None: OpenAI's), as its template takes them back in the next turn (Mistral's 9 characters)."""

    def __init__(self, ids: ToolCallParser | None = None):
        self.ids = ids

    def new_call_id(self) -> str:
        return self.ids.new_call_id() if self.ids is not None else super().new_call_id()


class NamedCall(ForcedCalls):
    """tool_choice {"type": "function", "function": {"name": ...}}: the answer is that function's arguments (cut
    short when the answer hit max_tokens: finish_reason "length" says so, as vLLM returns it)."""

    name = "named"
    finish_reason = None

    def __init__(self, function: str, ids: ToolCallParser | None = None):
        super().__init__(ids)
        self.function = function

    def calls(self, text: str, progress: Progress) -> tuple[ParsedCall, ...]:
        return (ParsedCall(self.function, text),)

    def sendable(self, text: str, sent: int) -> int | None:
        return None  # all of it is the call


class RequiredCalls(ForcedCalls):
    """tool_choice "required": the answer is a JSON list of {"name": ..., "parameters": {...}}, each a call once its
    name is written, as the model's own formats' calls."""

    name = "required"
    cut_lists_end_with_length = True

    def calls(self, text: str, progress: Progress) -> tuple[ParsedCall, ...]:
        at = _skip_space(text, 0)
        if not text.startswith("[", at):
            return ()
        return calls_of(read_json_list(text, at, ("parameters",), (), progress))

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
    else a 400 (known_format)."""
    return known_format(template_format(template))


def known_format(found: ToolCallParser | None) -> ToolCallParser:
    """The format a template names (template_format), else a 400: guessing wrong would return a model's calls as plain
    text."""
    if found is None:
        raise InvalidRequest(
            "this model's chat template renders tools but writes tool calls in no format this server knows "
            f"(it reads {', '.join(PARSERS)}); send the request without 'tools'", param="tools",
            code="unsupported_parameter")
    return found


def template_format(template: str) -> ToolCallParser | None:
    """The known tool-call format a chat template's text names; None when it names none or several."""
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
    return found[0] if len(found) == 1 else None


class ToolCallStream:
    """One streamed choice's text through a parser: feed() gives the content that can be sent now and the pieces of
    calls written so far, finish() the rest once the generation ended (and the whole answer's calls)."""

    def __init__(self, parser: ToolCallParser, max_calls: int | None = None):
        self.parser, self.max_calls = parser, max_calls  # max_calls 1: parallel_tool_calls false
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.in_call = False
        self.arguments_sent: list[str] = []  # per call sent
        self.progress = Progress(final=False)

    def feed(self, delta: str) -> tuple[str, list[CallPiece]]:
        self.text += delta
        if not self.in_call:
            sendable = self.parser.sendable(self.text, self.sent)
            if sendable is None:  # a call may have started: the content is the text before it
                self.in_call = True
                sendable = len(self.text[:self.parser.calls_start(self.text)].rstrip())
            out = self.text[self.sent:sendable]
            self.sent = max(self.sent, sendable)
            if not self.in_call:
                return out, []
            return out, self._pieces(self.parser.calls(self.text, self.progress))
        return "", self._pieces(self.parser.calls(self.text, self.progress))

    def finish(self) -> tuple[str | None, list[CallPiece], tuple[ParsedCall, ...]]:
        """The content not sent yet, the calls' pieces not sent yet, and the whole answer's calls."""
        parsed = self.parser.parse(self.text)
        content = parsed.content if parsed.calls else self.text
        calls = parsed.calls[:self.max_calls]
        return (content or "")[self.sent:] or None, self._pieces(calls), calls

    def _pieces(self, calls: tuple[ParsedCall, ...]) -> list[CallPiece]:
        """What the calls read so far add to those sent: a new call whole as far as it came, or more arguments."""
        pieces = []
        for index, call in enumerate(calls[:self.max_calls]):
            if index == len(self.arguments_sent):
                pieces.append(CallPiece(index, call.name, call.arguments))
                self.arguments_sent.append(call.arguments)
            elif len(call.arguments) > len(self.arguments_sent[index]):
                pieces.append(CallPiece(index, None, call.arguments[len(self.arguments_sent[index]):]))
                self.arguments_sent[index] = call.arguments
        return pieces


@dataclass(frozen=True)
class CallPiece:
    """What one streamed chunk tells of a call: its name in its first piece, then more of its arguments."""

    index: int
    name: str | None
    arguments: str
