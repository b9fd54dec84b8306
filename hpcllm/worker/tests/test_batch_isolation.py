"""What one request does or leaves in a shared engine must not change what another gets (test_engine_mixes.py has
the requests that run together): KV blocks the prefix cache keeps after their request ended, a cancel that meets
a step running out of memory."""

import threading

import pytest
import torch

from hpcllm.worker.engine import Engine
from hpcllm.worker.protocol import GenerateRequest

from .conftest import hold_at, wait_until
from .test_lora import PROMPTS, load, merged_greedy, request, write_adapter


@pytest.mark.parametrize("model_process", [False, True], ids=["in-process", "model-process"])
def test_an_adapter_rewritten_in_its_folder_and_loaded_again_shares_no_cached_prefix_with_its_old_weights(
        model_dirs, tmp_path, model_process):
    """A researcher retrains an adapter into the same folder, unloads it and loads it again: requests with its
    name must get the new weights' output, not the old weights' keys and values the prefix cache still holds for the
    same prompt."""
    model, tokenizer = load(model_dirs)
    folder = tmp_path / "adapter"
    old = write_adapter(folder, model, seed=1)
    prompt = tokenizer(PROMPTS[2])["input_ids"]  # several full KV blocks: a prefix the cache registers
    with Engine(model, tokenizer, model_name="tiny", kv_block_size=4, model_process=model_process) as engine:
        assert engine.load_lora("x", str(folder)) is True
        assert engine.generate(request(prompt_token_ids=prompt, lora="x")).token_ids == merged_greedy(
            model_dirs, old, prompt)
        assert engine.unload_lora("x") == 0
        new = write_adapter(folder, load(model_dirs)[0], seed=2)  # retrained: same folder, other weights
        assert engine.load_lora("x", str(folder)) is True
        expected = merged_greedy(model_dirs, new, prompt)
        assert expected != merged_greedy(model_dirs, old, prompt)  # the test means something
        assert engine.generate(request(prompt_token_ids=prompt, lora="x")).token_ids == expected


def test_a_request_cancelled_during_a_step_that_runs_out_of_memory_ends_at_once(load_pair, make_engine):
    """A client leaves while a batched step runs, and that step runs out of memory: the cancelled request, the
    newest (the one a preemption picks), must end now (abort), not be queued again behind a higher-priority request
    that waits for KV blocks and end only once the requests before it let that one in."""
    model, tokenizer = load_pair("llama")
    # 16 blocks of 4 tokens: "long" holds 11-15 of them, so "urgent" (6 blocks) waits for it.
    engine = make_engine(model, tokenizer, max_model_len=64, kv_cache_tokens=64, kv_block_size=4,
                         max_running_requests=2)
    long = GenerateRequest(request_id="long", prompt_token_ids=list(range(5, 45)), max_tokens=20, temperature=0,
                           ignore_eos=True, priority=-1)
    leaving = GenerateRequest(request_id="leaving", prompt_token_ids=[7, 8, 9, 10], max_tokens=20, temperature=0,
                              ignore_eos=True)
    urgent = GenerateRequest(request_id="urgent", prompt_token_ids=list(range(50, 70)), max_tokens=4, temperature=0,
                             ignore_eos=True, priority=-1)
    forward, failed = engine._forward, []

    def leave_and_run_out_of_memory(*args, **kwargs):
        if not failed and len(engine.tokens("leaving").output_token_ids) >= 2:
            failed.append(True)
            engine.cancel("leaving", wait=False)  # its client went away during this step
            engine.submit(urgent)
            raise torch.OutOfMemoryError("injected")
        return forward(*args, **kwargs)

    engine._forward = leave_and_run_out_of_memory
    ended = threading.Event()
    hold_at(engine, "long", 6, until=ended)  # "long" runs until "leaving" has its final line
    with engine._lock:
        long_stream, leaving_stream = engine.submit(long), engine.submit(leaving)
    try:
        assert wait_until(lambda: engine.tokens("leaving").state == "finished", timeout=60), \
            "the cancelled request waits behind the queue"
        assert engine.tokens("long").state == "running"  # it ended before "long" let "urgent" in
    finally:
        ended.set()
    assert failed
    assert list(leaving_stream.events())[-1].finish_reason == "abort"
    assert list(long_stream.events())[-1].finish_reason == "length"
    assert wait_until(lambda: engine.counts() == (0, 0) and engine.kv_pool.used_blocks == 0)


def test_adapters_loaded_and_unloaded_leave_no_trace_once_their_weights_went(model_dirs, tmp_path):
    """A long-lived worker loading each job's adapter folder and unloading it after: the engine keeps nothing per
    folder once its weights went (RequestState.lora_load's record of which load is held), however many came."""
    model, tokenizer = load(model_dirs)
    folders = [tmp_path / f"job-{index}" for index in range(3)]
    for seed, folder in enumerate(folders, start=1):
        write_adapter(folder, model, seed=seed)
    with Engine(model, tokenizer, model_name="tiny", kv_block_size=4) as engine:
        for folder in folders:
            assert engine.load_lora("x", str(folder)) is True
            engine.generate(request(prompt_token_ids=tokenizer(PROMPTS[0])["input_ids"], lora="x"))
            assert engine.unload_lora("x") == 0
        assert engine._adapter_loads == {}


def _leave_during_a_step_that_runs_out_of_memory(engine, leaving: str, after_tokens: int) -> list[bool]:
    """Make the step after `leaving` has after_tokens output tokens cancel it (its client went away during the
    step) and then run out of memory; returns a list that holds True once it did."""
    forward, failed = engine._forward, []

    def leave_and_run_out_of_memory(*args, **kwargs):
        if not failed and len(engine.tokens(leaving).output_token_ids) >= after_tokens:
            failed.append(True)
            engine.cancel(leaving, wait=False)
            raise torch.OutOfMemoryError("injected")
        return forward(*args, **kwargs)

    engine._forward = leave_and_run_out_of_memory
    return failed


def test_a_request_alone_whose_client_left_during_a_step_that_ran_out_of_memory_ends_as_cancelled(load_pair,
                                                                                                  make_engine):
    """Nobody waits for it any more: it ends as a cancel does (abort), not as an out-of-memory error."""
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    failed = _leave_during_a_step_that_runs_out_of_memory(engine, "leaving", 2)
    leaving = GenerateRequest(request_id="leaving", prompt_token_ids=[7, 8, 9, 10], max_tokens=20, temperature=0,
                              ignore_eos=True)
    events = list(engine.submit(leaving).events())
    assert failed
    assert events[-1].finish_reason == "abort" and events[-1].error is None, events[-1]


def test_a_cancel_during_a_step_that_ran_out_of_memory_preempts_no_live_request_of_the_batch(load_pair,
                                                                                             make_engine):
    """The step's batch holds a request whose client left (the older one) and a live one (the newest, the one a
    preemption picks): the cancelled one ends and frees its memory, the live one goes on without being preempted
    (no recompute of its tokens)."""
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    failed = _leave_during_a_step_that_runs_out_of_memory(engine, "leaving", 2)
    leaving = GenerateRequest(request_id="leaving", prompt_token_ids=[7, 8, 9, 10], max_tokens=20, temperature=0,
                              ignore_eos=True)
    staying = GenerateRequest(request_id="staying", prompt_token_ids=[11, 12, 13], max_tokens=20, temperature=0,
                              ignore_eos=True)
    with engine._lock:  # one batch from the first step
        leaving_stream, staying_stream = engine.submit(leaving), engine.submit(staying)
    assert list(leaving_stream.events())[-1].finish_reason == "abort"
    assert list(staying_stream.events())[-1].finish_reason == "length"
    assert failed
    assert engine.metrics.preemptions._value.get() == 0
