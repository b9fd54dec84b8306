"""A model's LoRA adapters reach its worker: the agent starts it (a fresh worker or a spare) with each adapter as
`--lora-module NAME=PATH`, and the worker serves requests naming one. (The adapters' arithmetic:
hpcllm/worker/tests/test_lora.py.)"""

from __future__ import annotations

import pytest

from hpcllm.node.app import create_app
from hpcllm.worker.client import WorkerClient, WorkerError
from hpcllm.worker.protocol import GenerateRequest
from hpcllm.worker.tests.test_lora import load, merged_greedy, token_ids, write_adapter

from .test_agent import (AUTH, SECRET, converted, make_agent, ready_spare,  # noqa: F401  (converted is a fixture)
                         wait_for)


@pytest.mark.parametrize("spare_workers", [0, 1], ids=["fresh-worker", "spare-worker"])
def test_an_instance_started_with_adapters_serves_them(tmp_path, converted, tiny_llama_dir,  # noqa: F811
                                                       spare_workers):
    model_dirs = {"llama": tiny_llama_dir}
    model, tokenizer = load(model_dirs)
    deltas = write_adapter(tmp_path / "adapter-x", model, seed=1)
    prompt_ids = tokenizer("hello world")["input_ids"]
    expected = merged_greedy(model_dirs, deltas, prompt_ids, max_new_tokens=6)
    agent = make_agent(tmp_path, spare_workers=spare_workers)
    client = create_app(agent).test_client()
    try:
        if spare_workers:
            spare = ready_spare(agent)
        resp = client.post("/v1/internal/instances", headers=AUTH, json={
            "model": "tiny-llama", "source": str(converted), "lora_adapters": {"x": str(tmp_path / "adapter-x")}})
        assert resp.status_code == 202, resp.get_json()
        inst = agent.workers.get(resp.get_json()["instance_id"])
        if spare_workers:
            assert inst.process.pid == spare.process.pid
        wait_for(lambda: inst.state == "ready", what="the worker to serve the model")
        with WorkerClient(inst.worker_url, SECRET) as worker:
            with worker.generate(GenerateRequest(request_id="r1", prompt_token_ids=prompt_ids, max_tokens=6,
                                                 temperature=0, ignore_eos=True, lora="x")) as stream:
                assert token_ids(stream) == expected
            with pytest.raises(WorkerError, match="'y' is not loaded"):
                worker.generate(GenerateRequest(request_id="r2", prompt_token_ids=prompt_ids, lora="y"))
    finally:
        agent.drain()
        agent.workers.close()


def test_an_adapter_name_that_is_no_model_name_is_refused(tmp_path, converted):  # noqa: F811
    agent = make_agent(tmp_path)
    client = create_app(agent).test_client()
    resp = client.post("/v1/internal/instances", headers=AUTH, json={
        "model": "tiny-llama", "source": str(converted), "lora_adapters": {"a b": str(tmp_path)}})
    assert resp.status_code == 400 and "lora_adapters" in resp.get_json()["error"]["param"]
    agent.workers.close()
