"""Run by the vLLM interpreter (test_vllm_worker.py): checks of hpcllm's vLLM engine, four on one vLLM start (each
start costs 25-50 s on the shared 2 cores), the hang last since it leaves the engine dead. vLLM runs one request at
a time here (max_num_seqs 1: the priority check's queue; the others hold with it as they would with more).

join: a request submitted while vLLM's engine core computes a step reaches vLLM at once, from the submitting thread,
instead of after the worker processed that step. The engine thread is held in its wait for the core's output (the
step of request "a" in flight); request "b" is submitted meanwhile. Reports which vLLM ids were added while the engine
thread waited and by which thread, and each request's tokens and finish reason once released.

priority: requests wait in vLLM's queue by priority (the engine built with scheduling_policy "priority", each
request's priority passed on). While the engine thread is held in its wait for the core's output (request "low1"
in flight, vLLM's one running request), "low2" (priority 5) and then "high" (priority 0) are submitted. Reports the
order they finished in (vLLM runs one at a time) and the policy vLLM was built with.

ended: vLLM's engine core ends a request on its own while it streams: with "error" (its retryable request-level
failure: a KV load failure, a grammar that will not compile, a request it could not preprocess) and with "abort"
(its shutdown). The core drops the request and sends the finish, as it does then (EngineCore's
_send_finish_outputs_to_client). Reports each stream's token count and final line. Then a migration's warm-up
that vLLM ends with "error": reports how the wait for the held request's prefill ended.

kv_full (an engine of its own, with a KV cache of KV_FULL_BLOCKS blocks, after the others): a migration's held
request arrives while a running request fills the KV cache. hpcllm's engine drops such a hold at once (the
destination's prepare answers 409, the source serves on); reports how the wait for its prefill ended and whether the
running request was still running then.

hang: vLLM's engine core stops answering while a request streams (SIGSTOP: to the worker a hung GPU or collective
looks the same); past the step timeout the engine fails like hpcllm's engine does (EngineBase._watch_steps). Reports
the stream's token count and final line, the error the worker's death handler got, whether the engine is alive and
whether its thread ended. The engine starts with a generous step timeout (the join check holds a step on purpose,
and this host may be slow); the hang check lowers it to HANG_STEP_TIMEOUT, which the watch reads at every look.

The engine is built with a KV cache of KV_CACHE_GB, whose size in bytes the JSON line reports first.

Prints one JSON line {"kv_cache_bytes": ..., "join": {...}, "priority": {...}, "ended": {...}, "hang": {...},
"kv_full": {...}}; a check that raised has {"failed": its traceback} instead. hpcllm is imported inside the
functions only: vLLM spawns its engine processes from this file, and its kernel registration trips over Flask's
context proxies if they were imported.
"""

import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

START_STEP_TIMEOUT = 60.0
HANG_STEP_TIMEOUT = 2.0
KV_FULL_BLOCKS = 8  # the kv_full check's vLLM KV cache, in blocks (one is vLLM's null block)
KV_CACHE_GB = 0.5  # a fraction of a GiB, as a worker config's vllm_kv_cache_gb may give


def collect(stream) -> dict:
    from hpcllm.worker.protocol import FinalLine

    tokens, final = [], None
    for event in stream.events(keepalive_seconds=60):
        if isinstance(event, FinalLine):
            final = event
        elif event is not None:
            tokens.append(event.token_id)
    return {"tokens": tokens, "finish_reason": final.finish_reason}


@contextlib.contextmanager
def held_output(engine):
    """The engine thread held in its wait for the engine core's output until the block ends (a step in flight).
    Yields a function that submits a request and, for the first, waits until the engine thread is held."""
    outputs = engine._core_outputs
    receive, waiting, release = outputs._receive, threading.Event(), threading.Event()

    def held():
        waiting.set()
        release.wait(120)
        return receive()

    def submit(request):
        stream = engine.submit(request)
        assert waiting.wait(120), "the engine thread never waited for vLLM's output"
        return stream

    outputs._receive = held
    try:
        yield submit
    finally:
        outputs._receive = receive
        release.set()


def join_check(engine) -> dict:
    from hpcllm.worker.protocol import GenerateRequest

    added = []
    add_request = engine.llm.add_request

    def recording_add(vllm_id, *args, **kwargs):
        added.append((vllm_id, threading.current_thread().name))
        return add_request(vllm_id, *args, **kwargs)

    engine.llm.add_request = recording_add
    try:
        with held_output(engine) as submit:
            first = submit(GenerateRequest(request_id="a", prompt="hello world", max_tokens=8, temperature=0,
                                           ignore_eos=True))
            second = submit(GenerateRequest(request_id="b", prompt="the quick brown fox", max_tokens=4,
                                            temperature=0, ignore_eos=True))
            added_while_waiting = list(added)
    finally:
        engine.llm.add_request = add_request
    return {"added_while_waiting": added_while_waiting, "main_thread": threading.main_thread().name,
            "a": collect(first), "b": collect(second)}


def priority_check(engine) -> dict:
    from hpcllm.worker.protocol import GenerateRequest

    def request(request_id: str, priority: int) -> GenerateRequest:
        return GenerateRequest(request_id=request_id, prompt="hello world", max_tokens=4, temperature=0,
                               ignore_eos=True, priority=priority)

    with held_output(engine) as submit:
        streams = [submit(request("low1", 5)), submit(request("low2", 5)), submit(request("high", 0))]
    for stream in streams:
        collect(stream)
    return {"finished": [r for r in engine._finished if r in ("low1", "low2", "high")],
            "policy": engine.llm.vllm_config.scheduler_config.policy}


def ended_check(engine) -> dict:
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

    from hpcllm.worker.protocol import FinalLine, GenerateRequest, TokenLine
    from hpcllm.worker.requests import RequestConflict

    out = {}
    for name, reason in (("error", FinishReason.ERROR), ("abort", FinishReason.ABORT)):
        request_id = f"ended-by-vllm-{name}"
        stream = engine.submit(GenerateRequest(request_id=request_id, prompt="hello world", max_tokens=500,
                                               temperature=0, ignore_eos=True))
        events = stream.events(keepalive_seconds=60)
        assert isinstance(next(events), TokenLine), "no first token"
        with engine._lock:
            vllm_id = engine._live[request_id].generating
        with engine._llm_lock:  # the core knows the request by vLLM's internal id
            [core_id] = engine.llm.output_processor.external_req_ids[vllm_id]
            engine.llm.engine_core.abort_requests([core_id])
        engine._core_outputs._queue.put_nowait(EngineCoreOutputs(
            outputs=[EngineCoreOutput(core_id, [], finish_reason=reason)], finished_requests={core_id}))
        tokens, final = 1, None
        for event in events:  # None: a minute without a line: the test fails saying so
            if event is None or isinstance(event, FinalLine):
                final = event
                break
            tokens += 1
        out[name] = {"tokens": tokens, "finish_reason": final and final.finish_reason,
                     "error": final.error.model_dump() if final and final.error else None}
    # A migration's warm-up (the held request's prefill) that vLLM ends with "error": under the engine's lock, which
    # the engine thread needs to send the warm-up on, vLLM's output for it arrives first.
    with engine._lock:
        engine.hold(GenerateRequest(request_id="warm-ended-by-vllm", prompt="hello world", max_tokens=5,
                                    temperature=0, ignore_eos=True), hold_seconds=60)
        [warm_id] = [vllm_id for vllm_id, (owner, _) in engine._vllm_ids.items()
                     if owner.request_id == "warm-ended-by-vllm"]
        engine._on_output(RequestOutput(warm_id, None, None, None, [CompletionOutput(
            0, "", [], None, None, finish_reason="error")], finished=True))
    try:
        out["warm_up"] = {"prefilled": engine.wait_prefilled("warm-ended-by-vllm")}
    except RequestConflict as exc:
        out["warm_up"] = {"refused": str(exc)}
    return out


def kv_full_check(checkpoint: str) -> dict:
    """A migration's held request on a vLLM engine whose KV cache a running request fills: KV_FULL_BLOCKS blocks of
    128 tokens (one vLLM's null block), "busy" (400 prompt tokens, 100 to generate) takes 4, the hold (400 tokens)
    needs 4. Reports how the wait for the hold's prefill (the destination's prepare) ended and whether "busy" was
    still running then.

    Then "shared": three running requests whose prompts share 256 tokens (+10 of their own) take 5 blocks (the 2
    shared ones once), and a 100-token hold fits beside them; reports how its prefill wait ended and which of them
    ran then. Then "abandoned": a running request that two failed migrations from here paused and resumed; reports
    vLLM's entries of it the worker keeps, the blocks it counts, and the blocks of the request alone."""
    from hpcllm.worker.protocol import FinalLine, GenerateRequest, TokenLine
    from hpcllm.worker.requests import RequestConflict
    from hpcllm.worker.vllm_engine import VllmSettings, load_with_vllm

    engine = load_with_vllm(Path(checkpoint), "m", max_model_len=512, settings=VllmSettings(
        max_num_seqs=4, kv_cache_gb=KV_CACHE_GB, extra={"num_gpu_blocks_override": KV_FULL_BLOCKS})).engine
    engine.start()
    try:
        busy = engine.submit(GenerateRequest(request_id="busy", prompt_token_ids=[5 + i % 900 for i in range(400)],
                                             max_tokens=100, temperature=0, ignore_eos=True))
        events = busy.events(keepalive_seconds=60)
        assert isinstance(next(events), TokenLine), "no first token"
        engine.hold(GenerateRequest(request_id="held", prompt_token_ids=[7 + i % 800 for i in range(400)],
                                    max_tokens=50, temperature=0, ignore_eos=True), hold_seconds=120)
        try:
            out = {"prefilled": engine.wait_prefilled("held")}
        except RequestConflict as exc:
            out = {"refused": str(exc)}
        with engine._lock:
            out["busy_running_then"] = "busy" in engine._live
        busy_tokens = 1 + sum(isinstance(event, TokenLine) for event in events)  # the rest, to its final line
        out = {**out, "busy_tokens": busy_tokens, "counts": engine.counts()}

        shared, running = [5 + i % 900 for i in range(256)], []
        for n in range(3):
            stream = engine.submit(GenerateRequest(request_id=f"shared{n}", prompt_token_ids=shared + [300 + n] * 10,
                                                   max_tokens=60, temperature=0, ignore_eos=True))
            running.append(stream.events(keepalive_seconds=60))
            assert isinstance(next(running[-1]), TokenLine), "no first token"
        engine.hold(GenerateRequest(request_id="beside", prompt_token_ids=[7 + i % 800 for i in range(100)],
                                    max_tokens=50, temperature=0, ignore_eos=True), hold_seconds=120)
        try:
            out["shared"] = {"prefilled": engine.wait_prefilled("beside")}
            engine.drop_held("beside")
        except RequestConflict as exc:
            out["shared"] = {"refused": str(exc)}
        with engine._lock:
            out["shared"]["running_then"] = sorted(r for r in engine._live if r.startswith("shared"))
        for events in running:
            out["shared"].setdefault("finals", []).append(
                next(e and e.finish_reason for e in events if e is None or isinstance(e, FinalLine)))

        moving = engine.submit(GenerateRequest(request_id="moving", prompt_token_ids=[9 + i % 700 for i in range(100)],
                                               max_tokens=300, temperature=0, ignore_eos=True))
        events = moving.events(keepalive_seconds=60)
        assert isinstance(next(events), TokenLine), "no first token"
        for _ in range(2):  # two failed tries
            engine.begin_migration("moving")
            engine.pause("moving")
            engine.abandon_migration("moving")
        with engine._lock:  # vLLM runs "moving" alone: its blocks are all the worker may count
            req = engine._live["moving"]
            out["abandoned"] = {"entries": sum(owner is req for owner, _ in engine._vllm_ids.values()),
                                "blocks": engine._kv_blocks_wanted(None, []),
                                "its_blocks": -(-(len(req.all_ids) + 1) // engine._kv_block_size)}
        engine.cancel("moving")
        return out
    finally:
        engine.shutdown()


def hang_check(engine, died: list) -> dict:
    from hpcllm.worker.protocol import FinalLine, GenerateRequest, TokenLine

    engine.step_timeout = HANG_STEP_TIMEOUT
    core = engine.llm.engine_core.resources.engine_manager.processes[0]
    try:
        stream = engine.submit(GenerateRequest(request_id="stuck", prompt="hello world", max_tokens=1000,
                                               temperature=0, ignore_eos=True))
        events = stream.events(keepalive_seconds=60)
        assert isinstance(next(events), TokenLine), "no first token"
        os.kill(core.pid, signal.SIGSTOP)
        tokens, final = 0, None
        for event in events:  # None: a minute without a line (the engine hangs on): the test fails saying so
            if event is None or isinstance(event, FinalLine):
                final = event
                break
            tokens += 1
        engine._thread.join(60)
        return {"tokens": tokens, "finish_reason": final and final.finish_reason,
                "error": final.error.model_dump() if final and final.error else None, "died": died,
                "alive": engine.alive, "thread_ended": not engine._thread.is_alive()}
    finally:
        os.kill(core.pid, signal.SIGCONT)


def checked(check, *args) -> dict:
    try:
        return check(*args)
    except Exception:  # noqa: BLE001 - reported to the test, which names the check that failed
        return {"failed": traceback.format_exc()}


def main(checkpoint: str) -> None:
    from hpcllm.worker.vllm_engine import VllmSettings, load_with_vllm

    engine = load_with_vllm(Path(checkpoint), "m", settings=VllmSettings(max_num_seqs=1, kv_cache_gb=KV_CACHE_GB),
                            step_timeout=START_STEP_TIMEOUT).engine
    died = []
    engine.on_died = died.append
    engine.start()
    try:
        out = {"kv_cache_bytes": engine.llm.vllm_config.cache_config.kv_cache_memory_bytes,
               "join": checked(join_check, engine), "priority": checked(priority_check, engine),
               "ended": checked(ended_check, engine)}
        out["hang"] = checked(hang_check, engine, died)
    finally:
        engine.shutdown()
    out["kv_full"] = checked(kv_full_check, checkpoint)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
