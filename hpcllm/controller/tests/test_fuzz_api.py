"""Property tests: whatever a node agent, a gateway or an admin puts in a body's fields, the controller answers a 4xx
with an OpenAI error body saying what to fix, or does it; never a 500 (a registry that cannot hold a value, a
placement that divides by it). Its state stays readable: the admin status answers after every example.

The fields are the wire types' own (registrations, heartbeats, model specs, migration-target and pool-token
requests) and the nested ones an agent reports (tiers, cache entries, instances); values as in
hpcllm.httpkit.tests.fuzzing.
"""

from __future__ import annotations

import pytest
from hypothesis import given

from hpcllm.controller.protocol import (AdminLoadLoraAdapter, Heartbeat, MigrationTargetRequest, ModelSpec,
                                        NodeRegistration, PoolTokenRequest)
from hpcllm.controller.tests.test_app import ADMIN, INTERNAL, registration_body
from hpcllm.httpkit.tests.fuzzing import FUZZ, as_sent, field_paths, mutated_bodies, problem_in

INSTANCE = {"instance_id": "inst-1", "model": "m", "state": "ready", "worker_url": "http://n1:9000/workers/inst-1",
            "gpu_ids": [0], "running_requests": 1, "tokens_in_flight": 10, "prefill_tokens_per_second": 100.0}
CACHED = {"model": "m", "tier": "nvme", "bytes": 1, "verified": True}
TIER_PATHS = [("tiers", tier, key) for tier in ("dram", "nvme") for key in ("capacity_bytes", "read_gbps")]
# name -> (path, headers, wire type, a valid body, nested paths besides the wire type's fields)
ENDPOINTS = {
    "register": ("/v1/internal/nodes/register", INTERNAL, NodeRegistration,
                 registration_body("n2", cached=[("m", "nvme")]), TIER_PATHS + [("cached", 0, key) for key in CACHED]),
    "heartbeat": ("/v1/internal/nodes/n1/heartbeat", INTERNAL, Heartbeat,
                  {"cached": [CACHED], "instances": [INSTANCE]},
                  TIER_PATHS + [("instances", 0, key) for key in INSTANCE] + [("cached", 0, key) for key in CACHED]),
    "migration-target": ("/v1/internal/migration-target", INTERNAL, MigrationTargetRequest,
                         {"model": "m", "exclude_node": "n1", "instance_id": "inst-1"}, []),
    "deploy": ("/v1/admin/models", ADMIN, ModelSpec, None,  # its source: the harness's checkpoint folder
               [("slurm", key) for key in ("partition", "time", "gres", "qos", "account")]),
    "pool-tokens": ("/v1/admin/pool-tokens", ADMIN, PoolTokenRequest, {"model": "m", "group": "physics"}, []),
    "load_lora_adapter": ("/v1/admin/load_lora_adapter", ADMIN, AdminLoadLoraAdapter,
                          {"lora_name": "m-legal", "lora_path": "/nowhere"}, []),
}


def valid_body(harness, name: str) -> dict:
    body = ENDPOINTS[name][3]
    return body if body is not None else {"name": "m2", "source": str(harness.source("m2")), "size_bytes": 1}


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_every_endpoint_starts_from_a_valid_body(harness, name):
    _, _, wire, _, _ = ENDPOINTS[name]
    body = valid_body(harness, name)
    wire.model_validate(body)
    assert set(body) <= {path[0] for path in field_paths(wire)}


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_no_body_makes_the_controller_fail(harness, name):
    path, headers, wire, _, extra = ENDPOINTS[name]
    harness.deploy("m")
    harness.register("n1")
    client = harness.app_client()

    @FUZZ
    @given(body=mutated_bodies(valid_body(harness, name), field_paths(wire) + extra))
    def done_or_refused(body):
        resp = client.post(path, data=as_sent(body), headers={**headers, "Content-Type": "application/json"})
        problem = problem_in(resp.status_code, resp.get_data(as_text=True))
        assert problem is None, f"{path} {as_sent(body)[:1500]}\n-> {problem}"
        status = client.get("/v1/admin/status", headers=ADMIN)
        assert status.status_code == 200, f"after {path} {as_sent(body)[:1500]}: {status.get_data(as_text=True)}"

    done_or_refused()
