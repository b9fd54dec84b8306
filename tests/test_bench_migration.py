"""bench/migration.py: what its stop-and-resume arm measures. The workers serve one prompt run after run; a resume
on B must prefill the whole context, as on a node that never served the request (the bench's and the docs' claim)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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


class _OneSecond:
    """datetime whose now() is always the same second."""

    @staticmethod
    def now():
        from datetime import datetime

        return datetime(2026, 12, 7, 11, 30, 0)


def result(failed_runs=0, texts_match=True):
    return {"benchmark": "migration", "median_pause_seconds": {"live": 0.05, "stop_and_resume": 0.5},
            "all_texts_match_uninterrupted": texts_match, "failed_runs": failed_runs, "runs": []}


def test_a_failing_run_does_not_become_the_latest_result(tmp_path, monkeypatch):
    # A run with failed moves or texts that differed from the uninterrupted run overwrote migration-latest.json,
    # whose live pause bench/simulate.py then used as a measured input.
    import json

    # The three runs end in one second: each keeps its own file, and its "time" is the one in that file's name.
    from bench import benchkit

    monkeypatch.setattr(benchkit, "datetime", _OneSecond)
    monkeypatch.setattr(migration, "RESULTS", tmp_path)
    assert migration.write_result(result())
    assert not migration.write_result(result(failed_runs=1))
    assert not migration.write_result(result(texts_match=False))
    latest = json.loads((tmp_path / "migration-latest.json").read_text())
    assert latest["time"] == "20261207-113000" and latest["passed"]
    written = {path.name: json.loads(path.read_text()) for path in tmp_path.glob("migration-2*.json")}
    assert sorted((name, r["time"], r["passed"]) for name, r in written.items()) == [
        ("migration-20261207-113000-2.json", "20261207-113000-2", False),
        ("migration-20261207-113000-3.json", "20261207-113000-3", False),
        ("migration-20261207-113000.json", "20261207-113000", True)]


@pytest.mark.parametrize("argv, says", [(["--prompt-tokens", "0"], "--prompt-tokens"),
                                        (["--prompt-tokens", "-3"], "--prompt-tokens"),
                                        (["--device", "cuda"], "CUDA is not available"),
                                        (["--device", "gpu"], "--device 'gpu'")])
def test_bad_arguments_get_one_line_before_anything_starts(monkeypatch, capsys, argv, says):
    # --device cuda where torch has no CUDA was a worker's traceback (and "worker a did not start") after the model
    # was built; --prompt-tokens 0 a traceback once the workers ran.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(migration, "WorkerProcess", lambda *a: pytest.fail("the bench started"))
    monkeypatch.setattr(migration.tempfile, "mkdtemp", lambda **kw: pytest.fail("the bench started"))
    with pytest.raises(SystemExit) as exit_:
        migration.main(argv)
    assert exit_.value.code == 2 and says in capsys.readouterr().err.splitlines()[-1]
