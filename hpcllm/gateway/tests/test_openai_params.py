"""n > 1, logprobs / top_logprobs, best_of, penalties, logit_bias and min_p through the gateway, with the official
openai client."""

from __future__ import annotations

import base64
import struct

import pytest
import torch

from hpcllm.worker.protocol import TokenLine

from .conftest import MODEL
from .test_openai_api import PROMPT, chat_prompt_ids, hf_greedy


def hf_logprobs(hf_pair, prompt_ids: list[int], output_ids: list[int]) -> list[float]:
    """Log probability transformers gives each output token (raw distribution)."""
    model = hf_pair[0]
    ids = prompt_ids + output_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logprobs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(output_ids)]


def test_n_greedy_choices_all_equal_generate_and_are_indexed(gateway, hf_pair):
    client = gateway.client()
    expected_text, _, _ = hf_greedy(hf_pair, hf_pair[1](PROMPT)["input_ids"], 12)
    resp = client.completions.create(model=MODEL, prompt=[PROMPT, "the"], n=2, max_tokens=12, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.choices[0].text == resp.choices[1].text == expected_text  # choices 0, 1: the first prompt
    assert resp.choices[2].text == resp.choices[3].text == hf_greedy(hf_pair, hf_pair[1]("the")["input_ids"], 12)[0]


def test_n_seeded_samples_differ_from_each_other_and_repeat_across_calls(gateway):
    client = gateway.client()

    def texts():
        resp = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=16, temperature=1.0, seed=11,
                                         extra_body={"ignore_eos": True})
        assert resp.usage.completion_tokens == 3 * 16
        return [c.text for c in resp.choices]

    first = texts()
    assert len(set(first)) == 3
    assert texts() == first


def test_every_64_bit_seed_is_its_own_and_others_are_refused(gateway):
    """Seeds are vLLM's signed 64-bit range: seeds 2**63 apart are different samples (they were folded onto one),
    n samples wrap at the top of the range, and a seed outside it is a 422 naming the parameter."""
    import openai

    client = gateway.client()

    def text(seed: int, n: int = 1) -> list[str]:
        resp = client.completions.create(model=MODEL, prompt=PROMPT, n=n, max_tokens=16, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True})
        return [c.text for c in resp.choices]

    assert text(-1) != text(2**63 - 1) and text(-(2**63)) != text(0)
    top = text(2**63 - 1, n=2)  # the second sample draws with the seed after the top one: the bottom of the range
    assert top == [text(2**63 - 1)[0], text(-(2**63))[0]]
    for seed in (2**63, -(2**63) - 1):
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            text(seed)
        assert refused.value.body["param"] == "seed"


def test_chat_n_streams_every_choice_with_its_role_chunk(gateway):
    client = gateway.client()
    messages = [{"role": "user", "content": "hi there"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=10, temperature=0.8,
                                           seed=5)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=10,
                                                 temperature=0.8, seed=5, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[index].message.content
        assert mine[-1].finish_reason == whole.choices[index].finish_reason


def test_streamed_choices_interleave_as_their_worker_streams_come(make_gateway, tiny_model_dir):
    """n > 1 streamed: each choice's text goes out as its worker sends it, not one whole choice after the other (a
    stand-in worker producing one token per 100 ms per choice: the second choice's first chunk comes long before the
    first choice's last; read one choice after the other, the second's tokens would come after, in one chunk)."""
    from .conftest import ThreadServer
    from .stand_in_worker import slow_worker_app

    slow = ThreadServer(slow_worker_app(seconds_per_token=0.1))
    try:
        running = make_gateway(static_models={"slow": {"worker_url": slow.url, "source": str(tiny_model_dir)}})
        chunks = list(running.client().completions.create(model="slow", prompt="hi", n=2, max_tokens=8,
                                                           stream=True))
    finally:
        slow.stop()
    order = [c.choices[0].index for c in chunks if c.choices and c.choices[0].text]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)  # choice 1 began before choice 0 ended
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == "x" * 8 and mine[-1].finish_reason == "length"


def test_continuous_usage_counts_each_chunks_own_choice(gateway, hf_pair):
    """vLLM's stream_options.continuous_usage_stats: every chunk's usage is its choice's so far (its prompt's tokens
    and the tokens that choice generated), as vLLM's completions and chat streams count it; the last chunk, the whole
    request's."""
    client = gateway.client()
    prompts = ["hello", "hello world, a longer prompt"]
    lengths = [len(hf_pair[1](p)["input_ids"]) for p in prompts]
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=3,
                                            stream=True, stream_options=options, extra_body={"ignore_eos": True}))
    last = {}
    for chunk in chunks[:-1]:
        index = chunk.choices[0].index
        assert chunk.usage.prompt_tokens == lengths[index // 2]
        assert chunk.usage.completion_tokens >= last.get(index, 0)
        last[index] = chunk.usage.completion_tokens
    assert last == {0: 6, 1: 6, 2: 6, 3: 6}
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (sum(lengths), 24)

    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                               max_tokens=5, temperature=1.0, seed=3, stream=True,
                                               stream_options=options, extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index: c.usage.completion_tokens for c in chat if c.choices and c.choices[0].finish_reason}
    assert finished == {0: 5, 1: 5} and chat[-1].usage.completion_tokens == 10


def test_completion_logprobs_match_the_model_and_streaming_gives_the_same(gateway, hf_pair):
    client = gateway.client()
    prompt_ids = hf_pair[1](PROMPT)["input_ids"]
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2)
    choice = resp.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == resp.usage.completion_tokens
    output_ids = hf_pair[1](choice.text, add_special_tokens=False)["input_ids"]
    if len(output_ids) == len(lp.tokens):  # the text re-tokenizes to the same ids (usual for this tokenizer)
        assert lp.token_logprobs == pytest.approx(hf_logprobs(hf_pair, prompt_ids, output_ids), abs=1e-4)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(logprob)  # greedy: the best one
        assert top.get(token, logprob) == pytest.approx(logprob)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2,
                                            stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [t for s in streamed for t in s.token_logprobs] == pytest.approx(lp.token_logprobs)
    assert [t for s in streamed for t in s.text_offset] == lp.text_offset


@pytest.mark.parametrize("k", [0, 1])
def test_completion_top_logprobs_always_hold_the_sampled_token(gateway, k):
    """OpenAI's legacy logprobs (and vLLM's): 'the API will always return the logprob of the sampled token, so there
    may be up to logprobs+1 elements' in each top_logprobs entry, streamed or not, for the echoed prompt's tokens
    too: the sampled token first, then the k most likely (k entries where it is one of them, else k + 1). Sampled at
    temperature 2, most tokens are not the most likely one."""
    client = gateway.client()
    request = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=2.0, seed=5, logprobs=k)
    whole = client.completions.create(**request).choices[0].logprobs
    chunks = list(client.completions.create(**request, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs is not None]
    echoed = client.completions.create(**request, echo=True).choices[0].logprobs
    for lp in (whole, echoed):
        first = 1 if lp is echoed else 0  # the echoed prompt's first token has none
        tops = list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))[first:]
        assert tops
        for token, logprob, top in tops:
            assert next(iter(top)) == token and top[token] == pytest.approx(logprob)
            alternatives = list(top.values())[1:]
            if len(top) == k + 1:  # not one of the k most likely: all of them are likelier
                assert all(other >= logprob for other in alternatives)
            else:  # one of them: the k - 1 others and one less likely token not listed
                assert len(top) == k and k >= 1
        assert any(len(top) == k + 1 for _, _, top in tops)  # a token not the most likely was sampled
    assert [top for s in streamed for top in s.top_logprobs] == whole.top_logprobs


def test_chat_logprobs_with_top_logprobs_stream_and_not(gateway, hf_pair):
    client = gateway.client()
    messages = [{"role": "user", "content": "hello"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    assert all(t.bytes == list(t.token.encode()) for t in content)
    expected_text = hf_greedy(hf_pair, chat_prompt_ids(hf_pair, messages), 8)[0]
    assert resp.choices[0].message.content == expected_text

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]

    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_best_of_returns_the_choice_with_the_highest_cumulative_logprob(gateway):
    client = gateway.client()
    common = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    # best_of=3 generates exactly what n=3 does (same seeds), then keeps the most likely one.
    all_three = client.completions.create(n=3, logprobs=0, **common)
    scores = {c.text: sum(c.logprobs.token_logprobs) for c in all_three.choices}
    best = client.completions.create(best_of=3, **common)
    assert len(best.choices) == 1 and best.choices[0].index == 0
    assert best.choices[0].text == max(scores, key=scores.get)
    assert best.choices[0].logprobs is None  # not asked for
    assert best.usage.completion_tokens == 3 * 8  # every generated choice counts


def test_bad_combinations_are_400(gateway):
    resp = gateway.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                      "top_logprobs": 2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_logprobs"
    for logprobs in ({}, {"logprobs": False}):  # 0 too, as OpenAI (vLLM lets 0 through and returns no logprobs)
        resp = gateway.post("/v1/chat/completions", json={"model": MODEL, "top_logprobs": 0, **logprobs,
                                                          "messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_logprobs", resp.text
    resp = gateway.post("/v1/completions", json={"model": MODEL, "prompt": "x", "best_of": 1, "n": 2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "best_of"
    resp = gateway.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 21})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "logprobs"


def hf_embedding(hf_pair, ids: list[int]) -> list[float]:
    with torch.no_grad():
        hidden = hf_pair[0].base_model(torch.tensor([ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(hidden, dim=-1).tolist()


def test_embeddings_are_the_normalized_last_token_state_in_float_and_base64(gateway, hf_pair):
    client = gateway.client()
    tokenizer = hf_pair[1]
    resp = client.embeddings.create(model=MODEL, input=[PROMPT, "the"])  # the client asks for base64
    assert [d.index for d in resp.data] == [0, 1] and resp.model == MODEL
    for text, data in zip([PROMPT, "the"], resp.data):
        assert data.embedding == pytest.approx(hf_embedding(hf_pair, tokenizer(text)["input_ids"]), abs=1e-5)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(
        len(tokenizer(t)["input_ids"]) for t in [PROMPT, "the"])
    as_floats = client.embeddings.create(model=MODEL, input=tokenizer(PROMPT)["input_ids"], encoding_format="float")
    assert as_floats.data[0].embedding == pytest.approx(resp.data[0].embedding, abs=1e-6)


def test_embeddings_bad_input_is_refused(gateway):
    resp = gateway.post("/v1/embeddings", json={"model": MODEL, "input": []})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "input"
    resp = gateway.post("/v1/embeddings", json={"model": MODEL, "input": "x", "dimensions": 8})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "dimensions"


def test_embeddings_fields_that_would_change_the_vector_or_its_bytes_are_honoured_or_refused(gateway, hf_pair):
    """vLLM's embed_dtype (of base64's bytes) and use_activation (and its removed normalize) change what the client
    decodes: refused by name unless neutral, never ignored; endianness "big" answers big-endian float32. Floats
    are floats whatever the embed_dtype (vLLM's: it only shapes base64 and bytes)."""
    ids = hf_pair[1](PROMPT)["input_ids"]
    for extra in ({"embed_dtype": "float16", "encoding_format": "base64"}, {"use_activation": False},
                  {"normalize": False}):
        resp = gateway.post("/v1/embeddings", json={"model": MODEL, "input": "x", **extra})
        field = next(iter(extra))
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field, (field, resp.text)
    as_floats = gateway.post("/v1/embeddings", json={"model": MODEL, "input": ids, "embed_dtype": "float16",
                                                      "encoding_format": "float"})
    assert as_floats.status_code == 200, as_floats.text
    assert as_floats.json()["data"][0]["embedding"] == pytest.approx(hf_embedding(hf_pair, ids), abs=1e-5)
    neutral = gateway.post("/v1/embeddings", json={"model": MODEL, "input": ids, "embed_dtype": "float32",
                                                    "use_activation": True, "endianness": "little"})
    assert neutral.status_code == 200
    big = gateway.post("/v1/embeddings", json={"model": MODEL, "input": ids, "encoding_format": "base64",
                                                "endianness": "big"}).json()["data"][0]["embedding"]
    floats = struct.unpack(f">{len(hf_embedding(hf_pair, ids))}f", base64.b64decode(big))
    assert list(floats) == pytest.approx(hf_embedding(hf_pair, ids), abs=1e-5)


def test_embeddings_take_add_special_tokens(make_gateway, tmp_path, worker_url, tiny_model_dir, hf_pair):
    """vLLM's add_special_tokens (default true): false embeds the text without the special tokens the tokenizer
    adds (here a BOS: the tiny model's tokenizer given Llama's post-processor; the same weights on the worker)."""
    import json
    import shutil

    from transformers import AutoTokenizer

    source = shutil.copytree(tiny_model_dir, tmp_path / "tiny-bos")
    tokenizer_json = json.loads((source / "tokenizer.json").read_text())
    bos = hf_pair[1].bos_token
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                 {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [hf_pair[1].bos_token_id], "tokens": [bos]}}}
    (source / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    tokenizer = AutoTokenizer.from_pretrained(source)
    bare, with_bos = (tokenizer(PROMPT, add_special_tokens=add)["input_ids"] for add in (False, True))
    assert with_bos == [hf_pair[1].bos_token_id, *bare]
    gateway = make_gateway(static_models={"tiny-bos": {"worker_url": worker_url, "source": str(source)}})
    for add, ids in ((False, bare), (True, with_bos), (None, with_bos)):
        body = {"model": "tiny-bos", "input": PROMPT, "encoding_format": "float"}
        resp = gateway.post("/v1/embeddings", json=body if add is None else {**body, "add_special_tokens": add})
        assert resp.json()["data"][0]["embedding"] == pytest.approx(hf_embedding(hf_pair, ids), abs=1e-5), add
        assert resp.json()["usage"]["prompt_tokens"] == len(ids)


PENALTIES = dict(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={"17": 4.0, "3": -100})
VLLM_PENALTIES = {"repetition_penalty": 1.3, "min_p": 0.1}


def test_penalties_logit_bias_and_min_p_reach_the_worker(gateway, worker_url, hf_pair):
    """The completion equals the worker's own answer to the same parameters, and differs from a plain one."""
    from hpcllm.worker.client import WorkerClient
    from hpcllm.worker.protocol import GenerateRequest

    from .conftest import SECRET

    client = gateway.client()
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "seed": 3}):
        got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, **sampling, **PENALTIES,
                                        extra_body={"ignore_eos": True, **VLLM_PENALTIES})
        with WorkerClient(worker_url, SECRET, read_timeout=60) as worker:
            with worker.generate(GenerateRequest(
                    request_id=f"direct-{len(sampling)}", prompt_token_ids=hf_pair[1](PROMPT)["input_ids"],
                    max_tokens=16, ignore_eos=True, **sampling, **VLLM_PENALTIES, frequency_penalty=1.5,
                    presence_penalty=0.5, logit_bias={17: 4.0, 3: -100.0})) as direct:
                expected = "".join(line.text for line in direct if isinstance(line, TokenLine))
        plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, **sampling,
                                          extra_body={"ignore_eos": True})
        assert got.choices[0].text == expected != plain.choices[0].text


def test_logit_bias_forces_a_token_in_chat_and_streams(gateway, hf_pair):
    tokenizer = hf_pair[1]
    client = gateway.client()
    messages = [{"role": "user", "content": "hi there"}]
    forced = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0.7, seed=1,
                                            logit_bias={"17": 100})
    assert forced.choices[0].message.content == tokenizer.decode([17] * 5, skip_special_tokens=True)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                            logit_bias={"17": 100}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tokenizer.decode([17] * 5)


@pytest.mark.parametrize("extra, param", [
    ({"logit_bias": {"seven": 1.0}}, "logit_bias"),
    ({"logit_bias": {"-3": 1.0}}, "logit_bias"),
    ({"logit_bias": {"7": 101}}, "logit_bias"),
    ({"logit_bias": {"7": "1"}}, "logit_bias.7"),
    ({"logit_bias": {str(i): 1.0 for i in range(301)}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 1e39}, "repetition_penalty"),  # overflows float32 in the worker's sampler
    ({"repetition_penalty": 1e-40}, "repetition_penalty"),  # its inverse does
    ({"min_p": 1.5}, "min_p"),
])
def test_bad_penalty_and_bias_values_are_refused_naming_the_parameter(gateway, extra, param):
    from .test_errors import assert_error

    resp = gateway.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **extra})
    error = assert_error(resp, 422, "invalid_value", param)
    if param == "logit_bias":
        assert any(word in error["message"] for word in ("token ids", "within", "at most")), error


def test_a_logit_bias_token_beyond_the_vocabulary_is_the_workers_400_relayed(gateway, hf_pair):
    from .test_errors import assert_error

    vocab = hf_pair[0].get_input_embeddings().num_embeddings
    resp = gateway.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2,
                                                 "logit_bias": {"3": 1.0, str(vocab): 1.0}})
    error = assert_error(resp, 400, "invalid_request", "logit_bias")
    assert f"token id {vocab}, outside this model's vocabulary 0..{vocab - 1}" in error["message"]
