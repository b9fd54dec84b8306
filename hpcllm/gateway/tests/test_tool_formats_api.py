"""Tool-call formats through a real gateway, with the official openai client: a tiny model with Qwen3-Coder's way of
calling tools in its chat template (devmodels' qwen3-coder-tools), and one with Mistral's (mistral-tools: its
markers special tokens), on scripted stand-in workers that answer what the test sets (token by token, as the
tokenizer cuts it, special tokens' text left out as workers decode). The format is read from the template (the
calls' values typed by the request's function schemas), or set by the model's config (tool_call_parser), static
or deployed through a real controller."""

from __future__ import annotations

import json
import re

import pytest

from hpcllm.httpkit.tests.thread_server import ThreadServer

from .conftest import MODEL, GatewayFactory, scripted_gateway
from .stand_in_worker import Script, scripted_worker_app
from .test_controller_router import InProcessAgents, serve_controller
from .test_tool_calls import MISTRAL_CALL_ID, MISTRAL_TWO_CALLS, OPENAI_CALL_ID, QWEN_TWO_CALLS, _message_of

CODER = "tiny-coder"
ASK = [{"role": "user", "content": "Weather in Paris for three days?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CODER_CALL = ("Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
              "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")


@pytest.fixture(scope="module")
def script() -> Script:
    from hpcllm.devmodels import make_tokenizer

    return Script(make_tokenizer("qwen3-coder-tools"))


CODER_AS_HERMES = "tiny-coder-as-hermes"  # the same model, its config saying it writes hermes calls
CODER_AS = {"hermes": CODER_AS_HERMES, "llama3_json": "tiny-coder-as-llama", "pythonic": "tiny-coder-as-pythonic"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from hpcllm.devmodels import make_model

    return make_model("llama", tmp_path_factory.mktemp("coder") / CODER, chat_template="qwen3-coder-tools")


@pytest.fixture(scope="module")
def worker(script):
    server = ThreadServer(scripted_worker_app(script))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, model_dir, worker):
    """A gateway serving CODER (its tokenizer and template from a devmodel's directory) on the scripted worker, and
    the same model configured to write hermes, llama3_json and pythonic calls (CODER_AS)."""
    factory = GatewayFactory(tmp_path_factory.mktemp("coder-gateway"), worker.url, model_dir)
    yield factory(static_models={
        CODER: {"worker_url": worker.url, "source": str(model_dir)},
        **{name: {"worker_url": worker.url, "source": str(model_dir), "tool_call_parser": parser}
           for parser, name in CODER_AS.items()}})
    factory.stop_all()


EXPECTED_ARGUMENTS = {"city": "Paris", "days": 3}  # days an integer, as its schema says


def test_qwen3_coder_calls_whole_and_streamed(gw, script):
    script.answer = CODER_CALL
    client = gw.client()
    choice = client.chat.completions.create(model=CODER, messages=ASK, tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    call, = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == EXPECTED_ARGUMENTS
    assert "<function=example_function_name>" in script.tokenizer.decode(script.prompts[-1])  # the tools rendered

    content, calls, finish_reason, _ = _streamed_choice(
        list(client.chat.completions.create(model=CODER, messages=ASK, tools=TOOLS, stream=True)))
    assert (content, calls, finish_reason) == ("Let me check.", [("get_weather", call.function.arguments)],
                                               "tool_calls")


def _calls(choice) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in choice.message.tool_calls or []]


HERMES_CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"timezone": "Europe/Paris"})]


def test_a_models_configured_format_wins_over_its_template(gw, script):
    """The template says qwen3_coder; a model configured with tool_call_parser = "hermes" reads hermes calls, whole
    and streamed, and the same answer from the model without the setting is plain content."""
    script.answer = QWEN_TWO_CALLS
    client = gw.client()
    choice = client.chat.completions.create(model=CODER_AS_HERMES, messages=ASK, tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls" and _calls(choice) == HERMES_CALLS
    _, streamed, _, _ = _streamed_choice(
        list(client.chat.completions.create(model=CODER_AS_HERMES, messages=ASK, tools=TOOLS, stream=True)))
    assert [(name, json.loads(arguments)) for name, arguments in streamed] == HERMES_CALLS
    unset = client.chat.completions.create(model=CODER, messages=ASK, tools=TOOLS).choices[0]
    assert (unset.finish_reason, unset.message.content, unset.message.tool_calls) == ("stop", QWEN_TWO_CALLS, [])


def test_a_deployed_models_format_reaches_the_gateway(tmp_path, model_dir, worker, script):
    """Deployed through a real controller with tool_call_parser = "hermes" (a model config's field): the gateway's
    card of it says so, and its calls are read as hermes ones."""
    agents = InProcessAgents(worker.url)
    factory = GatewayFactory(tmp_path / "gw", worker.url, model_dir)
    with serve_controller(tmp_path, agents, model_dir, model_gpus=0, node_gpus=0,
                          tool_call_parser="hermes") as server:
        try:
            gateway = factory(static_models={}, controller_url=server.url, route_poll_seconds=5)
            script.answer = QWEN_TWO_CALLS
            choice = gateway.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS).choices[0]
            assert choice.finish_reason == "tool_calls" and _calls(choice) == HERMES_CALLS
        finally:
            factory.stop_all()


MISTRAL = "tiny-mistral"


@pytest.fixture(scope="module")
def mistral_script() -> Script:
    from hpcllm.devmodels import make_tokenizer

    return Script(make_tokenizer("mistral-tools"))


@pytest.fixture(scope="module")
def mistral_gw(tmp_path_factory, mistral_script):
    with scripted_gateway(tmp_path_factory.mktemp("mistral"), MISTRAL, "mistral-tools", mistral_script) as gateway:
        yield gateway


def test_mistral_calls_whose_markers_are_special_tokens(mistral_gw, mistral_script):
    """The worker's text has no [TOOL_CALLS] nor [ARGS] (special tokens); the gateway puts them back from the token
    ids, so the calls are read, whole and streamed. With tool_choice "none" they stay out, as vLLM leaves them."""
    mistral_script.answer = "Checking.\n" + MISTRAL_TWO_CALLS
    weather = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
               for name in ("get_weather", "get_time")]
    client = mistral_gw.client()
    choice = client.chat.completions.create(model=MISTRAL, messages=ASK, tools=weather).choices[0]
    assert (choice.finish_reason, choice.message.content) == ("tool_calls", "Checking.")
    assert _calls(choice) == HERMES_CALLS
    content, streamed, _, _ = _streamed_choice(
        list(client.chat.completions.create(model=MISTRAL, messages=ASK, tools=weather, stream=True)), "mistral")
    assert content == "Checking."
    assert [(name, json.loads(arguments)) for name, arguments in streamed] == HERMES_CALLS
    assert "[AVAILABLE_TOOLS]" in mistral_script.tokenizer.decode(mistral_script.prompts[-1])

    # Mistral's templates (v3: Mistral 7B v0.3, Mixtral, Nemo) and mistral_common refuse any other call id than 9
    # letters or digits when the calls come back in the next turn's history: vLLM's parser writes such ids too.
    streamed_ids = [call.id for chunk in client.chat.completions.create(model=MISTRAL, messages=ASK, tools=weather,
                                                                         stream=True)
                    for c in chunk.choices for call in c.delta.tool_calls or [] if call.id]
    for ids in ([call.id for call in choice.message.tool_calls], streamed_ids):
        assert len(ids) == 2 and len(set(ids)) == 2 and all(re.fullmatch(MISTRAL_CALL_ID, i) for i in ids), ids

    plain = client.chat.completions.create(model=MISTRAL, messages=ASK, tools=weather, tool_choice="none").choices[0]
    tokenizer = mistral_script.tokenizer
    worker_text = tokenizer.decode(tokenizer(mistral_script.answer, add_special_tokens=False)["input_ids"],
                                   skip_special_tokens=True)
    assert plain.message.content == worker_text
    assert "[TOOL_CALLS]" not in plain.message.content and plain.message.tool_calls == []


@pytest.mark.parametrize("tool_choice, answer", [
    ("required", '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                 '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}]'),
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Paris"}'),
])
def test_a_mistral_models_forced_calls_have_mistral_ids(mistral_gw, mistral_script, tool_choice, answer):
    """A forced answer (tool_choice "required" or a named function) is JSON, no format of the model's, but its calls
    come back in the next turn's history all the same: their ids are the 9 letters or digits Mistral's templates take
    (vLLM's MistralToolCall for any call of a Mistral model), whole and streamed."""
    mistral_script.answer = answer
    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
             for name in ("get_weather", "get_time")]
    client = mistral_gw.client()
    whole = client.chat.completions.create(model=MISTRAL, messages=ASK, tools=tools, tool_choice=tool_choice)
    streamed = [call.id for chunk in client.chat.completions.create(model=MISTRAL, messages=ASK, tools=tools,
                                                                    tool_choice=tool_choice, stream=True)
                for c in chunk.choices for call in c.delta.tool_calls or [] if call.id]
    calls = 2 if tool_choice == "required" else 1
    for ids in ([call.id for call in whole.choices[0].message.tool_calls], streamed):
        assert len(set(ids)) == calls and all(re.fullmatch(MISTRAL_CALL_ID, i) for i in ids), ids


# ------------------------------------------------------------------------------- calls streamed as they are written
# A file write, as coding agents ask for: a long call, its text in quotes, backslashes, newlines and characters of
# several bytes (the tokenizer cuts those, and the name, into several tokens).
PATH, CONTENT = "notes/été.md", 'print("héllo, 世界 🌍")\npath = "C:\\\\temp"\n' * 3
WRITE_TOOLS = [{"type": "function", "function": {"name": "write_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}}]


def _json(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # also the value's Python literal: only ", \\, \\n escaped


WRITE_ARGUMENTS = f'{{"path": {_json(PATH)}, "content": {_json(CONTENT)}}}'
# Each format's model, and its answer writing the call.
WRITES = {
    "hermes": (CODER_AS["hermes"], f'I will write it.\n<tool_call>\n{{"name": "write_file", "arguments": '
                                   f'{WRITE_ARGUMENTS}}}\n</tool_call>'),
    "llama3_json": (CODER_AS["llama3_json"], f'{{"name": "write_file", "parameters": {WRITE_ARGUMENTS}}}'),
    "qwen3_coder": (CODER, f"I will write it.\n<tool_call>\n<function=write_file>\n<parameter=path>\n{PATH}\n"
                           f"</parameter>\n<parameter=content>\n{CONTENT}\n</parameter>\n</function>\n</tool_call>"),
    "pythonic": (CODER_AS["pythonic"], f"[write_file(path={_json(PATH)}, content={_json(CONTENT)})]"),
    "mistral": (MISTRAL, f"I will write it.\n[TOOL_CALLS]write_file[ARGS]{WRITE_ARGUMENTS}"),
}


def _serving(request, fmt: str):
    """The gateway serving the format's model, and its scripted worker's script, set to answer the file write."""
    gateway, script = ((request.getfixturevalue("mistral_gw"), request.getfixturevalue("mistral_script"))
                       if fmt == "mistral" else (request.getfixturevalue("gw"), request.getfixturevalue("script")))
    script.answer = WRITES[fmt][1]
    return gateway, script


def _call_id(fmt: str) -> str:
    """The shape of a format's call ids."""
    return MISTRAL_CALL_ID if fmt == "mistral" else OPENAI_CALL_ID


def _streamed_choice(chunks, fmt: str = "") -> tuple[str | None, list[tuple[str, str]], str, int]:
    """A streamed choice put together as OpenAI's clients do (test_tool_calls._message_of, the calls' ids of the
    format's shape): content, calls (name, arguments), finish_reason, and how many pieces of arguments came."""
    choices = [chunk.choices[0].model_dump(exclude_none=True) for chunk in chunks if chunk.choices]
    message = _message_of(choices, _call_id(fmt))
    pieces = sum(bool(call["function"]["arguments"]) for choice in choices
                 for call in choice["delta"].get("tool_calls", []))
    return (message["content"] or None, [(c["function"]["name"], c["function"]["arguments"]) for c in
                                         message["tool_calls"]], choices[-1]["finish_reason"], pieces)


@pytest.mark.parametrize("fmt", list(WRITES))
def test_a_long_call_streams_its_arguments_as_they_are_generated(request, fmt):
    """Each format: the call comes as it is written (its name whole in the first piece, the arguments in many), and
    the streamed call is the whole answer's, read by the openai client's own stream helper too; the Responses API
    streams it as function_call_arguments deltas."""
    gateway, script = _serving(request, fmt)
    ids = script.tokenizer(script.answer, add_special_tokens=False)["input_ids"]
    tokens = [script.tokenizer.decode([token]) for token in ids]
    assert "write_file" not in tokens and any("\ufffd" in token for token in tokens)  # cut inside name and characters
    model, client = WRITES[fmt][0], gateway.client()
    ask = dict(model=model, messages=ASK, tools=WRITE_TOOLS)
    whole = client.chat.completions.create(**ask).choices[0]
    call, = whole.message.tool_calls
    assert call.function.name == "write_file" and re.fullmatch(_call_id(fmt), call.id)
    assert json.loads(call.function.arguments) == {"path": PATH, "content": CONTENT}
    assert call.function.arguments == WRITE_ARGUMENTS and whole.finish_reason == "tool_calls"

    # With logprobs each token is a delta of its own (the gateway sends the tokens that piled up as one otherwise).
    chunks = list(client.chat.completions.create(**ask, stream=True, logprobs=True))
    content, calls, finish_reason, pieces = _streamed_choice(chunks, fmt)
    assert (content, calls, finish_reason) == (whole.message.content, [("write_file", WRITE_ARGUMENTS)], "tool_calls")
    assert pieces >= (3 if fmt in ("qwen3_coder", "pythonic") else 20)  # per parameter / as the tokens come
    assert sum(len(chunk.choices[0].logprobs.content) for chunk in chunks if chunk.choices[0].logprobs) == len(ids)
    with client.chat.completions.stream(**ask, logprobs=True) as stream:
        final = stream.get_final_completion().choices[0]
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == calls

    tools = [{"type": "function", **tool["function"]} for tool in WRITE_TOOLS]
    with client.responses.stream(model=model, input=ASK, tools=tools) as stream:
        deltas = [event.delta for event in stream if event.type == "response.function_call_arguments.delta"]
        item = stream.get_final_response().output[-1]
    assert (item.type, item.name, item.arguments) == ("function_call", "write_file", WRITE_ARGUMENTS)
    assert "".join(deltas) == WRITE_ARGUMENTS


@pytest.mark.parametrize("fmt", list(WRITES))
def test_a_call_cut_short_is_a_call_whole_and_streamed(request, fmt):
    """max_tokens reached inside the file's text: the call is still one (it was streamed from its name on), its
    arguments as far as they came (not JSON: a client must check them), finish_reason "length"."""
    gateway, script = _serving(request, fmt)
    cut = script.answer.index("path = ") + 3
    max_tokens = len(script.tokenizer(script.answer[:cut], add_special_tokens=False)["input_ids"])
    ask = dict(model=WRITES[fmt][0], messages=ASK, tools=WRITE_TOOLS, max_tokens=max_tokens)
    client = gateway.client()
    whole = client.chat.completions.create(**ask).choices[0]
    call, = whole.message.tool_calls
    arguments = call.function.arguments
    assert whole.finish_reason == "length" and call.function.name == "write_file"
    assert WRITE_ARGUMENTS.startswith(arguments) and 'print(\\"h' in arguments and len(arguments) < len(WRITE_ARGUMENTS)
    with pytest.raises(ValueError):
        json.loads(arguments)
    streamed = _streamed_choice(list(client.chat.completions.create(**ask, stream=True, logprobs=True)), fmt)
    assert streamed[:3] == (whole.message.content, [("write_file", arguments)], "length") and streamed[3] > 1
