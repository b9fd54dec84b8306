"""The official openai client, unmodified, against a real gateway in front of a real worker."""

from __future__ import annotations

import httpx
import torch

from .conftest import MODEL

PROMPT = "hello world, this"


def hf_greedy(hf_pair, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, str, int]:
    """Text, finish reason and token count transformers' own generate gives for a greedy completion."""
    model, tokenizer = hf_pair
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return greedy_answer(tokenizer, out[0, len(prompt_ids):].tolist())


def greedy_answer(tokenizer, new: list[int]) -> tuple[str, str, int]:
    """hf_greedy's text, finish reason and token count for the tokens generate gave (cut after the first eos)."""
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    finish = "stop" if new[-1] == tokenizer.eos_token_id else "length"
    return tokenizer.decode(new, skip_special_tokens=True), finish, len(new)


def chat_prompt_ids(hf_pair, messages) -> list[int]:
    tokenizer = hf_pair[1]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_completion_greedy_equals_transformers_generate(gateway, hf_pair):
    client = gateway.client()
    for prompt in (PROMPT, "🙂 日本語"):
        expected_text, expected_finish, expected_tokens = hf_greedy(hf_pair, hf_pair[1](prompt)["input_ids"], 24)
        resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert resp.object == "text_completion" and resp.model == MODEL and resp.id.startswith("cmpl-")
        assert resp.choices[0].text == expected_text
        assert resp.choices[0].finish_reason == expected_finish
        assert resp.usage.prompt_tokens == len(hf_pair[1](prompt)["input_ids"])
        assert resp.usage.completion_tokens == expected_tokens
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_stream_gives_the_same_text_in_chunks(gateway, hf_pair):
    client = gateway.client()
    expected_text, expected_finish, _ = hf_greedy(hf_pair, hf_pair[1](PROMPT)["input_ids"], 20)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
    assert len(chunks) >= 2  # text and the finish (tokens that reach the gateway together share an event)
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == expected_text
    assert [c.choices[0].finish_reason for c in chunks][-1] == expected_finish
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)


def test_token_id_prompts_and_prompt_lists_give_one_choice_each(gateway, hf_pair):
    client = gateway.client()
    ids = hf_pair[1](PROMPT)["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text

    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "🙂 日本語"], max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.choices[1].text == hf_greedy(hf_pair, hf_pair[1]("🙂 日本語")["input_ids"], 8)[0]


def test_chat_greedy_equals_transformers_generate_on_the_chat_template(gateway, hf_pair):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    expected_text, expected_finish, expected_tokens = hf_greedy(hf_pair, chat_prompt_ids(hf_pair, messages), 20)
    resp = gateway.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == expected_text
    assert resp.choices[0].finish_reason == expected_finish
    assert resp.usage.prompt_tokens == len(chat_prompt_ids(hf_pair, messages))
    assert resp.usage.completion_tokens == expected_tokens


def test_chat_stream_with_include_usage(gateway, hf_pair):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    plain = [{"role": "user", "content": "hello world"}]
    expected_text, expected_finish, expected_tokens = hf_greedy(hf_pair, chat_prompt_ids(hf_pair, plain), 16)
    stream = gateway.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == expected_tokens
    assert usage_chunk.usage.prompt_tokens == len(chat_prompt_ids(hf_pair, plain))
    assert all(c.usage is None for c in chunks[:-1])
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert content == expected_text
    assert chunks[-2].choices[0].finish_reason == expected_finish


def test_raw_sse_framing_is_exactly_openais(gateway):
    resp = gateway.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = resp.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_stop_string_ends_the_text_before_it(gateway, hf_pair):
    client = gateway.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) >= 4, "the tiny model produced too little text to pick a stop string from"
    stop = full[2:4]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_the_stop_string_that_ended_a_choice_is_its_stop_reason(gateway):
    """vLLM's stop_reason on each choice (completions and chat, streamed and not): the stop string that ended it,
    null when it ended otherwise (length here); clients written for vLLM read which stop matched from it."""
    client = gateway.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[2:4]
    request = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=["never there", stop],
                   extra_body={"ignore_eos": True})
    choice = client.completions.create(**request).choices[0]
    assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", stop)
    last = [c for c in client.completions.create(**request, stream=True) if c.choices][-1].choices[0]
    assert (last.finish_reason, last.model_extra["stop_reason"]) == ("stop", stop)
    cut = client.completions.create(**{**request, "max_tokens": 1, "stop": None}).choices[0]
    assert (cut.finish_reason, cut.model_extra["stop_reason"]) == ("length", None)

    chat = dict(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0,
                extra_body={"ignore_eos": True})
    answer = client.chat.completions.create(**chat).choices[0].message.content
    chat["stop"] = [answer[2:4]]
    choice = client.chat.completions.create(**chat).choices[0]
    assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", answer[2:4])
    last = [c for c in client.chat.completions.create(**chat, stream=True) if c.choices][-1].choices[0]
    assert (last.finish_reason, last.model_extra["stop_reason"]) == ("stop", answer[2:4])


def test_stop_token_ids_end_the_choice_at_the_token(gateway, hf_pair):
    """vLLM's stop_token_ids (they were refused): the choice ends at the first of them it generates, that token's
    text left out, its id the stop_reason; an id outside the vocabulary is a 400 naming the field."""
    from .test_errors import assert_error

    tokenizer = hf_pair[1]
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        out = hf_pair[0].generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=8)
    new = out[0, len(prompt_ids):].tolist()
    stop_id = next(t for t in new[2:] if t != tokenizer.eos_token_id)
    before = new[:new.index(stop_id)]
    client = gateway.client()
    request = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"stop_token_ids": [stop_id]})
    choice = client.completions.create(**request).choices[0]
    assert (choice.text, choice.finish_reason, choice.model_extra["stop_reason"]) == (
        tokenizer.decode(before), "stop", stop_id)
    last = [c for c in client.completions.create(**request, stream=True) if c.choices][-1].choices[0]
    assert (last.finish_reason, last.model_extra["stop_reason"]) == ("stop", stop_id)
    vocab = hf_pair[0].get_input_embeddings().num_embeddings
    for body in ({"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stop_token_ids": [vocab]},
                 {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2,
                  "stop_token_ids": [-1]}):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        assert_error(gateway.post(path, json=body), 400, "invalid_request", "stop_token_ids")


def test_seeded_sampling_is_reproducible(gateway):
    client = gateway.client()
    runs = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
            .choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_models_list(gateway):
    models = gateway.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model" and models.data[0].owned_by
    raw = gateway.get("/v1/models").json()
    assert raw["object"] == "list"
    assert gateway.client().models.retrieve(MODEL).id == MODEL


def test_metrics_count_requests_with_vllm_style_names(make_gateway):
    gateway = make_gateway()
    client = gateway.client()
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    text = httpx.get(f"{gateway.url}/metrics").text
    assert f'hpcllm_request_success_total{{finished_reason="length",model_name="{MODEL}"}} 1.0' in text
    assert f'hpcllm_time_to_first_token_seconds_count{{model_name="{MODEL}"}} 1.0' in text
    assert f'hpcllm_generation_tokens_total{{model_name="{MODEL}"}} 5.0' in text
    assert f'hpcllm_e2e_request_latency_seconds_count{{model_name="{MODEL}"}} 1.0' in text
    assert f'hpcllm_num_requests_running{{model_name="{MODEL}"}} 0.0' in text


def test_health_and_ready_are_open(gateway):
    assert httpx.get(f"{gateway.url}/health").status_code == 200
    ready = httpx.get(f"{gateway.url}/ready")
    assert ready.status_code == 200, ready.text
