"""A model's lora_adapters: checked at deploy (folders, names, what serves them), carried by its card to the gateway
and by every start to the node agent."""

from __future__ import annotations

import json

import pytest

from hpcllm.controller.tests.test_app import ADMIN, INTERNAL


@pytest.fixture
def client(harness):
    return harness.app_client()


def adapter_folder(path, **config):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **config}))
    (path / "adapter_model.safetensors").write_bytes(b"{}")
    return str(path)


def test_adapters_reach_the_card_and_every_start(client, harness, tmp_path):
    adapters = {"m-legal": adapter_folder(tmp_path / "legal"), "m-chem": adapter_folder(tmp_path / "chem")}
    body = {"name": "m", "source": str(harness.source("m")), "size_bytes": 1, "lora_adapters": adapters}
    assert client.post("/v1/admin/models", json=body, headers=ADMIN).status_code == 201
    [card] = client.get("/v1/internal/models", headers=INTERNAL).get_json()["models"]
    assert card["lora_adapters"] == adapters
    harness.register("n1")
    harness.controller.route("m")
    assert harness.agents.lora_adapters == [adapters]


@pytest.mark.parametrize("adapters, words", [
    (lambda tmp: {"x": "relative/folder"}, "is a relative path"),
    (lambda tmp: {"x": str(tmp / "nowhere")}, "does not exist"),
    (lambda tmp: {"x": adapter_folder(tmp / "dora", use_dora=True)}, "DoRA"),
    (lambda tmp: {"m": adapter_folder(tmp / "a")}, "has the model's own name"),
    (lambda tmp: {"other": adapter_folder(tmp / "a")}, "already a name of model 'other'"),
])
def test_deploy_refuses_adapters_it_cannot_serve_saying_why(client, harness, tmp_path, adapters, words):
    harness.deploy("other")
    body = {"name": "m", "source": str(harness.source("m")), "size_bytes": 1, "lora_adapters": adapters(tmp_path)}
    resp = client.post("/v1/admin/models", json=body, headers=ADMIN)
    assert resp.status_code == 400 and words in resp.get_json()["error"]["message"], resp.get_json()
    assert [m.name for m in harness.registry.models()] == ["other"]


def test_an_adapter_name_is_refused_for_a_model_while_another_model_serves_it(client, harness, tmp_path):
    harness.deploy("m", lora_adapters={"shared-name": adapter_folder(tmp_path / "a")})
    resp = client.post("/v1/admin/models", json={"name": "shared-name", "source": str(harness.source("s")),
                                                 "size_bytes": 1}, headers=ADMIN)
    assert resp.status_code == 400 and "already a name of model 'm'" in resp.get_json()["error"]["message"]


def test_adapters_are_refused_on_tensor_parallel_models_and_taken_on_vllm_ones(client, harness, tmp_path):
    body = {"name": "m", "source": str(harness.source("m")), "size_bytes": 1,
            "lora_adapters": {"x": adapter_folder(tmp_path / "x")}}
    resp = client.post("/v1/admin/models", json={**body, "tensor_parallel": 2}, headers=ADMIN)
    assert resp.status_code == 400 and "tensor_parallel > 1" in resp.get_json()["error"]["message"]
    assert client.post("/v1/admin/models", json={**body, "engine": "vllm"}, headers=ADMIN).status_code == 201


# ---- a redeploy that changes lora_adapters reaches the running instances -------------------------------------------


def ready_with(harness, adapters) -> str:
    """m deployed with these adapters and one ready instance of it on n1."""
    harness.deploy("m", lora_adapters=adapters)
    harness.register("n1")
    instance_id = harness.controller.route("m").instance_id
    harness.heartbeat("n1", tier="nvme")
    return instance_id


def test_a_redeploy_loads_added_and_unloads_removed_adapters_on_running_instances(harness, tmp_path):
    x, y = adapter_folder(tmp_path / "x"), adapter_folder(tmp_path / "y")
    instance_id = ready_with(harness, {"x": x})
    harness.deploy("m", lora_adapters={"y": y})
    assert harness.agents.serving_adapters == {instance_id: {"y": y}}
    assert harness.agents.lora_adapters == [{"x": x}]  # no instance was started for it
    assert harness.agents.stopped == []
    assert harness.registry.get_model("m").lora_adapters == {"y": y}


def test_an_adapter_a_worker_cannot_serve_undoes_the_redeploy_and_says_why(harness, tmp_path):
    from hpcllm.controller.errors import InvalidModelConfig
    from hpcllm.controller.protocol import AdapterFailure

    x, y, bad = (adapter_folder(tmp_path / name) for name in ("x", "y", "bad"))
    first = ready_with(harness, {"x": x})
    harness.agents.refuse_adapters["bad"] = AdapterFailure(
        status=400, message="LoRA adapter 'bad' targets model.layers.40.q_proj, which does not exist in this base "
                            "model: was it trained for another model?")
    with pytest.raises(InvalidModelConfig, match=r"lora_adapters.bad: instance .* cannot serve it: .*another model"):
        harness.deploy("m", lora_adapters={"y": y, "bad": bad})
    assert harness.registry.get_model("m").lora_adapters == {"x": x}
    assert harness.agents.serving_adapters[first] == {"x": x}
    assert harness.agents.stopped == []


@pytest.mark.parametrize("failure", ["unreachable", "runtime_lora_unsupported"])
def test_an_instance_that_cannot_change_its_adapters_is_replaced_and_its_failure_reported(harness, tmp_path,
                                                                                         failure):
    from hpcllm.controller.protocol import AdapterFailure

    x, y = adapter_folder(tmp_path / "x"), adapter_folder(tmp_path / "y")
    first = ready_with(harness, {"x": x})
    if failure == "unreachable":
        harness.agents.unreachable.add("http://n1:9000")
    else:
        harness.agents.refuse_adapters["y"] = AdapterFailure(
            status=409, message="this worker's vLLM engine was built without LoRA")
    harness.deploy("m", lora_adapters={"y": y})
    assert harness.registry.get_model("m").lora_adapters == {"y": y}
    assert harness.registry.get_instance(first).state == "draining"  # no route to it
    [failed] = harness.controller.status().failed_instances
    assert failed.instance_id == first and "could not apply its model's new LoRA adapters" in failed.error
    if failure != "unreachable":
        assert harness.agents.stopped == [("http://n1:9000", first)]
        harness.agents.refuse_adapters.clear()
        harness.heartbeat("n1")
        harness.controller.route("m")  # the replacement starts with the model's adapters
        assert harness.agents.lora_adapters[-1] == {"y": y}


def test_vllms_load_and_unload_endpoints_redeploy_the_base_model_with_the_admin_key(client, harness, tmp_path):
    """POST /v1/admin/load_lora_adapter and unload_lora_adapter: the base model named, or inferred (the model that
    serves the adapter; for a load, the only model deployed)."""
    x, y = adapter_folder(tmp_path / "x"), adapter_folder(tmp_path / "y")
    instance_id = ready_with(harness, {"x": x})
    load = client.post("/v1/admin/load_lora_adapter", json={"lora_name": "y", "lora_path": y}, headers=ADMIN)
    assert load.status_code == 200 and load.get_json()["lora_adapters"] == {"x": x, "y": y}
    assert harness.agents.serving_adapters[instance_id] == {"x": x, "y": y}
    unload = client.post("/v1/admin/unload_lora_adapter", json={"lora_name": "x"}, headers=ADMIN)
    assert unload.status_code == 200 and harness.registry.get_model("m").lora_adapters == {"y": y}
    assert harness.agents.serving_adapters[instance_id] == {"y": y}
    [card] = client.get("/v1/internal/models", headers=INTERNAL).get_json()["models"]
    assert card["lora_adapters"] == {"y": y}

    gone = client.post("/v1/admin/unload_lora_adapter", json={"lora_name": "x"}, headers=ADMIN)
    assert gone.status_code == 404 and "no deployed model serves a LoRA adapter 'x'" in gone.get_json()["error"][
        "message"]
    bad = client.post("/v1/admin/load_lora_adapter", json={"lora_name": "z", "lora_path": str(tmp_path / "none")},
                      headers=ADMIN)
    assert bad.status_code == 400 and "lora_adapters.z" in bad.get_json()["error"]["message"]
    harness.deploy("other")
    which = client.post("/v1/admin/load_lora_adapter", json={"lora_name": "x", "lora_path": x}, headers=ADMIN)
    assert which.status_code == 400 and which.get_json()["error"]["param"] == "base_model"
    assert client.post("/v1/admin/load_lora_adapter", json={"lora_name": "x", "lora_path": x, "base_model": "other"},
                       headers=ADMIN).status_code == 200
    assert client.post("/v1/admin/load_lora_adapter", json={"lora_name": "q", "lora_path": x},
                       headers=INTERNAL).status_code == 401  # the admin key, never the cluster secret


def test_a_redeploy_while_an_instance_is_being_started_reaches_it_once_its_agent_confirms(harness, tmp_path):
    x, y = adapter_folder(tmp_path / "x"), adapter_folder(tmp_path / "y")
    harness.deploy("m", lora_adapters={"x": x})
    harness.register("n1")
    start = harness.agents.start_instance

    def start_during_a_redeploy(*args, **kwargs):
        harness.deploy("m", lora_adapters={"y": y})  # the reservation is not pushed to: no agent knows it yet
        return start(*args, **kwargs)

    harness.agents.start_instance = start_during_a_redeploy
    instance_id = harness.controller.route("m").instance_id
    assert harness.agents.lora_adapters == [{"x": x}]  # started with the adapters of before
    assert harness.agents.serving_adapters[instance_id] == {"y": y}


def test_a_load_the_model_spec_refuses_is_a_400_naming_why(client, harness, tmp_path):
    """A load whose redeploy is no valid model (the adapter named as its base model; a tensor-parallel base) is the
    caller's 400 saying why, not a 500."""
    x = adapter_folder(tmp_path / "x")
    ready_with(harness, {})
    same_name = client.post("/v1/admin/load_lora_adapter", json={"lora_name": "m", "lora_path": x}, headers=ADMIN)
    assert same_name.status_code == 400, same_name.get_json()
    assert "has the model's own name" in same_name.get_json()["error"]["message"]
    assert same_name.get_json()["error"]["param"] == "lora_adapters"
    harness.deploy("tp", tensor_parallel=2, engine="hpcllm")
    tp = client.post("/v1/admin/load_lora_adapter", json={"lora_name": "x", "lora_path": x, "base_model": "tp"},
                     headers=ADMIN)
    assert tp.status_code == 400 and "tensor_parallel > 1" in tp.get_json()["error"]["message"], tp.get_json()
    assert harness.registry.get_model("m").lora_adapters == {} and harness.registry.get_model("tp").lora_adapters == {}


def two_ready_with(harness, adapters) -> list[str]:
    """m deployed with these adapters and two instances of it (min_instances 2), on n1 and n2: their ids, sorted."""
    harness.deploy("m", lora_adapters=adapters, min_instances=2, max_instances=2)
    harness.register("n1")
    harness.register("n2")
    harness.tick()
    harness.heartbeat("n1", tier="nvme")
    harness.tick()
    instances = sorted(i.instance_id for i in harness.registry.instances(model="m"))
    assert len(instances) == 2
    return instances


def test_a_redeploy_pushes_its_adapters_to_every_instance_at_once_waiting_per_change(harness, tmp_path):
    """Each push may take minutes (adapters are read and installed one by one): the instances are asked together,
    and each agent is given the worker's time per load or unload for every change (x unloaded, y loaded: two)."""
    import threading

    from hpcllm.controller.agents import AGENT_ANSWER_SECONDS
    from hpcllm.worker.client import ADAPTER_CALL_TIMEOUT

    x, y = adapter_folder(tmp_path / "x"), adapter_folder(tmp_path / "y")
    instances = two_ready_with(harness, {"x": x})
    both_asked = threading.Barrier(2, timeout=30)  # one push at a time would break it: the first waits alone
    set_adapters = harness.agents.set_lora_adapters

    def set_together(*args):
        both_asked.wait()
        return set_adapters(*args)

    harness.agents.set_lora_adapters = set_together
    harness.deploy("m", lora_adapters={"y": y}, min_instances=2, max_instances=2)
    assert {i: harness.agents.serving_adapters[i] for i in instances} == {i: {"y": y} for i in instances}
    assert harness.agents.adapter_timeouts == [2 * ADAPTER_CALL_TIMEOUT + AGENT_ANSWER_SECONDS] * 2


def test_an_undone_redeploy_rolls_back_only_the_instances_it_kept(harness, tmp_path):
    """One instance cannot load at runtime (replaced), another refuses an adapter (the redeploy is undone): the
    rollback pushes the previous adapters to the kept instance only; the replaced one is stopped and reported once."""
    from hpcllm.controller.errors import InvalidModelConfig
    from hpcllm.controller.protocol import AdapterFailure

    x, y, bad = (adapter_folder(tmp_path / name) for name in ("x", "y", "bad"))
    replaced, kept = two_ready_with(harness, {"x": x})
    harness.agents.refuse_adapters_on[replaced] = {
        "y": AdapterFailure(status=409, message="this worker's vLLM engine was built without LoRA")}
    harness.agents.refuse_adapters_on[kept] = {
        "bad": AdapterFailure(status=400, message="LoRA adapter 'bad' was trained for another model")}
    with pytest.raises(InvalidModelConfig, match=r"lora_adapters.bad: instance .* cannot serve it"):
        harness.deploy("m", lora_adapters={"y": y, "bad": bad}, min_instances=2, max_instances=2)
    assert harness.registry.get_model("m").lora_adapters == {"x": x}
    assert harness.agents.serving_adapters[kept] == {"x": x}
    assert [i for _, i in harness.agents.stopped] == [replaced]
    assert [f.instance_id for f in harness.controller.status().failed_instances] == [replaced]
    assert len(harness.agents.adapter_timeouts) == 3  # two pushes of the redeploy, one rollback to the kept one
