"""Bad input to the node agent's API is a 4xx that says what to fix, and never evicts, caches or stops more than
asked for (the Flask test client, a real CacheManager in a temporary folder)."""

from __future__ import annotations

import pytest

from hpcllm.errors import HpcllmError
from hpcllm.node.cache import CacheInUse
from hpcllm.node.app import create_app
from hpcllm.node.protocol import StartInstance
from hpcllm.node.tests.test_agent import AUTH, converted, make_agent  # noqa: F401 (converted: a fixture)

CACHE = "/v1/internal/cache"


@pytest.fixture
def agent(tmp_path):
    a = make_agent(tmp_path)
    yield a
    a.workers.close()


@pytest.fixture
def client(agent):
    return create_app(agent).test_client()


def cached(client) -> set[tuple[str, str]]:
    return {(c["model"], c["tier"]) for c in client.get(CACHE, headers=AUTH).get_json()["cached"]}


def warm(client, **body):
    return client.post(f"{CACHE}/warm", json=body, headers=AUTH)


def error(resp) -> dict:
    return resp.get_json()["error"]


@pytest.mark.parametrize("name", ["..", ".hpcllm-cache.db", "a%00b", "m+tp2.r0", "a" * 129])
def test_evicting_a_name_that_is_no_model_name_is_a_400_naming_the_model(client, name):
    resp = client.delete(f"{CACHE}/{name}", headers=AUTH)
    assert resp.status_code == 400, resp.get_json()
    assert error(resp)["param"] == "model" and "model name" in error(resp)["message"]


@pytest.mark.parametrize("query, param", [("tier=", "tier"), ("tier=all", "tier"), ("teir=dram", "teir")])
def test_an_empty_or_misspelt_evict_tier_evicts_nothing(client, converted, query, param):
    for tier in ("nvme", "dram"):
        assert warm(client, model="m", source=str(converted), tier=tier).status_code == 200
    resp = client.delete(f"{CACHE}/m?{query}", headers=AUTH)
    assert resp.status_code == 400 and error(resp)["param"] == param
    assert "tier" in error(resp)["message"]
    assert cached(client) == {("m", "nvme"), ("m", "dram")}


def test_a_rank_without_tensor_parallel_is_refused_not_warmed_as_a_whole_copy(client, converted):
    resp = warm(client, model="m", source=str(converted), rank=1)
    assert resp.status_code == 400 and error(resp)["param"] == "rank"
    assert "tensor_parallel" in error(resp)["message"]
    assert cached(client) == set()


def test_a_slice_copy_outside_nvme_names_the_tier(client, converted):
    resp = warm(client, model="m", source=str(converted), tier="dram", tensor_parallel=2, rank=0)
    assert resp.status_code == 400 and error(resp)["param"] == "tier" and "nvme" in error(resp)["message"]


def test_a_nul_byte_in_a_source_path_is_a_400(client, converted):
    assert warm(client, model="m", source=str(converted)).status_code == 200  # a copy to compare the source with
    for path, body in [("/v1/internal/instances", {}), (f"{CACHE}/warm", {"tier": "dram"})]:
        resp = client.post(path, json={"model": "m", "source": f"{converted}\0x", **body}, headers=AUTH)
        assert resp.status_code == 400, (path, resp.get_json())
        assert error(resp)["param"] == "source" and "NUL" in error(resp)["message"]


def test_one_rank_over_two_nodes_is_a_400_not_a_500(client, tmp_path):
    resp = client.post("/v1/internal/instances", json={"model": "m", "source": str(tmp_path), "nodes": 2},
                       headers=AUTH)
    assert resp.status_code == 400, resp.get_json()
    assert "nodes must divide tensor_parallel" in error(resp)["message"]


def instances(client) -> list[dict]:
    return client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/internal/instances", {"gpu_ids": [True]}, "gpu_ids.0"),
    ("/v1/internal/instances", {"max_model_len": "64"}, "max_model_len"),
    ("/v1/internal/instances", {"tensor_parallel": True}, "tensor_parallel"),
    (f"{CACHE}/warm", {"tensor_parallel": 2, "rank": False}, "rank"),
    (f"{CACHE}/warm", {"tier": "nvme", "tensor_parallel": "2", "rank": 0}, "tensor_parallel"),
])
def test_a_boolean_or_a_string_is_no_number_to_the_agent(client, converted, path, body, param):
    resp = client.post(path, json={"model": "m", "source": str(converted), **body}, headers=AUTH)
    assert resp.status_code == 400, resp.get_json()
    assert error(resp)["param"] == param and "valid integer" in error(resp)["message"]
    assert instances(client) == [] and cached(client) == set()


def test_a_max_model_len_over_the_models_context_is_a_400_before_any_worker(client, agent, converted):
    resp = client.post("/v1/internal/instances", json={"model": "m", "source": str(converted),
                                                        "max_model_len": 10**9}, headers=AUTH)
    assert resp.status_code == 400, resp.get_json()
    assert error(resp)["param"] == "max_model_len"
    assert "context length of 512 tokens" in error(resp)["message"]
    assert instances(client) == [] and agent.workers.starts == 0


def test_an_evict_right_after_a_start_chose_the_cached_copy_cannot_take_it(agent, client, converted, monkeypatch):
    # The start's choice of a copy holds it: an evict in between finds it in use (before: the evict went through
    # and the start failed with a 404, the copy gone, instead of starting).
    assert warm(client, model="m", source=str(converted), tier="nvme").status_code == 200
    choose, evicts = agent.cache.path_for_load, []

    def choose_then_evict(model, source, **options):
        chosen = choose(model, source, **options)
        try:
            agent.cache.evict(model, "nvme")
            evicts.append("evicted")
        except CacheInUse:
            evicts.append("in use")
        return chosen

    monkeypatch.setattr(agent.cache, "path_for_load", choose_then_evict)
    agent.workers.set_key(None)  # the start then stops at spawning its worker (no key for it), past the copy's use
    with pytest.raises(HpcllmError, match="no key for its workers"):
        agent.workers.start(StartInstance(model="m", source=str(converted)))
    assert evicts == ["in use"]
    assert [(c.tier, c.in_use) for c in agent.cache.list()] == [("nvme", 0)]


def test_a_start_that_fails_otherwise_than_with_oserror_lets_the_cached_copy_go(agent, client, converted):
    assert warm(client, model="m", source=str(converted), tier="nvme").status_code == 200
    agent.workers.set_key(None)  # its workers' key is unknown: spawning one fails with InstanceError
    with pytest.raises(HpcllmError, match="no key for its workers"):
        agent.workers.start(StartInstance(model="m", source=str(converted)))
    assert [(c.tier, c.in_use) for c in agent.cache.evict("m", "nvme")] == [("nvme", 0)]
    assert agent.cache.list() == [] and agent.workers.instances() == []


@pytest.mark.parametrize("change, param", [
    ({"gpu_ids": list(range(65))}, "gpu_ids"), ({"gpu_ids": [-1]}, "gpu_ids"),
    ({"max_model_len": 1 << 40}, "max_model_len"),
    ({"cache_on_load": ["dram", "nvme", "dram"]}, "cache_on_load"), ({"source": "/" + "a" * 5000}, "source")])
def test_a_start_request_out_of_any_real_bounds_is_a_400_naming_the_field(client, agent, converted, change, param):
    resp = client.post("/v1/internal/instances", json={"model": "m", "source": str(converted), **change}, headers=AUTH)
    assert resp.status_code == 400 and error(resp)["param"].startswith(param), resp.get_json()
    assert agent.workers.instances() == []


def test_a_body_larger_than_any_agent_message_is_a_413_before_it_is_parsed(client, agent, converted):
    """The agent's messages are a few KB: a 2 MiB one is refused whole (internal_http allows 64 MiB per body)."""
    body = {"model": "m", "source": str(converted), "padding": "x" * (2 << 20)}
    resp = client.post("/v1/internal/instances", json=body, headers=AUTH)
    assert resp.status_code == 413 and error(resp)["code"] == "request_too_large"
    assert agent.workers.instances() == []
