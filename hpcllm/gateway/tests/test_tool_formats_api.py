"""Tool-call formats through a real gateway, with the official openai client: a tiny model with Qwen3-Coder's way of
calling tools in its chat template (devmodels' qwen3-coder-tools), and one with Mistral's (mistral-tools: its
markers special tokens), on scripted stand-in workers that answer what the test sets (token by token, as the
tokenizer cuts it, special tokens' text left out as workers decode). The format is read from the template (the
calls' values typed by the request's function schemas), or set by the model's config (tool_call_parser), static
or deployed through a real controller."""

from __future__ import annotations

import json

import pytest

from hpcllm.httpkit.tests.thread_server import ThreadServer

from .conftest import MODEL, GatewayFactory, scripted_gateway
from .stand_in_worker import Script, scripted_worker_app
from .test_controller_router import InProcessAgents, serve_controller
from .test_tool_calls import MISTRAL_TWO_CALLS, QWEN_TWO_CALLS

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
    the same model as CODER_AS_HERMES."""
    factory = GatewayFactory(tmp_path_factory.mktemp("coder-gateway"), worker.url, model_dir)
    yield factory(static_models={
        CODER: {"worker_url": worker.url, "source": str(model_dir)},
        CODER_AS_HERMES: {"worker_url": worker.url, "source": str(model_dir), "tool_call_parser": "hermes"}})
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

    chunks = list(client.chat.completions.create(model=CODER, messages=ASK, tools=TOOLS, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    streamed, = [c for d in deltas for c in d.tool_calls or []]
    assert (streamed.function.name, json.loads(streamed.function.arguments)) == ("get_weather", EXPECTED_ARGUMENTS)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


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
    chunks = list(client.chat.completions.create(model=CODER_AS_HERMES, messages=ASK, tools=TOOLS, stream=True))
    streamed = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed] == HERMES_CALLS
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
    chunks = list(client.chat.completions.create(model=MISTRAL, messages=ASK, tools=weather, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert "".join(d.content or "" for d in deltas) == "Checking."
    streamed = [c for d in deltas for c in d.tool_calls or []]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed] == HERMES_CALLS
    assert "[AVAILABLE_TOOLS]" in mistral_script.tokenizer.decode(mistral_script.prompts[-1])

    plain = client.chat.completions.create(model=MISTRAL, messages=ASK, tools=weather, tool_choice="none").choices[0]
    tokenizer = mistral_script.tokenizer
    worker_text = tokenizer.decode(tokenizer(mistral_script.answer, add_special_tokens=False)["input_ids"],
                                   skip_special_tokens=True)
    assert plain.message.content == worker_text
    assert "[TOOL_CALLS]" not in plain.message.content and plain.message.tool_calls == []
