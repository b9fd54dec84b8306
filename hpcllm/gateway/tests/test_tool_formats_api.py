"""Tool-call formats through a real gateway, with the official openai client: a tiny model with Qwen3-Coder's way of
calling tools in its chat template (devmodels' qwen3-coder-tools), on a scripted stand-in worker that answers what
the test sets (token by token, as the tokenizer cuts it). The format is read from the template; the calls' values
are typed by the request's function schemas."""

from __future__ import annotations

import json

import pytest

from hpcllm.httpkit.tests.thread_server import ThreadServer

from .conftest import GatewayFactory
from .stand_in_worker import Script, scripted_worker_app

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


@pytest.fixture(scope="module")
def gw(tmp_path_factory, script):
    """A gateway serving CODER (its tokenizer and template from a devmodel's directory) on the scripted worker."""
    from hpcllm.devmodels import make_model

    model_dir = make_model("llama", tmp_path_factory.mktemp("coder") / CODER, chat_template="qwen3-coder-tools")
    worker = ThreadServer(scripted_worker_app(script))
    factory = GatewayFactory(tmp_path_factory.mktemp("coder-gateway"), worker.url, model_dir)
    yield factory(static_models={CODER: {"worker_url": worker.url, "source": str(model_dir)}})
    factory.stop_all()
    worker.stop()


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
