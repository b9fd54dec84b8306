"""A Mistral model's chat history with call ids of another shape (OpenAI's "call_" and 24 characters, another
server's): its templates take back only ids of 9 characters (devmodels' mistral-tools refuses others, as Mistral's v3
templates do), so the gateway hands the template each longer id's last 9 characters, as vLLM's
truncate_tool_call_ids does; through chat completions, the Responses API and /tokenize, on a scripted stand-in
worker."""

from __future__ import annotations

from hpcllm.httpkit.tests.thread_server import ThreadServer

from .conftest import GatewayFactory
from .stand_in_worker import scripted_worker_app
from .test_errors import assert_error
from .test_reasoning_api import _prompt
from .test_tool_formats_api import MISTRAL, mistral_gw, mistral_script  # noqa: F401 (fixtures)

OPENAI_ID = "call_Xy7QpL2mN4vR8sT1uW3zA5bC"  # OpenAI's shape: "call_" and 24 letters or digits
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_a_chat_historys_longer_call_ids_reach_a_mistral_template_as_their_last_9_characters(mistral_gw,
                                                                                           mistral_script):
    mistral_script.answer = "Sunny."
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": OPENAI_ID, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": OPENAI_ID, "content": "sunny"},
        {"role": "user", "content": "And so?"},
    ]
    answer = mistral_gw.client().chat.completions.create(model=MISTRAL, messages=messages, tools=TOOLS)
    assert answer.choices[0].message.content == "Sunny."
    assert f'"call_id": "{OPENAI_ID[-9:]}"' in _prompt(mistral_script)
    # /tokenize renders the same prompt (a client counts its tokens there before sending it)
    tokenized = mistral_gw.post("/tokenize", json={"model": MISTRAL, "messages": messages, "tools": TOOLS})
    assert tokenized.status_code == 200, tokenized.text
    assert tokenized.json()["tokens"] == mistral_script.prompts[-1]


def test_a_responses_call_id_of_another_shape_reaches_a_mistral_template_as_its_last_9_characters(mistral_gw,
                                                                                                mistral_script):
    mistral_script.answer = "Sunny."
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": OPENAI_ID, "name": "get_weather", "arguments": "{}"},
             {"type": "function_call_output", "call_id": OPENAI_ID, "output": "sunny"},
             {"role": "user", "content": "And so?"}]  # the template renders the tools in the last turn, a user's
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    response = mistral_gw.client().responses.create(model=MISTRAL, input=items, tools=tools, store=False)
    assert response.output_text == "Sunny."
    assert f'"call_id": "{OPENAI_ID[-9:]}"' in _prompt(mistral_script)


def test_call_ids_that_share_their_last_9_characters_or_are_shorter_stay_distinct_for_a_mistral_template(
        mistral_gw, mistral_script):
    """Two calls whose ids end alike each keep an id of their own (one the last 9 characters, the other 9 derived
    from it), so each tool answer stays paired with its call; a shorter id, which the template refuses, gets 9 too."""
    mistral_script.answer = "Sunny."
    ids = ["call_Paris0000123456789", "call_Lyon00000123456789", "c1"]
    messages = [{"role": "user", "content": "Weather in Paris, Lyon and Nice?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                    for call_id in ids]}]
    messages += [{"role": "tool", "tool_call_id": call_id, "content": f"sunny {n}"} for n, call_id in enumerate(ids)]
    messages.append({"role": "user", "content": "And so?"})
    answer = mistral_gw.client().chat.completions.create(model=MISTRAL, messages=messages, tools=TOOLS)
    assert answer.choices[0].message.content == "Sunny."
    prompt = _prompt(mistral_script)
    template_ids = [prompt.split(f'"content": "sunny {n}", "call_id": "')[1].split('"')[0] for n in range(len(ids))]
    assert template_ids[0] == ids[0][-9:]
    assert len(set(template_ids)) == 3 and all(len(i) == 9 and i.isalnum() for i in template_ids), template_ids


def test_a_history_with_call_ids_for_a_model_without_a_chat_template_says_so(tmp_path, mistral_script):
    """Reading the model's tool-call format for the history's ids finds no template: the 400 that says the model has
    none, as without ids, not a 500."""
    from hpcllm.devmodels import make_model

    model_dir = make_model("llama", tmp_path / "bare")
    (model_dir / "chat_template.jinja").unlink()
    worker = ThreadServer(scripted_worker_app(mistral_script))
    factory = GatewayFactory(tmp_path / "gateway", worker.url, model_dir)
    try:
        gateway = factory(static_models={"bare": {"worker_url": worker.url, "source": str(model_dir)}})
        messages = [{"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": OPENAI_ID, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": OPENAI_ID, "content": "sunny"}]
        for path in ("/v1/chat/completions", "/tokenize"):
            assert_error(gateway.post(path, json={"model": "bare", "messages": messages}), 400, "no_chat_template",
                         "messages")
    finally:
        factory.stop_all()
        worker.stop()
