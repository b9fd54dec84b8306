"""Run by the vLLM interpreter (test_vllm_worker.py): a request submitted while vLLM's engine core computes a step
reaches vLLM at once, from the submitting thread, instead of after the worker processed that step.

The engine thread is held in its wait for the core's output (the step of request "a" in flight); request "b" is
submitted meanwhile. Prints JSON: which vLLM ids were added while the engine thread waited and by which thread, and
each request's tokens and finish reason once released. hpcllm is imported in main() only: vLLM spawns its engine
processes from this file, and its kernel registration trips over Flask's context proxies if they were imported.
"""

import json
import sys
import threading
from pathlib import Path


def collect(stream) -> dict:
    from hpcllm.worker.protocol import FinalLine

    tokens, final = [], None
    for event in stream.events(keepalive_seconds=60):
        if isinstance(event, FinalLine):
            final = event
        elif event is not None:
            tokens.append(event.token_id)
    return {"tokens": tokens, "finish_reason": final.finish_reason}


def main(checkpoint: str) -> None:
    from hpcllm.worker.protocol import GenerateRequest
    from hpcllm.worker.vllm_engine import load_with_vllm

    engine = load_with_vllm(Path(checkpoint), "m").engine.start()
    try:
        outputs = engine._core_outputs
        receive, waiting, release = outputs._receive, threading.Event(), threading.Event()

        def held():
            waiting.set()
            release.wait(120)
            return receive()

        added = []
        add_request = engine.llm.add_request

        def recording_add(vllm_id, *args, **kwargs):
            added.append((vllm_id, threading.current_thread().name))
            return add_request(vllm_id, *args, **kwargs)

        engine.llm.add_request = recording_add
        outputs._receive = held
        first = engine.submit(GenerateRequest(request_id="a", prompt="hello world", max_tokens=8, temperature=0,
                                                     ignore_eos=True))
        assert waiting.wait(120), "the engine thread never waited for vLLM's output"
        second = engine.submit(GenerateRequest(request_id="b", prompt="the quick brown fox", max_tokens=4,
                                                      temperature=0, ignore_eos=True))
        added_while_waiting = list(added)
        outputs._receive = receive
        release.set()
        print(json.dumps({"added_while_waiting": added_while_waiting, "main_thread": threading.main_thread().name,
                          "a": collect(first), "b": collect(second)}))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
