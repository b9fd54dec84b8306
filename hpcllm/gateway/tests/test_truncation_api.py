"""vLLM's truncate_prompt_tokens and truncation_side through a real gateway and the tiny model's worker: a prompt
or input keeps its first tokens (the tokenizer's side, or "right") or its last ("left"), -1 as many as the context
holds, and the answer is the one the truncated prompt gets; usage counts the tokens kept."""

from __future__ import annotations

import json

import pytest

from .conftest import MODEL
from .test_errors import assert_error

TEXT = "the quick brown fox jumps over the lazy dog and then runs far away into the woods"


@pytest.fixture(scope="module")
def context(tiny_model_dir) -> int:
    return json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]


def ids_of(hf_pair, text: str) -> list[int]:
    return list(hf_pair[1](text)["input_ids"])


def embed(gateway, body: dict) -> dict:
    resp = gateway.post("/v1/embeddings", json={"model": MODEL, "encoding_format": "float", **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def complete(gateway, body: dict) -> dict:
    resp = gateway.post("/v1/completions", json={"model": MODEL, "temperature": 0, "max_tokens": 4, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_an_input_keeps_its_first_or_last_tokens_as_asked(gateway, hf_pair):
    ids = ids_of(hf_pair, TEXT)
    assert len(ids) > 8
    first, last = ids[:6], ids[-6:]
    want_first, want_last = (e["embedding"] for e in embed(gateway, {"input": [first, last]})["data"])
    assert want_first != want_last

    cut = embed(gateway, {"input": TEXT, "truncate_prompt_tokens": 6})  # the tokenizer's side: right
    assert cut["data"][0]["embedding"] == pytest.approx(want_first, abs=1e-5)
    assert cut["usage"]["prompt_tokens"] == 6
    right = embed(gateway, {"input": TEXT, "truncate_prompt_tokens": 6, "truncation_side": "right"})
    assert right["data"][0]["embedding"] == pytest.approx(want_first, abs=1e-5)
    left = embed(gateway, {"input": [TEXT, ids], "truncate_prompt_tokens": 6, "truncation_side": "left"})
    assert [e["embedding"] for e in left["data"]] == [pytest.approx(want_last, abs=1e-5)] * 2
    assert left["usage"]["prompt_tokens"] == 12

    short = embed(gateway, {"input": "fox", "truncate_prompt_tokens": 6})  # shorter than asked: as it is
    assert short["data"][0]["embedding"] == pytest.approx(embed(gateway, {"input": "fox"})["data"][0]["embedding"],
                                                          abs=1e-6)


def test_minus_one_keeps_what_the_context_holds_where_the_text_was_refused(gateway, hf_pair, context):
    too_long = TEXT + " and more" * (2 * context)
    assert_error(gateway.post("/v1/embeddings", json={"model": MODEL, "input": too_long}), 400,
                 "context_length_exceeded", "input")
    kept = embed(gateway, {"input": too_long, "truncate_prompt_tokens": -1, "truncation_side": "left"})
    assert kept["usage"]["prompt_tokens"] == context
    tail = ids_of(hf_pair, too_long)[-context:]  # the whole text's tokens: the cut by characters changed none
    assert kept["data"][0]["embedding"] == pytest.approx(embed(gateway, {"input": tail})["data"][0]["embedding"],
                                                         abs=1e-5)

    # A generation keeps one token of the context for its first token.
    answer = complete(gateway, {"prompt": too_long, "truncate_prompt_tokens": -1, "max_tokens": 1})
    assert answer["usage"]["prompt_tokens"] == context - 1


def test_a_completion_is_the_truncated_prompts_and_echoes_it(gateway, hf_pair):
    ids = ids_of(hf_pair, TEXT)
    want = complete(gateway, {"prompt": ids[-5:]})
    got = complete(gateway, {"prompt": TEXT, "truncate_prompt_tokens": 5, "truncation_side": "left", "echo": True})
    echoed = hf_pair[1].decode(ids[-5:])
    assert got["choices"][0]["text"] == echoed + want["choices"][0]["text"]
    assert got["usage"]["prompt_tokens"] == 5
    uncut = complete(gateway, {"prompt": "fox", "truncate_prompt_tokens": 50, "echo": True, "max_tokens": 1})
    assert uncut["choices"][0]["text"].startswith("fox")  # nothing cut: the prompt as sent, no decoded BOS
    first = complete(gateway, {"prompt": [ids], "truncate_prompt_tokens": 5})
    assert first["choices"][0]["text"] == complete(gateway, {"prompt": ids[:5]})["choices"][0]["text"]


def test_a_chat_prompt_is_truncated_after_its_template(gateway):
    messages = [{"role": "user", "content": TEXT}]
    rendered = gateway.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    want = complete(gateway, {"prompt": rendered[-7:]})
    resp = gateway.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0,
                                                       "max_tokens": 4, "truncate_prompt_tokens": 7,
                                                       "truncation_side": "left"})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["usage"]["prompt_tokens"] == 7
    assert answer["choices"][0]["message"]["content"] == want["choices"][0]["text"]


def test_truncation_that_cannot_be_done_is_refused_naming_it(gateway, context):
    for path, body in (("/v1/embeddings", {"input": TEXT}), ("/v1/completions", {"prompt": TEXT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": TEXT}]}),
                       ("/v1/score", {"text_1": TEXT, "text_2": TEXT}), ("/v1/rerank", {"query": TEXT,
                                                                                      "documents": [TEXT]})):
        for bad in (0, context + 1):
            error = assert_error(gateway.post(path, json={"model": MODEL, **body, "truncate_prompt_tokens": bad}),
                                 400, "invalid_value", "truncate_prompt_tokens")
            assert f"truncate_prompt_tokens {bad}" in error["message"] or f"={bad}" in error["message"], error
        for bad in (-2, 10**40):
            assert_error(gateway.post(path, json={"model": MODEL, **body, "truncate_prompt_tokens": bad}), 422,
                         "invalid_value", "truncate_prompt_tokens")
        assert_error(gateway.post(path, json={"model": MODEL, **body, "truncate_prompt_tokens": 3,
                                              "truncation_side": "middle"}), 422, "invalid_value", "truncation_side")
    # A generation keeps a token of the context for its answer: the whole context is one too many.
    error = assert_error(gateway.post("/v1/completions", json={"model": MODEL, "prompt": TEXT,
                                                               "truncate_prompt_tokens": context}),
                         400, "invalid_value", "truncate_prompt_tokens")
    assert str(context - 1) in error["message"]
    assert embed(gateway, {"input": TEXT, "truncate_prompt_tokens": context})["usage"]["prompt_tokens"] > 0


def test_scores_of_truncated_texts_are_those_of_the_texts_cut(gateway, hf_pair):
    ids = ids_of(hf_pair, TEXT)
    vectors = [e["embedding"] for e in embed(gateway, {"input": [ids[:6], "fox"]})["data"]]
    resp = gateway.post("/v1/score", json={"model": MODEL, "text_1": TEXT, "text_2": "fox",
                                           "truncate_prompt_tokens": 6})
    assert resp.status_code == 200, resp.text
    dot = sum(a * b for a, b in zip(*vectors))
    norms = (sum(a * a for a in vectors[0]) * sum(b * b for b in vectors[1])) ** 0.5
    assert resp.json()["data"][0]["score"] == pytest.approx(dot / norms, abs=1e-5)
    assert resp.json()["usage"]["prompt_tokens"] == 6 + len(ids_of(hf_pair, "fox"))
