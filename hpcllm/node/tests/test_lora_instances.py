"""A model's LoRA adapters reach its worker: the agent starts it (a fresh worker or a spare) with each adapter as
`--lora-module NAME=PATH`, and the worker serves requests naming one. (The adapters' arithmetic:
hpcllm/worker/tests/test_lora.py.)"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.node.app import create_app
from hpcllm.worker.cli import SECRET_ENV
from hpcllm.worker.client import WorkerClient, WorkerError
from hpcllm.worker.protocol import GenerateRequest
from hpcllm.worker.tests.test_lora import load, merged_greedy, token_ids, write_adapter

from .test_agent import (AUTH, SECRET, converted, make_agent, ready_spare,  # noqa: F401  (converted is a fixture)
                         wait_for)


def test_a_spare_started_before_the_node_key_was_known_serves_with_it_and_with_its_adapters(
        tmp_path, converted, tiny_llama_dir):  # noqa: F811
    """A token agent's spare starts while the agent registers, before the controller sent the node key: it starts
    without any key (never the cluster secret), and its assignment brings the key its worker then accepts, and the
    model's adapters, which it serves. (A fresh worker's adapters, --lora-module:
    test_a_redeploys_adapters_reach_a_running_instance_through_its_agent, which starts one with x.)"""

    model_dirs = {"llama": tiny_llama_dir}
    model, tokenizer = load(model_dirs)
    deltas = write_adapter(tmp_path / "adapter-x", model, seed=1)
    prompt_ids = tokenizer("hello world")["input_ids"]
    expected = merged_greedy(model_dirs, deltas, prompt_ids, max_new_tokens=6)
    # model_process False: adapters through a model process are hpcllm/worker/tests/test_lora.py's [model-process]
    # cases (test_each_request_gets_its_adapters_merged_output_alone_and_mixed_in_one_batch,
    # test_an_adapter_loaded_at_runtime_serves_its_merged_output_and_once_unloaded_is_refused, the x_engine tests)
    agent = make_agent(tmp_path, spare_workers=1, model_process=False)
    client = create_app(agent).test_client()
    try:
        agent.workers.set_key(None)  # a token agent, registering
        agent.workers.ensure_spares()
        [spare] = agent.workers._spares
        environ = (Path("/proc") / str(spare.process.pid) / "environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith(SECRET_ENV.encode() + b"=")]
        spare = ready_spare(agent)

        agent.workers.set_key("node-key")  # the registration's answer
        resp = client.post("/v1/internal/instances", headers={SECRET_HEADER: "node-key"}, json={
            "model": "tiny-llama", "source": str(converted), "lora_adapters": {"x": str(tmp_path / "adapter-x")}})
        assert resp.status_code == 202, resp.get_json()
        inst = agent.workers.get(resp.get_json()["instance_id"])
        agent.config.node.spare_workers = 0  # no spare after this load: nothing would take it
        assert inst.process.pid == spare.process.pid  # the spare became the worker
        wait_for(lambda: inst.state == "ready", what="the spare to serve the model")  # the agent asks with the key
        statuses = []
        for key in ("node-key", SECRET):
            with WorkerClient(inst.worker_url, key) as worker, pytest.raises(WorkerError) as answer:
                worker.tokens("no-such-request")
            statuses.append(answer.value.status)
        assert statuses == [404, 401]  # the node key is let in (no such request), the cluster secret is not
        with WorkerClient(inst.worker_url, "node-key") as worker:
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


def test_a_redeploys_adapters_reach_a_running_instance_through_its_agent(tmp_path, converted,  # noqa: F811
                                                                         tiny_llama_dir):
    """PUT .../lora-adapters: the worker unloads x, loads y, and refuses z (a folder it cannot serve) by name; the
    answer says what it serves now. Asked while the worker still loads, the change waits for it to be ready.
    The instance is a fresh worker started with x (--lora-module), which it serves once ready."""
    model_dirs = {"llama": tiny_llama_dir}
    model, tokenizer = load(model_dirs)
    x_deltas = write_adapter(tmp_path / "adapter-x", model, seed=1)
    y_deltas = write_adapter(tmp_path / "adapter-y", model, seed=2)
    prompt_ids = tokenizer("hello world")["input_ids"]
    expected_x = merged_greedy(model_dirs, x_deltas, prompt_ids, max_new_tokens=6)
    expected = merged_greedy(model_dirs, y_deltas, prompt_ids, max_new_tokens=6)
    folders = {name: str(tmp_path / f"adapter-{name}") for name in ("x", "y", "z")}
    agent = make_agent(tmp_path, model_process=False)
    client = create_app(agent).test_client()
    polls, poll_ready = threading.Event(), agent.workers._poll_ready
    agent.workers._poll_ready = lambda inst: polls.wait(60) and poll_ready(inst)  # loading until the PUT is in
    served_when_ready = []
    wake = agent.workers.on_change

    def on_change():
        if inst.state == "ready" and not served_when_ready:
            served_when_ready.append(dict(inst.lora_adapters))
        wake()

    try:
        resp = client.post("/v1/internal/instances", headers=AUTH, json={
            "model": "tiny-llama", "source": str(converted), "lora_adapters": {"x": folders["x"]}})
        instance_id = resp.get_json()["instance_id"]
        inst = agent.workers.get(instance_id)
        agent.workers.on_change = on_change
        path = f"/v1/internal/instances/{instance_id}/lora-adapters"
        pending = client.put(path, headers=AUTH, json={"lora_adapters": {"x": folders["x"], "y": folders["y"]}})
        assert pending.status_code == 200 and pending.get_json()["pending"] is True
        polls.set()
        wait_for(lambda: inst.state == "ready", what="the worker to be ready")
        # routes start at ready: the pending adapters were served by then, not loaded after
        assert served_when_ready == [{"x": folders["x"], "y": folders["y"]}]
        assert inst.lora_adapters == {"x": folders["x"], "y": folders["y"]}
        with WorkerClient(inst.worker_url, SECRET) as worker:  # x, from the start's --lora-module, serves
            with worker.generate(GenerateRequest(request_id="r0", prompt_token_ids=prompt_ids, max_tokens=6,
                                                 temperature=0, ignore_eos=True, lora="x")) as stream:
                assert token_ids(stream) == expected_x

        resp = client.put(path, headers=AUTH, json={"lora_adapters": {"y": folders["y"], "z": folders["z"]}})
        applied = resp.get_json()
        assert resp.status_code == 200 and applied["lora_adapters"] == {"y": folders["y"]}
        assert applied["failed"]["z"]["status"] == 400 and "does not exist" in applied["failed"]["z"]["message"]
        with WorkerClient(inst.worker_url, SECRET) as worker:
            with worker.generate(GenerateRequest(request_id="r1", prompt_token_ids=prompt_ids, max_tokens=6,
                                                 temperature=0, ignore_eos=True, lora="y")) as stream:
                assert token_ids(stream) == expected
            with pytest.raises(WorkerError, match="'x' is not loaded"):
                worker.generate(GenerateRequest(request_id="r2", prompt_token_ids=prompt_ids, lora="x"))
        assert client.put("/v1/internal/instances/nope/lora-adapters", headers=AUTH,
                          json={"lora_adapters": {}}).status_code == 404
    finally:
        agent.drain()
        agent.workers.close()


def test_a_loading_instance_that_cannot_serve_its_pending_adapters_fails_without_being_ready(
        tmp_path, converted):  # noqa: F811
    agent = make_agent(tmp_path, model_process=False)
    client = create_app(agent).test_client()
    polls, poll_ready = threading.Event(), agent.workers._poll_ready
    agent.workers._poll_ready = lambda inst: polls.wait(60) and poll_ready(inst)  # loading until the PUT is in
    states = []
    wake = agent.workers.on_change
    agent.workers.on_change = lambda: (states.extend(i.state for i in agent.workers.instances()), wake())
    try:
        resp = client.post("/v1/internal/instances", headers=AUTH, json={"model": "tiny-llama",
                                                                           "source": str(converted)})
        inst = agent.workers.get(resp.get_json()["instance_id"])
        pending = client.put(f"/v1/internal/instances/{inst.instance_id}/lora-adapters", headers=AUTH,
                             json={"lora_adapters": {"z": str(tmp_path / "no-adapter")}})
        assert pending.get_json()["pending"] is True
        polls.set()
        wait_for(lambda: inst.state in ("failed", "stopped"), what="the worker to be stopped as failed")
        assert "ready" not in states and "could not serve its model's LoRA adapters" in inst.error
    finally:
        agent.drain()
        agent.workers.close()
