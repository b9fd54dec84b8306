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
