"""Instances of `engine = "vllm"` models: the agent starts them with worker.vllm_python, refuses with the reason
when that interpreter is missing, and reports a vLLM that cannot be imported as a failed instance, with nothing
left allocated. (vLLM serving for real: hpcllm/gateway/tests/test_vllm_worker.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.checkpoint.converter import convert
from hpcllm.node.app import create_app
from hpcllm.worker.client import WorkerClient
from hpcllm.worker.protocol import GenerateRequest

from .test_agent import AUTH, SECRET, converted, make_agent, wait_for  # noqa: F401  (converted is a fixture)


def test_a_missing_vllm_interpreter_is_refused_with_what_to_do(tmp_path, converted):  # noqa: F811
    agent = make_agent(tmp_path, gpus=1)
    agent.config.worker.vllm_python = str(tmp_path / "no-such-venv" / "bin" / "python")
    client = create_app(agent).test_client()
    resp = client.post("/v1/internal/instances", headers=AUTH,
                       json={"model": "tiny-llama", "source": str(converted), "engine": "vllm", "gpu_ids": [0]})
    message = resp.get_json()["error"]["message"]
    assert resp.status_code == 400
    assert "no-such-venv" in message and "make vllm-venv" in message and "worker.vllm_python" in message
    assert agent.workers.instances() == [] and agent.workers.gpus_in_use() == set()
    agent.workers.close()


def test_a_vllm_that_cannot_be_imported_fails_the_instance_with_the_reason(tmp_path, converted):  # noqa: F811
    agent = make_agent(tmp_path, gpus=1)
    agent.config.worker.vllm_python = sys.executable  # the main venv: hpcllm without vLLM
    client = create_app(agent).test_client()
    try:
        resp = client.post("/v1/internal/instances", headers=AUTH,
                           json={"model": "tiny-llama", "source": str(converted), "engine": "vllm", "gpu_ids": [0]})
        assert resp.status_code == 202, resp.get_json()

        def failed():
            [info] = client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"]
            return info if info["state"] == "failed" else None

        info = wait_for(failed, timeout=180, what="the vLLM instance to be reported failed")
        assert "vLLM cannot be imported" in info["error"] and "make vllm-venv" in info["error"]
        assert agent.workers.gpus_in_use() == set()  # its GPU is free again
    finally:
        agent.workers.stop_all(timeout=5)
        agent.workers.close()


def test_an_unknown_engine_is_refused_naming_the_field(tmp_path, converted):  # noqa: F811
    agent = make_agent(tmp_path)
    client = create_app(agent).test_client()
    resp = client.post("/v1/internal/instances", headers=AUTH,
                       json={"model": "tiny-llama", "source": str(converted), "engine": "tgi"})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "engine"
    agent.workers.close()


@pytest.fixture(scope="module")
def small_converted(small_llama_dir, tmp_path_factory) -> Path:
    """The small dev Llama (head size 64, which vLLM's CPU attention supports), converted."""
    return convert(small_llama_dir, tmp_path_factory.mktemp("models") / "small-llama", progress=False).root


def _descendants(pid: int) -> set[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    found = {int(c) for c in children}
    for child in list(found):
        found |= _descendants(child)
    return found


def vllm_agent(tmp_path):
    """A node agent whose vLLM workers have a 1 GB KV cache; skips the test where no vLLM interpreter is set up."""
    from hpcllm.errors import HpcllmError
    from hpcllm.node.workers import vllm_python

    agent = make_agent(tmp_path, worker_start_timeout_seconds=900)
    try:
        vllm_python(agent.config)
    except HpcllmError as exc:
        if os.environ.get("CI"):  # CI builds .venv-vllm (make test): a missing one is a failure there, not a skip
            pytest.fail(f"CI must run the vLLM tests: no vLLM interpreter: {exc}", pytrace=False)
        pytest.skip(f"no vLLM interpreter: {exc} (make vllm-venv)")
    agent.config.worker.vllm_kv_cache_gb = 1
    return agent


@pytest.mark.slow
def test_the_agent_serves_a_vllm_model_and_stops_it_with_its_processes(tmp_path, small_converted):
    agent = vllm_agent(tmp_path)
    client = create_app(agent).test_client()
    try:
        resp = client.post("/v1/internal/instances", headers=AUTH,
                           json={"model": "small-llama", "source": str(small_converted), "engine": "vllm"})
        assert resp.status_code == 202, resp.get_json()
        instance_id = resp.get_json()["instance_id"]

        def ready():
            [info] = client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"]
            assert info["state"] in ("loading", "ready"), info
            return info if info["state"] == "ready" else None

        info = wait_for(ready, timeout=900, what="the vLLM instance to be ready")
        worker = agent.workers.get(instance_id)
        processes = _descendants(worker.process.pid)
        assert processes, "vLLM runs its engine core in a child process"
        with WorkerClient(info["worker_url"], SECRET, read_timeout=120) as worker_client:
            done = worker_client.generate(GenerateRequest(request_id="r", prompt="hello", max_tokens=8,
                                                          temperature=0, ignore_eos=True))
            with done as stream:
                lines = list(stream)
        assert len(lines) == 9 and stream.final.finish_reason == "length"

        assert client.delete(f"/v1/internal/instances/{instance_id}", headers=AUTH).status_code == 200
        wait_for(lambda: worker.process.poll() is not None, timeout=120, what="the vLLM worker to exit")
        wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in processes),
                 timeout=60, what="vLLM's child processes to exit")
    finally:
        agent.workers.stop_all(timeout=30)
        agent.workers.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie is gone, only not reaped yet
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_a_vllm_start_that_fails_reports_hpcllms_reason(tmp_path, small_converted):
    """vLLM's engine core only says "initialization failed"; the instance's error is the loader's own (here a
    corrupt chunk), with its exit status, and nothing stays allocated or running."""
    corrupt = tmp_path / "corrupt-llama"
    shutil.copytree(small_converted, corrupt)
    data = corrupt / "data-00000.h5"
    with open(data, "r+b") as f:  # one flipped byte in the middle of the weights
        f.seek(data.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    agent = vllm_agent(tmp_path)
    client = create_app(agent).test_client()
    try:
        resp = client.post("/v1/internal/instances", headers=AUTH,
                           json={"model": "corrupt", "source": str(corrupt), "engine": "vllm"})
        assert resp.status_code == 202, resp.get_json()
        worker = agent.workers.get(resp.get_json()["instance_id"])

        def failed():
            [info] = client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"]
            return info if info["state"] == "failed" else None

        info = wait_for(failed, timeout=900, what="the vLLM instance to fail")
        assert "data-00000.h5" in info["error"] and "is corrupt" in info["error"], info["error"]
        assert worker.process.returncode == 4  # ChecksumMismatch's status, as from hpcllm's own engine
        assert not _descendants(worker.process.pid)  # vLLM's engine core went with it
    finally:
        agent.workers.stop_all(timeout=30)
        agent.workers.close()
