"""A reasoning model through a real gateway, with the official openai client: a tiny model with Qwen3's way of
thinking in its chat template and its <think> tokens (devmodels' qwen3-think), on a scripted stand-in worker that
answers what the test sets (token by token, as the tokenizer cuts it) and records the prompts it was sent. Chat
answers carry the thinking as `reasoning` whole and streamed; chat_template_kwargs reach the template (/tokenize
renders the same); the Responses API answers with reasoning items and events."""

from __future__ import annotations

import pytest

from hpcllm.worker.protocol import Thinking
from hpcllm.worker.tests.schemas import PERSON_SCHEMA, check_person

from .conftest import SECRET, GatewayFactory, scripted_gateway
from .stand_in_worker import Script
from .test_errors import assert_error
from .test_tool_calls import QWEN_TWO_CALLS, TOOLS

THINKER = "tiny-thinker"
ASK = [{"role": "user", "content": "hello"}]
THOUGHT = "<think>\nThe user greets me. I greet back.\n</think>\n\nHello!"
REASONING, CONTENT = "\nThe user greets me. I greet back.\n", "\n\nHello!"


@pytest.fixture(scope="module")
def script() -> Script:
    from hpcllm.devmodels import make_tokenizer

    return Script(make_tokenizer("qwen3-think"))


@pytest.fixture(scope="module")
def gw(tmp_path_factory, script):
    """A gateway serving THINKER (its tokenizer and template from a devmodel's directory) on the scripted worker."""
    with scripted_gateway(tmp_path_factory.mktemp("thinker"), THINKER, "qwen3-think", script) as gateway:
        yield gateway


def _prompt(script: Script) -> str:
    return script.tokenizer.decode(script.prompts[-1])


def _thought_tokens(script: Script) -> int:
    """THOUGHT's tokens between <think> and </think> (one token each in this tokenizer, as in Qwen3's)."""
    ids = script.tokenizer(THOUGHT, add_special_tokens=False)["input_ids"]
    return ids.index(script.tokenizer.convert_tokens_to_ids("</think>")) - 1


def test_the_thinking_is_reasoning_whole_and_streamed(gw, script):
    script.answer = THOUGHT
    client = gw.client()
    whole = client.chat.completions.create(model=THINKER, messages=ASK, n=2)
    message = whole.choices[0].message
    assert (message.reasoning, message.content) == (REASONING, CONTENT)
    assert _thought_tokens(script) > 5  # vLLM's count, over both choices
    assert whole.usage.completion_tokens_details.reasoning_tokens == 2 * _thought_tokens(script)
    chunks = list(client.chat.completions.create(model=THINKER, messages=ASK, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == _thought_tokens(script)
    chunks = chunks[:-1]
    deltas = [chunk.choices[0].delta for chunk in chunks]
    reasoning = [d.reasoning for d in deltas if getattr(d, "reasoning", None)]
    content = [d.content for d in deltas if d.content]
    assert ("".join(reasoning), "".join(content)) == (REASONING, CONTENT)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_calls_after_the_thinking(gw, script):
    script.answer = "<think>\nI need both.\n</think>\n\n" + QWEN_TWO_CALLS
    choice = gw.client().chat.completions.create(model=THINKER, messages=ASK, tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning == "\nI need both.\n"
    assert [call.function.name for call in choice.message.tool_calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("body", [{"chat_template_kwargs": {"enable_thinking": False}},
                                  {"reasoning_effort": "none"}])
def test_thinking_turned_off_reaches_the_template(gw, script, body):
    script.answer = "Hello!"
    message = gw.client().chat.completions.create(model=THINKER, messages=ASK, extra_body=body).choices[0].message
    assert _prompt(script).endswith("<|assistant|>\n<think>\n\n</think>\n\n")  # the template's empty block
    assert (message.reasoning, message.content) == (None, "Hello!")
    usage = gw.client().chat.completions.create(model=THINKER, messages=ASK, extra_body=body).usage
    assert usage.completion_tokens_details.reasoning_tokens == 0
    gw.client().chat.completions.create(model=THINKER, messages=ASK)
    assert _prompt(script).endswith("<|assistant|>\n")
    tokenized = gw.post("/tokenize", json={"model": THINKER, "messages": ASK, **body}).json()
    gw.client().chat.completions.create(model=THINKER, messages=ASK, extra_body=body)
    assert tokenized["tokens"] == script.prompts[-1]  # /tokenize renders as chat does


def test_earlier_thinking_and_a_continued_message_reach_the_template(gw, script):
    script.answer = "lo!"
    history = [*ASK, {"role": "assistant", "content": "Hi!", "reasoning_content": "a greeting"},
               {"role": "user", "content": "again"}, {"role": "assistant", "content": "Hel"}]
    gw.client().chat.completions.create(model=THINKER, messages=history, extra_body={
        "add_generation_prompt": False, "continue_final_message": True})
    prompt = _prompt(script)
    assert "<|assistant|>\n<think>\na greeting\n</think>\n\nHi!</s>" in prompt
    assert prompt.endswith("<|assistant|>\nHel")  # no end of turn: the model goes on with the message


@pytest.mark.parametrize("body, status, code, param, says", [
    ({"chat_template_kwargs": {"tokenize": True}}, 400, "invalid_value", "chat_template_kwargs", "'tokenize'"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, 400, "invalid_value", "chat_template_kwargs",
     "send 'add_generation_prompt' as the request's own field"),
    ({"chat_template_kwargs": {"messages": []}}, 400, "invalid_value", "chat_template_kwargs", "'messages'"),
    ({"chat_template_kwargs": ["enable_thinking"]}, 422, "invalid_value", "chat_template_kwargs", None),
    ({"chat_template": "{{ messages }}"}, 400, "unsupported_parameter", "chat_template", None),
    ({"continue_final_message": True}, 400, "invalid_value", "add_generation_prompt", "add_generation_prompt false"),
    ({"reasoning_effort": "extreme"}, 422, "invalid_value", "reasoning_effort", None),
])
def test_chat_template_fields_that_cannot_be_honoured_say_why(gw, script, body, status, code, param, says):
    for path, extra in (("/v1/chat/completions", {}), ("/tokenize", {})):
        if path == "/tokenize" and param == "reasoning_effort":
            continue
        error = assert_error(gw.post(path, json={"model": THINKER, "messages": ASK, **body, **extra}), status, code,
                             param)
        assert says is None or says in error["message"], error


def test_responses_answer_with_a_reasoning_item(gw, script):
    script.answer = THOUGHT
    resp = gw.client().responses.create(model=THINKER, input="hello")
    thought, message = resp.output
    assert thought.type == "reasoning" and thought.id.startswith("rs_") and thought.summary == []
    assert [(part.type, part.text) for part in thought.content] == [("reasoning_text", REASONING)]
    assert message.type == "message" and resp.output_text == CONTENT and resp.status == "completed"
    assert resp.usage.output_tokens_details.reasoning_tokens == _thought_tokens(script)
    hidden = gw.client().responses.create(model=THINKER, input="hello", extra_body={"include_reasoning": False})
    assert [item.type for item in hidden.output] == ["message"] and hidden.output_text == CONTENT


def test_responses_stream_the_reasoning_as_openais_events(gw, script):
    script.answer = THOUGHT
    events = list(gw.client().responses.create(model=THINKER, input="hello", stream=True))
    kinds = [event.type for event in events]
    thinking = kinds[kinds.index("response.output_item.added"):kinds.index("response.output_item.done") + 1]
    assert thinking[:2] == ["response.output_item.added", "response.content_part.added"]
    assert set(thinking[2:-3]) == {"response.reasoning_text.delta"}
    assert thinking[-3:] == ["response.reasoning_text.done", "response.content_part.done",
                             "response.output_item.done"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == REASONING
    done = next(e for e in events if e.type == "response.reasoning_text.done")
    assert (done.text, done.output_index) == (REASONING, 0)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == CONTENT
    assert next(e for e in events if e.type == "response.output_text.delta").output_index == 1
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.usage.output_tokens_details.reasoning_tokens == _thought_tokens(script)
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_a_second_turn_sends_the_reasoning_item_back(gw, script):
    """The first answer's output items as the second request's input (how clients keep a conversation without
    stored responses): the reasoning item is accepted and its text reaches the template as the assistant's
    reasoning_content."""
    script.answer = THOUGHT
    first = gw.client().responses.create(model=THINKER, input="hello")
    script.answer = "Fine."
    second = gw.client().responses.create(model=THINKER, input=[
        {"role": "user", "content": "hello"}, *[item.model_dump(exclude_none=True) for item in first.output],
        {"role": "user", "content": "how are you?"}], extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert second.output_text == "Fine." and [item.type for item in second.output] == ["message"]
    prompt = _prompt(script)
    assert f"<|assistant|>\n<think>\n{REASONING}\n</think>\n\n{CONTENT}</s>\n<|user|>\nhow are you?" in prompt
    assert prompt.endswith("<think>\n\n</think>\n\n")  # chat_template_kwargs reached the template
    gw.client().responses.create(model=THINKER, input="hello", reasoning={"effort": "none", "summary": "auto"})
    assert _prompt(script).endswith("<think>\n\n</think>\n\n")


# A reasoning model's constrained answer: its thinking, then what the constraint allows (the worker holds the
# grammar back until </think>: GenerateRequest.thinking).
PERSON = '{"name":"Ada","age":36,"color":"blue"}'
THOUGHT_THEN_PERSON = "<think>\nA person: a name and an age.\n</think>" + PERSON
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}


def _markers(script: Script) -> tuple[int, int]:
    start, end = script.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    return start, end


def test_a_constrained_answer_thinks_first_whole_and_streamed(gw, script):
    """The worker is told the markers (the model opens its thinking itself: the start marker too); the answer's
    thinking is reasoning and the rest the schema's JSON, whole and streamed."""
    script.answer = THOUGHT_THEN_PERSON
    client = gw.client()
    whole = client.chat.completions.create(model=THINKER, messages=ASK, response_format=PERSON_FORMAT)
    start, end = _markers(script)
    assert script.requests[-1].thinking == Thinking(end_token_id=end, start_token_id=start)
    message = whole.choices[0].message
    assert message.reasoning == "\nA person: a name and an age.\n"
    assert check_person(message.content) == {"name": "Ada", "age": 36, "color": "blue"}
    assert whole.usage.completion_tokens_details.reasoning_tokens > 5
    chunks = list(client.chat.completions.create(model=THINKER, messages=ASK, response_format=PERSON_FORMAT,
                                                 stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert "".join(d.reasoning for d in deltas if getattr(d, "reasoning", None)) == message.reasoning
    assert "".join(d.content for d in deltas if d.content) == PERSON


def test_a_constrained_answer_without_thinking_is_constrained_from_its_first_token(gw, script):
    """enable_thinking false (the prompt holds an empty think block): no thinking for the worker to wait for."""
    script.answer = PERSON
    message = gw.client().chat.completions.create(model=THINKER, messages=ASK, response_format=PERSON_FORMAT,
                                                  reasoning_effort="none").choices[0].message
    assert script.requests[-1].thinking is None and script.requests[-1].grammar is not None
    assert (message.reasoning, message.content) == (None, PERSON)


def test_a_forced_call_after_the_thinking_streams_the_thinking_then_the_call(gw, script):
    script.answer = "<think>\nThe weather, then.\n</think>" + '{"city":"Paris"}'
    forced = {"type": "function", "function": {"name": "get_weather"}}
    client = gw.client()
    choice = client.chat.completions.create(model=THINKER, messages=ASK, tools=TOOLS, tool_choice=forced).choices[0]
    assert choice.message.reasoning == "\nThe weather, then.\n"
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_weather", '{"city":"Paris"}')]
    deltas = [chunk.choices[0].delta for chunk in client.chat.completions.create(
        model=THINKER, messages=ASK, tools=TOOLS, tool_choice=forced, stream=True) if chunk.choices]
    assert "".join(d.reasoning for d in deltas if getattr(d, "reasoning", None)) == "\nThe weather, then.\n"
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert calls[0].function.name == "get_weather"
    assert "".join(call.function.arguments for call in calls) == '{"city":"Paris"}'


def test_a_thinking_budget_goes_to_the_worker_with_or_without_a_constraint(gw, script):
    script.answer = THOUGHT
    start, end = _markers(script)
    for body, budget in (({"thinking_token_budget": 7}, 7), ({"thinking_token_budget": -1}, None)):
        gw.client().chat.completions.create(model=THINKER, messages=ASK, response_format=PERSON_FORMAT,
                                            extra_body=body)
        assert script.requests[-1].thinking == Thinking(end_token_id=end, start_token_id=start, budget=budget)
    gw.client().chat.completions.create(model=THINKER, messages=ASK, extra_body={"thinking_token_budget": 3})
    assert script.requests[-1].thinking.budget == 3 and script.requests[-1].grammar is None
    gw.client().chat.completions.create(model=THINKER, messages=ASK)
    assert script.requests[-1].thinking is None  # nothing for the worker to do


@pytest.mark.parametrize("budget", [-2, 1.5, "many"])
def test_a_bad_thinking_budget_is_refused(gw, budget):
    assert_error(gw.post("/v1/chat/completions", json={"model": THINKER, "messages": ASK,
                                                       "thinking_token_budget": budget}),
                 422, "invalid_value", "thinking_token_budget")


def test_a_thinking_budget_on_completions_is_refused_not_dropped(gw, script):
    """A raw prompt does not say whether the model thinks (the chat template does): a bound is a 400 naming the
    field, where it was ignored and the answer thought unbounded; -1 (no bound) is accepted."""
    error = assert_error(gw.post("/v1/completions", json={"model": THINKER, "prompt": "hi", "max_tokens": 2,
                                                          "thinking_token_budget": 4}),
                         400, "unsupported_parameter", "thinking_token_budget")
    assert "/v1/chat/completions" in error["message"]
    script.answer = THOUGHT
    ok = gw.post("/v1/completions", json={"model": THINKER, "prompt": "hi", "max_tokens": 2,
                                          "thinking_token_budget": -1})
    assert ok.status_code == 200, ok.text


@pytest.fixture(scope="module")
def thinking_gw(tmp_path_factory):
    """A gateway serving THINKER on a real worker (hpcllm's engine), whose random weights never close their thinking
    by themselves: only a thinking budget ends it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.devmodels import make_model
    from hpcllm.httpkit.tests.thread_server import ThreadServer
    from hpcllm.worker.server import ModelForServing, WorkerService, create_app

    root = tmp_path_factory.mktemp("real-thinker")
    model_dir = make_model("llama", root / THINKER, chat_template="qwen3-think")
    service = WorkerService(THINKER, secret=SECRET, keepalive_seconds=0.5)
    service.attach(ModelForServing(AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                                   AutoTokenizer.from_pretrained(model_dir), tier="dram", load_seconds=0.1))
    worker = ThreadServer(create_app(service))
    factory = GatewayFactory(root / "gateway", worker.url, model_dir)
    try:
        yield factory(static_models={THINKER: {"worker_url": worker.url, "source": str(model_dir)}})
    finally:
        factory.stop_all()
        worker.stop()
        service.shutdown()


def test_a_real_worker_thinks_up_to_the_budget_then_answers_the_schema(thinking_gw):
    """Greedy and seeded: the thinking cut at the budget (reasoning_tokens), then JSON valid against the schema."""
    client = thinking_gw.client()
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        answer = client.chat.completions.create(model=THINKER, messages=ASK, response_format=PERSON_FORMAT,
                                                max_tokens=80, extra_body={"thinking_token_budget": 5}, **sampling)
        choice = answer.choices[0]
        assert choice.finish_reason == "stop" and choice.message.reasoning
        assert answer.usage.completion_tokens_details.reasoning_tokens == 5
        check_person(choice.message.content)
