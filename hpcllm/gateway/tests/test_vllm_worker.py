"""vLLM behind hpcllm, for real: a vLLM worker (hpcllm.worker.vllm_engine in the interpreter of `make vllm-venv`,
weights read through hpcllm's store by the vLLM loader plugin) serves through the gateway to the openai client, and
generations live-migrate between it and hpcllm's own engine, and between two vLLM workers, with the text of an
unmigrated run.

One vLLM worker serves the module and test_vllm_lora.py (conftest's vllm_server, started with a LoRA adapter that
the requests here do not name: they get the base model); a second one starts for the vLLM -> vLLM migration, another
for the thinking model: each takes 30-120 s to start on these shared 2 cores. The tests skip, saying why, only when
the vLLM interpreter is absent; `make test` builds it (make vllm-venv).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hpcllm.worker.client import WorkerClient, WorkerError
from hpcllm.worker.migration import ticketed_request
from hpcllm.worker.protocol import GenerateRequest, Thinking, TokenLine
from hpcllm.worker.grammar import compile_grammar
from hpcllm.worker.requests import KV_CACHE_FULL, preempted_reason
from hpcllm.worker.tests.schemas import OTHER_CONSTRAINTS, PERSON_GRAMMAR, check_person

from .conftest import MODEL, SECRET, read_completion_stream, start_vllm_worker_for_test, vllm_python
from .test_migration import Worker, move_when_held
from .test_resume import ScriptedRouter

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[3]
PROMPT = "hello world"
# ~260 tokens: more than one of vLLM's KV blocks (128 tokens on CPU), so a migration into vLLM can find the context
# in its prefix cache.
LONG_PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)


@pytest.fixture(scope="module")
def vllm_worker(vllm_server) -> str:
    return vllm_server[0]


@pytest.fixture(scope="module")
def second_vllm_server(vllm_checkpoint, tmp_path_factory):
    """A second vLLM worker (only the vLLM -> vLLM migration needs one; it starts when that test runs)."""
    yield from start_vllm_worker_for_test(vllm_checkpoint, tmp_path_factory)


@pytest.fixture(scope="module")
def reference(small_llama_dir):
    """Greedy continuations by transformers' generate (float32, as the checkpoint)."""
    return transformers_greedy(small_llama_dir)


def transformers_greedy(model_dir: Path):
    """generate(prompt, max_tokens) -> (token ids, text): greedy continuations of the model by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def generate(prompt: str, max_tokens: int) -> tuple[list[int], str]:
        import torch

        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        return new, tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return generate


@pytest.fixture(scope="module")
def hpcllm_worker(small_llama_dir):
    """hpcllm's own engine over the same model (in this process), for migrations to and from vLLM."""
    worker = Worker(small_llama_dir)
    yield worker
    worker.stop()


@pytest.fixture
def gateway_to(make_gateway, vllm_checkpoint):
    """gateway_to(*worker_urls): a gateway whose router answers with these workers in turn (the last repeats)."""
    return lambda *urls: make_gateway(router=ScriptedRouter(vllm_checkpoint, list(urls)))


def test_greedy_tokens_equal_transformers(vllm_worker, reference):
    expected, text = reference(PROMPT, 32)
    with WorkerClient(vllm_worker, SECRET, read_timeout=120) as client:
        with client.generate(GenerateRequest(request_id="greedy", prompt=PROMPT, max_tokens=32, temperature=0,
                                             ignore_eos=True)) as stream:
            lines = list(stream)
        ready = client.ready()
    assert [line.token_id for line in lines[:-1]] == expected
    assert "".join(line.text for line in lines[:-1]) == text
    assert stream.final.finish_reason == "length" and stream.final.usage.completion_tokens == 32
    assert ready["load_tier"] in ("disk", "sharedfs", "dram")  # the weights came through hpcllm's store


def test_openai_client_through_the_gateway(vllm_worker, gateway_to, reference):
    _, expected = reference(PROMPT, 24)
    client = gateway_to(vllm_worker).client().with_options(timeout=120)
    request = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})

    whole = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))

    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 24


def test_seeded_sampling_repeats_for_every_seed(vllm_worker):
    """vLLM takes seed -1 for "no seed": through hpcllm every seed, -1 included, gives the same text each time."""

    def sample(seed: int) -> list[int]:
        with WorkerClient(vllm_worker, SECRET, read_timeout=120) as client:
            with client.generate(GenerateRequest(request_id=f"seeded{seed}", prompt=PROMPT, max_tokens=24,
                                                 temperature=1.0, seed=seed, ignore_eos=True)) as stream:
                return [line.token_id for line in stream if isinstance(line, TokenLine)]

    for seed in (-1, 7):
        assert sample(seed) == sample(seed)
    assert sample(-1) != sample(7)


def test_embeddings_and_scores_are_refused_by_name(vllm_worker, gateway_to):
    """Embeddings, and the scores computed from them, are not passed through to vLLM: a clear 400 naming the model
    and the engine, never an answer without them."""
    import openai

    gateway = gateway_to(vllm_worker)
    client = gateway.client().with_options(timeout=120)
    with pytest.raises(openai.BadRequestError, match='embeddings are not served by models with engine = "vllm"'):
        client.embeddings.create(model=MODEL, input="hello")
    for path, body in (("/v1/score", {"text_1": "a", "text_2": ["b", "c"]}),
                       ("/v1/rerank", {"query": "a", "documents": ["b"]})):
        refused = gateway.post(path, json={"model": MODEL, **body})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert f"model {MODEL!r}" in error["message"] and 'engine = "vllm"' in error["message"]
        assert error["param"] == "model"


@pytest.mark.parametrize("max_tokens", [4, 0])
def test_echo_and_logprobs_read_the_same_from_either_engine(vllm_worker, hpcllm_worker, gateway_to, max_tokens):
    """lm-eval's loglikelihood request (echo, logprobs, greedy): vLLM's prompt and output logprobs, mapped onto
    hpcllm's stream, answer as hpcllm's engine does (max_tokens 0: the prompt alone); vLLM's prompt_logprobs
    parameter too."""
    request = dict(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0, echo=True, logprobs=2,
                   extra_body={"ignore_eos": True, "prompt_logprobs": 3})
    answers = [gateway_to(url).client().with_options(timeout=120).completions.create(**request).choices[0]
               for url in (vllm_worker, hpcllm_worker.url)]
    (vllm, hpcllm) = (answer.logprobs for answer in answers)
    assert answers[0].text == answers[1].text and answers[0].text.startswith(PROMPT)
    assert vllm.tokens == hpcllm.tokens and vllm.text_offset == hpcllm.text_offset
    assert vllm.token_logprobs[0] is None and hpcllm.token_logprobs[0] is None
    assert vllm.token_logprobs[1:] == pytest.approx(hpcllm.token_logprobs[1:], abs=2e-3)
    assert [list(top) for top in vllm.top_logprobs[1:]] == [list(top) for top in hpcllm.top_logprobs[1:]]
    assert_same_prompt_logprobs(*(answer.model_extra["prompt_logprobs"] for answer in answers))


def assert_same_prompt_logprobs(from_vllm: list, from_hpcllm: list) -> None:
    """vLLM's prompt_logprobs shape read the same from either engine: the same tokens, ranks, log probabilities."""
    assert len(from_vllm) == len(from_hpcllm) and from_vllm[0] is None and from_hpcllm[0] is None
    for by_vllm, by_hpcllm in zip(from_vllm[1:], from_hpcllm[1:]):
        assert by_vllm.keys() == by_hpcllm.keys()
        assert {k: v["rank"] for k, v in by_vllm.items()} == {k: v["rank"] for k, v in by_hpcllm.items()}
        assert [v["logprob"] for v in by_vllm.values()] == pytest.approx(
            [v["logprob"] for v in by_hpcllm.values()], abs=2e-3)


def test_chat_and_stop_string_through_the_gateway(vllm_worker, hpcllm_worker, gateway_to):
    """The same chat request with a stop string reads the same from either engine, vLLM's prompt_logprobs too."""
    request = dict(model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=20, temperature=0)
    answers, prompt_logprobs = [], []
    for url in (vllm_worker, hpcllm_worker.url):
        answer = gateway_to(url).client().with_options(timeout=120).chat.completions.create(
            **request, extra_body={"prompt_logprobs": 2})
        answers.append((answer.choices[0].message.content, answer.choices[0].finish_reason))
        prompt_logprobs.append(answer.model_extra["prompt_logprobs"])
    assert_same_prompt_logprobs(*prompt_logprobs)
    text = answers[0][0]
    assert answers[0] == answers[1] and text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    client = gateway_to(vllm_worker).client().with_options(timeout=120)
    stopped = client.chat.completions.create(**request, stop=[stop])
    assert stopped.choices[0].message.content == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_penalties_logit_bias_and_min_p_choose_the_same_tokens_on_either_engine(vllm_worker, hpcllm_worker):
    """They reach vLLM's SamplingParams, and hpcllm's engine applies them as vLLM does (greedy: no draws to differ)."""
    fields = dict(prompt=PROMPT, max_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=1.5,
                  presence_penalty=0.5, repetition_penalty=1.3, min_p=0.1, logit_bias={17: 3.0, 100: -100.0})
    tokens = []
    for url in (vllm_worker, hpcllm_worker.url):
        with WorkerClient(url, SECRET, read_timeout=120) as client:
            with client.generate(GenerateRequest(request_id="penalized", **fields)) as stream:
                tokens.append([line.token_id for line in stream if isinstance(line, TokenLine)])
    assert tokens[0] == tokens[1] and len(tokens[0]) == 24
    plain = dict(fields, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0, logit_bias={})
    with WorkerClient(vllm_worker, SECRET, read_timeout=120) as client:
        with client.generate(GenerateRequest(request_id="plain", **plain)) as stream:
            assert [line.token_id for line in stream if isinstance(line, TokenLine)] != tokens[0]


def test_vllm_refuses_a_repetition_penalty_that_overflows_its_float32_and_follows_hpcllm_within_its_bound(
        vllm_worker, hpcllm_worker, small_llama_dir):
    """The API's smallest repetition_penalty divides the logits of the prompt's tokens, each raised by a bias of 100,
    past float32's range. hpcllm's engine computes such a row in float64 and takes the prompt token the model finds
    most likely (test_engine.py); vLLM computes it in float32, where the overflowed logits tie (it answered
    [261, 261, 261, 261], hpcllm's engine [345, 261, 345, 261]). A vLLM worker refuses such a factor, naming the
    parameter, and at its bound chooses what hpcllm's engine chooses."""
    from transformers import AutoTokenizer

    from hpcllm.worker.protocol import FLOAT32_TINY
    from hpcllm.worker.vllm_engine import VLLM_REPETITION_PENALTY_BOUND

    prompt_ids = AutoTokenizer.from_pretrained(small_llama_dir)(PROMPT)["input_ids"]
    fields = dict(prompt_token_ids=prompt_ids, max_tokens=4, temperature=0, ignore_eos=True,
                  logit_bias={t: 100.0 for t in set(prompt_ids)})
    with WorkerClient(vllm_worker, SECRET, read_timeout=120) as client:
        for factor in (FLOAT32_TINY, 2 * VLLM_REPETITION_PENALTY_BOUND):
            with pytest.raises(WorkerError) as refused:
                with client.generate(GenerateRequest(request_id="overflowing", repetition_penalty=factor,
                                                     **fields)) as stream:
                    list(stream)
            assert refused.value.status == 400 and "repetition_penalty" in str(refused.value)
    tokens = []
    for url in (hpcllm_worker.url, vllm_worker):
        with WorkerClient(url, SECRET, read_timeout=120) as client:
            with client.generate(GenerateRequest(request_id="at-the-bound", repetition_penalty=1 /
                                                 VLLM_REPETITION_PENALTY_BOUND, **fields)) as stream:
                tokens.append([line.token_id for line in stream if isinstance(line, TokenLine)])
    assert tokens[1] == tokens[0] and len(tokens[0]) == 4


def test_a_request_resumed_on_vllm_still_penalises_its_earlier_output(vllm_worker, hpcllm_worker):
    """vLLM takes a resumed request's earlier output for prompt, and counts frequency and presence penalties over
    its own output only; the worker's logits processor (vllm_penalties) adds them back, the repetition penalty
    applied after it. Greedy, so the resumed run must give the uninterrupted run's tokens: with these penalties
    and this resume point, vLLM alone would pick another token (its continuation of prompt + the earlier output)."""
    fields = dict(prompt=PROMPT, max_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=1.0,
                  presence_penalty=1.0, repetition_penalty=1.1)
    with WorkerClient(hpcllm_worker.url, SECRET, read_timeout=120) as client:
        with client.generate(GenerateRequest(request_id="whole", **fields)) as stream:
            whole = [line.token_id for line in stream if isinstance(line, TokenLine)]
    with WorkerClient(vllm_worker, SECRET, read_timeout=120) as client:
        with client.generate(GenerateRequest(request_id="resumed", resume_token_ids=whole[:5], **fields)) as stream:
            assert whole[:5] + [line.token_id for line in stream if isinstance(line, TokenLine)] == whole


def generated(url: str, **fields) -> tuple[list[int], str, str]:
    """(token ids, text, finish reason) of a request."""
    with WorkerClient(url, SECRET, read_timeout=120) as client:
        with client.generate(GenerateRequest(request_id="generated", **fields)) as stream:
            lines = [line for line in stream if isinstance(line, TokenLine)]
        return [line.token_id for line in lines], "".join(line.text for line in lines), stream.final.finish_reason


def constrained_answer(url: str, **fields) -> tuple[list[int], str]:
    """(token ids, text) of a constrained request the worker ended with "stop"."""
    ids, text, finish_reason = generated(url, **fields)
    assert finish_reason == "stop"
    return ids, text


def test_json_schema_gives_the_same_valid_json_on_either_engine_and_vllm_refuses_to_resume_it(vllm_worker,
                                                                                              hpcllm_worker):
    """Both engines constrain by llguidance with the same grammar (vLLM's guidance backend, compact JSON): greedy,
    the same tokens, JSON valid against the schema, ended by the grammar. vLLM cannot start a grammar mid-output:
    a constrained request resumed from output tokens is refused (400 naming resume_token_ids), not garbled."""
    fields = dict(prompt=PROMPT, max_tokens=64, temperature=0, grammar=PERSON_GRAMMAR)
    answers = [constrained_answer(url, **fields) for url in (vllm_worker, hpcllm_worker.url)]
    assert answers[0] == answers[1]
    check_person(answers[0][1])
    with WorkerClient(vllm_worker, SECRET, read_timeout=120) as client:
        with pytest.raises(WorkerError) as refused:
            with client.generate(GenerateRequest(request_id="resumed", resume_token_ids=answers[0][0][:3],
                                                 **fields)) as stream:
                list(stream)
    assert refused.value.status == 400 and refused.value.info.param == "resume_token_ids"


@pytest.mark.parametrize("name", OTHER_CONSTRAINTS)
def test_regex_choice_and_grammars_give_the_same_tokens_on_either_engine(vllm_worker, hpcllm_worker, name):
    """vLLM's structured_outputs regex, choice and grammar (Lark, GBNF) as the gateway compiles them: greedy, the
    same tokens on both engines, matching the constraint; sampled on vLLM, matching it too."""
    kind, spec, matches = OTHER_CONSTRAINTS[name]
    fields = dict(prompt=PROMPT, max_tokens=32, grammar=compile_grammar(kind, spec))
    answers = [constrained_answer(url, temperature=0, **fields) for url in (vllm_worker, hpcllm_worker.url)]
    assert answers[0] == answers[1] and matches(answers[0][1]), answers
    sampled = constrained_answer(vllm_worker, temperature=1.0, seed=3, **fields)
    assert matches(sampled[1]), sampled


@pytest.fixture(scope="module")
def thinkers(tmp_path_factory):
    """(vLLM worker url, hpcllm worker, <think> id, </think> id, model folder) over the small Llama with Qwen3's think
    tokens. Its vLLM worker is started without LoRA, as most deployments' are (vllm_server's has it enabled)."""
    from transformers import AutoTokenizer

    from hpcllm.checkpoint.converter import convert
    from hpcllm.devmodels import make_model

    root = tmp_path_factory.mktemp("thinker")
    model_dir = make_model("llama", root / "small-thinker", size="small", chat_template="qwen3-think")
    checkpoint = convert(model_dir, root / "converted", progress=False).root
    start, end = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(["<think>", "</think>"])
    hpcllm = Worker(model_dir)
    try:
        for url, _ in start_vllm_worker_for_test(checkpoint, tmp_path_factory):
            yield url, hpcllm, start, end, model_dir
    finally:
        hpcllm.stop()


def test_vllm_holds_the_grammar_back_until_the_thinking_ends_and_bounds_it(thinkers, vllm_worker):
    """vLLM's reasoning parser (a model with <think> tokens): a prompt that opened the thinking, a budget of 5 and a
    choice: 5 free tokens, </think> forced, then the choice, the same tokens as hpcllm's engine; a budget without a
    grammar cuts the thinking alike. Where the output may open its thinking, vLLM constrains it at once (it cannot
    let the first token decide). A vLLM worker of a model without the markers refuses thinking, naming it."""
    url, hpcllm, start, end, _ = thinkers
    prompt = [*hpcllm.service.engine.tokenizer(PROMPT)["input_ids"], start]
    choice = compile_grammar("choice", ["positive", "negative"])
    fields = dict(prompt_token_ids=prompt, max_tokens=24, temperature=0, grammar=choice,
                  thinking=Thinking(end_token_id=end, budget=5))
    answers = [constrained_answer(worker, **fields) for worker in (url, hpcllm.url)]
    assert answers[0] == answers[1]
    assert answers[0][0].index(end) == 5
    free = dict(prompt_token_ids=prompt, max_tokens=10, temperature=0, ignore_eos=True,
                thinking=Thinking(end_token_id=end, budget=3))
    cut = [generated(worker, **free)[0] for worker in (url, hpcllm.url)]
    assert cut[0] == cut[1] and cut[0].index(end) == 3 and len(cut[0]) == 10
    ids, text = constrained_answer(url, prompt=PROMPT, max_tokens=24, temperature=0, grammar=choice,
                                   thinking=Thinking(end_token_id=end, start_token_id=start))
    assert text in ("positive", "negative")
    with pytest.raises(WorkerError) as refused:
        generated(vllm_worker, prompt=PROMPT, max_tokens=4, grammar=choice, thinking=Thinking(end_token_id=5))
    assert refused.value.status == 400 and refused.value.info.param == "thinking"


def test_greedy_tokens_equal_transformers_on_a_vllm_worker_without_lora(thinkers):
    """test_greedy_tokens_equal_transformers's check on a worker started without LoRA (the thinkers'; no extra
    start): vllm_server's engine has LoRA enabled, which changes vLLM's model (its LoRA-wrapped layers)."""
    url, _, _, _, model_dir = thinkers
    expected, text = transformers_greedy(model_dir)(PROMPT, 32)
    ids, got_text, finish_reason = generated(url, prompt=PROMPT, max_tokens=32, temperature=0, ignore_eos=True)
    assert (ids, got_text, finish_reason) == (expected, text, "length")


def _stream_and_migrate(gateway, source: Worker | str, destination_url: str, max_tokens: int):
    """Stream a greedy completion from the source and move it to the destination mid-stream: (text, usage, finish
    reason, the move's MigrateAllResult). An hpcllm source (a Worker, in this process) is held after its third
    token until the move has run (Hold), so the move always finds the generation running; a vLLM source's engine
    runs in another process, where nothing can hold it: the move comes at the client's third text, and a client
    slower than the generation would find nothing to move."""
    moved = []

    def move_at_the_third_text(texts: list[str]) -> None:
        if len(texts) == 3:
            with WorkerClient(source, SECRET, read_timeout=120) as client:
                moved.append(client.migrate_all(ticketed_request(destination_url, model=MODEL, key=SECRET,
                                                                 timeout_seconds=60)))

    client = gateway.client().with_options(timeout=120)

    def read_stream(on_text=lambda texts: None):
        return read_completion_stream(client.completions.create(
            model=MODEL, prompt=LONG_PROMPT, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
            stream=True, stream_options={"include_usage": True}), on_text)

    if isinstance(source, str):
        texts, usage, finish = read_stream(move_at_the_third_text)
    else:
        hold = source.hold_at(tokens=3)
        with ThreadPoolExecutor(1) as mover:
            moving = mover.submit(move_when_held, hold, source, destination_url)
            texts, usage, finish = read_stream()
            moved.append(moving.result())
    return "".join(texts), usage, finish, moved[0] if moved else None


@pytest.mark.parametrize("direction", ["hpcllm_to_vllm", "vllm_to_hpcllm"])
def test_live_migration_between_engines_keeps_the_text(vllm_server, hpcllm_worker, gateway_to, reference,
                                                       direction):
    vllm_worker, vllm_log = vllm_server
    source, destination = ((hpcllm_worker, vllm_worker) if direction == "hpcllm_to_vllm"
                           else (vllm_worker, hpcllm_worker.url))
    max_tokens = 240  # still running when the migration comes (a few ms a token); prompt + 240 < 512 (the card)
    _, expected = reference(LONG_PROMPT, max_tokens)

    source_url = source if isinstance(source, str) else source.url
    text, usage, finish, moved = _stream_and_migrate(gateway_to(source_url), source, destination, max_tokens)

    assert moved is not None and len(moved.migrated) == 1 and moved.failed == [], moved
    assert text == expected  # greedy: the destination continues exactly
    assert usage.completion_tokens == max_tokens and finish == "length"  # no token lost or repeated
    request_id = moved.migrated[0].request_id
    with WorkerClient(destination, SECRET) as client:
        assert client.tokens(request_id).finish_reason == "length"
    if direction == "hpcllm_to_vllm":  # the warm-up prefilled the context: the resumed request found it cached
        found = re.search(rf"migrated-in request {re.escape(request_id)}: (\d+) of (\d+) known tokens came from "
                          "vLLM's prefix cache", vllm_log.read_text())
        assert found and int(found[1]) >= 128, found


@pytest.mark.long
def test_live_migration_between_two_vllm_workers_keeps_the_text(vllm_server, second_vllm_server, gateway_to,
                                                                reference):
    source, _ = vllm_server
    destination, _ = second_vllm_server
    max_tokens = 240
    _, expected = reference(LONG_PROMPT, max_tokens)

    text, usage, finish, moved = _stream_and_migrate(gateway_to(source), source, destination, max_tokens)

    assert moved is not None and len(moved.migrated) == 1 and moved.failed == [], moved
    assert text == expected  # greedy: the destination continues exactly
    assert usage.completion_tokens == max_tokens and finish == "length"  # no token lost or repeated
    request_id = moved.migrated[0].request_id
    with WorkerClient(source, SECRET) as client:
        assert client.tokens(request_id).finish_reason == "migrated"
    with WorkerClient(destination, SECRET) as client:
        assert client.tokens(request_id).finish_reason == "length"
        assert client.ready()["running_requests"] == 0


def test_a_client_that_disconnects_frees_its_slot(vllm_worker):
    with WorkerClient(vllm_worker, SECRET, read_timeout=120) as client:
        with client.generate(GenerateRequest(request_id="leaver", prompt=PROMPT, max_tokens=400, temperature=0,
                                             ignore_eos=True)) as stream:
            for line in stream:
                if line.index >= 2:
                    break  # leaving the block closes the connection
        deadline = time.monotonic() + 30
        while client.tokens("leaver").state != "finished" and time.monotonic() < deadline:
            time.sleep(0.05)
        tokens = client.tokens("leaver")
        assert tokens.finish_reason == "abort" and len(tokens.output_token_ids) < 400
        assert client.ready()["running_requests"] == 0
        # The engine goes on serving.
        again = client.generate(GenerateRequest(request_id="after", prompt=PROMPT, max_tokens=4, temperature=0))
        with again as stream:
            assert sum(1 for _ in stream) == 5


def test_a_python_without_vllm_fails_with_the_reason(vllm_checkpoint, tmp_path):
    """The worker exits non-zero with one `error:` line the node agent shows in `hpcllm status`."""
    if _importable("vllm"):
        pytest.skip("this interpreter has vLLM")
    result = subprocess.run(
        [sys.executable, "-m", "hpcllm.cli.main", "worker", "--engine", "vllm", "--model", str(vllm_checkpoint)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HPCLLM_SHARED_SECRET": SECRET},
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "error: vLLM cannot be imported by" in result.stderr and "make vllm-venv" in result.stderr


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def engine_checks(vllm_checkpoint, tmp_path_factory) -> dict:
    """hpcllm/worker/tests/vllm_join_and_hang_script.py run over the checkpoint by the vLLM interpreter: the JSON
    line it prints, one part per check (both on one vLLM start: each start costs 25-50 s here)."""
    script = REPO_ROOT / "hpcllm" / "worker" / "tests" / "vllm_join_and_hang_script.py"
    result = subprocess.run([vllm_python(), str(script), str(vllm_checkpoint)], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path_factory.mktemp("vllm-checks"),
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))  # vLLM logs too


def _check(engine_checks: dict, name: str) -> dict:
    out = engine_checks[name]
    assert "failed" not in out, out["failed"]
    return out


def test_a_fraction_of_a_gib_of_kv_cache_is_what_vllm_gets(engine_checks):
    """vllm_kv_cache_gb takes any size above 0; vLLM's VLLM_CPU_KVCACHE_SPACE takes whole GiB only (the worker set
    it to "0.5", and vLLM stopped the worker's start with a ValueError)."""
    assert engine_checks["kv_cache_bytes"] == 0.5 * 2**30


def test_a_request_reaches_vllm_while_the_step_in_flight_computes(engine_checks, reference):
    """A request submitted while vLLM's core computes a step is in vLLM at once, added by the submitting thread:
    vLLM's core takes it at the next step boundary, as vLLM's own server does, instead of a step later (the worker
    used to add it only once it had processed the step in flight: ~1 step of TTFT at 16 clients). The engine
    thread is held in its wait for the core's output, so this does not depend on timing."""
    out = _check(engine_checks, "join")
    added = dict(out["added_while_waiting"])
    assert set(added) == {"a#gen1", "b#gen1"}, out
    assert added["b#gen1"] == out["main_thread"]  # the submitting thread, not the engine thread
    # both then generate as alone: greedy, transformers' tokens
    assert out["a"] == {"tokens": reference("hello world", 8)[0], "finish_reason": "length"}
    assert out["b"] == {"tokens": reference("the quick brown fox", 4)[0], "finish_reason": "length"}


def test_vllm_admits_waiting_requests_by_priority(engine_checks):
    """The vLLM worker builds vLLM with scheduling_policy "priority" and passes each request's priority: with one
    request submitted, a later priority-0 request runs before an earlier priority-5 one (FCFS would run that first).
    Whether the first one is still waiting in vLLM's core when the others come depends on the machine's load: it
    finishes first or after the priority-0 one, always before the other priority-5 one (equal priorities: FCFS)."""
    out = _check(engine_checks, "priority")
    finished = out["finished"]
    assert sorted(finished) == ["high", "low1", "low2"] and out["policy"] == "priority", out
    assert finished.index("high") < finished.index("low2") and finished.index("low1") < finished.index("low2"), out


def test_a_request_vllm_ends_with_an_error_or_an_abort_ends_so_on_the_stream(engine_checks):
    """vLLM's core ends a request on its own with "error" (a retryable request-level failure) or "abort" (its
    shutdown): the stream says so as hpcllm's engine does for the same case (an error line: the gateway answers 500;
    "abort": it resumes the request elsewhere), not "length", which the client took for a complete answer."""
    out = _check(engine_checks, "ended")
    error, abort = out["error"], out["abort"]
    assert error["finish_reason"] == "error" and error["error"]["type"] == "server_error", out
    assert "vLLM ended the request (error)" in error["error"]["message"], out
    assert abort["finish_reason"] == "abort" and abort["error"] is None, out
    assert error["tokens"] < 500 and abort["tokens"] < 500, out


def test_a_migrations_warm_up_that_vllm_ends_with_an_error_drops_the_hold(engine_checks):
    """A held request's warm-up that vLLM ends with "error" cached nothing: the hold is dropped (the destination's
    prepare answers 409, the source serves on) instead of counting its ids as prefilled (prepare answered 200 with
    cached_tokens vLLM did not have)."""
    out = _check(engine_checks, "ended")["warm_up"]
    assert "vLLM ended its prefill (error)" in out.get("refused", ""), out


def test_a_vllm_destination_whose_kv_cache_is_full_drops_the_migrations_hold_at_once(engine_checks):
    """As hpcllm's engine (test_migration.py's KV-full destination): a held request that vLLM's full KV cache cannot
    take is dropped at once, the destination's prepare answering 409 with the reason while the running request goes
    on; it used to wait in vLLM's queue until that request ended (here all its 100 tokens; in a hand-over, with the
    source's stream paused)."""
    out = _check(engine_checks, "kv_full")
    assert preempted_reason(KV_CACHE_FULL) in out.get("refused", ""), out
    assert out["busy_running_then"] and out["busy_tokens"] == 100 and out["counts"] == [0, 0], out


def test_a_hold_that_fits_beside_requests_sharing_a_prefix_is_prefilled(engine_checks):
    """The worker counts the KV blocks requests share (a system prompt, n > 1) once, as vLLM's prefix cache holds
    them: a hold that fits beside three requests sharing 256 tokens is prefilled while they run (counted apiece, it
    was refused with "KV cache full")."""
    out = _check(engine_checks, "kv_full")["shared"]
    assert out.get("prefilled") == [100, 0], out
    assert out["running_then"] == ["shared0", "shared1", "shared2"] and out["finals"] == ["length"] * 3, out


def test_a_failed_migration_from_a_vllm_worker_leaves_its_request_counted_once(engine_checks):
    """Pausing a migrating request aborts it in vLLM; a failed migration resumes it. Each try left the aborted
    request behind in the worker's KV count, so later holds were refused for a KV cache that had room."""
    out = _check(engine_checks, "kv_full")["abandoned"]
    assert out["entries"] == 1 and out["blocks"] == out["its_blocks"], out


def test_a_hung_vllm_engine_core_fails_the_engine_and_its_streams_past_the_step_timeout(engine_checks):
    """As hpcllm's engine: a vLLM step that never ends (its engine core stopped) must not hold its streams forever.
    Past step_timeout the stream ends with an engine_unavailable error (the gateway resumes it elsewhere), the engine
    is dead (/health 503) and the worker's death handler hears why (the worker exits), and the engine thread, which
    waited for the core's output, ends."""
    out = _check(engine_checks, "hang")
    assert out["finish_reason"] == "error" and out["error"]["type"] == "engine_unavailable", out
    assert "has not finished a step" in out["error"]["message"] and "step timeout is 2 s" in out["error"]["message"]
    assert out["tokens"] < 1000 and len(out["died"]) == 1 and "has not finished a step" in out["died"][0]
    assert not out["alive"] and out["thread_ended"]
