"""Tools on /v1/chat/completions through a real gateway and worker: request validation, tools reaching the prompt
of a model whose chat template renders them (a tiny Llama with the devmodels' hermes-tools template), the answer's
shape. The tiny model writes random text, never a call by itself: reading calls is tested in test_tool_calls.py; a
forced call (tool_choice "required" or a named function) is one whatever the weights, its JSON constrained by the
tools' schemas."""

from __future__ import annotations

import json

import pytest

from .conftest import MODEL, USER_KEY, GatewayFactory
from .test_errors import assert_error

TOOLS_MODEL = "tiny-tools"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# A whole round: the assistant called the tool, the tool answered.
ROUND = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


@pytest.fixture(scope="module")
def tools_model_dir(tmp_path_factory):
    """The tiny Llama's weights (seed 0) with a chat template that renders tools in the Hermes format."""
    from hpcllm.devmodels import make_model

    return make_model("llama", tmp_path_factory.mktemp("tools-model") / TOOLS_MODEL, chat_template="hermes-tools")


@pytest.fixture(scope="module")
def tools_tokenizer(tools_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tools_model_dir)


@pytest.fixture(scope="module")
def gw(tmp_path_factory, worker_url, tiny_model_dir, tools_model_dir):
    """A gateway serving the plain tiny-llama and tiny-tools, both on the test worker (one tokenizer, one model)."""
    factory = GatewayFactory(tmp_path_factory.mktemp("tools-gateway"), worker_url, tiny_model_dir)
    yield factory(static_models={MODEL: {"worker_url": worker_url, "source": str(tiny_model_dir)},
                                 TOOLS_MODEL: {"worker_url": worker_url, "source": str(tools_model_dir)}})
    factory.stop_all()


def chat(gw, **body):
    return gw.post("/v1/chat/completions", json={"model": TOOLS_MODEL, "messages": ASK, "max_tokens": 4,
                                                 "temperature": 0, **body})


def prompt_tokens(tokenizer, messages, tools=None) -> tuple[str, int]:
    """The rendered prompt and its token count, as transformers gives them (arguments as objects, as vLLM passes)."""
    messages = json.loads(json.dumps(messages))
    for message in messages:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return text, len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("body, status, code, param", [
    ({"tools": [{"type": "retrieval", "function": WEATHER_TOOL["function"]}]}, 422, "invalid_value",
     "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, 422, "invalid_value",
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, 400, "missing_field",
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]}, 422, "invalid_value",
     "tools[0].function.parameters"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, 422, "invalid_value", "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, 422, "invalid_value", "tool_choice"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, 400,
     "invalid_value", "tool_choice"),
    ({"tool_choice": "required"}, 400, "invalid_value", "tool_choice"),
    ({"tool_choice": "auto"}, 400, "invalid_value", "tool_choice"),  # OpenAI's and vLLM's 400 too
    ({"tools": []}, 400, "invalid_value", "tools"),
    ({"tools": [], "tool_choice": "none"}, 400, "invalid_value", "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, 400,
     "invalid_value", "response_format"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
      "structured_outputs": {"json": {"type": "object"}}}, 400, "invalid_value", "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
      "tool_choice": "required"}, 400, "invalid_value", "tools"),
    ({"functions": [WEATHER_TOOL["function"]]}, 400, "unsupported_parameter", "functions"),
    ({"messages": ROUND[:2] + [{"role": "tool", "content": "sunny"}]}, 422, "invalid_value", "messages[2]"),
    ({"messages": [{**ROUND[1], "role": "user", "content": "hi"}]}, 422, "invalid_value", "messages[0]"),
    ({"messages": [ROUND[0], {**ROUND[1], "tool_calls": [{**ROUND[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": "city=Paris"}}]}]}, 422, "invalid_value",
     "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_tool_requests_say_what_to_fix(gw, body, status, code, param):
    assert_error(chat(gw, **body), status, code, param)


def test_tool_choice_none_without_tools_is_a_plain_answer(gw):
    """vLLM's rule (OpenAI answers 400): "none" asks for what a request without tools gets anyway."""
    resp = chat(gw, tool_choice="none")
    assert resp.status_code == 200, resp.text
    assert not resp.json()["choices"][0]["message"].get("tool_calls")


def test_a_template_that_ignores_tools_is_a_400_not_tools_silently_dropped(gw):
    error = assert_error(chat(gw, model=MODEL, tools=[WEATHER_TOOL]), 400, "unsupported_parameter", "tools")
    assert "chat template does not support tools" in error["message"]
    assert chat(gw, model=MODEL).status_code == 200


@pytest.mark.parametrize("tool_choice", [None, "auto", "none"])
def test_tools_reach_the_prompt_through_the_chat_template(gw, tools_tokenizer, tool_choice):
    extra = {"tool_choice": tool_choice} if tool_choice else {}
    without = chat(gw).json()
    resp = chat(gw, tools=[WEATHER_TOOL], **extra)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    text, expected = prompt_tokens(tools_tokenizer, ASK, [WEATHER_TOOL])
    assert '"name": "get_weather"' in text and '"description": "The current weather in a city."' in text
    assert body["usage"]["prompt_tokens"] == expected
    assert expected > without["usage"]["prompt_tokens"] + 50  # the tools' JSON and the format's instructions
    choice = body["choices"][0]
    # The tiny model writes random text, never a call: the answer is plain content, as OpenAI shapes it.
    assert choice["finish_reason"] in ("stop", "length")
    message = choice["message"]
    assert message == {"role": "assistant", "content": message["content"], "refusal": None, "tool_calls": [],
                       "reasoning": None}  # vLLM's null: the template writes no thinking
    assert isinstance(message["content"], str)


def test_a_conversation_with_calls_and_tool_answers_is_rendered(gw, tools_tokenizer):
    resp = chat(gw, messages=ROUND, tools=[WEATHER_TOOL])
    assert resp.status_code == 200, resp.text
    text, expected = prompt_tokens(tools_tokenizer, ROUND, [WEATHER_TOOL])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert resp.json()["usage"]["prompt_tokens"] == expected


def test_openai_client_with_tools_streamed_and_not(gw):
    client = gw.client(USER_KEY)
    args = dict(model=TOOLS_MODEL, messages=ROUND, tools=[WEATHER_TOOL], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**args)
    message = whole.choices[0].message
    assert message.tool_calls == [] and isinstance(message.content, str)
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == message.content  # greedy: the same answer, held back only where a call could start
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert not any(c.choices[0].delta.tool_calls for c in chunks)


# Forced calls: functions whose schemas bound their arguments (the random weights would otherwise write a string to
# max_tokens), small enough for the tiny model's 512 tokens with the template's tool instructions (the answer gets
# what the context has left).
TRIP_SCHEMA = {"type": "object", "properties": {"days": {"enum": [1, 2, 3]}}, "required": ["days"],
               "additionalProperties": False}
PAINT_SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"],
                "additionalProperties": False}
TRIP_TOOL = {"type": "function", "function": {"name": "trip", "parameters": TRIP_SCHEMA}}
PAINT_TOOL = {"type": "function", "function": {"name": "paint", "parameters": PAINT_SCHEMA}}
ALLOWED_ARGUMENTS = {"trip": [{"days": 1}, {"days": 2}, {"days": 3}], "paint": [{"color": "red"}, {"color": "green"}]}


def check_arguments(name: str, arguments: str) -> None:
    """The call's arguments valid against its function's schema (jsonschema is not a dependency)."""
    assert json.loads(arguments) in ALLOWED_ARGUMENTS[name], (name, arguments)


SAMPLINGS = pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=3)],
                                    ids=["greedy", "seeded"])


def _forced(gw, tool_choice, sampling, tools=(TRIP_TOOL, PAINT_TOOL), **extra):
    """The whole answer's choice and the streamed one's chunks' choices."""
    args = dict(model=TOOLS_MODEL, messages=ASK, tools=list(tools), tool_choice=tool_choice, **sampling, **extra)
    client = gw.client(USER_KEY)
    whole = client.chat.completions.create(**args).choices[0]
    streamed = [c.choices[0] for c in client.chat.completions.create(**args, stream=True) if c.choices]
    return whole, streamed


def _streamed_calls(streamed) -> list[tuple[int, str, str]]:
    """The calls of a streamed answer, which has no text: each starts with a chunk holding its id, type and name;
    chunks without an id add to its arguments (a named function's, streamed as they come)."""
    assert not "".join(choice.delta.content or "" for choice in streamed)
    calls = []
    for call in (call for choice in streamed for call in choice.delta.tool_calls or []):
        if call.id is not None:
            assert call.id.startswith("call_") and call.type == "function"
            calls.append([call.index, call.function.name, ""])
        assert call.index == calls[-1][0]
        calls[-1][2] += call.function.arguments
    return [tuple(call) for call in calls]


@SAMPLINGS
def test_a_named_function_is_called_with_arguments_its_schema_allows(gw, sampling):
    choice = {"type": "function", "function": {"name": "trip"}}
    whole, streamed = _forced(gw, choice, sampling)
    assert whole.finish_reason == "stop"  # as OpenAI and vLLM end a named function's call
    assert whole.message.content is None
    call, = whole.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "trip"
    check_arguments("trip", call.function.arguments)
    assert _streamed_calls(streamed) == [(0, "trip", call.function.arguments)]
    assert streamed[-1].finish_reason == "stop"


@SAMPLINGS
def test_required_answers_with_calls_of_the_given_functions(gw, sampling):
    whole, streamed = _forced(gw, "required", sampling)
    assert whole.finish_reason == "tool_calls" and whole.message.content is None, whole.message
    calls = whole.message.tool_calls
    assert calls
    for call in calls:
        check_arguments(call.function.name, call.function.arguments)
    assert _streamed_calls(streamed) == [(i, c.function.name, c.function.arguments) for i, c in enumerate(calls)]
    assert streamed[-1].finish_reason == "tool_calls"


def test_required_without_parallel_calls_is_one_call(gw):
    whole, streamed = _forced(gw, "required", dict(temperature=1.0, seed=5), parallel_tool_calls=False)
    call, = whole.message.tool_calls
    assert whole.finish_reason == "tool_calls"
    check_arguments(call.function.name, call.function.arguments)
    assert len(_streamed_calls(streamed)) == 1


def test_a_function_without_parameters_is_called_with_an_object(gw):
    tool = {"type": "function", "function": {"name": "ping"}}
    whole, _ = _forced(gw, {"type": "function", "function": {"name": "ping"}}, dict(temperature=0), tools=[tool],
                       logit_bias={"96": 10})  # "}" (the tiny tokenizer's): closes the object soon
    call, = whole.message.tool_calls
    assert call.function.name == "ping" and isinstance(json.loads(call.function.arguments), dict)
