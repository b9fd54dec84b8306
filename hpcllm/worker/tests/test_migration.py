"""Token-based live migration between two real workers (HTTP, tiny Llama): rounds, hand-over, attach, failures.

Each test compares against an uninterrupted run of the same request: a migrated generation must produce exactly
the same tokens and text, with every output index delivered once (source stream, then the attach stream).
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from hpcllm.worker.client import WorkerError
from hpcllm.worker.engine import EngineUnavailable
from hpcllm.worker.migration import MAX_PARALLEL_MIGRATIONS
from hpcllm.worker.protocol import (
    FinalLine,
    GenerateRequest,
    PrepareMigration,
    Thinking,
    TokenLine,
    drain_answer_margin,
)
from hpcllm.worker.requests import KV_CACHE_FULL, preempted_reason

from .conftest import handed_over, held, hold_at, slow_down, ticketed, wait_until
from .schemas import PERSON_GRAMMAR, check_person

GREEDY = dict(temperature=0.0)
SEEDED = dict(temperature=0.9, top_p=0.95, seed=1234)
# Penalties read the token history, which the destination rebuilds from the token ids it is given.
PENALIZED = dict(temperature=0.9, seed=1234, presence_penalty=1.2, frequency_penalty=0.6, repetition_penalty=1.3,
                 min_p=0.02, logit_bias={17: 2.5, 5: -4.0})
# A prompt long enough that a destination prefilling 4 tokens per step needs many steps.
LONG_PROMPT = [(7 * i) % 300 + 5 for i in range(120)]


@pytest.fixture
def pair(load_pair):
    return load_pair("llama")


def body(request_id: str, **fields) -> GenerateRequest:
    fields.setdefault("prompt", "hello world, this")
    fields.setdefault("ignore_eos", True)
    return GenerateRequest(request_id=request_id, **fields)


def uninterrupted(worker, request: GenerateRequest) -> list[TokenLine]:
    """The reference: the same request run to the end on one worker, as token lines."""
    with worker.client.generate(request.model_copy(update={"request_id": request.request_id + "-ref"})) as stream:
        return [line for line in stream if isinstance(line, TokenLine)]


def read_until(lines, count: int) -> list[TokenLine]:
    got = []
    for line in lines:
        assert isinstance(line, TokenLine), line
        got.append(line)
        if len(got) == count:
            return got
    raise AssertionError("stream ended early")


def finish_through_attach(source_lines, destination) -> tuple[list[TokenLine], FinalLine, FinalLine]:
    """Read the source stream to its final line, attach on the destination it names, read that to the end."""
    from_source = [line for line in source_lines]
    source_final = from_source.pop()
    assert isinstance(source_final, FinalLine) and source_final.finish_reason == "migrated", source_final
    moved = source_final.migrated_to
    assert moved is not None and moved.worker_url == destination.url
    with destination.client.attach(moved.request_id, moved.from_index) as stream:
        from_destination = list(stream)
    final = from_destination.pop()
    return from_source + from_destination, source_final, final


def assert_same_generation(received: list[TokenLine], reference: list[TokenLine]) -> None:
    assert [line.index for line in received] == list(range(len(reference))), "a token was lost or repeated"
    assert [line.token_id for line in received] == [line.token_id for line in reference]
    assert "".join(line.text for line in received) == "".join(line.text for line in reference)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED, PENALIZED], ids=["greedy", "seeded", "penalized"])
def test_live_migration_continues_exactly_like_an_uninterrupted_run(pair, start_worker, sampling):
    source, destination = start_worker(pair), start_worker(pair)
    request = body("live", max_tokens=40, stop=["zzz"], **sampling)
    reference = uninterrupted(source, request)
    # The source decodes during the rounds and is still decoding at the hand-over, however loaded the machine: its
    # steps wait at output 6 until the prepare (round 1, the output so far) reached the destination, which prefills
    # it once the source has decoded on to output 20, where the source's steps wait for the hand-over's pause.
    engine, prepared = source.service.engine, threading.Event()
    hold_at(engine, "live", 6, until=prepared)
    hold_at(engine, "live", 20, until=handed_over(engine))
    hold = destination.service.engine.hold

    def hold_once_the_source_decoded_on(*args, **kwargs):
        prepared.set()
        assert wait_until(lambda: len(engine.tokens("live").output_token_ids) >= 20, timeout=60)
        return hold(*args, **kwargs)

    destination.service.engine.hold = hold_once_the_source_decoded_on

    stream = source.client.generate(request)
    lines = iter(stream)
    first = read_until(lines, 5)
    result = source.client.migrate("live", ticketed(destination.url))
    rest, source_final, final = finish_through_attach(lines, destination)
    received = first + rest

    assert_same_generation(received, reference)
    assert final.finish_reason == "length" and final.usage.completion_tokens == 40
    assert source_final.migrated_to.from_index == result.output_tokens_at_handover == 20
    assert result.rounds == len(result.tokens_per_round) >= 3
    assert result.tokens_per_round[1] >= 14  # round 2: what the source decoded during round 1
    prompt_tokens = len(source.service.engine.tokens("live").prompt_token_ids)
    assert result.tokens_per_round[0] >= prompt_tokens + 5  # round 1: the prompt and the output so far
    assert result.tokens_per_round[0] - prompt_tokens + sum(result.tokens_per_round[1:]) == result.output_tokens_at_handover
    assert source.service.engine.tokens("live").finish_reason == "migrated"
    assert source.service.engine.counts() == (0, 0)


def token_lines(lines: list[TokenLine]) -> list[tuple]:
    """What a client reads of each token line: index, token, text, and the log probabilities' tokens."""
    return [(line.index, line.token_id, line.text, line.logprobs and line.logprobs.token,
             line.logprobs and [top.token_id for top in line.logprobs.top]) for line in lines]


def test_the_destination_holds_back_what_the_source_held_back_at_every_hand_over_point(pair, start_worker):
    """Text the source held back at the hand-over - the start of a stop string, or an incomplete UTF-8 character
    (a hot sampled output of byte tokens) - is not in its stream; the destination rebuilds its detokenizer from the
    tokens it is given (prepare, then extend) and emits that text with the next token, as the uninterrupted run
    does. Moved at each index: the same token lines (text, log probabilities) and usage, nothing lost or doubled."""
    worker = start_worker(pair)
    sampled = body("ref", max_tokens=30, temperature=3.0, seed=77, logprobs=2)
    text = "".join(line.text for line in uninterrupted(worker, sampled))
    # The start of a stop string that never completes: held back, then released with the token that breaks it.
    request = sampled.model_copy(update={"stop": [text[len(text) // 2:len(text) // 2 + 3] + "\x00"]})
    with worker.client.generate(request.model_copy(update={"request_id": "whole"})) as stream:
        reference = list(stream)
    reference_final = reference.pop()
    ids = [line.token_id for line in reference]
    decode = pair[1].decode
    emitted_before = ["".join(line.text for line in reference[:k]) for k in range(len(reference))]
    assert any(decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))  # a character split across tokens
    assert any(not decode(ids[:k]).endswith("\ufffd") and len(emitted_before[k]) < len(decode(ids[:k]))
               for k in range(1, len(ids)))  # a stop string's start held back

    for k in range(len(reference)):
        for prepared in (k, k // 2):  # the tokens given by the prepare alone, or half of them by an extend
            request_id = f"moved-at-{k}-{prepared}"
            moved = request.model_copy(update={"request_id": request_id, "resume_token_ids": ids[:prepared]})
            worker.client.prepare_migration(PrepareMigration(request_id=request_id, generate=moved))
            worker.client.extend_migration(request_id, ids[prepared:k], wait=True)
            with worker.client.attach(request_id, k) as stream:
                rest = list(stream)
            final = rest.pop()
            assert token_lines(reference[:k] + rest) == token_lines(reference), f"moved at {k}, {prepared} prepared"
            assert (final.finish_reason, final.usage) == (reference_final.finish_reason, reference_final.usage)


def test_a_request_moved_before_its_first_token_gets_its_prompt_logprobs_from_the_destination(pair, start_worker):
    """Moved while the source still prefills its prompt (stop-and-copy): the destination produces output index 0,
    with the prompt's log probabilities it scored itself, and goes on as the uninterrupted run."""
    source, destination = start_worker(pair, prefill_chunk_tokens=8), start_worker(pair)
    request = body("early", prompt=None, prompt_token_ids=LONG_PROMPT, max_tokens=12, logprobs=2, prompt_logprobs=1,
                   **SEEDED)
    reference = uninterrupted(source, request)
    # The source's steps wait, once its first prompt chunk is in, until the move returned (it needs no step there).
    engine, reached, released = source.service.engine, threading.Event(), threading.Event()
    forward = engine._forward

    def held_mid_prefill(*args, **kwargs):
        early = engine._live.get("early")
        if early is not None and early.num_cached > 0 and not released.is_set():
            reached.set()
            released.wait(60)
        return forward(*args, **kwargs)

    engine._forward = held_mid_prefill
    lines = iter(source.client.generate(request))
    assert reached.wait(60)
    try:
        result = source.client.migrate("early", ticketed(destination.url, max_rounds=1))
    finally:
        released.set()
    rest, source_final, final = finish_through_attach(lines, destination)

    assert result.output_tokens_at_handover == source_final.migrated_to.from_index == 0
    assert token_lines(rest) == token_lines(reference)
    assert rest[0].prompt_logprobs is not None, "output index 0 came without the prompt's log probabilities"
    prompt_logprobs = [[(p.token, [top.token_id for top in p.top]) if p else None for p in line.prompt_logprobs]
                       for line in (rest[0], reference[0])]
    assert prompt_logprobs[0] == prompt_logprobs[1] and len(prompt_logprobs[0]) == len(LONG_PROMPT)
    assert all(line.prompt_logprobs is None for line in rest[1:])
    assert final.finish_reason == "length" and final.usage.completion_tokens == 12


def test_a_constrained_request_migrates_mid_answer_and_tokens_outside_the_schema_are_refused(pair, start_worker):
    """The destination rebuilds the request's grammar state from the tokens it is given (prepare, extend) and goes
    on exactly: the answer is the uninterrupted run's valid JSON. A token the schema does not allow there is a 400
    naming token_ids, the held request left as it was."""
    source, destination = start_worker(pair), start_worker(pair)
    request = body("json", max_tokens=64, temperature=1.0, seed=9, grammar=PERSON_GRAMMAR)
    reference = uninterrupted(source, request)
    hold_at(source.service.engine, "json", 5, until=handed_over(source.service.engine))  # still answering then

    stream = source.client.generate(request)
    lines = iter(stream)
    first = read_until(lines, 5)
    source.client.migrate("json", ticketed(destination.url))
    rest, _, final = finish_through_attach(lines, destination)
    assert_same_generation(first + rest, reference)
    assert final.finish_reason == "stop"
    check_person("".join(line.text for line in reference))

    resume = [line.token_id for line in reference[:5]]
    destination.client.prepare_migration(PrepareMigration(
        request_id="held-json", generate=request.model_copy(update={"request_id": "held-json",
                                                                    "resume_token_ids": resume})))
    end_of_answer = reference[-1].token_id  # not allowed mid-answer
    with pytest.raises(WorkerError) as refused:
        destination.client.extend_migration("held-json", [reference[5].token_id, end_of_answer])
    assert refused.value.status == 400 and refused.value.info.param == "token_ids"
    assert "token_ids[1]" in str(refused.value)
    assert destination.service.engine.tokens("held-json").output_token_ids == resume


def test_a_thinking_request_migrates_mid_thought_and_answers_its_grammar_after_it(start_worker, tmp_path):
    """A reasoning model's request (GenerateRequest.thinking) moved while it thinks: the destination is told its
    thinking too, so it takes the free thinking tokens, cuts the thinking at the budget and answers the choice,
    exactly as the uninterrupted run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.devmodels import make_model
    from hpcllm.worker.grammar import compile_grammar

    model_dir = make_model("llama", tmp_path / "thinker", chat_template="qwen3-think")
    thinker = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    source, destination = start_worker(thinker), start_worker(thinker)
    end = thinker[1].convert_tokens_to_ids("</think>")
    request = body("thinking", max_tokens=32, temperature=1.0, seed=5, ignore_eos=False,
                   grammar=compile_grammar("choice", ["positive", "negative"]),
                   thinking=Thinking(end_token_id=end, budget=12))
    reference = uninterrupted(source, request)
    hold_at(source.service.engine, "thinking", 4, until=handed_over(source.service.engine))  # still thinking then

    stream = source.client.generate(request)
    lines = iter(stream)
    first = read_until(lines, 4)
    source.client.migrate("thinking", ticketed(destination.url))
    rest, source_final, final = finish_through_attach(lines, destination)
    assert_same_generation(first + rest, reference)
    assert source_final.migrated_to.from_index == 4 < 12  # moved while thinking
    ids = [line.token_id for line in reference]
    assert ids.index(end) == 12 and final.finish_reason == "stop"
    assert thinker[1].decode(ids[13:], skip_special_tokens=True) in ("positive", "negative")


def test_rounds_shrink_while_the_source_decodes_during_a_slow_prefill(pair, start_worker):
    source = start_worker(pair)
    destination = start_worker(pair, prefill_chunk_tokens=4)
    request = body("long", prompt=None, prompt_token_ids=LONG_PROMPT, max_tokens=200, **SEEDED)
    reference = uninterrupted(source, request)
    slow_down(source.service.engine, 0.01)
    hold_at(source.service.engine, "long", 150, until=handed_over(source.service.engine))  # never ends first
    # 30 prefill steps of 4 tokens: the source decodes meanwhile.
    restore_destination = slow_down(destination.service.engine, 0.02)

    stream = source.client.generate(request)
    lines = iter(stream)
    first = read_until(lines, 3)
    result = source.client.migrate("long", ticketed(destination.url, handover_tokens=2))
    restore_destination()
    rest, _, final = finish_through_attach(lines, destination)

    assert_same_generation(first + rest, reference)
    assert final.finish_reason == "length"
    assert result.rounds >= 3, result
    assert result.tokens_per_round[1] > 2  # the source kept decoding during the first prefill
    initial_output = result.tokens_per_round[0] - len(LONG_PROMPT)
    assert initial_output >= 3
    assert initial_output + sum(result.tokens_per_round[1:]) == result.output_tokens_at_handover
    assert result.handover_seconds < result.total_seconds


def test_migrate_all_moves_every_running_and_waiting_request(pair, start_worker):
    source = start_worker(pair, max_running_requests=2)
    destination = start_worker(pair)
    requests = [
        body("a", max_tokens=40, **GREEDY),
        body("b", prompt="the quick brown", max_tokens=40, **SEEDED),
        body("c", prompt="🙂 日本語", max_tokens=30, **GREEDY),  # waits for a slot on the source
    ]
    references = [uninterrupted(source, r) for r in requests]
    # Every step waits, once "a" and "b" have 2 tokens, until all three were handed over.
    hold_at(source.service.engine, ("a", "b"), 2, until=handed_over(source.service.engine, requests=3))
    streams = [iter(source.client.generate(r)) for r in requests]
    firsts = [read_until(streams[0], 2), read_until(streams[1], 2), []]
    assert source.service.engine.counts() == (2, 1)

    result = source.client.migrate_all(ticketed(destination.url))

    assert sorted(m.request_id for m in result.migrated) == ["a", "b", "c"] and result.failed == []
    for first, lines, reference in zip(firsts, streams, references):
        rest, _, final = finish_through_attach(lines, destination)
        assert_same_generation(first + rest, reference)
        assert final.finish_reason == "length"
    assert source.service.engine.counts() == (0, 0)
    assert source.client.migrate_all(ticketed(destination.url)).migrated == []


@pytest.fixture
def silent_destination():
    """The URL of a destination that takes connections and never answers (a hung or swamped node)."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # every call the drain makes waits in the backlog, unanswered
        yield f"http://127.0.0.1:{hole.getsockname()[1]}"


def test_a_drain_answers_by_its_deadline_and_what_did_not_move_stays_here(pair, start_worker, silent_destination):
    """More requests than move at once, to a destination that never answers: the drain answers within its
    timeout_seconds plus the margin the node agent waits past it (before, each move waited timeout_seconds for
    the prepare, then again for the drop, and the requests queued behind the first 16 did it all once more: the
    agent had given up and stopped the worker), with every request in `failed`, still running here. A short
    node.migrate_timeout_seconds (5 s) leaves a short margin (1 s), and the drops of holds fit in it too."""
    source = start_worker(pair, max_running_requests=4, async_scheduling=False)  # each step slowed down below
    count = MAX_PARALLEL_MIGRATIONS + 2
    slow_down(source.service.engine, 0.05)  # the running ones are far from their end when the drain answers
    streams = [source.client.generate(body(f"r{i}", max_tokens=500)) for i in range(count)]
    lines = [iter(stream) for stream in streams]
    for request_lines in lines[:4]:
        read_until(request_lines, 1)
    assert source.service.engine.counts() == (4, count - 4)
    migrate_timeout_seconds = 5.0

    # The node agent's order and wait (hpcllm.node.workers.migrate_out): the worker's deadline is the agent's own
    # less the answer margin.
    deadline = migrate_timeout_seconds - drain_answer_margin(migrate_timeout_seconds)
    result = source.client.migrate_all(ticketed(silent_destination, timeout_seconds=deadline),
                                       timeout=migrate_timeout_seconds)

    assert result.migrated == []
    assert sorted(f.request_id for f in result.failed) == sorted(f"r{i}" for i in range(count))
    assert all("timed out" in f.error or "did not move before the drain's deadline (4 s: node.migrate_timeout_seconds"
               in f.error for f in result.failed), result.failed
    assert source.service.engine.counts() == (4, count - 4)  # none moved or lost: they go on here
    assert isinstance(next(lines[0]), TokenLine)  # not paused
    for stream in streams:
        stream.close()


def test_a_request_cancelled_during_a_drain_is_not_reported_as_a_failed_move(pair, start_worker):
    """The client of one request leaves while the drain moves it: the drain reports it in neither list (it finished
    here), not as a failed move the node agent would log as resuming from its tokens; the others move."""
    source, destination = start_worker(pair), start_worker(pair)
    # Steps wait, once both have 2 tokens, until "stays" was handed over ("leaves" is held on the destination until
    # it ended here: it is never paused).
    hold_at(source.service.engine, ("leaves", "stays"), 2, until=handed_over(source.service.engine))
    holding, release = threading.Event(), threading.Event()
    hold = destination.service.engine.hold

    def hold_until_released(request, *args, **kwargs):
        if request.request_id == "leaves":
            holding.set()
            assert release.wait(60)
        return hold(request, *args, **kwargs)

    destination.service.engine.hold = hold_until_released
    leaving = source.client.generate(body("leaves", max_tokens=500))
    staying = source.client.generate(body("stays", max_tokens=60, **GREEDY))
    leaving_lines, staying_lines = iter(leaving), iter(staying)
    read_until(leaving_lines, 2)
    firsts = read_until(staying_lines, 2)
    with ThreadPoolExecutor(1) as pool:
        drain = pool.submit(source.client.migrate_all, ticketed(destination.url))
        assert holding.wait(60)
        leaving.close()  # the client goes away: its request is cancelled
        assert wait_until(lambda: source.service.engine.tokens("leaves").state == "finished", timeout=60)
        release.set()
        result = drain.result(timeout=120)

    assert [m.request_id for m in result.migrated] == ["stays"] and result.failed == [], result
    rest, _, final = finish_through_attach(staying_lines, destination)
    assert final.finish_reason == "length" and len(firsts + rest) == 60
    assert source.service.engine.tokens("leaves").finish_reason == "abort"
    assert wait_until(lambda: destination.service.engine.counts() == (0, 0))  # its hold there was dropped


@pytest.mark.parametrize("ending", ["engine fails", "worker stops"])
def test_a_request_ended_by_its_worker_during_a_drain_is_reported_as_not_moved(pair, start_worker, ending):
    """The source's engine fails (a step that never ends: finish_reason error, engine_unavailable) or the worker
    stops (abort) while the drain moves a request: the gateway resumes such a request from its tokens, so the drain
    reports it in `failed` with the reason (before, any finished request was dropped from both lists: the node agent
    logged '0 requests live-migrated' and the controller recorded the drain as a success)."""
    source, destination = start_worker(pair, step_timeout=1.0), start_worker(pair)
    engine = source.service.engine
    forward, hang, let_go = engine._forward, threading.Event(), threading.Event()

    def forward_that_may_hang(*args, **kwargs):
        if hang.is_set():
            let_go.wait(60)  # a kernel that does not return (let go when the test ends)
        return forward(*args, **kwargs)

    engine._forward = forward_that_may_hang
    holding, release = threading.Event(), threading.Event()
    hold = destination.service.engine.hold

    def hold_until_released(request, *args, **kwargs):
        holding.set()
        assert release.wait(60)
        return hold(request, *args, **kwargs)

    destination.service.engine.hold = hold_until_released
    try:
        stream = source.client.generate(body("fails", max_tokens=500))
        read_until(iter(stream), 2)
        with ThreadPoolExecutor(1) as pool:
            drain = pool.submit(source.client.migrate_all, ticketed(destination.url))
            assert holding.wait(60)
            if ending == "engine fails":
                hang.set()  # the engine's next step never ends: past step_timeout the engine fails its requests
            else:
                engine.shutdown()
            assert wait_until(lambda: engine.tokens("fails").state == "finished", timeout=60)
            release.set()
            result = drain.result(timeout=120)
        stream.close()
    finally:
        release.set()
        let_go.set()

    reason = "error" if ending == "engine fails" else "abort"
    assert engine.tokens("fails").finish_reason == reason
    assert result.migrated == [] and [f.request_id for f in result.failed] == ["fails"], result
    assert f"({reason})" in result.failed[0].error, result.failed


def test_a_hand_over_that_cannot_make_the_deadline_does_not_pause_the_stream(pair, start_worker):
    """A slow destination: the prepare takes most of the migration's time, so the next round is the hand-over, but
    an extend as slow as that prepare would end past the deadline. The migration gives up (504) without pausing the
    request, whose stream goes on here (before, it paused the request, waited for the extend until the deadline,
    then failed with 502 and un-paused it: the client's stream stalled for nothing)."""
    source, destination = start_worker(pair), start_worker(pair)
    slow_down(source.service.engine, 0.01)
    slow_seconds = 2.0  # the destination's every call; the migration has 1.5 of it
    dest_engine = destination.service.engine
    hold, extend = dest_engine.hold, dest_engine.extend

    def slow_hold(*args, **kwargs):
        time.sleep(slow_seconds)  # a swamped destination, not a wait for an event
        return hold(*args, **kwargs)

    def slow_extend(*args, **kwargs):
        time.sleep(slow_seconds)
        return extend(*args, **kwargs)

    dest_engine.hold, dest_engine.extend = slow_hold, slow_extend
    pauses = []
    pause = source.service.engine.pause
    source.service.engine.pause = lambda request_id: pauses.append(request_id) or pause(request_id)
    with source.client.generate(body("late", max_tokens=500)) as stream:
        lines = iter(stream)
        read_until(lines, 2)
        with pytest.raises(WorkerError) as refused:
            source.client.migrate("late", ticketed(destination.url, timeout_seconds=slow_seconds * 1.5))
        assert refused.value.status == 504 and "did not move before the migration's deadline" in str(refused.value)
        assert pauses == []
        assert isinstance(next(lines), TokenLine)  # it goes on here
    assert wait_until(lambda: dest_engine.counts() == (0, 0))  # its hold there was dropped


def test_destination_down_or_refusing_leaves_the_source_request_untouched(pair, start_worker):
    source, destination = start_worker(pair), start_worker(pair)
    request = body("stay", max_tokens=40, **SEEDED)
    reference = uninterrupted(source, request)
    # Both requests "stay" are still running when the migrations are tried: each engine's steps wait until then.
    tried, checked = threading.Event(), threading.Event()
    hold_at(source.service.engine, "stay", 3, until=tried)
    hold_at(destination.service.engine, "stay", 1, until=checked)
    # The destination already runs a request with this id, so its prepare answers 409.
    occupying = destination.client.generate(body("stay", max_tokens=200))
    occupying_lines = iter(occupying)
    next(occupying_lines)

    stream = source.client.generate(request)
    lines = iter(stream)
    received = read_until(lines, 3)
    try:
        with pytest.raises(WorkerError) as down:
            source.client.migrate("stay", ticketed("http://127.0.0.1:9", timeout_seconds=5))
        assert down.value.status == 502 and "127.0.0.1:9" in str(down.value)
        with pytest.raises(WorkerError) as refused:
            source.client.migrate("stay", ticketed(destination.url))
        assert refused.value.status == 502 and "already in progress" in str(refused.value)
    finally:
        tried.set()

    rest = list(lines)
    final = rest.pop()
    assert final.finish_reason == "length"
    assert_same_generation(received + rest, reference)
    assert destination.service.engine.tokens("stay").state == "running"  # the destination's own request is fine
    checked.set()
    occupying.close()


def test_a_failure_after_the_pause_resumes_the_source_exactly(pair, start_worker):
    source, destination = start_worker(pair), start_worker(pair)
    request = body("pausing", max_tokens=40, **SEEDED)
    reference = uninterrupted(source, request)
    hold_at(source.service.engine, "pausing", 4, until=handed_over(source.service.engine))  # running until paused

    def extend_fails(*args, **kwargs):
        raise EngineUnavailable("destination shutting down")

    destination.service.engine.extend = extend_fails
    stream = source.client.generate(request)
    lines = iter(stream)
    received = read_until(lines, 4)
    with pytest.raises(WorkerError) as failed:
        # A huge handover_tokens makes round 2 the hand-over: the source pauses, then the extend fails.
        source.client.migrate("pausing", ticketed(destination.url, handover_tokens=10_000))
    assert failed.value.status == 502 and "shutting down" in str(failed.value)

    rest = list(lines)
    assert rest.pop().finish_reason == "length"
    assert_same_generation(received + rest, reference)
    # The held request on the destination was dropped.
    assert destination.service.engine.tokens("pausing").state == "finished"
    assert destination.service.engine.counts() == (0, 0)


def test_migrating_an_unknown_or_finished_request_is_refused(pair, start_worker):
    source, destination = start_worker(pair), start_worker(pair)
    target = ticketed(destination.url)
    with pytest.raises(WorkerError) as unknown:
        source.client.migrate("nobody", target)
    assert unknown.value.status == 404
    with source.client.generate(body("done", max_tokens=3)) as stream:
        list(stream)
    with pytest.raises(WorkerError) as finished:
        source.client.migrate("done", target)
    assert finished.value.status == 409 and "already finished" in str(finished.value)


def test_held_request_extend_attach_and_their_errors(pair, start_worker):
    source, destination = start_worker(pair), start_worker(pair)
    request = body("held", max_tokens=30, **SEEDED)
    reference = uninterrupted(source, request)
    prompt = destination.service.engine.tokenize_prompt(request)
    resume = [line.token_id for line in reference[:5]]
    prepare = PrepareMigration(
        request_id="held",
        generate=request.model_copy(update={"prompt": None, "prompt_token_ids": prompt, "resume_token_ids": resume}),
    )

    prepared = destination.client.prepare_migration(prepare)
    assert prepared.cached_tokens == len(prompt) + 5
    assert destination.service.engine.tokens("held").state == "held"
    with pytest.raises(WorkerError) as duplicate:
        destination.client.prepare_migration(prepare)
    assert duplicate.value.status == 409
    extended = destination.client.extend_migration("held", [line.token_id for line in reference[5:9]], wait=True)
    assert (extended.cached_tokens, extended.output_tokens) == (len(prompt) + 9, 9)
    with pytest.raises(WorkerError) as wrong_index:
        destination.client.attach("held", 5)
    assert wrong_index.value.status == 409 and "9 output tokens" in str(wrong_index.value)
    with pytest.raises(WorkerError) as unknown:
        destination.client.extend_migration("nobody", [1])
    assert unknown.value.status == 404
    with pytest.raises(WorkerError) as unknown_attach:
        destination.client.attach("nobody", 0)
    assert unknown_attach.value.status == 404

    with destination.client.attach("held", 9) as stream:
        rest = list(stream)
    assert rest.pop().finish_reason == "length"
    assert_same_generation(reference[:9] + rest, reference)
    with pytest.raises(WorkerError) as again:
        destination.client.attach("held", 30)
    assert again.value.status == 409


def test_held_requests_expire_and_refuse_ending_tokens(pair, start_worker):
    worker = start_worker(pair)
    engine = worker.service.engine
    generate = GenerateRequest(request_id="brief", prompt_token_ids=[5, 6, 7], max_tokens=10)
    # 2 s: long enough that a loaded machine still sees the hold before it expires (0.3 s lapsed once first)
    worker.client.prepare_migration(PrepareMigration(request_id="brief", generate=generate, hold_seconds=2.0))
    assert engine.counts() == (1, 0)  # the held request keeps its slot and KV cache ...
    assert wait_until(lambda: engine.tokens("brief").state == "finished", timeout=15)
    assert engine.counts() == (0, 0)  # ... until it expires
    with pytest.raises(WorkerError) as expired:
        worker.client.attach("brief", 0)
    assert expired.value.status == 409 and "hold_seconds" in str(expired.value)

    eos = sorted(engine.eos_token_ids)[0]
    ending = generate.model_copy(update={"request_id": "ending"})
    worker.client.prepare_migration(PrepareMigration(request_id="ending", generate=ending))
    with pytest.raises(WorkerError) as stops:
        worker.client.extend_migration("ending", [8, eos])
    assert stops.value.status == 400 and "ends the generation" in str(stops.value)
    assert engine.tokens("ending").state == "finished" and engine.counts() == (0, 0)


def test_a_held_request_waiting_for_a_slot_is_prefilled_once_admitted(pair, start_worker):
    worker = start_worker(pair, max_running_requests=1)
    looked = threading.Event()
    hold_at(worker.service.engine, "busy", 1, until=looked)  # it takes the one slot until the test looked
    busy = iter(worker.client.generate(body("busy", max_tokens=30)))
    next(busy)
    generate = GenerateRequest(request_id="queued", prompt_token_ids=[5, 6, 7], max_tokens=10)
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(
        worker.client.prepare_migration(PrepareMigration(request_id="queued", generate=generate))))
    thread.start()
    try:
        assert wait_until(lambda: worker.service.engine.counts() == (1, 1))
        assert not answer  # no answer while it cannot even start prefilling
    finally:
        looked.set()
    list(busy)
    thread.join(20)
    assert answer and answer[0].cached_tokens == 3
    assert worker.service.engine.tokens("queued").state == "held"


# ---------------------------------------------------------------------------- only where the controller says


def test_a_migration_to_a_destination_the_controller_did_not_name_is_refused(pair, start_worker):
    from hpcllm.credentials import TICKET_SECONDS, issue_ticket
    from hpcllm.worker.migration import ticketed_request
    from hpcllm.worker.protocol import MigrateRequest

    from .conftest import MODEL, SECRET

    source, destination = start_worker(pair), start_worker(pair)
    request = body("stays", max_tokens=30, **GREEDY)
    reference = uninterrupted(source, request)
    slow_down(source.service.engine, 0.01)
    stream = source.client.generate(request)
    lines = iter(stream)
    first = read_until(lines, 3)

    elsewhere = "http://127.0.0.1:9"  # e.g. a user's own server
    stale = issue_ticket(model=MODEL, source_instance="", source_key=SECRET, destination_url=destination.url,
                         destination_instance="", destination_key=SECRET, now=time.time() - TICKET_SECONDS - 1)
    refusals = {
        "no ticket": (MigrateRequest(destination_url=destination.url), "needs a ticket"),
        "ticket for another destination": (MigrateRequest(destination_url=elsewhere,
                                                          ticket=ticketed(destination.url).ticket), "names"),
        "ticket not made with this worker's key": (ticketed_request(destination.url, model=MODEL, key="guessed"),
                                                   "bad signature"),
        "ticket for another model": (ticketed_request(destination.url, model="other-model", key=SECRET),
                                     "other-model"),
        "expired ticket": (MigrateRequest(destination_url=destination.url, ticket=stale), "expired"),
    }
    for what, (order, message) in refusals.items():
        for migrate in (lambda: source.client.migrate("stays", order), lambda: source.client.migrate_all(order)):
            with pytest.raises(WorkerError) as refused:
                migrate()
            assert refused.value.status == 403 and message in str(refused.value), what

    # The request never left: it finishes on the source like an uninterrupted run.
    rest = [line for line in lines]
    final = rest.pop()
    assert final.finish_reason == "length"
    assert_same_generation(first + rest, reference)
    assert destination.service.engine.counts() == (0, 0)


def test_a_grant_opens_only_the_requests_moved_with_it(pair, start_worker):
    from hpcllm.worker.client import WorkerClient

    source, destination = start_worker(pair), start_worker(pair)
    hold_at(source.service.engine, "moved", 3, until=handed_over(source.service.engine))  # running until moved
    lines = iter(source.client.generate(body("moved", max_tokens=30, **GREEDY)))
    read_until(lines, 3)
    source.client.migrate("moved", ticketed(destination.url))
    moved = [line for line in lines][-1].migrated_to
    assert moved.grant  # what the reader (the gateway) attaches with: never the destination's key

    with destination.client.generate(body("someone-else", max_tokens=200, **GREEDY)) as other:
        next(iter(other))
        granted = WorkerClient(destination.url, "", grant=moved.grant, read_timeout=60)
        with pytest.raises(WorkerError) as foreign:
            granted.attach("someone-else", 0)
        assert foreign.value.status == 403 and "does not cover request someone-else" in str(foreign.value)
        with pytest.raises(WorkerError) as generate:
            list(granted.generate(body("new", max_tokens=3)))
        assert generate.value.status == 401
        forged = WorkerClient(destination.url, "", grant=moved.grant[:-4] + "0000", read_timeout=60)
        with pytest.raises(WorkerError) as bad:
            forged.attach("moved", moved.from_index)
        assert bad.value.status == 401
        with granted.attach("moved", moved.from_index) as stream:
            assert list(stream)[-1].finish_reason == "length"


def grant_client(worker, **ticket_fields):
    """A client holding a fresh migration grant for worker (as a source would, from its own ticket)."""
    from hpcllm.credentials import issue_ticket
    from hpcllm.worker.client import WorkerClient

    from .conftest import MODEL, SECRET

    ticket = issue_ticket(model=MODEL, source_instance="", source_key=SECRET, destination_url=worker.url,
                          destination_instance="", destination_key=SECRET, **ticket_fields)
    return WorkerClient(worker.url, "", grant=ticket.grant, read_timeout=60)


def test_a_grant_cannot_take_a_request_another_grant_holds(pair, start_worker):
    worker = start_worker(pair)
    a, b = grant_client(worker), grant_client(worker)
    a.prepare_migration(held("X"))
    with pytest.raises(WorkerError) as duplicate:
        b.prepare_migration(held("X"))
    assert duplicate.value.status == 409
    for call in (lambda: b.extend_migration("X", [8]), lambda: b.drop_migration("X"), lambda: b.attach("X", 0)):
        with pytest.raises(WorkerError) as foreign:
            call()
        assert foreign.value.status == 403 and "does not cover request X" in str(foreign.value)
    with a.attach("X", 0) as stream:
        assert list(stream)[-1].finish_reason == "length"


def test_a_grant_prepares_a_request_once(pair, start_worker):
    worker = start_worker(pair)
    grant = grant_client(worker)
    grant.prepare_migration(held("attached"))
    with grant.attach("attached", 0) as stream:
        list(stream)
    grant.prepare_migration(held("dropped"))
    grant.drop_migration("dropped")
    for request_id in ("attached", "dropped"):
        with pytest.raises(WorkerError) as replayed:
            grant.prepare_migration(held(request_id))
        assert replayed.value.status == 409 and "already prepared with this migration grant" in str(replayed.value)
    assert worker.service.engine.counts() == (0, 0)
    worker.client.prepare_migration(held("dropped"))  # the key is no grant: it may


def test_a_grant_holds_at_most_a_slot_each_for_at_most_its_tickets_lifetime(pair, start_worker):
    from hpcllm.credentials import TICKET_SECONDS

    worker = start_worker(pair, max_running_requests=2)
    engine = worker.service.engine
    grant = grant_client(worker)
    for request_id in ("h0", "h1"):
        grant.prepare_migration(held(request_id, hold_seconds=3600))
        assert engine._live[request_id].hold_seconds == TICKET_SECONDS
    with pytest.raises(WorkerError) as full:
        grant.prepare_migration(held("h2"))
    assert full.value.status == 429 and "already holds 2 requests" in str(full.value)
    assert "h2" not in engine._live
    grant.drop_migration("h0")
    grant.prepare_migration(held("h2"))


def test_a_grant_prepares_no_more_requests_than_its_ticket_covers(pair, start_worker):
    """An attached request no longer counts as held, so one grant could prepare, attach and prepare again until its
    requests filled every slot; it prepares as many as its ticket covers (the source's requests), failed ones too."""
    worker = start_worker(pair, max_running_requests=2)
    grant = grant_client(worker, max_requests=2)
    grant.prepare_migration(held("first"))
    with grant.attach("first", 0) as stream:
        assert list(stream)[-1].finish_reason == "length"
    grant.prepare_migration(held("second"))
    grant.drop_migration("second")
    with pytest.raises(WorkerError) as spent:
        grant.prepare_migration(held("third"))
    assert spent.value.status == 403 and "covers 2 requests" in str(spent.value)
    assert "third" not in worker.service.engine._live
    grant_client(worker, max_requests=2).prepare_migration(held("third"))  # another ticket's grant may


def test_migrate_orders_with_a_bad_timeout_or_url_are_refused_and_the_request_stays(pair, start_worker):
    import httpx

    from hpcllm.httpkit.auth import SECRET_HEADER

    from .conftest import SECRET

    source, destination = start_worker(pair), start_worker(pair)
    slow_down(source.service.engine, 0.01)
    lines = iter(source.client.generate(body("stays", max_tokens=30, **GREEDY)))
    read_until(lines, 1)
    order = ticketed(destination.url).model_dump_json()
    bad = {"timeout_seconds": [order[:-1] + f',"timeout_seconds":{value}}}' for value in ("1e12", "Infinity", "NaN")],
           "destination_url": [order.replace(destination.url, "http://[::1")]}
    for param, raw_bodies in bad.items():
        for raw in raw_bodies:
            response = httpx.post(source.url + "/v1/internal/requests/stays/migrate", content=raw,
                                  headers={SECRET_HEADER: SECRET, "Content-Type": "application/json"})
            assert response.status_code == 400 and param in response.json()["error"]["message"], raw
    assert [line for line in lines][-1].finish_reason == "length"


def test_a_destination_whose_kv_cache_fills_drops_the_hold_and_the_source_serves_on(pair, start_worker):
    """The destination's running request needs the block the held request was prefilled into: the hold is dropped
    (queued again, it would wait for that request's end while the source's hand-over waited for it), the move
    fails at once, and the source finishes the request, nothing lost or repeated."""
    source = start_worker(pair)
    destination = start_worker(pair, max_model_len=128, kv_cache_tokens=128, kv_block_size=16,
                               async_scheduling=False)
    request = body("moving", max_tokens=60, **GREEDY)
    reference = uninterrupted(source, request)
    engine = destination.service.engine
    # The hold must fit the one block left: the source makes no 4th token until the prepare reached the destination
    # (a loaded machine's slow prepare once let it make 11, 2 blocks' worth). Reached: held there, or already
    # dropped (finished), which can happen between two looks.
    source_engine, prepared = source.service.engine, threading.Event()
    source_forward = source_engine._forward

    def until_prepared(*args, **kwargs):
        moving = source_engine._live.get("moving")
        if not prepared.is_set() and moving is not None and len(moving.output_ids) >= 3:
            assert wait_until(lambda: "moving" in engine._live or "moving" in engine._finished, timeout=60)
            prepared.set()
        return source_forward(*args, **kwargs)

    source_engine._forward = until_prepared
    slow_down(source_engine, 0.05)
    forward = engine._forward

    def until_the_hold_arrives(*args, **kwargs):
        # "busy": 108 prompt tokens, 7 of the 8 blocks up to its 4th token (112 tokens), which this step computes;
        # its 5th needs the 8th block, the one the hold takes meanwhile
        busy_request = engine._live.get("busy")
        if busy_request is not None and len(busy_request.output_ids) == 3:
            assert wait_until(lambda: "moving" in engine._live, timeout=60)
        return forward(*args, **kwargs)

    engine._forward = until_the_hold_arrives
    lines = iter(source.client.generate(request))
    received = read_until(lines, 3)
    busy = iter(destination.client.generate(body("busy", prompt=None, prompt_token_ids=LONG_PROMPT[:108],
                                                 max_tokens=19)))
    next(busy)
    with pytest.raises(WorkerError) as failed:
        source.client.migrate("moving", ticketed(destination.url))
    assert failed.value.status == 502 and preempted_reason(KV_CACHE_FULL) in str(failed.value)

    rest = list(lines)
    assert rest.pop().finish_reason == "length"
    assert_same_generation(received + rest, reference)
    assert engine.tokens("moving").finish_reason == "abort"
    assert len([line for line in busy if isinstance(line, TokenLine)]) == 18
    assert wait_until(lambda: engine.counts() == (0, 0) and engine.kv_pool.used_blocks == 0)  # nothing leaked
