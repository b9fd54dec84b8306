"""echo and prompt log probabilities on /v1/completions, as lm-evaluation-harness's local-completions model scores
a context and its continuation (loglikelihood tasks: MMLU, HellaSwag, ...), and vLLM's prompt_logprobs on chat,
through a real gateway and worker."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import MODEL
from .test_openai_api import PROMPT


def prompt_logprobs(hf_pair, ids: list[int]) -> list[float]:
    """transformers' log probability of each prompt token after the first, given the tokens before it."""
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_pair[0](torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logprobs[p - 1, ids[p]]) for p in range(1, len(ids))]


def lm_eval_request(prompt, **fields) -> dict:
    """What lm-eval's local-completions sends for a loglikelihood request (api_models / openai_completions)."""
    return {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True,
            "seed": 1234, **fields}


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_an_lm_eval_loglikelihood_request_gets_the_prompt_and_its_logprobs(gateway, hf_pair, max_tokens):
    tokenizer = hf_pair[1]
    ids = tokenizer(PROMPT)["input_ids"]
    resp = gateway.post("/v1/completions", json=lm_eval_request([ids], max_tokens=max_tokens))
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    lp = choice["logprobs"]
    generated = 1 if max_tokens else 0  # max_tokens 0: the prompt alone (vLLM)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + generated
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(prompt_logprobs(hf_pair, ids), abs=1e-4)
    assert lp["tokens"][:len(ids)] == [tokenizer.decode([i]) for i in ids]
    # the token and its most likely alternative (one entry when that is the token): logprobs + 1 at most (OpenAI)
    assert all(1 <= len(top) <= 2 and top[token] == logprob
               for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]))
    assert choice["text"].startswith(tokenizer.decode(ids))
    if not max_tokens:
        assert choice["text"] == tokenizer.decode(ids)
    # lm-eval's parse_logprobs: the continuation's logprobs and whether it is the greedy one.
    continuation = slice(len(ids) - 3, len(ids) - 1 + generated) if generated else slice(len(ids) - 3, None)
    assert sum(lp["token_logprobs"][continuation]) == pytest.approx(sum(prompt_logprobs(hf_pair, ids)[-3:]),
                                                                     abs=1e-3)
    with torch.no_grad():
        greedy = hf_pair[0](torch.tensor([ids])).logits[0].argmax(dim=-1).tolist()
    for position in range(1, len(ids)):
        is_greedy = lp["token_logprobs"][position] == pytest.approx(max(lp["top_logprobs"][position].values()))
        assert is_greedy == (greedy[position - 1] == ids[position])


def test_echo_of_a_text_prompt_streamed_and_not(gateway, hf_pair):
    client = gateway.client()
    ids = hf_pair[1](PROMPT)["input_ids"]
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                      logprobs=2)
    choice = whole.choices[0]
    assert choice.text == PROMPT + plain.choices[0].text
    assert choice.logprobs.token_logprobs[1:len(ids)] == pytest.approx(prompt_logprobs(hf_pair, ids), abs=1e-4)
    assert len(choice.logprobs.tokens) == len(ids) + whole.usage.completion_tokens
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)
    assert choice.logprobs.text_offset[len(ids)] == len(PROMPT)  # the generated tokens' offsets follow the prompt

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    assert chunks[0].choices[0].text.startswith(PROMPT)  # the prompt goes out in the first chunk
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert [t for s in streamed for t in s.tokens] == choice.logprobs.tokens
    assert [t for s in streamed for t in s.token_logprobs] == pytest.approx(choice.logprobs.token_logprobs)
    # echo without logprobs: the text only
    bare = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert bare.choices[0].text == choice.text and bare.choices[0].logprobs is None


def test_echo_with_max_tokens_0_streams_the_prompt_alone(gateway, hf_pair):
    ids = hf_pair[1](PROMPT)["input_ids"]
    resp = gateway.post("/v1/completions", json=lm_eval_request(ids, max_tokens=0, stream=True))
    events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    choices = [e["choices"][0] for e in events]
    assert "".join(c["text"] for c in choices) == hf_pair[1].decode(ids)
    assert choices[-1]["finish_reason"] == "length"
    tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert len(tokens) == len(ids)


def test_max_tokens_0_without_echo_is_a_400_and_requests_without_echo_are_unchanged(gateway):
    resp = gateway.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 0})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens"
    resp = gateway.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0,
                                                 "logprobs": 1})
    lp = resp.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and None not in lp["token_logprobs"]


def test_vllms_prompt_logprobs_parameter_gives_its_shape(gateway, hf_pair):
    """vLLM's extension: choices[].prompt_logprobs, per prompt token {token id: {logprob, rank, decoded_token}} for
    the token and its most likely alternatives; refused when streaming (as vLLM)."""
    tokenizer = hf_pair[1]
    ids = tokenizer(PROMPT)["input_ids"]
    resp = gateway.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 2, "temperature": 0,
                                                 "prompt_logprobs": 2})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["logprobs"] is None
    assert_vllm_prompt_logprobs(hf_pair, ids, choice["prompt_logprobs"], 2)
    resp = gateway.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2,
                                                 "prompt_logprobs": 1, "stream": True})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt_logprobs"


def test_chat_prompt_logprobs_score_the_rendered_messages(gateway, hf_pair):
    """vLLM's extension on chat too: the response's top-level prompt_logprobs, over the prompt the chat template
    renders (the ids /tokenize counts for the messages), once whatever n; refused when streaming (as vLLM)."""
    messages = [{"role": "user", "content": PROMPT}]
    ids = gateway.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    resp = gateway.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2, "n": 2,
                                                      "prompt_logprobs": 3})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["choices"]) == 2 and all("prompt_logprobs" not in choice for choice in body["choices"])
    assert_vllm_prompt_logprobs(hf_pair, ids, body["prompt_logprobs"], 3)
    plain = gateway.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2})
    assert plain.json()["prompt_logprobs"] is None
    resp = gateway.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2,
                                                      "prompt_logprobs": 0, "stream": True})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt_logprobs"


def assert_vllm_prompt_logprobs(hf_pair, ids: list[int], prompt_logprobs: list, k: int) -> None:
    """vLLM's shape: per prompt token {token id: {logprob, rank, decoded_token}} for the token and its k most likely
    alternatives (None for the first), each as transformers scores the prompt."""
    model, tokenizer = hf_pair
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    with torch.no_grad():
        rows = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for position, ranked in enumerate(prompt_logprobs[1:], start=1):
        row, token = rows[position - 1], ids[position]
        own = ranked[str(token)]
        assert own["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert own["rank"] == int((row >= row[token]).sum())  # vLLM's rank: itself and every token as likely
        assert own["decoded_token"] == tokenizer.decode([token])
        best = torch.topk(row, k).indices.tolist()
        assert {int(key) for key in ranked} == {token, *best}
        assert [ranked[str(i)]["rank"] for i in best] == list(range(1, k + 1))
