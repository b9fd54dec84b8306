"""[worker] model_process: the engine's forward runs in a child process (runner_process.ProcessRunner).

The split must not change what a user gets: greedy output equals transformers' generate, seeded sampling equals the
in-process engine's, prefix caching and cancel work, and a dead model process fails the engine like any engine
failure. Each engine here spawns a process (torch imports: seconds), so one engine serves most tests."""

import ctypes
import itertools
import logging
import math
import mmap
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from hpcllm.worker import engine as engine_module
from hpcllm.worker.engine import Engine, EngineUnavailable, _still_matches, _Work
from hpcllm.worker.protocol import FinalLine, GenerateRequest, TokenLine
from hpcllm.worker.model_process import ModelProcess
from hpcllm.worker.runner import SequenceChunk, StepBatch
from hpcllm.worker.runner_process import (ChoiceFailures, ModelProcessError, ProcessRunner, _feed_previous_tokens,
                                          choose_tokens)
from hpcllm.worker.sampling import SamplingParams, TokenState, sample_token
from hpcllm.worker.server import ModelForServing, load_with_hpcllm

from .conftest import wait_until
from .schemas import CONSTRAINED, check_person

_ids = itertools.count()
PENALIZED = dict(temperature=0.9, presence_penalty=1.2, frequency_penalty=0.6, repetition_penalty=1.3, min_p=0.02,
                 ignore_eos=True)
PROMPTS = ["hello world, this", "the", "🙂 日本語 テスト and a longer prompt that takes a few chunks to prefill", "a b c"]


def request(**fields) -> GenerateRequest:
    fields.setdefault("request_id", f"p{next(_ids)}")
    return GenerateRequest(**fields)


def hf_greedy(model, prompt_ids, max_new_tokens):
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()


def run_together(engine, requests):
    with engine._lock:  # all submitted before the engine steps any
        streams = [engine.submit(r) for r in requests]
    return [list(stream.events()) for stream in streams]


def load_unpacked(model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dirs["llama"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture
def unpacked_pair(model_dirs):
    """A model no engine was given yet: the model process shares the parent's weights, an in-process engine's fast
    path packs them in place into oneDNN tensors, which cannot be shared (load_pair's are), and a model process's
    fast path takes the weights it replaced from the worker's copy (one engine per model)."""
    return load_unpacked(model_dirs)


@pytest.fixture(scope="module")
def process_engine(model_dirs):
    model, tokenizer = load_unpacked(model_dirs)
    engine = Engine(model, tokenizer, model_name="tiny", model_process=True, prefill_chunk_tokens=8,
                    kv_block_size=4, model_process_threads=1).start()  # not the parent's 2: a test below checks them
    yield engine
    engine.shutdown()


def test_the_forward_runs_in_a_child_process_and_greedy_output_equals_generate(unpacked_pair, reference_model,
                                                                              process_engine):
    tokenizer, model = unpacked_pair[1], reference_model("llama")
    runner = process_engine.runner
    assert isinstance(runner, ProcessRunner) and runner._process.pid != os.getpid() and runner._process.is_alive()
    assert process_engine.kv_pool.prefix_caching  # the child runs the paged runner
    lengths = [30, 12, 25, 40]
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    results = run_together(process_engine, [request(prompt_token_ids=ids, max_tokens=n, temperature=0)
                                            for ids, n in zip(prompt_ids, lengths)])
    assert [[e.token_id for e in events[:-1]] for events in results] == [
        hf_greedy(model, ids, n) for ids, n in zip(prompt_ids, lengths)]
    # Every stream got its lines in order, then its final line.
    for events, n in zip(results, lengths):
        assert [e.index for e in events[:-1]] == list(range(len(events) - 1))
        assert isinstance(events[-1], FinalLine) and events[-1].usage.completion_tokens == len(events) - 1


def test_seeded_sampling_and_logprobs_equal_the_in_process_engine(load_pair, process_engine):
    model, tokenizer = load_pair("llama")  # the in-process engine's (packed in place by its fast path)
    sampled = [request(prompt=p, max_tokens=20, temperature=0.9, top_k=40, seed=i, ignore_eos=True, logprobs=2)
               for i, p in enumerate(PROMPTS)]
    with Engine(model, tokenizer, model_name="tiny", prefill_chunk_tokens=8, kv_block_size=4) as local:
        expected = run_together(local, [r.model_copy(update={"request_id": f"{r.request_id}-local"})
                                        for r in sampled])
    got = run_together(process_engine, sampled)
    strip = lambda events: [(e.token_id, e.text, e.logprobs.top[0].token_id) for e in events[:-1]]  # noqa: E731
    assert [strip(events) for events in got] == [strip(events) for events in expected]


def test_penalized_and_biased_requests_equal_the_in_process_engine_beside_plain_ones(load_pair, process_engine):
    """A greedy request with a penalty or a logit bias must not take the model process's plain argmax, and a
    penalized one's token depends on counts only the worker keeps: steps sent ahead must not change any token."""
    model, tokenizer = load_pair("llama")
    both = [
        request(prompt=PROMPTS[0], max_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=2.0),
        request(prompt=PROMPTS[1], max_tokens=24, temperature=0, ignore_eos=True, logit_bias={17: 8.0, 3: -5.0}),
        request(prompt=PROMPTS[2], max_tokens=24, temperature=0.9, seed=4, ignore_eos=True, presence_penalty=1.0,
                repetition_penalty=1.5, min_p=0.05, logit_bias={17: 2.0}),
        request(prompt=PROMPTS[3], max_tokens=24, temperature=0, ignore_eos=True),
        request(prompt=PROMPTS[0], max_tokens=24, temperature=0.8, seed=6, ignore_eos=True, min_p=0.1),
    ]
    with Engine(model, tokenizer, model_name="tiny", prefill_chunk_tokens=8, kv_block_size=4) as local:
        expected = run_together(local, [r.model_copy(update={"request_id": f"{r.request_id}-local"}) for r in both])
    got = run_together(process_engine, both)
    ids = lambda events: [e.token_id for e in events[:-1]]  # noqa: E731
    assert [ids(events) for events in got] == [ids(events) for events in expected]
    plain_first = run_together(process_engine, [request(prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                                        ignore_eos=True)])[0]
    assert ids(got[0]) != ids(plain_first)  # the penalty did change the greedy tokens


def test_a_penalized_request_decodes_every_step_like_a_plain_one_beside_it(load_pair, process_engine, monkeypatch):
    """Asynchronous scheduling sends a penalized request's next decode ahead like any other: the model process keeps
    its token counts and chooses its token, so it gets a token per step, not one every other step, and the same
    tokens as the in-process engine."""
    launched = []
    launch = process_engine._launch
    monkeypatch.setattr(process_engine, "_launch", lambda work: launched.append(
        [(w.req.request_id, w.previous_row is not None) for w in work if w.end > w.start]) or launch(work))
    penalized = dict(max_tokens=20, ignore_eos=True, presence_penalty=1.0, frequency_penalty=0.5,
                     repetition_penalty=1.3)
    both = [request(prompt=PROMPTS[1], max_tokens=20, temperature=0, ignore_eos=True),
            request(prompt=PROMPTS[1], temperature=0.9, seed=11, **penalized),
            request(prompt=PROMPTS[1], temperature=0, **penalized)]
    got = run_together(process_engine, both)
    steps = [sum(1 for step in launched if any(rid == r.request_id for rid, _ in step)) for r in both]
    ahead = [sum(1 for step in launched for rid, sent_ahead in step if rid == r.request_id and sent_ahead)
             for r in both]
    assert steps == [len(launched)] * 3 and ahead[1:] == ahead[:1] * 2, (steps, ahead, len(launched))
    model, tokenizer = load_pair("llama")
    with Engine(model, tokenizer, model_name="tiny", prefill_chunk_tokens=8, kv_block_size=4) as local:
        expected = run_together(local, [r.model_copy(update={"request_id": f"{r.request_id}-local"}) for r in both])
    ids = lambda events: [e.token_id for e in events[:-1]]  # noqa: E731
    assert [ids(events) for events in got] == [ids(events) for events in expected]


@pytest.mark.parametrize("penalty_or_schema", [PENALIZED, CONSTRAINED], ids=["penalized", "constrained"])
def test_penalized_tokens_stay_exact_when_the_model_process_counts_go_stale(load_pair, process_engine, monkeypatch,
                                                                           penalty_or_schema):
    """The model process's counts of a penalized request are rebuilt from its ids whenever a token it chose is not
    taken: a step sent ahead dropped after an out-of-memory failure (and the newest request preempted); and they
    start from the resumed ids of a request resumed from token ids. Every token still equals the in-process
    engine's uninterrupted run."""
    runner, collect, failed = process_engine.runner, process_engine.runner.collect, []

    def collect_failing_once():
        result = collect()
        if not failed and process_engine._ahead is not None and len(launched_steps) > 6:
            failed.append(True)
            raise torch.OutOfMemoryError("injected")
        return result

    launched_steps = []
    launch = process_engine._launch
    monkeypatch.setattr(process_engine, "_launch", lambda work: launched_steps.append(1) or launch(work))
    monkeypatch.setattr(runner, "collect", collect_failing_once)
    sampling = dict(max_tokens=24, **penalty_or_schema)
    cases = [request(prompt=p, seed=i, **sampling) for i, p in enumerate(PROMPTS)]
    model, tokenizer = load_pair("llama")
    with Engine(model, tokenizer, model_name="tiny", prefill_chunk_tokens=8, kv_block_size=4) as local:
        expected = run_together(local, [r.model_copy(update={"request_id": f"{r.request_id}-local"}) for r in cases])
    preemptions = process_engine.metrics.preemptions._value.get()
    got = run_together(process_engine, cases)
    ids = lambda events: [e.token_id for e in events[:-1]]  # noqa: E731
    assert failed and process_engine.metrics.preemptions._value.get() > preemptions
    assert [ids(events) for events in got] == [ids(events) for events in expected]
    if "grammar" in sampling:
        assert_complete_answers_are_valid(got)

    monkeypatch.undo()
    # Resumed from its first 9 tokens: the model process's counts start from the resumed ids.
    resumed = request(prompt_token_ids=process_engine.tokens(cases[3].request_id).prompt_token_ids,
                      resume_token_ids=ids(expected[3])[:9], seed=3,
                      **sampling)
    [events] = run_together(process_engine, [resumed])
    assert ids(events) == ids(expected[3])[9:]
    assert process_engine.kv_pool.used_blocks == 0


@pytest.mark.parametrize("sampling", [PENALIZED, CONSTRAINED], ids=["penalized", "constrained"])
def test_a_penalized_request_migrated_between_model_process_engines_continues_exactly(load_pair, process_engine,
                                                                                     monkeypatch, sampling):
    """Live migration by tokens (here within one engine, under another request id): the source is paused while its
    next token is being chosen (the model process counted it; it is dropped), the destination holds the request, is
    extended with the tokens produced since, and after attach samples from kept logits in the worker; its counts in
    the model process start from the ids it was given. The source's migration is then abandoned: it goes on here
    from kept logits, and its counts in the model process are sent again. Both continue exactly as an uninterrupted
    run. The engine thread is held at chosen points (before committing a step), so nothing depends on timing. A
    constrained request's grammar state is rebuilt from its ids the same way: its JSON stays valid."""
    source = request(prompt=PROMPTS[0], max_tokens=30, seed=21, **sampling)
    model, tokenizer = load_pair("llama")
    with Engine(model, tokenizer, model_name="tiny", prefill_chunk_tokens=8, kv_block_size=4) as local:
        [expected] = run_together(local, [source.model_copy(update={"request_id": "migrated-local"})])
    gates = {5: (threading.Event(), threading.Event()), 8: (threading.Event(), threading.Event())}
    commit = process_engine._commit

    def commit_at_gates(*args, **kwargs):
        live = process_engine._live.get(source.request_id)
        gate = gates.pop(len(live.output_ids), None) if live is not None else None
        if gate is not None:
            gate[0].set()  # reached: the test acts on the engine while its thread waits here
            gate[1].wait(60)
        return commit(*args, **kwargs)

    monkeypatch.setattr(process_engine, "_commit", commit_at_gates)
    source_stream = process_engine.submit(source)
    reached, release = gates[5]
    assert reached.wait(60)
    moved = process_engine.begin_migration(source.request_id).model_copy(update={"request_id": "migrated"})
    process_engine.hold(moved, 60.0)
    reached, release_second = gates[8][0], gates[8][1]
    release.set()
    assert reached.wait(60)
    final = process_engine.pause(source.request_id)  # the token being chosen now is dropped
    release_second.set()
    process_engine.wait_prefilled("migrated")
    process_engine.extend("migrated", final[len(moved.resume_token_ids):])
    process_engine.wait_prefilled("migrated")
    rest = [e.token_id for e in list(process_engine.attach("migrated", len(final)).events())[:-1]]
    process_engine.abandon_migration(source.request_id)
    stayed = [e.token_id for e in list(source_stream.events())[:-1]]
    assert len(moved.resume_token_ids) == 5 and len(final) == 8
    assert final + rest == stayed == [e.token_id for e in expected[:-1]]
    assert process_engine.kv_pool.used_blocks == 0
    if "grammar" in sampling:
        check_person(tokenizer.decode(stayed, skip_special_tokens=True))


@pytest.mark.parametrize("sampling", [PENALIZED, CONSTRAINED], ids=["penalized", "constrained"])
def test_penalized_requests_preempted_under_a_tiny_kv_budget_stay_exact(unpacked_pair, load_pair, sampling):
    """A preempted request's KV state and its token counts (or grammar state) in the model process are forgotten
    together; when it is recomputed they are rebuilt from its ids, and its tokens equal an uninterrupted run's."""
    model, tokenizer = unpacked_pair
    cases = [request(prompt_token_ids=tokenizer(p)["input_ids"][:12], max_tokens=32, seed=i, **sampling)
             for i, p in enumerate(PROMPTS)]
    with Engine(model, tokenizer, model_name="tiny", model_process=True, max_model_len=64, kv_cache_tokens=64,
                kv_block_size=4, max_running_requests=4, prefill_chunk_tokens=8) as engine:
        got = run_together(engine, cases)
        assert engine.metrics.preemptions._value.get() > 0 and engine.kv_pool.used_blocks == 0
    local_model, local_tokenizer = load_pair("llama")
    with Engine(local_model, local_tokenizer, model_name="tiny", prefill_chunk_tokens=8, kv_block_size=4) as local:
        expected = run_together(local, [r.model_copy(update={"request_id": f"{r.request_id}-local"}) for r in cases])
    ids = lambda events: [e.token_id for e in events[:-1]]  # noqa: E731
    assert [ids(events) for events in got] == [ids(events) for events in expected]
    if "grammar" in sampling:
        assert_complete_answers_are_valid(got)


def assert_complete_answers_are_valid(streams) -> None:
    """Constrained streams that ended with "stop" (at least one) hold JSON valid against the schema."""
    complete = ["".join(e.text for e in events[:-1]) for events in streams if events[-1].finish_reason == "stop"]
    assert complete
    for text in complete:
        check_person(text)


def test_steps_sent_ahead_change_no_token_and_requests_that_stop_meanwhile_end_where_they_should(
        load_pair, process_engine, monkeypatch):
    """Asynchronous scheduling: the model process runs the next step, fed its own choice of each row's token,
    before the worker has committed this one. Requests that end meanwhile (a stop string, max_tokens of 1 or 2,
    a stop token id) must end exactly where the in-process engine (one step at a time) ends them, sampled ones
    with the same draws, and leave no KV blocks behind."""
    assert process_engine.async_scheduling
    sent_ahead, matched = [], []
    schedule_ahead = process_engine._schedule_ahead
    monkeypatch.setattr(process_engine, "_schedule_ahead",
                        lambda current: sent_ahead.append(schedule_ahead(current)) or sent_ahead[-1])
    monkeypatch.setattr(engine_module, "_still_matches",
                        lambda w, still=engine_module._still_matches: matched.append(still(w)) or matched[-1])
    model, tokenizer = load_pair("llama")
    with Engine(model, tokenizer, model_name="tiny", prefill_chunk_tokens=8, kv_block_size=4) as local:
        [probe] = run_together(local, [request(prompt=PROMPTS[0], max_tokens=30, temperature=0, ignore_eos=True)])
        text = "".join(e.text for e in probe[:-1])
        stop = text[len(text) // 2:len(text) // 2 + 2]
        cases = [
            request(prompt=PROMPTS[0], max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]),
            request(prompt=PROMPTS[1], max_tokens=1, temperature=0),
            request(prompt=PROMPTS[2], max_tokens=2, temperature=0.8, seed=3),
            request(prompt=PROMPTS[3], max_tokens=40, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True),
            request(prompt=PROMPTS[1], max_tokens=40, temperature=0, ignore_eos=True,
                    stop_token_ids=[probe[5].token_id]),
            request(prompt=PROMPTS[0], max_tokens=25, temperature=0, ignore_eos=True),
        ]
        expected = run_together(local, [r.model_copy(update={"request_id": f"{r.request_id}-local"})
                                        for r in cases])
    got = run_together(process_engine, cases)
    outcome = lambda events: ([(e.token_id, e.text) for e in events[:-1]], events[-1].finish_reason)  # noqa: E731
    assert [outcome(events) for events in got] == [outcome(events) for events in expected]
    assert outcome(got[0])[1] == "stop" and len(got[0]) - 1 < 30  # the stop string ended it early
    assert [len(events) - 1 for events in got[1:3]] == [1, 2]
    assert sum(1 for work in sent_ahead if work) >= 20  # most steps were sent ahead
    assert matched.count(False) <= len(cases)  # and their rows were taken: dropped only for requests that ended
    assert process_engine.kv_pool.used_blocks == 0 and process_engine.counts() == (0, 0)


def test_the_model_process_chooses_tokens_by_the_engines_rule_and_skips_steps_that_follow_a_failed_one():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    choices = [(SamplingParams(temperature=0.0), 3), (SamplingParams(temperature=0.7, top_k=10, seed=5), 2), None,
               (SamplingParams(temperature=1.0, top_p=0.5, seed=9), 0)]
    assert choose_tokens(logits, choices) == [int(logits[0].argmax()), sample_token(logits[1], *choices[1]), -1,
                                              sample_token(logits[3], *choices[3])]
    low = int(logits[0].argmin())  # a greedy row with a logit bias is not the plain argmax
    assert choose_tokens(logits[:1], [(SamplingParams(temperature=0.0, logit_bias=((low, 100.0),)), 0)]) == [low]
    batch = StepBatch(chunks=[SequenceChunk(1, [0], 5, previous_row=2), SequenceChunk(2, [7, 8], 0)])
    assert _feed_previous_tokens(batch, [11, 12, 13])
    assert [chunk.token_ids for chunk in batch.chunks] == [[13], [7, 8]]
    assert not _feed_previous_tokens(batch, None)  # the step it follows failed: nothing to feed


def test_a_request_whose_token_choice_fails_ends_alone_and_the_model_process_serves_on(process_engine):
    """A choice that raises in the model process used to fail the whole step: the engine died with every request,
    and the worker exited. Now that request ends with the error (the engine samples its row itself), and a step sent
    ahead fed by its row is dropped. The failing choice: a NaN temperature, which the API refuses (parameters it
    takes choose a token: test_sampling's extreme repetition penalties), past validation as a bug would be."""
    failing = request(prompt_token_ids=[5, 6, 7], max_tokens=8, seed=1).model_copy(update={"temperature": math.nan})
    bad, good = run_together(process_engine, [
        failing,
        request(prompt=PROMPTS[1], max_tokens=12, temperature=0, ignore_eos=True)])
    assert len(bad) == 1 and bad[-1].finish_reason == "error" and "nan" in bad[-1].error.message
    assert good[-1].finish_reason == "length" and len(good) - 1 == 12
    assert process_engine.alive
    assert process_engine.generate(request(prompt=PROMPTS[3], max_tokens=3, ignore_eos=True)).finish_reason == "length"
    assert process_engine.kv_pool.used_blocks == 0 and process_engine.counts() == (0, 0)
    assert choose_tokens(torch.zeros(2, 8), [(SamplingParams(temperature=0.5, repetition_penalty=1e39), 0),
                                             (SamplingParams(temperature=0.0), 0)],
                         [TokenState.build(SamplingParams(repetition_penalty=1e39), 8, [1], []), None]) == [-1, 0]
    # A step sent ahead feeds a placeholder where no token was chosen, and its commit drops that chunk: its request
    # has ended (the engine's rule on the failed request itself).
    batch = StepBatch(chunks=[SequenceChunk(1, [0], 5, previous_row=0)])
    assert _feed_previous_tokens(batch, [-1]) and batch.chunks[0].token_ids == [0]
    ended = process_engine._finished[failing.request_id]
    assert not _still_matches(_Work(ended, ended.num_cached, ended.num_cached + 1, ended.num_cached + 1,
                                    previous_row=0, fed=0))


def test_a_failed_token_choice_is_logged_once_per_sequence(caplog):
    """The model process's choice of a row that raises is logged (a systematic failure would otherwise be silent),
    once for its sequence however many steps fail it, again for a new request given the freed sequence id."""
    overflowing = (SamplingParams(temperature=0.5, repetition_penalty=1e39), 0)  # past the API's bounds: a stand-in
    batch = StepBatch(chunks=[SequenceChunk(7, [3], 4), SequenceChunk(9, [3], 4)],
                      choices=[overflowing, (SamplingParams(temperature=0.0), 0)])
    states = [TokenState.build(overflowing[0], 8, [1], []), None]
    failures = ChoiceFailures()
    with caplog.at_level(logging.WARNING, logger="hpcllm.worker.runner_process"):
        for _ in range(2):  # a step and the one sent ahead
            assert choose_tokens(torch.zeros(2, 8), batch.choices, states, failed=failures.of(batch)) == [-1, 0]
        failures.forget([7])
        choose_tokens(torch.zeros(2, 8), batch.choices, states, failed=failures.of(batch))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("sequence 7 failed" in m and "RuntimeError" in m for m in messages), messages


def test_a_shared_prefix_is_served_from_the_cache_and_cancel_ends_a_stream_in_order(unpacked_pair, reference_model,
                                                                                   process_engine):
    tokenizer, model = unpacked_pair[1], reference_model("llama")
    system = tokenizer("You are a helpful assistant. Answer briefly and politely, in plain words.")["input_ids"]
    hits = process_engine.metrics.prefix_cache_hits._value.get()
    first, second = system + tokenizer("the")["input_ids"][-1:], system + tokenizer("hello world")["input_ids"][-2:]
    for ids in (first, second):
        [events] = run_together(process_engine, [request(prompt_token_ids=ids, max_tokens=5, temperature=0)])
        assert [e.token_id for e in events[:-1]] == hf_greedy(model, ids, 5)
    assert process_engine.metrics.prefix_cache_hits._value.get() - hits >= (len(system) // 4) * 4

    stream = process_engine.submit(request(prompt=PROMPTS[0], max_tokens=200, ignore_eos=True))
    events = stream.events()
    assert isinstance(next(events), TokenLine)
    tokens = process_engine.cancel(stream.request_id)
    rest = list(events)
    assert isinstance(rest[-1], FinalLine) and rest[-1].finish_reason == "abort"
    token_lines = 1 + len(rest) - 1  # the first, then all but the final line
    assert token_lines == len(tokens.output_token_ids)  # every token line the cancel reports, then the end
    assert process_engine.kv_pool.used_blocks == 0


def test_a_worker_started_with_model_process_streams_over_http_and_stops_the_process(unpacked_pair, reference_model,
                                                                                      start_worker):
    (unpacked, tokenizer), model = unpacked_pair, reference_model("llama")
    worker = start_worker(loader=lambda: ModelForServing(unpacked, tokenizer, tier="test"), model_process=True)
    assert wait_until(lambda: worker.service.engine is not None and worker.service.engine.alive, timeout=120)
    process = worker.service.engine.runner._process  # the one started while the model loaded
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with worker.client.generate(request(prompt_token_ids=ids, max_tokens=12, temperature=0)) as stream:
        lines = list(stream)
    assert [line.token_id for line in lines[:-1]] == hf_greedy(model, ids, 12)
    assert lines[-1].finish_reason == "length"
    assert worker.client.ready()["status"] == "ready"
    worker.stop()
    assert not process.is_alive()


def test_a_dead_model_process_fails_the_engine_and_its_requests(unpacked_pair):
    model, tokenizer = unpacked_pair
    engine = Engine(model, tokenizer, model_name="tiny", model_process=True).start()
    try:
        stream = engine.submit(request(prompt=PROMPTS[0], ignore_eos=True))  # until the context is full
        events = stream.events()
        next(events)
        engine.runner._process.kill()
        final = [e for e in events if isinstance(e, FinalLine)][-1]
        assert final.finish_reason == "error" and "model process died" in final.error.message
        assert not engine.alive and "model process died" in engine.error
    finally:
        engine.shutdown()


def test_a_model_process_that_stops_answering_is_killed_and_fails_the_engine_and_its_streams(unpacked_pair,
                                                                                            start_worker):
    """A stopped (or hung) model process: past step_timeout it is killed, the stream ends with an engine_unavailable
    error instead of keep-alives forever, and /health turns 503 (the node agent restarts the worker)."""
    import signal
    import threading

    unpacked, tokenizer = unpacked_pair
    worker = start_worker(loader=lambda: ModelForServing(unpacked, tokenizer, tier="test"), model_process=True,
                          step_timeout=1.0)
    assert wait_until(lambda: worker.service.engine is not None and worker.service.engine.alive, timeout=120)
    process = worker.service.engine.runner._process
    # Continued after 30 s if still there: then the stream would end normally, and the test fail, rather than hang.
    wake = threading.Timer(30, lambda: process.is_alive() and os.kill(process.pid, signal.SIGCONT))
    try:
        body = request(prompt=PROMPTS[0], ignore_eos=True)  # until the context is full
        with worker.client.generate(body) as stream:
            lines = iter(stream)
            assert isinstance(next(lines), TokenLine)
            os.kill(process.pid, signal.SIGSTOP)
            wake.start()
            final = list(lines)[-1]
        assert final.finish_reason == "error" and final.error.type == "engine_unavailable"
        assert "has not finished a step" in final.error.message
        assert not worker.client.health()
        assert wait_until(lambda: not process.is_alive())
    finally:
        wake.cancel()
        if process.is_alive():
            process.kill()


def test_a_step_send_blocked_on_a_stopped_model_process_under_the_engine_lock_still_fails_the_engine(unpacked_pair):
    """A step is sent under the engine lock; a model process that stopped reading leaves the send blocked once its
    pipe is full (a large batch). The watchdog kills the process before it takes the lock, so the send fails and the
    engine ends instead of both waiting for ever."""
    import signal
    import threading

    model, tokenizer = unpacked_pair
    engine = Engine(model, tokenizer, model_name="tiny", model_process=True, step_timeout=1.0).start()
    runner, process = engine.runner, engine.runner._process
    launch, stop, stopped = runner.launch, threading.Event(), threading.Event()

    def launch_into_a_full_pipe(batch):
        if stop.is_set() and not stopped.is_set():  # the next step's send, under the engine lock
            stopped.set()
            os.kill(process.pid, signal.SIGSTOP)
            runner._conn.send_bytes(bytes(8 << 20))  # more than the pipe holds: blocks while the child is stopped
        return launch(batch)

    runner.launch = launch_into_a_full_pipe
    woken = threading.Event()

    def continue_it():  # after 30 s if still there: the test then fails rather than hang
        woken.set()
        if process.is_alive():
            os.kill(process.pid, signal.SIGCONT)

    wake = threading.Timer(30, continue_it)
    try:
        stream = engine.submit(request(prompt=PROMPTS[0], ignore_eos=True))
        events = stream.events()
        next(events)
        stop.set()
        wake.start()
        final = [e for e in events if isinstance(e, FinalLine)][-1]
        assert stopped.is_set() and not woken.is_set()  # it ended while the process was stopped, not once continued
        assert final.finish_reason == "error" and "has not finished a step" in final.error.message
        assert wait_until(lambda: not process.is_alive())
        assert engine.counts() == (0, 0)  # the lock is free again
    finally:
        wake.cancel()
        if process.is_alive():
            process.kill()
        engine.shutdown()


def test_an_embedding_whose_model_process_died_fails_with_the_reason_and_so_does_the_engine(unpacked_pair):
    model, tokenizer = unpacked_pair
    engine = Engine(model, tokenizer, model_name="tiny", model_process=True).start()
    try:
        engine.runner._process.kill()
        engine.runner._process.join(10)
        with pytest.raises(EngineUnavailable, match="embedding failed: the model process"):
            engine.embed([tokenizer(PROMPTS[0])["input_ids"]])
        assert wait_until(lambda: not engine.alive) and "model process" in engine.error
    finally:
        engine.shutdown()


def test_a_model_packed_by_an_in_process_engine_is_refused_with_a_reason(load_pair):
    model, tokenizer = load_pair("llama")
    Engine(model, tokenizer, model_name="tiny")  # its fast path packs the shared test model in place
    with pytest.raises(ValueError, match="already packed"):
        Engine(model, tokenizer, model_name="tiny", model_process=True)


def test_an_engine_takes_a_model_process_started_ahead_and_one_dead_before_its_imports_is_a_clear_error(
        unpacked_pair, model_dirs):
    model, tokenizer = unpacked_pair
    ahead = ModelProcess()  # what a spare worker starts while it waits
    assert ahead.wait_imported()
    engine = Engine(model, tokenizer, model_name="tiny", model_process=ahead).start()
    try:
        assert engine.model_process_pid == ahead.process.pid
        stream = engine.submit(request(prompt=PROMPTS[0], max_tokens=3, temperature=0))
        assert [e for e in stream.events() if isinstance(e, FinalLine)][-1].finish_reason == "length"
    finally:
        engine.shutdown()
    assert not ahead.process.is_alive()
    # The worker's copy gave the weights the child's fast path replaced up: it cannot serve again.
    with pytest.raises(ValueError, match="handed to a model process"):
        Engine(model, tokenizer, model_name="tiny", model_process=True)

    dead = ModelProcess()
    dead.process.kill()
    with pytest.raises(ModelProcessError, match="died while importing"):
        Engine(load_unpacked(model_dirs)[0], tokenizer, model_name="tiny", model_process=dead)
    dead.close()


@pytest.fixture(scope="module")
def converted_llama(model_dirs):
    from hpcllm.checkpoint import convert

    base = Path(tempfile.mkdtemp(prefix="hpcllm-model-process-", dir="/var/tmp"))
    convert(model_dirs["llama"], base / "llama", partitions=2, progress=False)
    yield base / "llama"
    shutil.rmtree(base, ignore_errors=True)


def shm_inode(pid: int | str, address: int) -> int:
    """The inode of the shared-memory file mapped at `address` in process `pid` (0: anonymous memory)."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return int(fields[4])
    raise AssertionError(f"{address:#x} is not mapped in {pid}")


def mapped_inodes(pid: int) -> set[int]:
    with open(f"/proc/{pid}/maps") as maps:
        return {int(line.split()[4]) for line in maps}


@pytest.mark.parametrize("shared_memory", [True, False])
def test_weights_loaded_into_shared_memory_reach_the_model_process_without_a_copy(converted_llama, reference_model,
                                                                                  shared_memory):
    """The worker's load for a model process (shared_memory=True): pickling the model shares the loader's pages, so
    the weights stay where they were loaded and the child maps those same pages; a plain load's weights are copied
    into new segments (moved). Either way the child serves greedy output equal to generate."""
    served = load_with_hpcllm(converted_llama, "cpu", shared_memory=shared_memory)
    weights = dict(served.model.named_parameters())
    before = {name: p.data_ptr() for name, p in weights.items()}
    segments = {p.untyped_storage().data_ptr() for p in weights.values()}
    engine = Engine(served.model, served.tokenizer, model_name="tiny", model_process=True,
                    prefill_chunk_tokens=8, kv_block_size=4).start()
    try:
        after = {name: p.data_ptr() for name, p in weights.items()}
        assert (after == before) is shared_memory
        child = engine.runner.pid
        inodes = {shm_inode(os.getpid(), address) for address in segments}
        assert (0 not in inodes and inodes <= mapped_inodes(child)) is shared_memory
        prompt_ids = [served.tokenizer(p)["input_ids"] for p in PROMPTS]
        results = run_together(engine, [request(prompt_token_ids=ids, max_tokens=12, temperature=0)
                                        for ids in prompt_ids])
        assert [[e.token_id for e in events[:-1]] for events in results] == [
            hf_greedy(reference_model("llama"), ids, 12) for ids in prompt_ids]
    finally:
        engine.shutdown()
        served.owner.release()


_libc = ctypes.CDLL(None, use_errno=True)


def resident_bytes(storages) -> int:
    """Bytes of these shared-memory segments whose pages exist (mincore: a segment's pages are resident for every
    process mapping it, or gone for all of them after MADV_REMOVE)."""
    total = 0
    for storage in storages:
        pages = -(-storage.nbytes() // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        assert _libc.mincore(ctypes.c_void_p(storage.data_ptr()), ctypes.c_size_t(storage.nbytes()), vector) == 0
        total += sum(1 for page in vector if page & 1) * mmap.PAGESIZE
    return total


def mapped_rss(pid: int, inodes: set[int]) -> int:
    """Resident bytes of process `pid`'s mappings of these files (/proc/pid/smaps)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):
                inside = len(fields) >= 5 and int(fields[4]) in inodes
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def test_with_a_model_process_each_weight_is_held_once_and_embeddings_run_there(converted_llama, reference_model,
                                                                               load_pair, start_worker):
    """The child's fast path replaces most weights by fused, packed copies: the worker's shared-memory originals of
    those are given back (their pages gone for both processes), the worker's model holds none of them, and greedy
    output and embeddings (computed in the child) still equal generate's and the in-process engine's."""
    served = load_with_hpcllm(converted_llama, "cpu", shared_memory=True)
    model, tokenizer = served.model, served.tokenizer
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage() for p in model.parameters()}.values()
    weight_bytes = sum(p.nbytes for p in model.parameters())
    resident_at_load = resident_bytes(storages)
    assert resident_at_load >= weight_bytes  # the load wrote every weight into the segments
    inodes = {shm_inode(os.getpid(), storage.data_ptr()) for storage in storages}

    worker = start_worker(loader=lambda: served, model_process=True)
    assert wait_until(lambda: worker.service.engine is not None and worker.service.engine.alive, timeout=120)
    runner = worker.service.engine.runner
    assert isinstance(runner, ProcessRunner) and runner.fast_path.fused_attention == model.config.num_hidden_layers
    dropped = sum(length for _, length in runner.fast_path.dropped_ranges)
    assert dropped > weight_bytes / 2  # q/k/v, gate/up, o/down projections and the (untied) lm_head: most of it
    whole_pages = dropped - 2 * mmap.PAGESIZE * len(runner.fast_path.dropped_ranges)  # partial pages stay
    assert wait_until(lambda: resident_at_load - resident_bytes(storages) >= whole_pages), (
        f"released {resident_at_load - resident_bytes(storages)} of {dropped} bytes")
    assert mapped_rss(runner.pid, inodes) <= resident_at_load - dropped + mmap.PAGESIZE * len(storages)
    dropped_names = set(runner.fast_path.dropped_weights)
    assert {name for name, p in model.named_parameters() if p.device.type == "meta"} == dropped_names

    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    for ids in prompt_ids[:2]:
        with worker.client.generate(request(prompt_token_ids=ids, max_tokens=12, temperature=0)) as stream:
            assert [line.token_id for line in list(stream)[:-1]] == hf_greedy(reference_model("llama"), ids, 12)
    embedded = worker.client.embed(prompt_ids).embeddings
    local_model, local_tokenizer = load_pair("llama")
    with Engine(local_model, local_tokenizer, model_name="tiny") as local:
        expected = local.embed(prompt_ids)
    for got, want in zip(embedded, expected):
        assert got == pytest.approx(want, abs=1e-5)
    worker.stop()
    served.owner.release()


def test_the_model_process_gets_the_compute_threads_and_the_worker_keeps_one(process_engine):
    """The worker's own torch (sampling) stays single-threaded so its OpenMP workers never spin on the model process's
    cores; the model process computes with the threads the worker was given, and /ready's torch_threads says so."""
    from hpcllm.worker.cli import _leave_the_threads_to

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _leave_the_threads_to(False) is None and torch.get_num_threads() == 2  # in-process: unchanged
        assert _leave_the_threads_to(True) == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    # What the model process reported after setting it: the model_process_threads process_engine was started with
    # (1, not this process's torch threads, which it would take without the setting).
    assert process_engine.compute_threads == 1


def test_out_of_memory_with_a_step_sent_ahead_drops_that_step_and_outputs_stay_exact(unpacked_pair, reference_model,
                                                                                      process_engine, monkeypatch):
    """A step fails while the next one is already in the model process: the engine collects and drops the one sent
    ahead, preempts the newest request as for any OOM, and every request still gets generate's tokens."""
    tokenizer, model = unpacked_pair[1], reference_model("llama")
    runner, collect, failed = process_engine.runner, process_engine.runner.collect, []

    def collect_failing_once():
        result = collect()  # the reply is read either way: the pipe stays in step
        if not failed and process_engine._ahead is not None:
            failed.append(True)
            raise torch.OutOfMemoryError("injected")
        return result

    monkeypatch.setattr(runner, "collect", collect_failing_once)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    results = run_together(process_engine, [request(prompt_token_ids=ids, max_tokens=12, temperature=0)
                                            for ids in prompt_ids])
    assert failed
    assert [[e.token_id for e in events[:-1]] for events in results] == [hf_greedy(model, ids, 12) for ids in prompt_ids]
    assert process_engine.metrics.preemptions._value.get() >= 1
    assert process_engine.kv_pool.used_blocks == 0


class _Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, 10)

    def get_output_embeddings(self):
        return self.head


class _FailingRunner:
    """Logits of zeros but for token 7, whose step runs out of memory."""

    fast_path = None

    def step(self, batch):
        if any(7 in chunk.token_ids for chunk in batch.chunks):
            raise torch.OutOfMemoryError("injected")
        if any(9 in chunk.token_ids for chunk in batch.chunks):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return torch.zeros(len(batch.chunks), 10)


def test_the_model_process_answers_skipped_for_a_step_fed_by_a_failed_one_and_runs_the_next_plain_one(monkeypatch,
                                                                                                    caplog):
    import multiprocessing
    import threading

    import hpcllm.worker.runner_process as runner_process

    monkeypatch.setattr(runner_process, "make_runner", lambda model, **options: _FailingRunner())
    monkeypatch.setattr(runner_process.signal, "signal", lambda *args: None)  # not the main thread here
    monkeypatch.setattr(runner_process, "freeze_startup_heap", lambda: None)  # not this test process's heap
    ours, theirs = multiprocessing.Pipe()
    child = threading.Thread(target=runner_process.serve_steps, args=(theirs,), daemon=True)
    child.start()
    ours.send(("load", {"model": _Head(), "num_blocks": 4, "block_size": 4, "batching": "auto", "max_rows": 2,
                        "threads": 1, "fast_path": False}))
    assert ours.recv()[0] == "ready"
    greedy = (SamplingParams(temperature=0.0), 0)
    ours.send(("step", StepBatch(chunks=[SequenceChunk(1, [7], 0)], choices=[greedy])))  # fails
    ours.send(("step", StepBatch(chunks=[SequenceChunk(1, [0], 1, previous_row=0)], choices=[greedy])))
    ours.send(("step", StepBatch(chunks=[SequenceChunk(1, [3], 0)], choices=[greedy])))
    assert [ours.recv()[0] for _ in range(3)] == ["oom", "skipped", "ok"]
    # A step that raises: the child sends its traceback; what the engine (its requests, their clients) fails with
    # is the exception's line, the traceback is logged.
    ours.send(("step", StepBatch(chunks=[SequenceChunk(1, [9], 0)], choices=[greedy])))
    kind, child_traceback = ours.recv()
    assert kind == "error" and child_traceback.startswith("Traceback")
    with caplog.at_level("ERROR", logger=runner_process.__name__):
        failure = runner_process.step_failure(child_traceback)
    assert str(failure) == ("the model process failed: RuntimeError: probability tensor contains either `inf`, "
                            "`nan` or element < 0")
    assert "Traceback" in caplog.text and "in serve_steps" in caplog.text
    ours.send(("stop", None))
    child.join(10)
    assert not child.is_alive()


def test_a_waiting_model_process_and_spare_have_frozen_their_imports(monkeypatch):
    """A spare's start time: the freeze once the model is there (gc.collect + gc.freeze) must find the imports'
    ~385k objects frozen already, or the collection walks them all on the way to ready (0.17 -> 0.5 s measured).
    Both waiting processes run their start-up here in-process, told to stop at once."""
    import gc
    import io
    import multiprocessing

    import signal

    from hpcllm.worker import spare
    from hpcllm.worker.model_process import _child_main

    # serve_steps ignores SIGINT/SIGTERM (the worker's to act on): not in this test process, whose later
    # subprocesses would inherit it
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    gc.unfreeze()
    try:
        parent, child = multiprocessing.Pipe()
        parent.send(("stop", None))
        _child_main(child)
        assert parent.recv() == ("imported", None)
        assert gc.get_freeze_count() > 0, "the model process waits for its model with its imports unfrozen"

        gc.unfreeze()
        monkeypatch.delenv(spare.MODEL_PROCESS_ENV, raising=False)
        monkeypatch.delenv("HPCLLM_HOST_POOL_BYTES", raising=False)
        monkeypatch.setattr("sys.stdin", io.StringIO(""))  # retired before an assignment came
        assert spare.main() == 0
        assert gc.get_freeze_count() > 0, "the spare waits for its assignment with its imports unfrozen"
    finally:
        gc.unfreeze()


def test_a_model_process_closed_from_two_threads_at_once_is_closed_once():
    # The engine thread and the step watchdog both end a hung engine (Engine._end_all): the pipe was closed from
    # both, and one failed with EBADF (an exception in the watchdog thread, seen in a full test run).
    import threading

    child = ModelProcess()
    pipe_closes, slow_join = [], child.process.join

    def join_slowly(timeout=None):  # hold the first close where the second would overtake it
        time.sleep(0.3)
        slow_join(timeout)

    real_close = child.conn.close
    child.conn.close = lambda: (pipe_closes.append(threading.current_thread().name), real_close())
    child.process.join = join_slowly
    failures = []

    def close():
        try:
            child.close()
        except Exception as exc:  # noqa: BLE001 (recorded: the assertion below names it)
            failures.append(exc)

    closers = [threading.Thread(target=close, name=f"closer-{i}") for i in range(2)]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join(30)
    assert failures == [] and len(pipe_closes) == 1 and not child.process.is_alive()
