"""LoRA adapters through the gateway: each adapter of a deployed model is listed as a model (vLLM's shape: `parent`
the base model), and a request naming it runs on the base model's instance with that adapter."""

from __future__ import annotations

import pytest
import torch

from hpcllm.worker.tests.test_lora import load, merged_greedy, write_adapter

from .conftest import ADMIN_KEY, MODEL, SECRET, ThreadServer
from .test_controller_router import InProcessAgents, serve_controller

ADAPTER = "tiny-legal"


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A PEFT adapter folder for the tiny model and what merging it adds to each weight."""
    folder = tmp_path_factory.mktemp("adapters") / ADAPTER
    model, _ = load({"llama": tiny_model_dir})
    return folder, write_adapter(folder, model, seed=5)


@pytest.fixture(scope="module")
def adapter_worker(tiny_model_dir, adapter):
    from hpcllm.worker.server import ModelForServing, WorkerService, create_app

    service = WorkerService(MODEL, secret=SECRET, keepalive_seconds=0.5, lora_adapters={ADAPTER: str(adapter[0])})
    service.attach(ModelForServing(*load({"llama": tiny_model_dir}), tier="dram", load_seconds=0.1))
    server = ThreadServer(create_app(service))
    yield server.url
    server.stop()
    service.shutdown()


@pytest.fixture
def agents(adapter_worker):
    return InProcessAgents(adapter_worker)


@pytest.fixture
def gateway(tmp_path, agents, tiny_model_dir, adapter, make_gateway):
    with serve_controller(tmp_path, agents, tiny_model_dir, model_gpus=0, node_gpus=0,
                          lora_adapters={ADAPTER: str(adapter[0])}) as server:
        yield make_gateway(static_models={}, controller_url=server.url, route_poll_seconds=5)


def test_an_adapter_is_listed_as_a_model_of_its_base_and_served_by_the_bases_instance(gateway, agents, adapter,
                                                                                     tiny_model_dir, hf_pair):
    listed = gateway.get("/v1/models").json()["data"]
    assert [(m["id"], m["root"], m["parent"]) for m in listed] == [(ADAPTER, ADAPTER, MODEL), (MODEL, MODEL, None)]
    assert gateway.get(f"/v1/models/{ADAPTER}").json()["parent"] == MODEL

    tokenizer = hf_pair[1]
    prompt_ids = tokenizer("hello world")["input_ids"]
    client = gateway.client()
    texts = {}
    for model in (ADAPTER, MODEL):
        resp = client.completions.create(model=model, prompt="hello world", max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert resp.model == model
        texts[model] = resp.choices[0].text
    with torch.no_grad():
        merged = merged_greedy({"llama": tiny_model_dir}, adapter[1], prompt_ids, max_new_tokens=8)
        base = merged_greedy({"llama": tiny_model_dir}, None, prompt_ids, max_new_tokens=8)
    assert merged != base
    assert texts == {ADAPTER: tokenizer.decode(merged, skip_special_tokens=True),
                     MODEL: tokenizer.decode(base, skip_special_tokens=True)}
    assert [model for model, _ in agents.started] == [MODEL]  # one instance of the base serves both


def test_embeddings_and_scores_of_an_adapter_are_refused_naming_the_base_model(gateway):
    resp = gateway.post("/v1/embeddings", json={"model": ADAPTER, "input": "hello"})
    assert resp.status_code == 400 and f"ask '{MODEL}'" in resp.json()["error"]["message"]
    for path, body in (("/v1/score", {"text_1": "a", "text_2": "b"}),
                       ("/v1/rerank", {"query": "a", "documents": ["b"]})):
        resp = gateway.post(path, json={"model": ADAPTER, **body})
        assert resp.status_code == 400 and f"ask '{MODEL}'" in resp.json()["error"]["message"], path


def test_a_static_models_adapters_are_listed_and_served_by_its_workers(make_gateway, adapter_worker, adapter,
                                                                       tiny_model_dir, hf_pair):
    gateway = make_gateway(static_models={MODEL: {"worker_url": adapter_worker, "source": str(tiny_model_dir),
                                                  "lora_adapters": [ADAPTER]}})
    assert [(m["id"], m["parent"]) for m in gateway.get("/v1/models").json()["data"]] == [(ADAPTER, MODEL),
                                                                                         (MODEL, None)]
    tokenizer = hf_pair[1]
    resp = gateway.client().completions.create(model=ADAPTER, prompt="hello world", max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True})
    with torch.no_grad():
        merged = merged_greedy({"llama": tiny_model_dir}, adapter[1], tokenizer("hello world")["input_ids"],
                               max_new_tokens=8)
    assert resp.choices[0].text == tokenizer.decode(merged, skip_special_tokens=True)


def test_a_static_adapter_named_like_a_model_is_a_config_error(tiny_model_dir):
    from hpcllm.config import StaticModel
    from hpcllm.errors import ConfigError
    from hpcllm.gateway.routing import StaticRouter

    models = {name: StaticModel(worker_url="http://w:1", source=tiny_model_dir, lora_adapters=adapters)
              for name, adapters in (("a", ["b"]), ("b", []))}
    with pytest.raises(ConfigError, match="'b' is already the name of a model or adapter"):
        StaticRouter(models, shared_secret=SECRET)


def test_a_stream_for_an_adapter_resumes_with_it_when_its_worker_shuts_down(make_gateway, adapter_worker, adapter,
                                                                           tiny_model_dir, hf_pair):
    import dataclasses

    from .test_resume import ScriptedRouter, second_worker, stream_interrupted_after_three_events

    service, doomed_url, server = second_worker(tiny_model_dir, lora_adapters={ADAPTER: str(adapter[0])})
    try:
        router = ScriptedRouter(tiny_model_dir, [doomed_url, adapter_worker])
        router.list_models = lambda: [router.card, dataclasses.replace(router.card, name=ADAPTER, parent=MODEL)]
        gateway = make_gateway(router=router)
        body = {"model": ADAPTER, "prompt": "hello world", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
        texts = stream_interrupted_after_three_events(gateway, body, service.shutdown)
        assert router.resolved[:2] == [doomed_url, adapter_worker]  # resolved by the base model's name
    finally:
        server.stop()
        service.shutdown()
    tokenizer = hf_pair[1]
    with torch.no_grad():
        merged = merged_greedy({"llama": tiny_model_dir}, adapter[1], tokenizer("hello world")["input_ids"],
                               max_new_tokens=60)
    assert "".join(texts) == tokenizer.decode(merged, skip_special_tokens=True)
