"""Property test: whatever the controller or an admin's CLI puts in a node agent's request bodies, the agent answers
a 4xx with an OpenAI error body or does it; never a 500. Its cache stays whole: the copy warmed before the examples
is still listed and verifies after them (a bad request must not evict, corrupt or half-write a copy).

Starts name a checkpoint folder that does not exist, so no example starts a worker process. Values as in
hpcllm.httpkit.tests.fuzzing.
"""

from __future__ import annotations

import pytest
from hypothesis import given

from hpcllm.httpkit.tests.fuzzing import FUZZ, as_sent, field_paths, mutated_bodies, problem_in
from hpcllm.node.app import create_app
from hpcllm.node.protocol import SetLoraAdapters, StartInstance, VerifyRequest, WarmRequest
from hpcllm.node.tests.test_agent import AUTH, converted, make_agent  # noqa: F401 (converted: a fixture)

CACHE = "/v1/internal/cache"
# name -> (path, wire type, a valid body (None: warm's, naming the converted checkpoint), nested paths)
ENDPOINTS = {
    "start": ("/v1/internal/instances", StartInstance,
              {"model": "m", "source": "/nonexistent/m", "gpu_ids": [], "max_model_len": 64,
               "lora_adapters": {"m-a": "/nonexistent/a"}},
              [("gpu_ids", 0), ("lora_adapters", "m-a"), ("lora_adapters", "..")]),
    "warm": (f"{CACHE}/warm", WarmRequest, None, []),
    "verify": (f"{CACHE}/verify", VerifyRequest, {"model": "m"}, []),
    "lora-adapters": ("/v1/internal/instances/inst-none/lora-adapters", SetLoraAdapters,
                      {"lora_adapters": {"m-a": "/nonexistent/a"}}, [("lora_adapters", "m-a")]),
}


@pytest.fixture
def agent(tmp_path):
    a = make_agent(tmp_path)
    yield a
    a.workers.stop_all(timeout=5)
    a.workers.close()


def valid_body(name: str, checkpoint) -> dict:
    body = ENDPOINTS[name][2]
    return body if body is not None else {"model": "m", "source": str(checkpoint), "tier": "dram"}


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_no_body_makes_the_agent_fail_or_lose_its_cache(agent, converted, name):
    path, wire, _, extra = ENDPOINTS[name]
    client = create_app(agent).test_client()
    assert client.post(f"{CACHE}/warm", json={"model": "m", "source": str(converted), "tier": "nvme"},
                       headers=AUTH).status_code == 200
    base = valid_body(name, converted)
    wire.model_validate(base)
    put = client.put if name == "lora-adapters" else client.post

    @FUZZ
    @given(body=mutated_bodies(base, field_paths(wire) + extra))
    def done_or_refused(body):
        resp = put(path, data=as_sent(body), headers={**AUTH, "Content-Type": "application/json"})
        problem = problem_in(resp.status_code, resp.get_data(as_text=True))
        assert problem is None, f"{path} {as_sent(body)[:1500]}\n-> {problem}"

    done_or_refused()
    listed = {(c["model"], c["tier"]) for c in client.get(CACHE, headers=AUTH).get_json()["cached"]}
    assert ("m", "nvme") in listed
    verified = client.post(f"{CACHE}/verify", json={"model": "m"}, headers=AUTH).get_json()["results"]
    assert verified and all(result["ok"] for result in verified), verified
