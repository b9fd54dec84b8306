"""bench/migration.py: what its stop-and-resume arm measures. The workers serve one prompt run after run; a resume
on B must prefill the whole context, as on a node that never served the request (the bench's and the docs' claim)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import migration  # noqa: E402

from hpcllm.worker.protocol import GenerateRequest  # noqa: E402


def test_a_resume_on_the_bench_worker_prefills_the_whole_context(tmp_path, monkeypatch):
    from hpcllm.devmodels import make_model
    from hpcllm.worker import server

    model_dir = make_model("llama", tmp_path / "tiny", size="tiny")
    served = []
    monkeypatch.setattr(server, "serve", lambda service, load, url_file: served.append((service, load)))
    migration.serve_worker(model_dir, "cpu", tmp_path / "url", 1)  # the worker process's set-up, not its server
    [(service, load)] = served
    engine = service.attach(load())
    try:
        prompt = list(range(5, 5 + 64))
        for request_id, ids in (("earlier-run", prompt), ("resumed", prompt + [7, 8])):
            stream = engine.submit(GenerateRequest(request_id=request_id, prompt_token_ids=ids, max_tokens=2,
                                                   temperature=0, ignore_eos=True))
            list(stream.events())
        assert engine.metrics.prefix_cache_hits._value.get() == 0
    finally:
        engine.shutdown()
