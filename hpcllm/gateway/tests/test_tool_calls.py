"""Tool calls read out of model answers (hpcllm.gateway.chat.tool_calls) and the chat answers built from them.

The answers are written as Qwen2.5/Hermes and Llama 3.1 models write their calls; streamed answers are cut into the
devmodel tokenizer's tokens (as a worker sends them) and at every character, and must read as the whole answer does.
"""

from __future__ import annotations

import json
import re
from typing import get_args

import pytest

from hpcllm.config import ToolCallFormat

from hpcllm.devmodels import make_tokenizer
from hpcllm.devmodels.tokenizer import (CHAT_TEMPLATE, HERMES_TOOLS_CHAT_TEMPLATE, MISTRAL_TOOLS_CHAT_TEMPLATE,
                                        QWEN3_CODER_TOOLS_CHAT_TEMPLATE)
from hpcllm.gateway.chat.protocol import ChatCompletionRequest
from hpcllm.gateway.chat.serving import AnswerReader, ChatChoiceStream, chat_choice
from hpcllm.gateway.chat.tool_calls import (PARSERS, CallPiece, NamedCall, ParsedCall, RequiredCalls,
                                            ToolCallStream, parser_for_template)
from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.serving import ChoiceResult, Delta

from .stand_in_worker import token_pieces

HERMES, LLAMA, PYTHONIC, MISTRAL = PARSERS["hermes"], PARSERS["llama3_json"], PARSERS["pythonic"], PARSERS["mistral"]
# Qwen3-Coder's values are text, read by the schema of the request's functions.
WEATHER_PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer"},
    "hourly": {"type": "boolean"}, "spots": {"type": "array", "items": {"type": "string"}},
    "radius": {"anyOf": [{"type": "number"}, {"type": "null"}]}, "zip": {"type": "string"}}}
QWEN3_CODER = PARSERS["qwen3_coder"].for_tools({"get_weather": WEATHER_PARAMETERS,
                                                "get_time": {"type": "object", "properties": {}}})

WEATHER = ParsedCall("get_weather", '{"city": "Paris", "unit": "celsius"}')
TIME = ParsedCall("get_time", '{"timezone": "Europe/Paris"}')

QWEN_TWO_CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
                  '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n'
                  '</tool_call>')
TEXT_THEN_CALL = ('Let me look that up for you.\n\n<tool_call>\n{"name": "get_weather", "arguments": '
                  '{"city": "Paris", "unit": "celsius"}}\n</tool_call>')
# As Qwen3-Coder writes them: the format its template shows, values one per line.
CODER_TWO_CALLS = ('<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=unit>\n'
                   'celsius\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n'
                   '<parameter=timezone>\nEurope/Paris\n</parameter>\n</function>\n</tool_call>')
CODER_TYPED = ('I will check the forecast.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSaint-Denis\nde la '
               'Réunion\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=hourly>\ntrue\n</parameter>\n'
               '<parameter=spots>\n["beach", "port"]\n</parameter>\n<parameter=radius>\nnull\n</parameter>\n'
               '<parameter=zip>\n97400\n</parameter>\n<parameter=note>\n42\n</parameter>\n</function>\n</tool_call>')
CODER_TYPED_CALL = ParsedCall("get_weather", json.dumps(
    {"city": "Saint-Denis\nde la Réunion", "days": 3, "hourly": True, "spots": ["beach", "port"], "radius": None,
     "zip": "97400", "note": "42"}, ensure_ascii=False))
# Mistral's, its markers' text put back by the gateway: tokenizers from v11 on, and before (a JSON list).
MISTRAL_TWO_CALLS = ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]'
                     '{"timezone": "Europe/Paris"}')
MISTRAL_V3_TWO_CALLS = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                        '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]')
PYTHONIC_TWO_CALLS = '[get_weather(city="Paris", unit="celsius"), get_time(timezone="Europe/Paris")]'
LLAMA_TWO_CALLS = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                   '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}')

# (parser, answer, content, calls) - what a whole answer reads as.
ANSWERS = [
    (HERMES, QWEN_TWO_CALLS, None, (WEATHER, TIME)),
    (HERMES, TEXT_THEN_CALL, "Let me look that up for you.", (WEATHER,)),
    # max_tokens (or a stop) right after the JSON: the block is not closed, the call is whole.
    (HERMES, '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}', None, (TIME,)),
    (HERMES, "The weather in Paris is sunny, 21 °C. <tool_ isn't a call", None, ()),
    (HERMES, "", None, ()),
    (LLAMA, LLAMA_TWO_CALLS, None, (WEATHER, TIME)),
    (LLAMA, '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}', None, (TIME,)),
    (LLAMA, '\n\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}\n', None, (WEATHER,)),
    (LLAMA, 'Sure! As JSON: {"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', None, ()),
    (LLAMA, '{"type": "function", "name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', None, (TIME,)),
    # another order of keys: a call once its object is whole (its arguments re-encoded)
    (LLAMA, '{"parameters": {"timezone":"Europe/Paris"}, "name": "get_time"}', None, (TIME,)),
    (LLAMA, "<|python", None, ()),
    (QWEN3_CODER, CODER_TWO_CALLS, None, (WEATHER, TIME)),
    # types from the schema: integer, boolean, array, null; a string stays one though it reads as a number, and a
    # parameter the schema does not name stays text (vLLM's rule)
    (QWEN3_CODER, CODER_TYPED, "I will check the forecast.", (CODER_TYPED_CALL,)),
    # a <function= without <tool_call> (vLLM reads it too); the answer cut off right after </function>
    (QWEN3_CODER, 'Sure.\n<function=get_time>\n<parameter=timezone>\nEurope/Paris\n</parameter>\n</function>', "Sure.",
     (TIME,)),
    (QWEN3_CODER, "<tool_call>\n<function=get_time>\n<parameter=timezone>\nEurope/Paris\n</parameter>\n</function>",
     None, (TIME,)),
    (QWEN3_CODER, "Use <tool_c carefully: <functional> programming is fine.", None, ()),
    (MISTRAL, MISTRAL_TWO_CALLS, None, (WEATHER, TIME)),
    (MISTRAL, MISTRAL_V3_TWO_CALLS, None, (WEATHER, TIME)),
    (MISTRAL, "Let me look.\n\n" + MISTRAL_TWO_CALLS + "</s> and text after", "Let me look.", (WEATHER, TIME)),
    (MISTRAL, '[TOOL_CALLS]get_time{"timezone": "Europe/Paris"}', None, (TIME,)),  # no [ARGS]: vLLM reads it too
    (MISTRAL, '[TOOL_CALLS]get_time{"timezone": "[ARGS]"}', None, (ParsedCall("get_time", '{"timezone": "[ARGS]"}'),)),
    (MISTRAL, "Paris [TOOL is sunny; [ARGS] and [TOOL_CALL are no markers", None, ()),
    (PYTHONIC, PYTHONIC_TWO_CALLS, None, (WEATHER, TIME)),
    (PYTHONIC, '<|python_start|>[get_time(timezone="Europe/Paris")]<|python_end|>', None, (TIME,)),  # Llama 4's tags
    (PYTHONIC, '\n[get_weather(city="Paris", unit="celsius", days=-2, hourly=true, spots=("a", "b"), radius=None)]\n',
     None, (ParsedCall("get_weather", '{"city": "Paris", "unit": "celsius", "days": -2, "hourly": true, '
                                      '"spots": ["a", "b"], "radius": null}'),)),
    (PYTHONIC, "[Note] Paris is sunny today.", None, ()),
    # strings holding what would end a call outside them: quotes, brackets, commas, a marker; read across tokens
    (HERMES, '<tool_call>\n{"name": "write", "arguments": {"path": "a\\\\b", "text": "say \\"</tool_call>\\" {[(,"}}'
             '\n</tool_call>', None,
     (ParsedCall("write", '{"path": "a\\\\b", "text": "say \\"</tool_call>\\" {[(,"}'),)),
    (PYTHONIC, '[write(text="""a, "b") \'c\'\n""", n=[1, (2, 3)], d={"k": \'v\\\'s)\'}), f()]', None,
     (ParsedCall("write", json.dumps({"text": 'a, "b") \'c\'\n', "n": [1, [2, 3]], "d": {"k": "v's)"}},
                                     ensure_ascii=False)), ParsedCall("f", "{}"))),
    (PYTHONIC, 'Calling [get_time(timezone="Europe/Paris")]', None, ()),
]
# Calls begun but unreadable before their name is whole: the whole answer is the content, as vLLM returns it.
BROKEN = [
    (HERMES, '<tool_call>\n{"name": "get_time", "arguments": "Europe/Paris"}\n</tool_call>'),  # not an object
    (HERMES, '<tool_call>\n{"arguments": {"timezone": "Europe/Paris"}}\n</tool_call>'),  # no name
    (HERMES, '<tool_call>\n{"name": "get_wea'),  # cut off inside the name
    (LLAMA, '{"city": "Paris"}'),
    (LLAMA, "<|python_tag|>print(get_time())"),
    (QWEN3_CODER, '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>'),  # JSON
    (QWEN3_CODER, "<tool_call>\n<function=>\n</function>\n</tool_call>"),  # no name
    (QWEN3_CODER, "Checking.\n<tool_call>\n<function=get_ti"),
    (MISTRAL, "[TOOL_CALLS]Sure, here it is{}"),  # no function's name
    (MISTRAL, '[TOOL_CALLS]get_time[ARGS]["Europe/Paris"]'),  # arguments not an object
    (MISTRAL, "Nothing to call. [TOOL_CALLS]"),
    (MISTRAL, "[TOOL_CALLS]get_ti"),
    (PYTHONIC, "[" * 500),
    (PYTHONIC, "[get_ti"),
]
# Calls whose name is whole, then cut short (max_tokens, a stop string) or malformed: calls, each with the arguments
# as far as they came (invalid JSON when cut), the text after them dropped; streamed, they were sent as they came.
CUT = "Checking.\n<tool_call>\n<function=get_time>\n<parameter=timezone>\nEurope/Par"
CUT_OR_MALFORMED = [
    (HERMES, 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>', "Checking.",
     (ParsedCall("get_weather", '{"city": "Paris"\n', complete=False),)),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', None,
     (ParsedCall("get_weather", '{"city": "Par', complete=False),)),
    (HERMES, QWEN_TWO_CALLS.replace('"name": "get_time", ', ""), None, (WEATHER,)),  # the second call has no name
    # a malformed call ends at its block's end (or the next marker), and the calls after it are read
    (HERMES, '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris",</tool_call>\n' + QWEN_TWO_CALLS[-89:],
     None, (ParsedCall("get_weather", '{"city": "Paris",', complete=False), TIME)),
    (MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris",' + MISTRAL_TWO_CALLS[-54:], None,
     (ParsedCall("get_weather", '{"city": "Paris",', complete=False), TIME)),
    (LLAMA, '{"name": "get_weather", "parameters": {"city": "Paris"}', None,
     (ParsedCall("get_weather", '{"city": "Paris"}'),)),
    (LLAMA, '{"name": "get_time", "parameters": {}} and then some text', None, (ParsedCall("get_time", "{}"),)),
    (QWEN3_CODER, CUT, "Checking.", (ParsedCall("get_time", '{"timezone": "Europe/Par', complete=False),)),
    (QWEN3_CODER, CODER_TWO_CALLS[:-40], None,
     (WEATHER, ParsedCall("get_time", '{"timezone": "Europe/Par', complete=False))),
    (MISTRAL, MISTRAL_TWO_CALLS[:-10], None, (WEATHER, ParsedCall("get_time", '{"timezone": "Euro', complete=False))),
    (MISTRAL, MISTRAL_V3_TWO_CALLS.replace('"name": "get_time", ', ""), None, (WEATHER,)),
    (PYTHONIC, PYTHONIC_TWO_CALLS[:-20], None, (WEATHER, ParsedCall("get_time", "{", complete=False))),
    (PYTHONIC, PYTHONIC_TWO_CALLS[:-8], None,
     (WEATHER, ParsedCall("get_time", '{"timezone": "Europe/', complete=False))),
    (PYTHONIC, "[get_time(timezone=tz)]", None, (ParsedCall("get_time", "{", complete=False),)),  # not a literal
    (PYTHONIC, '[get_time("Europe/Paris"), 42]', None, (ParsedCall("get_time", "{}"),)),  # positional: ignored
    (PYTHONIC, '[get_time(timezone="Europe/Paris")] and the weather next', None, (TIME,)),
]
SAMPLES = [(parser, text) for parser, text, _, _ in ANSWERS + CUT_OR_MALFORMED] + BROKEN


@pytest.mark.parametrize("parser, text, content, calls", ANSWERS + CUT_OR_MALFORMED)
def test_whole_answers(parser, text, content, calls):
    parsed = parser.parse(text)
    assert parsed.calls == calls
    assert parsed.content == (content if calls else text)


@pytest.mark.parametrize("parser, text", BROKEN)
def test_a_call_that_does_not_parse_is_returned_as_content(parser, text):
    parsed = parser.parse(text)
    assert parsed.calls == () and parsed.content == text


def _streamed(parser, pieces: list[str]) -> tuple[str, tuple]:
    """The content and calls (name, arguments) a client puts together from the stream of `pieces`; the calls the
    stream's end reads are the same."""
    stream = ToolCallStream(parser)
    content, calls = "", []
    for piece in pieces:
        sent, call_pieces = stream.feed(piece)
        assert not (sent and calls)  # the content comes before the calls
        content += sent
        _add_pieces(calls, call_pieces)
    rest, call_pieces, whole_calls = stream.finish()
    assert not (rest and calls)
    _add_pieces(calls, call_pieces)
    assert [(call.name, call.arguments) for call in whole_calls] == calls
    return content + (rest or ""), tuple(calls)


def _add_pieces(calls: list[tuple[str, str]], pieces) -> None:
    """As an OpenAI client adds up a stream's tool_calls deltas: a new index starts a call, the others add to its
    arguments."""
    for piece in pieces:
        if piece.index == len(calls):
            assert piece.name is not None
            calls.append((piece.name, piece.arguments))
        else:
            assert piece.name is None and piece.index == len(calls) - 1  # only the last call grows
            calls[piece.index] = (calls[piece.index][0], calls[piece.index][1] + piece.arguments)


def _whole(parser, text: str) -> tuple[str, tuple]:
    parsed = parser.parse(text)
    return parsed.content or "", tuple((call.name, call.arguments) for call in parsed.calls)


@pytest.mark.parametrize("parser, text", SAMPLES)
def test_a_stream_cut_anywhere_reads_as_the_whole_answer(parser, text):
    whole = _whole(parser, text)
    for cut in range(len(text) + 1):
        assert _streamed(parser, [text[:cut], text[cut:]]) == whole, cut
    assert _streamed(parser, list(text)) == whole


def test_text_before_a_call_streams_at_once_and_only_a_possible_marker_is_held():
    stream = ToolCallStream(HERMES)
    assert stream.feed("Let me look") == ("Let me look", [])
    assert stream.feed(" that up.") == (" that up.", [])
    assert stream.feed("\n\n<tool") == ("", [])  # may be a call's start: held, with the whitespace before it
    assert stream.feed("box> is a tag") == ("\n\n<toolbox> is a tag", [])  # it was not
    assert stream.feed(" <tool_call>\n{") == ("", [])
    assert stream.finish() == (' <tool_call>\n{', [], ())  # a broken call: the held text comes as content

    llama = ToolCallStream(LLAMA)
    assert llama.feed(" ") == ("", []) and llama.feed("<|python") == ("", [])  # a call may start the answer
    assert llama.feed("ic|> snake") == (" <|pythonic|> snake", [])


def test_a_call_streams_from_its_name_on_and_its_arguments_as_they_come():
    """Nothing is a call before its name is whole (a tail that may be a marker held); then its name, and its
    arguments as written; a call cut short by max_tokens stays one, its arguments as far as they came."""
    stream = ToolCallStream(HERMES)
    assert stream.feed('Sure.\n<tool_call>\n{"name": "write_file", "argu') == ("Sure.", [])
    assert stream.feed('ments": {"path": "a.py", "text": "x = \\"') == ("", [
        CallPiece(0, "write_file", '{"path": "a.py", "text": "x = \\"')])
    assert stream.feed('\u00e9\\"\\n</tool_') == ("", [CallPiece(0, None, '\u00e9\\"\\n')])  # </tool_ may end it
    assert stream.feed("call> in a string") == ("", [CallPiece(0, None, "</tool_call> in a string")])
    rest, pieces, calls = stream.finish()
    assert (rest, pieces) == (None, [])
    assert calls == (ParsedCall("write_file", '{"path": "a.py", "text": "x = \\"\u00e9\\"\\n</tool_call> in a string',
                                complete=False),)


def test_every_format_a_model_config_may_name_is_read():
    assert sorted(PARSERS) == sorted(get_args(ToolCallFormat))


def test_parsers_are_chosen_from_the_chat_template():
    assert parser_for_template(HERMES_TOOLS_CHAT_TEMPLATE) is HERMES
    # Llama 3.1's template: JSON calls with "parameters", built-in tools after <|python_tag|>.
    llama31 = ('{{- "<|start_header_id|>" + message.role + "<|end_header_id|>\\n\\n" }}{{- "<|python_tag|>" }}'
               '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and '
               'its value}.\' }}')
    assert parser_for_template(llama31) is LLAMA
    # Llama 3.2's has no <|python_tag|> but the same JSON format.
    assert parser_for_template(llama31.replace('{{- "<|python_tag|>" }}', "")) is LLAMA
    # Llama 4's (its JSON calls after <|python_start|>, a special token the worker leaves out)
    llama4 = ('{{- \'<|header_start|>\' + message[\'role\'] + \'<|header_end|>\\n\\n\' }}{{- \'Respond in the format '
              '{"name": function name, "parameters": dictionary of argument name and its value}.\' }}')
    assert parser_for_template(llama4) is LLAMA
    assert parser_for_template(QWEN3_CODER_TOOLS_CHAT_TEMPLATE).name == "qwen3_coder"
    # vLLM's Llama 3.2 / Llama 4 pythonic templates (a Llama header, and the calls' format shown by example)
    pythonic = ('{{- "<|start_header_id|>" + message.role + "<|end_header_id|>\\n\\n" }}{{- "If you decide to invoke '
                'any of the function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, '
                'params_name2=params_value2...), func_name2(params)]" }}')
    assert parser_for_template(pythonic) is PYTHONIC
    assert parser_for_template(MISTRAL_TOOLS_CHAT_TEMPLATE) is MISTRAL


@pytest.mark.parametrize("template", [
    CHAT_TEMPLATE,
    # Mistral's calls and hermes' named together
    MISTRAL_TOOLS_CHAT_TEMPLATE + "<tool_call>",
    # both formats named: which one the model writes is a guess
    HERMES_TOOLS_CHAT_TEMPLATE + '<|start_header_id|>{"name": ..., "parameters": ...}',
])
def test_a_template_with_no_known_call_format_is_refused(template):
    with pytest.raises(InvalidRequest) as refused:
        parser_for_template(template)
    assert refused.value.param == "tools" and "no format this server knows" in refused.value.message


# ----------------------------------------------------------------------------------- answers built for clients
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
         for name in ("get_weather", "get_time")]


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "weather and time in Paris?"}], "tools": TOOLS,
         **fields})


def _token_deltas(text: str, finish_reason: str, template: str = "hermes-tools") -> list[Delta]:
    """The answer as a worker streams it: one delta per token of the devmodel tokenizer, then the finish."""
    return [Delta(0, piece) for _, piece in token_pieces(make_tokenizer(template), text)] + [
        Delta(0, "", finish_reason)]


def _streamed_message(req: ChatCompletionRequest, deltas: list[Delta], parser=None) -> dict:
    """The message a client puts together from the chunks of a streamed choice; what it had before the last chunk
    (content, and the calls' arguments: `before_the_end`)."""
    stream = ChatChoiceStream(AnswerReader(parser or (HERMES if req.parses_tool_calls else None)), req)
    chunks = [choice.model_dump(exclude_none=True) for delta in deltas[:-1] for choice in stream.choices(delta)]
    early = _message_of(chunks)
    chunks += [choice.model_dump(exclude_none=True) for choice in stream.choices(deltas[-1])]
    assert [c.get("finish_reason") for c in chunks][:-1] == [None] * (len(chunks) - 1)
    return {**_message_of(chunks), "finish_reason": chunks[-1]["finish_reason"],
            "before_the_end": early["content"] or "",
            "arguments_before_the_end": [call["function"]["arguments"] for call in early["tool_calls"]]}


# A call's id: OpenAI's shape; a mistral format model's, the 9 letters or digits Mistral's templates take back.
OPENAI_CALL_ID, MISTRAL_CALL_ID = r"call_[0-9a-f]{24}", r"[A-Za-z0-9]{9}"


def _message_of(chunks: list[dict], call_id: str = OPENAI_CALL_ID) -> dict:
    """As OpenAI's clients add chunks up: content pieces joined, a tool_calls delta with a new index a new call (its
    id, of the format's shape `call_id`, type and name), one with an index seen adds to that call's arguments."""
    content = [c["delta"]["content"] for c in chunks if "content" in c["delta"]]
    calls: list[dict] = []
    for piece in (call for c in chunks for call in c["delta"].get("tool_calls", [])):
        if piece["index"] == len(calls):
            assert re.fullmatch(call_id, piece["id"]) and piece["type"] == "function" and piece["function"]["name"]
            calls.append({**piece, "function": dict(piece["function"])})
        else:
            assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
            calls[piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
    return {"content": "".join(content) if content else None, "tool_calls": calls}


def _without_ids(calls: list[dict]) -> list[dict]:
    for call in calls:
        assert re.fullmatch(OPENAI_CALL_ID, call["id"]) and call["type"] == "function"
    return [{"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}
            for call in calls]


@pytest.mark.parametrize("finish_reason", ["stop", "length"])
def test_calls_answer_as_openais_tool_calls_streamed_or_not(finish_reason):
    req = _request()
    text = "Let me check both.\n" + QWEN_TWO_CALLS
    choice = chat_choice(ChoiceResult(0, text, finish_reason), AnswerReader(HERMES), req).model_dump()
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me check both."
    assert _without_ids(message["tool_calls"]) == [
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
        {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]
    assert len({call["id"] for call in message["tool_calls"]}) == 2

    streamed = _streamed_message(req, _token_deltas(text, finish_reason))
    assert streamed["content"] == message["content"]
    assert _without_ids(streamed["tool_calls"]) == _without_ids(message["tool_calls"])
    assert [call["index"] for call in streamed["tool_calls"]] == [0, 1]
    assert streamed["finish_reason"] == "tool_calls"
    assert streamed["before_the_end"] == "Let me check both."  # sent as generated, not held to the end
    # the calls too: whole before the generation's end (its last delta)
    assert streamed["arguments_before_the_end"] == [call["function"]["arguments"] for call in streamed["tool_calls"]]


def test_parallel_tool_calls_false_returns_the_first_call_only():
    req = _request(parallel_tool_calls=False)
    message = chat_choice(ChoiceResult(0, QWEN_TWO_CALLS, "stop"), AnswerReader(HERMES),
                          req).model_dump()["message"]
    assert message["content"] is None and [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    streamed = _streamed_message(req, _token_deltas(QWEN_TWO_CALLS, "stop"))
    assert [c["function"]["name"] for c in streamed["tool_calls"]] == ["get_weather"]


@pytest.mark.parametrize("fields, text", [
    ({"tool_choice": "none"}, QWEN_TWO_CALLS),  # calls are not read with tool_choice "none" (as vLLM)
    ({}, BROKEN[0][1]),
    ({}, "It is sunny in Paris."),
])
def test_answers_without_calls_are_plain_content(fields, text):
    req = _request(**fields)
    parser = HERMES if req.parses_tool_calls else None
    choice = chat_choice(ChoiceResult(0, text, "length"), AnswerReader(parser), req).model_dump()
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == text and choice["message"]["tool_calls"] == []
    streamed = _streamed_message(req, _token_deltas(text, "length"))
    assert (streamed["content"], streamed["tool_calls"], streamed["finish_reason"]) == (text, [], "length")


# tool_choice "required": the answer constrained to a list of {"name", "parameters"} (as ChatCompletionRequest's
# forced_calls_schema writes it).
REQUIRED_TWO_CALLS = ('[{"name":"get_weather","parameters":{"city":"Paris","unit":"celsius"}},'
                      '{"name":"get_time","parameters":{"timezone":"Europe/Paris"}}]')


def test_a_required_answer_is_its_calls_streamed_or_not():
    req = _request(tool_choice="required")
    calls = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
             {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]
    choice = chat_choice(ChoiceResult(0, REQUIRED_TWO_CALLS, "stop"), AnswerReader(RequiredCalls()),
                         req).model_dump()
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert _without_ids(choice["message"]["tool_calls"]) == calls
    streamed = _streamed_message(req, _token_deltas(REQUIRED_TWO_CALLS, "stop"), RequiredCalls())
    assert (streamed["content"], streamed["finish_reason"]) == (None, "tool_calls")
    assert _without_ids(streamed["tool_calls"]) == calls
    assert streamed["arguments_before_the_end"] == [  # as generated (the parameters' JSON text), not at the end
        '{"city":"Paris","unit":"celsius"}', '{"timezone":"Europe/Paris"}']


def test_a_named_functions_call_streams_its_arguments_as_they_come():
    """As vLLM: one call, its arguments the answer, each token's text a chunk; the first with id, type and name;
    finish_reason "stop" (OpenAI's and vLLM's for a named function)."""
    req = _request(tool_choice={"type": "function", "function": {"name": "get_time"}})
    text = '{"timezone":"Europe/Paris"}'
    choice = chat_choice(ChoiceResult(0, text, "stop"), AnswerReader(NamedCall("get_time")), req).model_dump()
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None
    assert _without_ids(choice["message"]["tool_calls"]) == [{"name": "get_time", "arguments": json.loads(text)}]
    deltas = _token_deltas(text, "stop")
    stream = ChatChoiceStream(AnswerReader(NamedCall("get_time")), req)
    chunks = [[c.model_dump(exclude_none=True) for c in stream.choices(delta)] for delta in deltas]
    assert all(len(sent) == 1 for sent in chunks[:-1]) and len(deltas) > 3  # a chunk per token, not held
    pieces = [sent[0]["delta"]["tool_calls"][0] for sent in chunks[:-1]]
    first, *rest = pieces
    assert first["id"].startswith("call_") and first["type"] == "function" and first["function"]["name"] == "get_time"
    assert all(set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"} for piece in rest)
    assert "".join(piece["function"]["arguments"] for piece in pieces) == text
    assert chunks[-1] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    empty = list(ChatChoiceStream(AnswerReader(NamedCall("get_time")), req).choices(Delta(0, "", "length")))
    assert empty[0].delta.tool_calls[0].function.name == "get_time" and empty[-1].finish_reason == "length"


def test_a_forced_answer_cut_by_max_tokens_ends_with_length():
    """As vLLM: the call's arguments as far as they came, the generation's finish_reason saying it was cut; a
    `required` answer's calls so far likewise, streamed or not."""
    cut = REQUIRED_TWO_CALLS[:108]
    required = _request(tool_choice="required")
    choice = chat_choice(ChoiceResult(0, cut, "length"), AnswerReader(RequiredCalls()), required)
    calls = [("get_weather", '{"city":"Paris","unit":"celsius"}'), ("get_time", '{"tim')]
    assert (choice.finish_reason, choice.message.content) == ("length", None)
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == calls
    streamed = _streamed_message(required, _token_deltas(cut, "length"), RequiredCalls())
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed["tool_calls"]] == calls
    assert (streamed["content"], streamed["finish_reason"]) == (None, "length")
    # cut between two calls (or in the second's name): the first whole, but the list was not: more may have come
    for between in (REQUIRED_TWO_CALLS[:70], REQUIRED_TWO_CALLS[:84]):
        choice = chat_choice(ChoiceResult(0, between, "length"), AnswerReader(RequiredCalls()), required)
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        assert choice.finish_reason == "length", between
        streamed = _streamed_message(required, _token_deltas(between, "length"), RequiredCalls())
        assert (len(streamed["tool_calls"]), streamed["finish_reason"]) == (1, "length")
    named = _request(tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = chat_choice(ChoiceResult(0, '{"timezone":"Eur', "length"), AnswerReader(NamedCall("get_time")),
                         named)
    assert choice.finish_reason == "length"
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_time", '{"timezone":"Eur')]


DEFS_TOOL = {"type": "function", "function": {"name": "move", "parameters": {
    "type": "object", "properties": {"to": {"$ref": "#/$defs/place"}}, "$defs": {"place": {"enum": ["a", "b"]}}}}}


def test_required_with_functions_that_use_defs():
    req = _request(tools=[*TOOLS, DEFS_TOOL], tool_choice="required")
    req.check_supported()  # the $defs moved to the top of the list's schema: its $ref still resolves
    assert req.forced_calls_schema()["$defs"] == {"place": {"enum": ["a", "b"]}}
    assert "$defs" in DEFS_TOOL["function"]["parameters"]  # the request's tools are left as they were
    other = {"type": "function", "function": {"name": "jump", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/place"}}, "$defs": {"place": {"enum": ["c"]}}}}}
    with pytest.raises(InvalidRequest) as caught:
        _request(tools=[DEFS_TOOL, other], tool_choice="required").check_supported()
    assert caught.value.param == "tools[1]" and "place" in caught.value.message


# A tree: "#" is the function's own parameters schema (JSON Schema's root reference).
TREE_TOOL = {"type": "function", "function": {"name": "plant", "parameters": {
    "type": "object", "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}},
    "required": ["name", "children"], "additionalProperties": False}}}


def test_required_with_a_function_whose_schema_refers_to_its_own_root():
    """The answer's schema nests each function's parameters in a list of calls: a reference to the root ("#",
    "#/properties/...") still means the function's schema, so a nested tree is a valid call and a list of calls
    in its place is not."""
    from hpcllm.worker.grammar import GrammarState, grammar_compiler

    req = _request(tools=[*TOOLS, TREE_TOOL], tool_choice="required")
    req.check_supported()
    tokenizer = make_tokenizer("hermes-tools")
    compiler, grammar = grammar_compiler(tokenizer), req.constraint().grammar()

    def allowed(answer: str) -> bool:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        return GrammarState(grammar, compiler, []).extend(ids) is None

    assert allowed('[{"name":"plant","parameters":{"name":"a","children":[{"name":"b","children":[]}]}}]')
    calls_in_place = '[{"name":"get_time","parameters":{}}]'
    assert not allowed('[{"name":"plant","parameters":{"name":"a","children":[' + calls_in_place + ']}}]')
    assert allowed('[{"name":"get_time","parameters":{"zone":1}}]')  # the other functions as before
    assert "$defs" not in TREE_TOOL["function"]["parameters"]  # the request's tools are left as they were
    anchored = {"type": "function", "function": {"name": "tag", "parameters": {  # "#name": an anchor, no pointer
        "type": "object", "properties": {"x": {"$ref": "#level"}, "y": {"$ref": "#"}},
        "$defs": {"level": {"$anchor": "level", "enum": [1, 2]}}}}}
    _request(tools=[anchored], tool_choice="required").check_supported()


def test_messages_reach_the_template_as_templates_read_them():
    """Arguments as objects (templates `tojson` them), no tool_calls key on other messages (Llama's and Hermes'
    templates test `'tool_calls' in message`), a tool answer named after the call it answers (Hermes' templates
    require the name; OpenAI clients do not send it)."""
    req = _request(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
        {"role": "tool", "tool_call_id": "call_a", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "tool", "tool_call_id": "call_x", "name": "lookup", "content": "?"},
    ])
    assert req.template_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "12:00", "tool_call_id": "call_b", "name": "get_time"},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_a", "name": "get_weather"},
        {"role": "tool", "content": "?", "tool_call_id": "call_x", "name": "lookup"},
    ]
    assert req.template_tools() == TOOLS
