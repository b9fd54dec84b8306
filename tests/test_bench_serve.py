"""bench/serve.py: the serving benchmark's targets share one abstract interface."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import serve  # noqa: E402
from hpcllm.errors import ConfigError  # noqa: E402


def test_a_target_missing_a_method_cannot_be_made():
    """A new target that forgets processes() fails when it is built, naming the method, not mid-benchmark."""

    class Forgetful(serve.Target):
        def start(self) -> str:
            return "http://127.0.0.1:1/v1"

        def stop(self) -> None:
            pass

    with pytest.raises(TypeError, match="processes"):
        Forgetful()
    with pytest.raises(TypeError, match="start"):
        serve.Target()


def test_every_benchmarked_target_implements_the_interface(tmp_path):
    setup = serve.Setup(checkpoint=tmp_path, hf_dir=tmp_path, max_running=2, threads=1, work=tmp_path,
                        vllm_python=sys.executable, engine_cpus=[0])
    for name, make in serve.TARGETS.items():
        target = make(setup)  # TypeError if a target left an abstract method out
        assert isinstance(target, serve.Target) and target.name == name


def test_long_context_prompt_sets_keep_their_lengths_and_seeds():
    """--prompt-lengths: every prompt within LO..HI, the same set for the same seed, the default set otherwise."""
    long = serve.prompt_set(50, 1000, seed=3, lengths=(300, 800))
    assert all(300 <= len(p.token_ids) <= 800 for p in long)
    assert [p.token_ids for p in long] == [p.token_ids for p in serve.prompt_set(50, 1000, seed=3, lengths=(300, 800))]
    assert max(len(p.token_ids) for p in serve.prompt_set(50, 1000, seed=3)) <= 400  # the log-normal default


def test_prompt_lengths_the_model_cannot_hold_are_refused_in_one_line():
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, str(root / "bench" / "serve.py"), "--targets", "hpcllm",
                                "--prompt-lengths", "500", "2000"], capture_output=True, text=True, timeout=600,
                               env={**os.environ, "PYTHONPATH": str(root)})
    assert completed.returncode == 2 and "--prompt-lengths must be" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_isolate_engine_refuses_targets_without_an_engine_process_in_one_line():
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, str(root / "bench" / "serve.py"), "--targets", "hpcllm-in-process",
                                "vllm-direct", "--isolate-engine", "--rounds", "1"], capture_output=True, text=True,
                               timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
    assert completed.returncode == 2 and "--isolate-engine takes hpcllm, vllm-behind-hpcllm" in completed.stderr
    assert "Traceback" not in completed.stderr


ENGINE_LIKE = """
import multiprocessing, sys, time

def engine(ready):
    ready.set()
    time.sleep(60)

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")  # as hpcllm's worker starts its model process
    ready = context.Event()
    context.Process(target=engine, args=(ready,), daemon=True).start()
    ready.wait(60)
    print("up", flush=True)
    time.sleep(60)
"""


def test_isolate_engine_puts_engine_processes_on_their_cpus_and_the_rest_elsewhere(tmp_path):
    """A worker-like process with a spawned model-process-like child: the child's threads go to the engine CPUs,
    the parent's (and the bench's own) to the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        with pytest.raises(ConfigError, match="lower --threads"):
            serve.engine_and_front_cpus(1)
        return
    engine_cpus, front_cpus = serve.engine_and_front_cpus(1)
    assert (engine_cpus, front_cpus) == (cpus[:1], cpus[1:])
    (tmp_path / "worker_like.py").write_text(ENGINE_LIKE)
    worker = subprocess.Popen([sys.executable, str(tmp_path / "worker_like.py")], stdout=subprocess.PIPE, text=True)
    bench_cpus = os.sched_getaffinity(0)
    try:
        assert worker.stdout.readline().strip() == "up"
        placed = serve.isolate_engines({"worker-like": [worker.pid]}, engine_cpus, front_cpus)
        kinds = dict(entry.split(":") for entry in placed["worker-like"])
        assert kinds[str(worker.pid)] == "front" and list(kinds.values()).count("engine") == 1
        for pid, kind in kinds.items():
            for task in Path(f"/proc/{pid}/task").iterdir():
                assert sorted(os.sched_getaffinity(int(task.name))) == (engine_cpus if kind == "engine" else front_cpus)
        assert sorted(os.sched_getaffinity(0)) == front_cpus  # the client threads' process
    finally:
        serve.pin_process(os.getpid(), sorted(bench_cpus))  # every thread of this process back
        worker.kill()
        worker.wait()


def test_a_baseline_revision_runs_as_a_twin_of_each_hpcllm_target(tmp_path, monkeypatch):
    """--baseline REV: every hpcllm target also runs from REV's exported hpcllm (its worker and gateway put that
    folder on PYTHONPATH), vLLM direct once; this tree's throughput is printed against the twin's."""
    from bench.revisions import export_revision

    monkeypatch.setattr(serve, "TARGETS", dict(serve.TARGETS))
    commit = export_revision("HEAD", tmp_path / "baseline")
    root = Path(__file__).resolve().parents[1]
    exported = (tmp_path / "baseline" / "hpcllm" / "version.py").read_text()
    committed = subprocess.run(["git", "show", "HEAD:hpcllm/version.py"], cwd=root, capture_output=True, text=True,
                               check=True).stdout
    assert exported == committed

    names = serve.add_baseline_targets(["vllm-behind-hpcllm", serve.ANCHOR], tmp_path / "baseline", commit)
    assert names == ["vllm-behind-hpcllm", f"vllm-behind-hpcllm@{commit}", serve.ANCHOR]
    setup = serve.Setup(checkpoint=tmp_path, hf_dir=tmp_path, max_running=2, threads=1, work=tmp_path,
                        vllm_python=sys.executable, engine_cpus=[0])
    twin, ours = serve.TARGETS[names[1]](setup), serve.TARGETS[names[0]](setup)
    assert (twin.name, twin.tree) == (names[1], tmp_path / "baseline") and ours.tree == root

    def levels(*tok_s):
        return {"levels": [{"concurrency": c, "output_tokens_per_s": t} for c, t in zip((1, 16), tok_s)]}

    ratios = serve.baseline_ratios({names[0]: levels(110.0, 1500.0), names[1]: levels(100.0, 1200.0),
                                    serve.ANCHOR: levels(120.0, 1600.0)})
    assert ratios == {f"vllm-behind-hpcllm / {names[1]}": {1: 1.1, 16: 1.25}}


def test_sampling_parameters_reach_every_request_and_bad_ones_are_one_line():
    """--sampling '{"frequency_penalty": 0.5}': each streamed request carries them (a penalized run measures the
    penalized path), greedy still."""
    import json

    import httpx

    prompts = serve.prompt_set(3, 1000, seed=1, sampling={"frequency_penalty": 0.5})
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        body = json.loads(request.content)
        events = [{"choices": [{"text": "x"}]}, {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}]
        return httpx.Response(200, text="".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n")

    with httpx.Client(transport=httpx.MockTransport(answer)) as http:
        for prompt in prompts:
            serve.stream_completion(http, "http://bench.invalid/v1", prompt)
    assert [(b["frequency_penalty"], b["temperature"]) for b in seen] == [(0.5, 0)] * 3

    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, str(root / "bench" / "serve.py"), "--sampling", "[0.5]"],
                               capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
    assert completed.returncode == 2 and "--sampling takes a JSON object" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_worker_settings_parse_as_json_where_they_can_and_a_pair_without_a_key_is_one_line():
    assert serve.parse_worker_settings(["prefill_chunk_tokens=128", "batching=paged", "model_process=false"]) == {
        "prefill_chunk_tokens": 128, "batching": "paged", "model_process": False}
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, str(root / "bench" / "serve.py"), "--worker-setting", "128"],
                               capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
    assert completed.returncode == 2 and "--worker-setting takes KEY=VALUE, not '128'" in completed.stderr
    assert "Traceback" not in completed.stderr

