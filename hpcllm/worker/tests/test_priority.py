"""Request priority (GenerateRequest.priority, vLLM's: lower is sooner): admission by (priority, arrival), the
lowest-priority newest request preempted first when KV blocks run out, and a waiting request preempting a running
one of a lower priority when no slot is free. Equal priorities keep plain FIFO. Preemption never changes a
request's tokens (greedy output equals transformers' generate)."""

import itertools
import threading

import pytest
import torch

from hpcllm.worker.engine import Engine
from hpcllm.worker.protocol import GenerateRequest

from .test_model_process import load_unpacked

_ids = itertools.count()
PROMPTS = ["hello world, this", "the", "a b c", "one two three four"]
BATCH, INTERACTIVE = 10, 0


def request(**fields) -> GenerateRequest:
    fields.setdefault("request_id", f"q{next(_ids)}")
    return GenerateRequest(**fields)


def greedy(ids: list[int], max_tokens: int, priority: int = 0) -> GenerateRequest:
    return request(prompt_token_ids=ids, max_tokens=max_tokens, temperature=0, ignore_eos=True, priority=priority)


def hf_greedy(model, prompt_ids, max_new_tokens):
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()


def tokens(stream) -> list[int]:
    return [e.token_id for e in list(stream.events())[:-1]]


class StepLog:
    """Which requests each model step ran, and a pause after the first `pause_after` steps: the test queues a
    request while that step is in flight, so it arrives while the first requests run (no timing involved)."""

    def __init__(self, engine: Engine, pause_after: int | None = None):
        self.engine, self.steps, self.pause_after = engine, [], pause_after
        self.paused, self.go = threading.Event(), threading.Event()
        self._replaced: list[tuple[object, str, object]] = []  # (owner, name, its own attribute then, or None)
        if engine.model_process_pid is not None:  # steps are sent ahead (launch) and collected
            launch, collect = engine.runner.launch, engine.runner.collect
            self._hook(engine.runner, "launch", lambda batch: (self._note(batch), launch(batch))[1])
            self._hook(engine.runner, "collect", lambda: (self._maybe_pause(), collect())[1])
        else:
            forward = engine._forward
            self._hook(engine, "_forward", lambda batch: (self._note(batch), self._maybe_pause(), forward(batch))[2])

    def _hook(self, owner: object, name: str, replacement) -> None:
        self._replaced.append((owner, name, vars(owner).get(name)))
        setattr(owner, name, replacement)

    def restore(self) -> None:
        """Let a held step go, and put back what this log replaced (an engine shared by tests, as it was; logs
        stacked on one engine are restored newest first)."""
        self.go.set()
        for owner, name, own in reversed(self._replaced):
            if own is None:
                vars(owner).pop(name, None)
            else:
                setattr(owner, name, own)
        self._replaced = []

    def _note(self, batch) -> None:
        self.steps.append({chunk.seq_id for chunk in batch.chunks})

    def _maybe_pause(self) -> None:
        if self.pause_after is not None and len(self.steps) >= self.pause_after:
            self.pause_after = None
            self.paused.set()
            self.go.wait()

    def steps_of(self, request_id: str) -> list[int]:
        seq_id = self.engine._finished[request_id].seq_id
        return [i for i, step in enumerate(self.steps) if seq_id in step]


def prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"][:8]


def test_a_later_higher_priority_request_is_admitted_first_and_equal_priorities_keep_fifo(load_pair):
    model, tokenizer = load_pair("llama")
    with Engine(model, tokenizer, model_name="tiny", max_running_requests=1) as engine:
        log = StepLog(engine)
        cases = [greedy(prompt_ids(tokenizer, p), 4, priority) for p, priority in
                 zip(PROMPTS, [BATCH, BATCH, INTERACTIVE, INTERACTIVE])]
        with engine._lock:  # all queued before the engine admits any
            streams = [engine.submit(r) for r in cases]
        for stream in streams:
            tokens(stream)
        first = {r.request_id: log.steps_of(r.request_id)[0] for r in cases}
    # one slot: the two interactive requests (submitted last) ran first, each kind in its own arrival order
    order = sorted(first, key=first.get)
    assert order == [cases[2].request_id, cases[3].request_id, cases[0].request_id, cases[1].request_id]
    assert engine.metrics.preemptions._value.get() == 0


@pytest.mark.parametrize("in_model_process", [False, True], ids=["in-process", "model-process"])
@pytest.mark.parametrize("batch_priority", [BATCH, INTERACTIVE], ids=["batch-low", "equal"])
def test_a_waiting_higher_priority_request_preempts_a_running_lower_one_and_tokens_stay_greedy(
        in_model_process, batch_priority, load_pair, model_dirs, reference_model):
    """One slot, busy with a long batch request: an interactive request that arrives runs at once (the batch one
    is preempted, then resumes from its tokens); at equal priority it waits its turn (FIFO, no preemption)."""
    model, tokenizer = load_unpacked(model_dirs) if in_model_process else load_pair("llama")
    long_ids, short_ids = prompt_ids(tokenizer, PROMPTS[0]), prompt_ids(tokenizer, PROMPTS[3])
    with Engine(model, tokenizer, model_name="tiny", max_running_requests=1, model_process=in_model_process,
                kv_block_size=4) as engine:
        log = StepLog(engine, pause_after=3)
        batch = greedy(long_ids, 40, batch_priority)
        batch_stream = engine.submit(batch)
        assert log.paused.wait(60)
        interactive = greedy(short_ids, 6, INTERACTIVE)
        interactive_stream = engine.submit(interactive)
        log.go.set()
        got_interactive, got_batch = tokens(interactive_stream), tokens(batch_stream)
        batch_steps, interactive_steps = log.steps_of(batch.request_id), log.steps_of(interactive.request_id)
        preemptions = engine.metrics.preemptions._value.get()
    reference = reference_model("llama")
    assert got_interactive == hf_greedy(reference, short_ids, 6)
    assert got_batch == hf_greedy(reference, long_ids, 40)
    between = [s for s in batch_steps if interactive_steps[0] < s < interactive_steps[-1]]
    if batch_priority == INTERACTIVE:
        assert preemptions == 0 and interactive_steps[0] > batch_steps[-1]  # waited for the whole batch request
    else:
        assert preemptions == 1 and not between and batch_steps[-1] > interactive_steps[-1]


def test_kv_blocks_running_out_preempt_the_lowest_priority_requests_first(load_pair, reference_model):
    model, tokenizer = load_pair("llama")
    # 64 tokens of KV for four requests that need 28 each: two fit, the other two must give way; the batch ones
    # (queued first) do.
    with Engine(model, tokenizer, model_name="tiny", max_model_len=64, kv_cache_tokens=64, kv_block_size=4,
                max_running_requests=4) as engine:
        ids = [prompt_ids(tokenizer, p) for p in PROMPTS]
        cases = [greedy(i, 20, priority) for i, priority in zip(ids, [BATCH, BATCH, INTERACTIVE, INTERACTIVE])]
        with engine._lock:
            streams = [engine.submit(r) for r in cases]
        got = [tokens(s) for s in streams]
        preempted = [engine._finished[r.request_id].preemptions for r in cases]
    assert got == [hf_greedy(reference_model("llama"), i, 20) for i in ids]
    assert preempted[2:] == [0, 0] and sum(preempted[:2]) > 0


def test_a_request_being_cancelled_is_never_preempted_for_a_waiting_one(load_pair):
    """One slot, its lower-priority request cancelled while a step runs and a higher-priority one waiting: the step
    boundary ends the cancelled request (abort) instead of preempting it (which would put a request nobody waits for
    back in the queue, its KV dropped for nothing); the waiting one then runs."""
    model, tokenizer = load_pair("llama")
    with Engine(model, tokenizer, model_name="tiny", max_running_requests=1, kv_block_size=4) as engine:
        log = StepLog(engine, pause_after=3)
        batch = greedy(prompt_ids(tokenizer, PROMPTS[0]), 40, BATCH)
        batch_stream = engine.submit(batch)
        assert log.paused.wait(60)  # the engine thread is inside the batch request's third step
        engine.cancel(batch.request_id, wait=False)
        interactive = greedy(prompt_ids(tokenizer, PROMPTS[3]), 4, INTERACTIVE)
        interactive_stream = engine.submit(interactive)
        log.go.set()
        assert len(tokens(interactive_stream)) == 4
        list(batch_stream.events())
        cancelled = engine._finished[batch.request_id]
        assert (cancelled.finish_reason, cancelled.preemptions) == ("abort", 0)
        assert engine.metrics.preemptions._value.get() == 0
