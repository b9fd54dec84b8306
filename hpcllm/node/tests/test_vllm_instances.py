"""Instances of `engine = "vllm"` models: the agent starts them with worker.vllm_python, refuses with the reason
when that interpreter is missing, and reports a vLLM that cannot be imported as a failed instance, with nothing
left allocated. (vLLM serving for real: hpcllm/gateway/tests/test_vllm_worker.py.)"""

from __future__ import annotations

import sys

from hpcllm.node.app import create_app

from .test_agent import AUTH, converted, make_agent, wait_for  # noqa: F401  (converted is a fixture)


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
