"""A batched step that runs out of memory after another thread ended one of its requests (the step runs outside the
engine lock): the engine goes on, the other requests get their answers, the ended one stays ended."""

from __future__ import annotations

import threading

import pytest
import torch

from hpcllm.worker.engine import InvalidRequest, RequestConflict
from hpcllm.worker.protocol import GenerateRequest

from .conftest import held, hold_at, wait_until


def test_a_step_out_of_memory_after_its_held_request_was_ended_by_extend_preempts_the_others(load_pair,
                                                                                              make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    other = GenerateRequest(request_id="other", prompt_token_ids=[9, 10, 11, 12], max_tokens=8, temperature=0.0,
                            ignore_eos=True)
    alone = engine.generate(other.model_copy(update={"request_id": "alone"}))
    hold = held("held")

    forward, failed = engine._forward, []

    def out_of_memory_once_the_held_request_ended(*args, **kwargs):
        if not failed and engine.tokens("held").state == "finished":
            failed.append(True)
            raise torch.OutOfMemoryError("injected")
        return forward(*args, **kwargs)

    engine._forward = out_of_memory_once_the_held_request_ended
    ended = threading.Event()
    hold_at(engine, ("other", "held"), 0, until=ended)  # the step that prefills both waits for the extend below
    with engine._lock:  # both queued before the engine steps: one step prefills both
        stream = engine.submit(other)
        engine.hold(hold.generate, hold_seconds=60)
        held_request = engine._live["held"]
    try:
        # Scheduled: the step's batch holds it (the batch is built with the schedule, under the lock).
        assert wait_until(lambda: held_request.first_scheduled is not None, timeout=60)
        with pytest.raises(InvalidRequest, match="ends the generation"):
            engine.extend("held", [8] * hold.generate.max_tokens)  # max_tokens reached: the hold is dropped
    finally:
        ended.set()
    events = list(stream.events())

    assert failed
    assert engine.alive, engine.error
    final = events.pop()
    assert final.error is None and final.finish_reason == "length"
    assert [e.token_id for e in events] == alone.token_ids  # recomputed after the out-of-memory step
    assert engine.tokens("held").finish_reason == "abort"
    with pytest.raises(RequestConflict):
        engine.extend("held", [8])
    assert wait_until(lambda: engine.counts() == (0, 0) and engine.kv_pool.used_blocks == 0)
