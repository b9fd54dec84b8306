"""POST /v1/responses (OpenAI's Responses API) with the official openai client, through a real gateway and worker:
the answer is the chat completion of the same conversation (greedy text as transformers generates it on the chat
template, the same prompt token count), streamed as OpenAI's typed events; tool calls become function_call items
(built from constructed chat answers, as test_tool_calls does: the tiny model writes random text, never a call)."""

from __future__ import annotations

import json
import re

import openai
import pydantic
import pytest

from hpcllm.gateway.chat.serving import AnswerReader, ChatChoiceStream, chat_choice
from hpcllm.gateway.chat.tool_calls import PARSERS, NamedCall, RequiredCalls
from hpcllm.gateway.errors import ServiceUnavailable
from hpcllm.gateway.protocol import UsageInfo, unsupported
from hpcllm.gateway.responses.protocol import ResponsesRequest, renamed_for_responses
from hpcllm.gateway.responses.serving import ResponseBuilder
from hpcllm.gateway.serving import ChoiceResult, Delta
from hpcllm.worker.tests.schemas import PERSON_SCHEMA, check_person

from .conftest import MODEL, GatewayFactory
from .test_errors import assert_error
from .test_openai_api import chat_prompt_ids, hf_greedy
# gw: a gateway serving TOOLS_MODEL too, whose chat template renders tools (and the fixtures it needs)
from .test_tool_calling_api import ROUND, TOOLS_MODEL, WEATHER_TOOL, gw, prompt_tokens, tools_model_dir  # noqa: F401
from .test_tool_calling_api import ASK, PAINT_TOOL, TRIP_TOOL, check_arguments
from .test_tool_calling_api import tools_tokenizer  # noqa: F401
from .test_tool_calls import QWEN_TWO_CALLS, REQUIRED_TWO_CALLS, _token_deltas

INSTRUCTIONS = "be brief"
QUESTION = "hello world"
MESSAGES = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
FUNCTION_TOOL = {"type": "function", **WEATHER_TOOL["function"]}  # the Responses shape: no "function" level


def test_a_response_is_the_chat_answer_of_its_instructions_and_input(gateway, hf_pair):
    prompt_ids = chat_prompt_ids(hf_pair, MESSAGES)
    text, finish, tokens = hf_greedy(hf_pair, prompt_ids, 20)
    resp = gateway.client().responses.create(model=MODEL, instructions=INSTRUCTIONS, input=QUESTION,
                                             max_output_tokens=20, temperature=0, metadata={"run": "1"})
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == MODEL
    assert resp.output_text == text and text
    assert resp.status == ("completed" if finish == "stop" else "incomplete")
    message, = resp.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [part.type for part in message.content] == ["output_text"] and message.content[0].annotations == []
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (len(prompt_ids), tokens)
    assert resp.usage.total_tokens == len(prompt_ids) + tokens
    assert resp.usage.input_tokens_details.cached_tokens == 0
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    assert (resp.instructions, resp.max_output_tokens, resp.temperature) == (INSTRUCTIONS, 20, 0)
    assert resp.metadata == {"run": "1"} and resp.tools == [] and resp.tool_choice == "auto"

    chat = gateway.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    assert resp.usage.input_tokens == chat.usage.prompt_tokens  # the same rendering of the same conversation
    assert resp.output_text == chat.choices[0].message.content


def test_input_items_are_the_chat_messages_they_name(gateway, hf_pair):
    messages = [{"role": "system", "content": "answer in French"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "bonjour"}, {"role": "user", "content": "and again"}]
    items = [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "answer in French"}]},
             {"role": "user", "content": [{"type": "input_text", "text": "hel"}, {"type": "input_text", "text": "lo"}]},
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "bonjour", "annotations": []}]},
             {"role": "user", "content": "and again"}]
    text, _, _ = hf_greedy(hf_pair, chat_prompt_ids(hf_pair, messages), 12)
    resp = gateway.client().responses.create(model=MODEL, input=items, max_output_tokens=12, temperature=0)
    assert resp.usage.input_tokens == len(chat_prompt_ids(hf_pair, messages))
    assert resp.output_text == text


def test_max_output_tokens_reached_is_an_incomplete_response(gateway, hf_pair):
    assert hf_greedy(hf_pair, chat_prompt_ids(hf_pair, MESSAGES), 2)[1] == "length"  # the model goes on past 2
    resp = gateway.client().responses.create(model=MODEL, instructions=INSTRUCTIONS, input=QUESTION,
                                             max_output_tokens=2, temperature=0)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete" and resp.usage.output_tokens == 2


def _stream_events(gateway, **body) -> list:
    return list(gateway.client().responses.create(model=MODEL, instructions=INSTRUCTIONS, input=QUESTION,
                                                  temperature=0, stream=True, **body))


def test_a_streamed_response_sends_openais_events_and_the_same_answer(gateway, hf_pair):
    prompt_ids = chat_prompt_ids(hf_pair, MESSAGES)
    text, finish, tokens = hf_greedy(hf_pair, prompt_ids, 16)
    events = _stream_events(gateway, max_output_tokens=16)
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    status = "completed" if finish == "stop" else "incomplete"
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * deltas + [
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     f"response.{status}"]
    assert deltas >= 1 and [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    item_id = events[2].item.id
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == text and events[-4].text == text
    assert all(e.item_id == item_id for e in events if e.type.startswith("response.output_text"))
    final = events[-1].response
    assert final.id == events[0].response.id and final.status == status
    assert final.output_text == text and final.output[0].id == item_id
    assert (final.usage.input_tokens, final.usage.output_tokens) == (len(prompt_ids), tokens)


def test_the_clients_stream_helper_reads_the_events(gateway, hf_pair):
    """responses.stream() checks each event against what it accumulated (an item's identity, its output index); it
    hands out the final response for response.completed only, and the tiny model never stops on its own."""
    text, _, _ = hf_greedy(hf_pair, chat_prompt_ids(hf_pair, MESSAGES), 10)
    with gateway.client().responses.stream(model=MODEL, instructions=INSTRUCTIONS, input=QUESTION,
                                           max_output_tokens=10, temperature=0) as stream:
        events = list(stream)
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == text
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == text


def test_a_streamed_response_is_raw_sse_with_event_lines(gateway):
    resp = gateway.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2,
                                               "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = resp.text.split("\n\n")
    assert events[-1] == ""
    for event in events[:-1]:
        name, data = event.split("\n")
        assert name.startswith("event: ") and data.startswith("data: {")
        assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")


def test_function_call_outputs_reach_the_chat_template(gw, tools_tokenizer):  # noqa: F811
    items = [{"role": "user", "content": ROUND[0]["content"]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}]
    resp = gw.post("/v1/responses", json={"model": TOOLS_MODEL, "input": items, "tools": [FUNCTION_TOOL],
                                                     "max_output_tokens": 4, "temperature": 0})
    assert resp.status_code == 200, resp.text
    text, expected = prompt_tokens(tools_tokenizer, ROUND, [WEATHER_TOOL])
    assert "sunny, 21 C" in text and '"name": "get_weather"' in text
    assert resp.json()["usage"]["input_tokens"] == expected
    chat = gw.post("/v1/chat/completions", json={"model": TOOLS_MODEL, "messages": ROUND,
                                                            "tools": [WEATHER_TOOL], "max_tokens": 4})
    assert chat.json()["usage"]["prompt_tokens"] == expected
    assert resp.json()["tools"] == [{**FUNCTION_TOOL, "strict": None}]


CALL_ANSWER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
FINAL_ANSWER = "It is sunny in Paris."


@pytest.fixture
def calling_gateway(tmp_path, tools_model_dir, tools_tokenizer):  # noqa: F811
    """A gateway serving TOOLS_MODEL from a stand-in worker that answers as a tool-calling model would (the tiny
    model never writes a call): a call of get_weather, or once the prompt holds the tool's answer, the final text,
    in 5-character tokens ending with "stop". The prompts it was sent are in the gateway's `worker_prompts`."""
    from flask import Flask, Response, request

    from hpcllm.httpkit.tests.thread_server import ThreadServer
    from hpcllm.worker.protocol import GENERATE_PATH, FinalLine, GenerateRequest, TokenLine, Usage

    app = Flask("calling-worker")
    prompts: list[list[int]] = []

    @app.post(GENERATE_PATH)
    def generate():
        req = GenerateRequest.model_validate_json(request.get_data())
        prompts.append(req.prompt_token_ids)
        answer = FINAL_ANSWER if "sunny" in tools_tokenizer.decode(req.prompt_token_ids) else CALL_ANSWER
        pieces = [answer[i:i + 5] for i in range(0, len(answer), 5)]
        usage = Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=len(pieces),
                      total_tokens=len(req.prompt_token_ids) + len(pieces))
        lines = [TokenLine(index=i, token_id=100, text=piece) for i, piece in enumerate(pieces)]
        body = "".join(line.model_dump_json() + "\n" for line in [*lines, FinalLine(finish_reason="stop",
                                                                                    usage=usage)])
        return Response(body, mimetype="application/x-ndjson")

    @app.get("/ready")
    def ready():
        return {"status": "ready"}

    worker = ThreadServer(app)
    factory = GatewayFactory(tmp_path, worker.url, tools_model_dir)
    gateway = factory(static_models={TOOLS_MODEL: {"worker_url": worker.url, "source": str(tools_model_dir)}})
    gateway.worker_prompts = prompts
    yield gateway
    factory.stop_all()
    worker.stop()


def test_a_tool_round_with_the_openai_client(calling_gateway):
    """The Agents SDK's loop: the answer's call as a function_call item, sent back with the tool's output, then
    the final answer; streamed, the client's stream helper reads the events into the completed response."""
    client = calling_gateway.client()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.responses.create(model=TOOLS_MODEL, input=ask, tools=[FUNCTION_TOOL])
    call, = first.output
    assert (call.type, call.name, json.loads(call.arguments), first.status) == (
        "function_call", "get_weather", {"city": "Paris"}, "completed")
    round_trip = ask + [call.model_dump(exclude_none=True),
                        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}]
    with client.responses.stream(model=TOOLS_MODEL, input=round_trip, tools=[FUNCTION_TOOL]) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == FINAL_ANSWER
    with client.responses.stream(model=TOOLS_MODEL, input=ask, tools=[FUNCTION_TOOL]) as stream:
        streamed_call, = stream.get_final_response().output
    assert (streamed_call.type, streamed_call.name, streamed_call.arguments) == ("function_call", call.name,
                                                                                 call.arguments)


def test_a_call_named_as_the_model_wrote_it_is_sent_back_as_it_came(calling_gateway, monkeypatch):
    """The parsers take any non-empty name a model writes (Hermes models often write "functions.get_weather"):
    OpenAI's manual tool loop sends the answer's output back as it came (input += response.output) and gets the
    next answer; an empty name names nothing, a 422."""
    monkeypatch.setitem(globals(), "CALL_ANSWER", CALL_ANSWER.replace('"get_weather"', '"functions.get_weather"'))
    client = calling_gateway.client()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.responses.create(model=TOOLS_MODEL, input=ask, tools=[FUNCTION_TOOL])
    call, = first.output
    assert (call.type, call.name) == ("function_call", "functions.get_weather")
    round_trip = ask + [item.model_dump(exclude_none=True) for item in first.output] + [
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}]
    final = client.responses.create(model=TOOLS_MODEL, input=round_trip, tools=[FUNCTION_TOOL])
    assert final.output_text == FINAL_ANSWER
    sent_back = [item for item in client.responses.input_items.list(final.id).data if item.type == "function_call"]
    assert [item.name for item in sent_back] == ["functions.get_weather"]
    unnamed = {**round_trip[1], "name": ""}
    assert_error(calling_gateway.post("/v1/responses", json={"model": TOOLS_MODEL, "input": [unnamed]}), 422,
                 "invalid_value", "input[0]")


@pytest.mark.parametrize("tool_choice, name", [("required", None), ({"type": "function", "name": "paint"}, "paint")])
def test_a_forced_tool_choice_answers_with_function_call_items(gw, tool_choice, name):  # noqa: F811
    """tool_choice "required" or a named function: chat's forced calls (test_tool_calling_api), whole and streamed."""
    tools = [{"type": "function", **tool["function"]} for tool in (TRIP_TOOL, PAINT_TOOL)]
    args = dict(model=TOOLS_MODEL, input=ASK, tools=tools, tool_choice=tool_choice, temperature=0)  # no seed here
    client = gw.client()
    whole = client.responses.create(**args)
    assert whole.status == "completed" and whole.output
    for item in whole.output:
        assert item.type == "function_call" and item.name == (name or item.name)
        check_arguments(item.name, item.arguments)
    with client.responses.stream(**args) as stream:
        deltas: dict[int, str] = {}
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas[event.output_index] = deltas.get(event.output_index, "") + event.delta
        streamed = stream.get_final_response()
    assert [item.type for item in streamed.output] == ["function_call"] * len(streamed.output)
    for item in streamed.output:
        check_arguments(item.name, item.arguments)
    # the calls' arguments as they are generated, pieces that join to each call's arguments (how many pieces depends
    # on how many tokens reach the gateway at once: test_tool_formats_api counts them with one token per read)
    assert deltas == {i: item.arguments for i, item in enumerate(streamed.output)}


def _request(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "weather and time in Paris?",
                                            "tools": [FUNCTION_TOOL, {**FUNCTION_TOOL, "name": "get_time"}],
                                            **fields})


CALLS = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
         {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]


def _calls(items: list[dict]) -> list[dict]:
    for item in items:
        assert item["id"].startswith("fc_") and item["call_id"].startswith("call_") and item["status"] == "completed"
    return [{"name": item["name"], "arguments": json.loads(item["arguments"])} for item in items]


def test_tool_calls_in_the_answer_are_function_call_items():
    req = _request()
    text = "Let me check both.\n" + QWEN_TWO_CALLS
    choice = chat_choice(ChoiceResult(0, text, "stop"), AnswerReader(PARSERS["hermes"]), req.to_chat())
    body = ResponseBuilder(req, "resp_1", 0).whole(choice, UsageInfo(prompt_tokens=5, completion_tokens=7,
                                                                       total_tokens=12))
    message, *calls = body["output"]
    assert message["type"] == "message" and message["content"][0]["text"] == "Let me check both."
    assert [item["type"] for item in calls] == ["function_call"] * 2 and _calls(calls) == CALLS
    assert body["status"] == "completed" and body["usage"]["total_tokens"] == 12
    openai.types.responses.Response.model_validate(body)  # the client's own type reads it

    only_calls = chat_choice(ChoiceResult(0, QWEN_TWO_CALLS, "stop"), AnswerReader(PARSERS["hermes"]),
                             req.to_chat())
    assert [item["type"] for item in ResponseBuilder(req, "resp_2", 0).whole(only_calls, UsageInfo())["output"]] == [
        "function_call", "function_call"]


def _events(stream: bytes) -> list[dict]:
    return [json.loads(event.split("\ndata: ")[1]) for event in stream.decode().split("\n\n") if event]


def test_streamed_tool_calls_are_function_call_events_after_the_text():
    req = _request(stream=True)
    chat_req = req.to_chat()
    text = "Let me check both.\n" + QWEN_TWO_CALLS
    stream = ResponseBuilder(req, "resp_1", 0).events(
        iter(_token_deltas(text, "stop")), ChatChoiceStream(AnswerReader(PARSERS["hermes"]), chat_req), UsageInfo,
        "request-1")
    events = _events(b"".join(stream))
    kinds = [event["type"] for event in events]
    message_done = kinds.index("response.output_item.done")
    assert "".join(e["delta"] for e in events[:message_done] if e["type"] == "response.output_text.delta") == (
        "Let me check both.")
    calls = "".join({"response.output_item.added": "(", "response.function_call_arguments.delta": "d",
                     "response.function_call_arguments.done": "=", "response.output_item.done": ")",
                     "response.completed": "."}[kind] for kind in kinds[message_done + 1:])
    assert re.fullmatch(r"(\(dd+=\)){2}\.", calls), calls  # each call's arguments in several deltas, as generated
    for done in (e for e in events if e["type"] == "response.function_call_arguments.done"):
        deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
                  and e["item_id"] == done["item_id"]]
        assert "".join(deltas) == done["arguments"]
    added = [e["item"] for e in events[message_done + 1:] if e["type"] == "response.output_item.added"]
    assert [(item["type"], item["arguments"], item["status"]) for item in added] == [
        ("function_call", "", "in_progress")] * 2
    done = [e["item"] for e in events[message_done + 1:] if e["type"] == "response.output_item.done"]
    assert _calls(done) == CALLS
    assert [e["output_index"] for e in events if e["type"].endswith("arguments.done")] == [1, 2]
    final = events[-1]["response"]
    assert final["output"][1:] == done and final["output"][0]["content"][0]["text"] == "Let me check both."
    for event in events:  # each as the client's own event types read it
        pydantic.TypeAdapter(openai.types.responses.ResponseStreamEvent).validate_python(event)


def test_a_call_cut_short_is_an_incomplete_function_call_item_whole_and_streamed():
    """max_output_tokens reached inside a call's arguments: the call is still one (streamed from its name on), its
    arguments as far as they came; the response and that item are "incomplete"."""
    req = _request(stream=True)
    text = "Let me check.\n" + QWEN_TWO_CALLS[:-20]
    chat_req = req.to_chat()
    whole = ResponseBuilder(req, "resp_1", 0).whole(
        chat_choice(ChoiceResult(0, text, "length"), AnswerReader(PARSERS["hermes"]), chat_req), UsageInfo())
    events = _events(b"".join(ResponseBuilder(req, "resp_2", 0).events(
        iter(_token_deltas(text, "length")), ChatChoiceStream(AnswerReader(PARSERS["hermes"]), chat_req), UsageInfo,
        "request-1")))
    streamed = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete"
    for response in whole, streamed:
        assert response["status"] == "incomplete"
        assert [(item["type"], item.get("name"), item["status"]) for item in response["output"]] == [
            ("message", None, "completed"), ("function_call", "get_weather", "completed"),
            ("function_call", "get_time", "incomplete")]
    cut = streamed["output"][-1]
    assert cut["arguments"] == whole["output"][-1]["arguments"] == '{"timezone": "Europe/P'
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
              and e["item_id"] == cut["id"]]
    assert len(deltas) > 1 and "".join(deltas) == cut["arguments"]


@pytest.mark.parametrize("tool_choice, text, parser, statuses", [
    # cut between two calls: the response is incomplete (more calls may have followed), its one call is whole
    ("required", REQUIRED_TWO_CALLS[:70], RequiredCalls(), ["completed"]),
    ("required", REQUIRED_TWO_CALLS[:108], RequiredCalls(), ["completed", "incomplete"]),  # in the second's arguments
    ({"type": "function", "name": "get_time"}, '{"timezone": "Eur', NamedCall("get_time"), ["incomplete"]),
])
def test_a_forced_answer_cut_short_marks_only_a_cut_call_incomplete(tool_choice, text, parser, statuses):
    """max_output_tokens ending a forced answer: the response is "incomplete"; a function_call item is "incomplete"
    only when its own arguments were cut, whole and streamed."""
    req = _request(stream=True, tool_choice=tool_choice)
    chat_req = req.to_chat()
    whole = ResponseBuilder(req, "resp_1", 0).whole(
        chat_choice(ChoiceResult(0, text, "length"), AnswerReader(parser), chat_req), UsageInfo())
    events = _events(b"".join(ResponseBuilder(req, "resp_2", 0).events(
        iter(_token_deltas(text, "length")), ChatChoiceStream(AnswerReader(parser), chat_req), UsageInfo,
        "request-1")))
    for response in whole, events[-1]["response"]:
        assert response["status"] == "incomplete"
        assert [(item["type"], item["status"]) for item in response["output"]] == [
            ("function_call", status) for status in statuses]


def test_an_error_mid_stream_is_an_error_event():
    req = _request(stream=True)

    def failing_deltas():
        yield Delta(0, "Let me")
        raise ServiceUnavailable("generation interrupted", code="worker_lost")

    events = _events(b"".join(ResponseBuilder(req, "resp_1", 0).events(
        failing_deltas(), ChatChoiceStream(AnswerReader(), req.to_chat()), UsageInfo, "request-1")))
    assert events[-1] == {"type": "error", "sequence_number": len(events) - 1, "code": "worker_lost",
                          "message": "generation interrupted", "param": None}
    assert [e["type"] for e in events][-2] == "response.output_text.delta"


def test_text_format_json_schema_constrains_the_answer_whole_and_streamed(gateway):
    """text.format is chat's response_format (its json_schema fields flat): the answer is JSON valid against the
    schema, which the tiny model's random weights never write by themselves."""
    person = {"type": "json_schema", "name": "person", "schema": PERSON_SCHEMA, "strict": True}
    client = gateway.client()
    resp = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=64, temperature=0,
                                   text={"format": person})
    assert resp.status == "completed" and resp.text.format.type == "json_schema"
    check_person(resp.output_text)
    events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=64, temperature=0,
                                          text={"format": person}, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == resp.output_text
    any_object = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=8, temperature=0,
                                         text={"format": {"type": "json_object"}})
    assert any_object.output_text.startswith("{")  # an object begun (its random keys do not end in 8 tokens)


def test_chats_errors_name_the_responses_field():
    error = renamed_for_responses(unsupported("response_format", "response_format 'json_schema'"))
    assert error.param == "text.format" and "response_format" not in error.message
    assert renamed_for_responses(unsupported("tools", "tools here")).param == "tools"


@pytest.mark.parametrize("body, status, code, param", [
    ({"previous_response_id": "resp_123"}, 400, "previous_response_not_found", "previous_response_id"),
    ({"conversation": "conv_1"}, 404, "not_found", "conversation"),
    ({"conversation": {"id": "conv_1"}, "previous_response_id": "resp_1"}, 400, "mutually_exclusive_parameters",
     "conversation"),
    ({"conversation": {"name": "conv_1"}}, 400, "invalid_value", "conversation"),
    ({"tools": [{"type": "web_search"}]}, 400, "unsupported_parameter", "tools[0].type"),
    ({"tools": [FUNCTION_TOOL, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, 400,
     "unsupported_parameter", "tools[1].type"),
    ({"background": True}, 400, "unsupported_parameter", "background"),
    ({"reasoning": {"effort": "extreme"}}, 400, "invalid_value", "reasoning.effort"),
    ({"reasoning": {"budget_tokens": 500}}, 400, "unsupported_parameter", "reasoning.budget_tokens"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"}]}, 400,
     "unsupported_parameter", "input[0].encrypted_content"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": [], "content": "thought"}]}, 400,
     "invalid_value", "input[0].content"),
    ({"include": ["file_search_call.results"]}, 400, "unsupported_parameter", "include"),
    ({"input": [{"role": "user", "content": "hi"}, {"type": "item_reference", "id": "msg_none"}]}, 400,
     "item_not_found", "input[1]"),
    ({"input": [{"type": "item_reference"}]}, 422, "invalid_value", "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}, 400,
     "unsupported_parameter", "input[0].content[0].type"),
    ({"tools": [FUNCTION_TOOL], "tool_choice": {"type": "function", "name": "get_time"}}, 400, "invalid_value",
     "tool_choice"),
    ({"tools": [FUNCTION_TOOL], "tool_choice": "required", "text": {"format": {"type": "json_object"}}}, 400,
     "invalid_value", "text.format"),
    ({"tools": [{"type": "function", "description": "no name"}]}, 422, "invalid_value", "tools[0]"),
    ({"tools": [{"type": "function", "name": "get weather"}]}, 422, "invalid_value", "tools[0]"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "city=Paris"}]}, 422,
     "invalid_value", "input[0]"),
    ({"input": [{"type": "function_call_output", "output": "sunny"}]}, 422, "invalid_value", "input[0]"),
    ({"input": [{"type": "function_call_output", "call_id": "", "output": "sunny"}]}, 422, "invalid_value",
     "input[0]"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "", "arguments": "{}"}]}, 422, "invalid_value",
     "input[0]"),
    ({"input": []}, 422, "invalid_value", "input"),
    ({"max_output_tokens": 100_000}, 400, "context_length_exceeded", "max_output_tokens"),
    ({"input": "hello " * 5000}, 400, "context_length_exceeded", "input"),
    # text.format as chat's response_format checks it, named where the Responses request has it (its json_schema
    # fields flat in text.format)
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, 400, "missing_field",
     "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "a person", "schema": {"type": "object"}}}}, 422,
     "invalid_value", "text.format.name"),
    ({"text": {"format": {"type": "xml"}}}, 422, "invalid_value", "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, 400,
     "invalid_value", "text.format.schema"),
])
def test_what_cannot_be_done_is_a_4xx_naming_the_field(gateway, body, status, code, param):
    resp = gateway.post("/v1/responses", json={"model": MODEL, "input": "hi", **body})
    error = assert_error(resp, status, code, param)
    if code == "context_length_exceeded":  # chat's check, worded with the Responses field
        assert "max_tokens" not in error["message"]
    assert "response_format" not in error["message"], error


@pytest.mark.parametrize("body", [{"tools": []}, {"tool_choice": "auto"}, {"tools": [], "tool_choice": "none"}])
def test_no_tools_with_tool_choice_auto_or_none_is_answered(gateway, body):
    """The Responses API's defaults (tools [], tool_choice "auto", as a response echoes them) sent back: answered,
    though chat refuses an empty 'tools' and "auto" without tools (as OpenAI and vLLM)."""
    resp = gateway.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2, **body})
    assert resp.status_code == 200, resp.text


def test_settings_that_change_nothing_are_accepted(gateway):
    resp = gateway.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2, "store": False,
                                               "reasoning": {"effort": None, "summary": "auto"},
                                               "include": ["reasoning.encrypted_content"], "truncation": "disabled",
                                               "parallel_tool_calls": False, "user": "u1"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["parallel_tool_calls"], body["user"], body["store"], body["truncation"]) == (False, "u1", False,
                                                                                             "disabled")


def test_responses_need_an_api_key_as_chat_does(gateway):
    assert_error(gateway.post("/v1/responses", key=None, json={"model": MODEL, "input": "hi"}), 401,
                 "missing_api_key")
    with pytest.raises(openai.AuthenticationError):
        gateway.client(key="sk-wrong").responses.create(model=MODEL, input="hi")
