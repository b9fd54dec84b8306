"""Run by the vLLM interpreter (test_vllm_worker.py): vLLM's engine core stops answering while a request streams
(SIGSTOP: to the worker a hung GPU or collective looks the same); past the step timeout the engine fails like
hpcllm's engine does (EngineBase._watch_steps). Prints JSON: the stream's token count and final line, the error the
worker's death handler got, whether the engine is alive and whether its thread ended.

hpcllm is imported in main() only (vllm_join_script.py says why)."""

import json
import os
import signal
import sys
from pathlib import Path


def main(checkpoint: str) -> None:
    from hpcllm.worker.protocol import FinalLine, GenerateRequest, TokenLine
    from hpcllm.worker.vllm_engine import load_with_vllm

    engine = load_with_vllm(Path(checkpoint), "m", step_timeout=2.0).engine
    died = []
    engine.on_died = died.append
    engine.start()
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
        print(json.dumps({"tokens": tokens, "finish_reason": final and final.finish_reason,
                          "error": final.error.model_dump() if final and final.error else None, "died": died,
                          "alive": engine.alive, "thread_ended": not engine._thread.is_alive()}))
    finally:
        os.kill(core.pid, signal.SIGCONT)
        engine.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
