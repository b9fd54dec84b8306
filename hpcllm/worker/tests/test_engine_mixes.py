"""Whatever runs beside it, every request gets the answer it gets alone: a campus's mix of requests (greedy, seeded,
penalized, biased, stop strings, logprobs, prompt logprobs, priorities, a shared system prompt, prompts that fill the
context) joins and leaves a batch mid-run under a KV budget so small that requests are preempted and recomputed,
with n-gram speculation on and some requests cancelled, in the engine's thread and in a model process with
asynchronous scheduling. Each answer (tokens, text, logprobs, finish and stop reason, usage) is compared to the same
request's answer from an engine that runs one request at a time."""

from __future__ import annotations

import random
import threading

import pytest

from hpcllm.worker.engine import Engine
from hpcllm.worker.protocol import FinalLine, GenerateRequest

from .test_priority import StepLog

MAX_MODEL_LEN = 96
ACROSS = ("m1", "m5", "m8")  # requests whose stop string completes across a token boundary
CORPUS = ("the cat sat on the mat and the dog sat on the log while the scheduler queued every job that asked for a "
          "node with two cores and a little memory, then the model wrote its answer one token at a time").split()


def _load(model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dirs["llama"]  # loaded per engine: an in-process engine packs its model, a model process needs one
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def campus_mix(tokenizer, seed: int) -> list[GenerateRequest]:
    """Twelve requests of different lengths and kinds (ACROSS's stop strings are set from their output later); two
    prompts fill the context but for a few tokens, every third starts with the same system prompt."""
    rng = random.Random(seed)
    system = tokenizer(" ".join(CORPUS[:14]))["input_ids"]
    kinds = [dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=11),
             dict(temperature=0.7, seed=5, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2),
             dict(temperature=0, logit_bias={"17": 4.0, "42": -100.0}), dict(temperature=0, stop=["e", " t"]),
             dict(temperature=1.0, seed=3, logprobs=2), dict(temperature=0, prompt_logprobs=2),
             dict(temperature=0.9, seed=9, logit_bias={"33": 3.0}, stop=["s,", "a"]),
             dict(temperature=0, stop=["the "]),
             dict(temperature=1.0, seed=21, ignore_eos=True), dict(temperature=0), dict(temperature=0, logprobs=0)]
    requests = []
    for i, kind in enumerate(kinds):
        start = rng.randrange(len(CORPUS) - 12)
        ids = tokenizer(" ".join(CORPUS[start:start + rng.randint(1, 12)]))["input_ids"]
        if i % 3 == 0:
            ids = system + ids  # a prefix other requests' blocks hold
        if i in (9, 10):
            ids = (ids * MAX_MODEL_LEN)[:MAX_MODEL_LEN - rng.randint(1, 4)]  # max_tokens: to the context's end
            max_tokens = None
        else:
            max_tokens = rng.randint(1, 40)
        requests.append(GenerateRequest(request_id=f"m{i}", prompt_token_ids=ids, max_tokens=max_tokens,
                                        ignore_eos=kind.pop("ignore_eos", i % 2 == 0),
                                        priority=rng.choice([0, 0, 1, -1]), **kind))
    return requests


def stop_across_a_token_boundary(engine: Engine, request: GenerateRequest) -> GenerateRequest:
    """request with a stop string made of the last character of one of its output tokens and the first of the
    next (the first such pair that first occurs there): it completes only once the second token is in."""
    probe = answer(list(engine.submit(request.model_copy(update={"request_id": request.request_id + "-probe",
                                                                 "stop": []})).events()))
    pieces, text = [], ""
    for token in probe["tokens"]:
        pieces.append(engine.decode(probe["tokens"][:len(pieces) + 1])[len(text):])
        text += pieces[-1]
    end = 0
    for piece, following in zip(pieces, pieces[1:]):
        end += len(piece)
        if piece and following and end >= 2 and text.find(text[end - 1:end + 1]) == end - 1:
            return request.model_copy(update={"stop": [text[end - 1:end + 1]]})
    raise AssertionError(f"{request.request_id}'s output has no token boundary to stop at: {pieces}")


def answer(events) -> dict:
    tokens = events[:-1]
    final = events[-1]
    assert isinstance(final, FinalLine)
    return dict(
        tokens=[e.token_id for e in tokens], indices=[e.index for e in tokens], text="".join(e.text for e in tokens),
        logprobs=[(e.logprobs.logprob, [t.token_id for t in e.logprobs.top]) if e.logprobs else None for e in tokens],
        prompt_logprobs=[p and p.logprob for p in tokens[0].prompt_logprobs or []] if tokens else [],
        finish_reason=final.finish_reason, stop_reason=final.stop_reason,
        usage=(final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens), error=final.error)


def assert_same_answer(batched: dict, alone: dict, request_id: str) -> None:
    for key in ("tokens", "indices", "text", "finish_reason", "stop_reason", "usage", "error"):
        assert batched[key] == alone[key], f"{request_id}: {key} differs in the batch"
    assert [lp and lp[1] for lp in batched["logprobs"]] == [lp and lp[1] for lp in alone["logprobs"]], request_id
    assert [lp and lp[0] for lp in batched["logprobs"]] == pytest.approx(
        [lp and lp[0] for lp in alone["logprobs"]], abs=1e-3), request_id
    assert batched["prompt_logprobs"] == pytest.approx(alone["prompt_logprobs"], abs=1e-3), request_id


@pytest.mark.parametrize("model_process", [False, True])
def test_a_campus_mix_under_preemption_speculation_and_cancels_gets_each_requests_solo_answer(model_process,
                                                                                               model_dirs):
    model, tokenizer = _load(model_dirs)
    requests = campus_mix(tokenizer, seed=7)
    with Engine(model, tokenizer, model_name="alone", max_model_len=MAX_MODEL_LEN, max_running_requests=1) as alone:
        requests = [stop_across_a_token_boundary(alone, r) if r.request_id in ACROSS else r for r in requests]
        solo = {r.request_id: answer(list(alone.submit(r).events())) for r in requests}
    for r in requests:  # the mix's own terms, so that the comparison below means what it says
        expected_text = tokenizer.decode(solo[r.request_id]["tokens"], skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
        if isinstance(solo[r.request_id]["stop_reason"], str):
            expected_text = expected_text[:expected_text.index(solo[r.request_id]["stop_reason"])]
        assert solo[r.request_id]["text"] == expected_text, r.request_id
        assert solo[r.request_id]["usage"][:2] == (len(r.prompt_token_ids), len(solo[r.request_id]["tokens"]))
    assert {solo[r.request_id]["finish_reason"] for r in requests} >= {"stop", "length"}
    assert all(isinstance(solo[request_id]["stop_reason"], str) for request_id in ACROSS)
    assert any(a["usage"][2] == MAX_MODEL_LEN for a in solo.values())  # a request filled the context

    model, tokenizer = _load(model_dirs)
    # KV for about two of the prompts at once: requests wait for blocks, and running ones are preempted to let
    # others grow (and for waiting ones of a higher priority), then recomputed from their token ids.
    engine = Engine(model, tokenizer, model_name="mixed", max_model_len=MAX_MODEL_LEN,
                    kv_cache_tokens=MAX_MODEL_LEN + 40, kv_block_size=4, max_running_requests=6,
                    prefill_chunk_tokens=16, speculative_ngram_tokens=3, model_process=model_process).start()
    cancel_after = {"m2": 2, "m11": 0}  # cancelled once they have this many tokens more
    batched: dict[str, dict | tuple[list[int], str]] = {}
    failed: dict[str, Exception] = {}  # a reader thread's exception, shown in the test's failure

    def read(request_id, stream):
        try:
            if request_id not in cancel_after:
                batched[request_id] = answer(list(stream.events()))
                return
            tokens = []
            for event in stream.events():
                if isinstance(event, FinalLine):
                    batched[request_id] = (tokens, event.finish_reason)
                    return
                tokens.append(event.token_id)
                if len(tokens) == cancel_after[request_id] + 1:
                    engine.cancel(request_id, wait=request_id == "m2")
        except Exception as error:  # reported by the test's thread, which asserts there is none
            failed[request_id] = error

    # the second wave arrives while the first runs: the engine waits inside its second step until all are queued
    steps = StepLog(engine, pause_after=2)
    try:
        with engine._lock:  # the first wave arrives together
            streams = [engine.submit(r) for r in requests[:6]]
        assert steps.paused.wait(120), "the engine never ran the first wave's second step"
        streams += [engine.submit(r) for r in requests[6:]]  # the rest join the running batch, one by one
        steps.go.set()
        readers = [threading.Thread(target=read, args=(r.request_id, stream)) for r, stream in zip(requests, streams)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(300)
        assert not any(reader.is_alive() for reader in readers), f"requests still streaming after 300 s: {failed}"
        assert not failed, f"reading a stream failed: {failed}"
        assert batched.keys() == solo.keys()
        for r in requests:
            if r.request_id in cancel_after:  # what it got before the cancel is the start of its solo answer
                got, finish_reason = batched[r.request_id]
                assert got == solo[r.request_id]["tokens"][:len(got)], r.request_id
                assert finish_reason == "abort" or got == solo[r.request_id]["tokens"], r.request_id
            else:
                assert_same_answer(batched[r.request_id], solo[r.request_id], r.request_id)
        assert engine.metrics.preemptions._value.get() > 0
        with engine._lock:
            assert engine.kv_pool.used_blocks == 0  # every block came back: none leaked by preemptions or cancels
    finally:
        steps.go.set()  # a failed submit must not leave the engine paused for its shutdown
        engine.shutdown()
