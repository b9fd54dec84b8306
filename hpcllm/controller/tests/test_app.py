"""The HTTP API through Flask's test client: auth, errors, node agents, routing with cold starts, admin."""

from __future__ import annotations

import os
import threading

import pytest

from hpcllm.controller.tests.conftest import ADMIN_KEY, GB, SECRET
from hpcllm.httpkit.auth import SECRET_HEADER

INTERNAL = {SECRET_HEADER: SECRET}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def registration_body(node_id="n1", gpus=2, cached=(), job=None):
    return {"node_id": node_id, "agent_url": f"http://{node_id}:9000", "slurm_job_id": job, "job_scoped": True,
            "gpus": gpus,
            "tiers": {"dram": {"capacity_bytes": 10 * GB, "read_gbps": 20.0},
                      "nvme": {"capacity_bytes": 100 * GB, "read_gbps": 4.0, "scope": "persistent"},
                      "sharedfs": {"read_gbps": 1.0}},
            "cached": [{"model": m, "tier": t, "bytes": 1, "verified": True} for m, t in cached]}


@pytest.fixture
def client(harness):
    return harness.app_client()


def test_internal_api_needs_the_shared_secret(client):
    resp = client.get("/v1/internal/route?model=x")
    assert resp.status_code == 401
    assert resp.get_json()["error"]["code"] == "unauthorized"
    assert client.get("/v1/internal/route?model=x", headers={SECRET_HEADER: "wrong"}).status_code == 401


def test_admin_api_needs_the_admin_key(client):
    assert client.get("/v1/admin/status", headers=INTERNAL).status_code == 401
    assert client.get("/v1/admin/status", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/admin/status", headers=ADMIN).status_code == 200


def test_health_and_metrics_are_open(client):
    assert client.get("/health").get_json() == {"status": "ok"}
    assert b"hpcllm_controller_routes" in client.get("/metrics").data


def test_unknown_path_is_a_json_error(client):
    resp = client.get("/v1/nope", headers=INTERNAL)
    assert resp.status_code == 404
    assert "error" in resp.get_json()


def test_route_errors(client, harness):
    resp = client.get("/v1/internal/route?model=ghost", headers=INTERNAL)
    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/internal/route", headers=INTERNAL).get_json()["error"]["param"] == "model"
    harness.deploy("m")
    resp = client.get("/v1/internal/route?model=m&wait=soon", headers=INTERNAL)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "wait"
    for wait in ("nan", "inf"):  # nan never reached its deadline: the route spun on a thread at 100% CPU
        resp = client.get(f"/v1/internal/route?model=m&wait={wait}", headers=INTERNAL)
        assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "wait"


def test_bad_registration_names_the_field(client):
    body = registration_body()
    body["gpus"] = -1
    resp = client.post("/v1/internal/nodes/register", json=body, headers=INTERNAL)
    assert resp.status_code == 400
    assert resp.get_json()["error"]["param"] == "gpus"
    assert "gpus" in resp.get_json()["error"]["message"]
    resp = client.post("/v1/internal/nodes/register", data="not json", headers=INTERNAL)
    assert resp.status_code == 400


@pytest.mark.parametrize("change, param", [
    # An infinite bandwidth was stored (as null) before the answer failed: every later read of the registry, and
    # every controller start, failed on it.
    (lambda body: body["tiers"]["dram"].update(read_gbps=float("inf")), "tiers.dram.read_gbps"),
    (lambda body: body["tiers"]["nvme"].update(capacity_bytes=2**63), "tiers.nvme.capacity_bytes"),
    (lambda body: body.update(gpus=10**30), "gpus"),  # SQLite's integers end at 2**63 - 1
    (lambda body: body.update(node_id="n/../x"), "node_id"),
])
def test_a_registration_the_registry_cannot_hold_is_refused_and_nothing_is_stored(client, harness, change, param):
    import json

    body = registration_body()
    change(body)
    resp = client.post("/v1/internal/nodes/register", data=json.dumps(body), headers=INTERNAL,
                       content_type="application/json")
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == param
    assert harness.registry.nodes() == []
    assert client.get("/v1/admin/status", headers=ADMIN).status_code == 200
    assert client.post("/v1/internal/nodes/register", json=registration_body(), headers=INTERNAL).status_code == 200


@pytest.mark.parametrize("slurm", [{"account": "x\n#SBATCH --wrap=id"}, {"qos": "a b --uid=0"},
                                   {"partition": "x\n#SBATCH --foo"}])
def test_deploy_refuses_slurm_settings_sbatch_would_refuse(client, harness, slurm):
    # Accepted before, the model was stored and could never be allocated (refused at its first allocation).
    resp = client.post("/v1/admin/models", json={"name": "m", "source": str(harness.source("m")), "size_bytes": 1,
                                                "slurm": slurm}, headers=ADMIN)
    assert resp.status_code in (400, 422) and resp.get_json()["error"]["param"] == f"slurm.{next(iter(slurm))}"
    assert harness.registry.models() == []


def test_deploy_refuses_what_the_registry_cannot_hold(client, harness):
    too_big = client.post("/v1/admin/models", json={"name": "m", "source": str(harness.source("m")),
                                                   "size_bytes": 2**63}, headers=ADMIN)
    assert too_big.status_code in (400, 422) and too_big.get_json()["error"]["param"] == "size_bytes"
    long_path = client.post("/v1/admin/models", json={"name": "m", "source": "/" + "a" * 10_000, "size_bytes": 1},
                            headers=ADMIN)
    assert long_path.status_code == 400 and "cannot be looked up" in long_path.get_json()["error"]["message"]
    assert harness.registry.models() == []


def test_a_second_agent_on_a_node_is_refused_while_the_first_lives(client, harness):
    """Slurm may put two agent jobs on one node; the controller knows an agent by its node, so the second one must
    not take over the first one's registration (and its instances) while that one heartbeats."""
    harness.deploy("m")
    assert client.post("/v1/internal/nodes/register", json=registration_body("n1", job="11"),
                       headers=INTERNAL).status_code == 200
    harness.controller.route("m")  # an instance starts on n1, under job 11's agent
    [instance] = harness.registry.instances()

    resp = client.post("/v1/internal/nodes/register", json=registration_body("n1", job="12"), headers=INTERNAL)
    assert resp.status_code == 409
    error = resp.get_json()["error"]
    assert error["code"] == "node_taken" and "job 11" in error["message"] and "job 12" in error["message"]
    node = harness.registry.get_node("n1")
    assert node.slurm_job_id == "11" and [i.instance_id for i in harness.registry.instances()] == [
        instance.instance_id]

    # The same job's agent (restarted, or requeued) registers again as before.
    assert client.post("/v1/internal/nodes/register", json=registration_body("n1", job="11"),
                       headers=INTERNAL).status_code == 200
    # Once job 11's agent has been silent for node_timeout_seconds, job 12's may take the node.
    harness.clock.advance(harness.controller.settings.node_timeout_seconds + 1)
    resp = client.post("/v1/internal/nodes/register", json=registration_body("n1", job="12"), headers=INTERNAL)
    assert resp.status_code == 200 and harness.registry.get_node("n1").slurm_job_id == "12"


def test_heartbeat_of_unknown_node_asks_to_register(client):
    resp = client.post("/v1/internal/nodes/ghost/heartbeat", json={"cached": [], "instances": []}, headers=INTERNAL)
    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "unknown_node"


def test_cold_start_then_ready_through_http(client, harness):
    harness.deploy("m", size_bytes=8 * GB, gpus=1)
    resp = client.post("/v1/internal/nodes/register", json=registration_body("n1"), headers=INTERNAL)
    assert resp.status_code == 200 and resp.get_json()["heartbeat_seconds"] > 0
    client.post("/v1/internal/nodes/register", json=registration_body("n2", cached=[("m", "nvme")]),
                headers=INTERNAL)

    resp = client.get("/v1/internal/route?model=m", headers=INTERNAL)
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["status"] == "starting" and body["node_id"] == "n2"  # n2 holds it on NVMe: 8/4 = 2 s vs 8 s
    assert resp.headers["Retry-After"] == "1"
    assert harness.agents.started == [("http://n2:9000", "m", [0])]

    # Concurrent requests while it loads wait for the same instance: no second cold start.
    assert client.get("/v1/internal/route?model=m", headers=INTERNAL).status_code == 202
    assert len(harness.agents.started) == 1

    instances = harness.agents.finish_loading("http://n2:9000", tier="nvme", load_seconds=2.1)
    hb = {"cached": [{"model": "m", "tier": "nvme", "bytes": 1}],
          "instances": [i.model_dump() for i in instances]}
    assert client.post("/v1/internal/nodes/n2/heartbeat", json=hb, headers=INTERNAL).status_code == 200

    resp = client.get("/v1/internal/route?model=m", headers=INTERNAL)
    assert resp.status_code == 200
    ready = resp.get_json()
    assert ready["worker_url"] == f"http://n2:9000/workers/{body['instance_id']}"
    assert (ready["load_tier"], ready["load_seconds"]) == ("nvme", 2.1)

    status = client.get("/v1/admin/status", headers=ADMIN).get_json()
    [cold] = status["cold_starts"]
    assert (cold["model"], cold["node_id"], cold["tier"], cold["load_seconds"]) == ("m", "n2", "nvme", 2.1)
    assert cold["estimate_seconds"] == pytest.approx(2.0)
    [inst] = status["instances"]  # the decision stays visible with the instance: node, tier, estimate
    assert (inst["placement"]["node"], inst["placement"]["tier"]) == ("n2", "nvme")
    assert inst["placement"]["load_seconds"] == pytest.approx(2.0) and inst["placement"]["considered"] >= 2
    assert b'hpcllm_controller_cold_starts_total{model_name="m",tier="nvme"} 1.0' in client.get("/metrics").data


def test_least_loaded_ready_instance_is_chosen(harness):
    harness.deploy("m", max_instances=2)
    harness.register("n1")
    harness.register("n2")
    harness.controller.route("m")  # cold start 1
    harness.heartbeat("n1", tier="nvme")
    harness.heartbeat("n2")
    first = harness.controller.route("m")
    assert first.status == "ready"
    # Force a second instance on n2 (n1 is the node with the ready one; scale out goes elsewhere when tied).
    harness.controller.start_instance(harness.registry.get_model("m"))
    harness.heartbeat("n1", tier="nvme")
    harness.heartbeat("n2", tier="sharedfs")
    picks = [harness.controller.route("m").instance_id for _ in range(4)]
    # Load counts climb per route until the next heartbeat: the two instances alternate.
    assert picks[0] != picks[1] and picks[0] == picks[2] and picks[1] == picks[3]


def test_long_poll_returns_as_soon_as_the_instance_is_ready(harness):
    harness.deploy("m")
    harness.register("n1")
    assert harness.controller.route("m").status == "starting"
    timer = threading.Timer(0.3, lambda: harness.heartbeat("n1", tier="dram"))
    timer.start()
    outcome = harness.controller.route("m", wait_seconds=10)
    timer.join()
    assert outcome.status == "ready"


def test_full_node_evicts_an_idle_instance_of_another_model(harness):
    harness.deploy("a", max_instances=2)
    harness.deploy("b")
    harness.register("n1", gpus=0)  # CPU node: cpu_slots_per_node = 2
    harness.controller.route("a")
    harness.heartbeat("n1", tier="sharedfs")
    harness.controller.start_instance(harness.registry.get_model("a"))  # a second instance of a fills n1
    harness.heartbeat("n1", tier="sharedfs")
    assert len(harness.registry.instances(model="a")) == 2
    harness.backend.down = True  # no allocation possible: moving an idle instance is the only way
    outcome = harness.controller.route("b")
    assert outcome.status == "starting"
    assert len(harness.agents.stopped) == 1  # one idle instance of a moved off (evicted)
    placement = harness.registry.get_instance(outcome.instance_id).placement
    assert placement["migration_seconds"] == harness.config.controller.eviction_seconds
    assert len(placement["migrate"]) == 1


def test_no_capacity_without_slurm_is_503_with_retry_after(make_harness):
    h = make_harness(allocate_on_demand=False)
    h.deploy("m")
    client = h.app_client()
    resp = client.get("/v1/internal/route?model=m", headers=INTERNAL)
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "no_capacity"
    assert "allocate_on_demand is off" in resp.get_json()["error"]["message"]
    assert int(resp.headers["Retry-After"]) >= 1
    assert h.registry.demand().keys() == {"m"}


def test_no_capacity_submits_an_allocation_preferring_the_node_with_the_checkpoint(harness):
    harness.deploy("m", size_bytes=20 * GB, gpus=1, slurm={"partition": "debug", "time": "00:30:00"})
    # n3 ran an agent before (persistent NVMe holding m); its job ended, the cache entry stayed.
    harness.register("n3", cached=(("m", "nvme"),), job="1")
    harness.registry.node_left("n3", "gone")
    outcome = harness.controller.route("m")
    assert outcome.status == "allocating"
    [spec] = harness.backend.submitted()
    assert spec.nodelist == ("n3",)  # 30 + 20/4 = 35 s on n3 vs 30 + 20/1 = 50 s elsewhere
    assert (spec.partition, spec.time, spec.gpus_per_node) == ("debug", "00:30:00", 2)
    assert spec.env["HPCLLM_CONTROLLER_URL"] == "http://controller:8700"
    [alloc] = harness.registry.allocations()
    assert (alloc.job_id, alloc.state, alloc.model, alloc.preferred_nodes) == (outcome.job_id, "pending", "m", ["n3"])
    # Asking again waits for the same allocation instead of submitting another.
    assert harness.controller.route("m").job_id == outcome.job_id
    assert len(harness.backend.submitted()) == 1


@pytest.mark.parametrize("failure", ["refuse", "down"])
def test_slurm_failure_is_a_clear_503_and_leaves_no_allocation(harness, failure):
    harness.deploy("m")
    if failure == "refuse":
        harness.backend.refuse_submit = "sbatch: error: Batch job submission failed: Invalid account"
    client = harness.app_client()
    if failure == "down":
        harness.backend.node_infos = harness.backend.node_infos  # nodes listed, then sbatch finds Slurm down
        original_submit = harness.backend.submit

        def submit_down(spec):
            harness.backend.down = True
            return original_submit(spec)

        harness.backend.submit = submit_down
    resp = client.get("/v1/internal/route?model=m", headers=INTERNAL)
    assert resp.status_code == 503
    message = resp.get_json()["error"]["message"]
    assert "requesting an allocation failed" in message
    assert ("Invalid account" if failure == "refuse" else "not responding") in message
    assert harness.registry.allocations() == []


def test_agent_refusing_a_start_is_reported_and_unreserves(harness):
    harness.deploy("m")
    harness.register("n1")
    harness.agents.refuse_start = True
    resp = harness.app_client().get("/v1/internal/route?model=m", headers=INTERNAL)
    assert resp.status_code == 502
    assert "out of memory" in resp.get_json()["error"]["message"]
    assert harness.registry.instances() == []


# ------------------------------------------------------------------------------------------------------ admin


def test_deploy_update_list_undeploy(client, harness):
    src = harness.source("m")
    body = {"name": "m", "source": str(src), "size_bytes": 123, "gpus": 1, "max_instances": 2}
    resp = client.post("/v1/admin/models", json=body, headers=ADMIN)
    assert resp.status_code == 201 and resp.get_json()["size_bytes"] == 123
    assert client.post("/v1/admin/models", json={**body, "max_instances": 3}, headers=ADMIN).status_code == 200
    models = client.get("/v1/internal/models", headers=INTERNAL).get_json()["models"]
    assert [(m["name"], m["source"], m["gpus"]) for m in models] == [("m", str(src), 1)]

    harness.register("n1")
    harness.controller.route("m")
    harness.heartbeat("n1", tier="sharedfs")
    resp = client.delete("/v1/admin/models/m", headers=ADMIN)
    assert resp.get_json() == {"undeployed": "m", "stopped_instances": 1}
    assert len(harness.agents.stopped) == 1
    assert client.delete("/v1/admin/models/m", headers=ADMIN).status_code == 404


@pytest.mark.parametrize("change, param, words", [
    ({"gpus": "two"}, "gpus", "valid integer"),
    ({"colour": "red"}, "colour", "Extra inputs"),
    ({"min_instances": 3, "max_instances": 1}, None, "must not exceed max_instances"),
    ({"name": "bad name!"}, "name", "pattern"),
    ({"slurm": {"time": "forever"}}, "slurm.time", "pattern"),
])
def test_deploy_rejects_invalid_fields_naming_them(client, harness, change, param, words):
    body = {"name": "m", "source": str(harness.source("m")), "size_bytes": 1, **change}
    resp = client.post("/v1/admin/models", json=body, headers=ADMIN)
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert words in error["message"]
    if param:
        assert error["param"] == param
    assert harness.registry.models() == []


def test_deploy_checks_the_source_and_partition(client, harness, tmp_path):
    missing = {"name": "m", "source": str(tmp_path / "nowhere"), "size_bytes": 1}
    resp = client.post("/v1/admin/models", json=missing, headers=ADMIN)
    assert resp.status_code == 400 and "does not exist" in resp.get_json()["error"]["message"]

    no_manifest = {"name": "m", "source": str(harness.source("m"))}
    resp = client.post("/v1/admin/models", json=no_manifest, headers=ADMIN)
    assert "hpcllm convert" in resp.get_json()["error"]["message"]

    bad_partition = {**no_manifest, "size_bytes": 1, "slurm": {"partition": "gpu-huge"}}
    resp = client.post("/v1/admin/models", json=bad_partition, headers=ADMIN)
    assert resp.status_code == 400
    assert resp.get_json()["error"]["message"] == \
        "slurm.partition: unknown partition 'gpu-huge' (Slurm has: debug)"
    assert harness.registry.models() == []

    harness.backend.down = True  # Slurm unreachable: the partition cannot be checked, the deploy goes through
    assert client.post("/v1/admin/models", json=bad_partition, headers=ADMIN).status_code == 201


def test_deploy_refuses_a_relative_source_and_a_checkpoint_missing_data(client, tmp_path, converted_checkpoint):
    import shutil

    relative = client.post("/v1/admin/models", json={"name": "m", "source": "models/tiny"}, headers=ADMIN)
    assert relative.status_code == 400 and "is a relative path" in relative.get_json()["error"]["message"]
    broken = shutil.copytree(converted_checkpoint, tmp_path / "broken")
    data = sorted(broken.glob("data-*"))[0]
    data.write_bytes(data.read_bytes()[:100])  # a copy cut short: caught at deploy, not on a node later
    resp = client.post("/v1/admin/models", json={"name": "m", "source": str(broken)}, headers=ADMIN)
    message = resp.get_json()["error"]["message"]
    assert resp.status_code == 400 and f"{data.name}: has 100 bytes, the manifest says" in message
    data.unlink()
    resp = client.post("/v1/admin/models", json={"name": "m", "source": str(broken)}, headers=ADMIN)
    assert resp.status_code == 400 and "is missing from the checkpoint" in resp.get_json()["error"]["message"]


def test_a_models_cache_on_load_reaches_the_agent_and_bad_tiers_are_refused(client, harness):
    src = harness.source("m", positions=512)
    body = {"name": "m", "source": str(src), "size_bytes": 1, "gpus": 1}
    bad = client.post("/v1/admin/models", json={**body, "cache_on_load": ["gpu"]}, headers=ADMIN)
    assert bad.status_code == 400 and "cache_on_load" in bad.get_json()["error"]["param"]
    assert client.post("/v1/admin/models", json={**body, "cache_on_load": ["dram"]}, headers=ADMIN).status_code == 201
    harness.register("n1")
    harness.controller.route("m")
    assert harness.agents.cache_on_loads == [["dram"]]
    assert harness.registry.get_model("m").cache_on_load == ["dram"]


def test_deploy_records_the_models_context_length_and_workers_get_it(client, harness):
    src = harness.source("m", positions=512)
    body = {"name": "m", "source": str(src), "size_bytes": 1, "gpus": 1}
    too_long = client.post("/v1/admin/models", json={**body, "max_model_len": 2048}, headers=ADMIN)
    assert too_long.status_code == 400
    error = too_long.get_json()["error"]
    assert error["param"] == "max_model_len" and error["code"] == "invalid_model_config"
    assert "max_model_len = 2048 is more than the model's context length of 512 tokens" in error["message"]
    assert harness.registry.models() == []

    # Without the key: the model's own; the gateway's model list and the started worker get the same number.
    assert client.post("/v1/admin/models", json=body, headers=ADMIN).get_json()["max_model_len"] == 512
    models = client.get("/v1/internal/models", headers=INTERNAL).get_json()["models"]
    assert [m["max_model_len"] for m in models] == [512]
    harness.register("n1")
    harness.controller.route("m")
    assert harness.agents.max_model_lens == [512]

    # Redeploying re-reads config.json: a smaller value is kept as asked and reaches the next worker.
    assert client.post("/v1/admin/models", json={**body, "max_model_len": 300}, headers=ADMIN).status_code == 200
    assert harness.registry.get_model("m").max_model_len == 300


def test_restart_rederives_context_lengths_of_old_registry_records(harness, tmp_path):
    """A registry written before deploy derived the length holds none, or the demo config's too-large 2048."""
    from hpcllm.controller.protocol import DeployedModel

    def record(name, max_model_len, source):
        harness.registry.put_model(DeployedModel(name=name, source=str(source), size_bytes=1, deployed_at=0.0,
                                                 max_model_len=max_model_len))

    record("too-long", 2048, harness.source("too-long", positions=512))
    record("unset", None, harness.source("unset", positions=1024))
    record("fine", 256, harness.source("fine", positions=512))
    record("unreadable", 2048, tmp_path / "gone")
    harness.controller.reconcile()
    lengths = {m.name: m.max_model_len for m in harness.registry.models()}
    assert lengths == {"too-long": 512, "unset": 1024, "fine": 256, "unreadable": 2048}


def test_deploy_reads_size_from_a_converted_checkpoint(client, harness, converted_checkpoint):
    from hpcllm.checkpoint import read_checkpoint

    body = {"name": "tiny", "source": str(converted_checkpoint), "size_bytes": 5}
    resp = client.post("/v1/admin/models", json=body, headers=ADMIN)
    assert resp.status_code == 201
    assert resp.get_json()["size_bytes"] == read_checkpoint(converted_checkpoint).total_bytes != 5


def test_deploy_refuses_a_corrupt_manifest(client, harness, converted_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(converted_checkpoint, broken)
    (broken / "manifest.json").write_text("{ not json")
    resp = client.post("/v1/admin/models", json={"name": "tiny", "source": str(broken)}, headers=ADMIN)
    assert resp.status_code == 400
    assert "manifest.json" in resp.get_json()["error"]["message"]
    assert harness.registry.models() == []


@pytest.mark.parametrize("make_odd", [lambda p: p.mkdir(), lambda p: os.mkfifo(p)], ids=["folder", "fifo"])
def test_deploy_refuses_a_manifest_that_is_not_a_file_even_with_size_bytes(client, harness, converted_checkpoint,
                                                                           tmp_path, make_odd):
    """size_bytes stands in only for a checkpoint without a manifest: a manifest.json that is a folder or a FIFO is a
    broken checkpoint to say so about, not a missing manifest (the deploy went through and every load failed)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(converted_checkpoint, broken)
    (broken / "manifest.json").unlink()
    make_odd(broken / "manifest.json")
    body = {"name": "tiny", "source": str(broken), "size_bytes": 5}
    resp = client.post("/v1/admin/models", json=body, headers=ADMIN)
    assert resp.status_code == 400
    assert "manifest.json: is not a regular file" in resp.get_json()["error"]["message"]
    assert harness.registry.models() == []


def test_status_lists_everything(client, harness):
    harness.deploy("m")
    harness.register("n1", cached=(("m", "dram"),))
    harness.controller.route("m")
    status = client.get("/v1/admin/status", headers=ADMIN).get_json()
    assert [m["name"] for m in status["models"]] == ["m"]
    assert [(n["node_id"], n["state"], n["gpus"]) for n in status["nodes"]] == [("n1", "up", 2)]
    assert status["nodes"][0]["cached"][0]["tier"] == "dram"
    assert [(i["model"], i["state"]) for i in status["instances"]] == [("m", "loading")]
    assert status["allocations"] == []


def test_the_demo_model_config_deploys_on_the_demo_model(harness, tmp_path):
    """`make up` builds the tiny Llama (512 positions), converts it and deploys conf/models/tiny-llama.toml."""
    from pathlib import Path

    from hpcllm.checkpoint import convert
    from hpcllm.controller.cli import read_model_file
    from hpcllm.devmodels import make_model

    spec = read_model_file(Path(__file__).resolve().parents[3] / "conf" / "models" / "tiny-llama.toml")
    converted = tmp_path / "tiny-llama"
    convert(make_model("llama", tmp_path / "tiny-llama-hf", size="tiny"), converted, progress=False)
    model, _ = harness.controller.deploy(spec.model_copy(update={"source": str(converted)}))
    assert model.max_model_len == 512


def test_deploy_checks_tensor_parallel_against_the_models_config(client, harness, converted_checkpoint):
    # converted_checkpoint: 2 attention heads, 1 KV head, intermediate 64, vocabulary 64.
    body = {"name": "tiny", "source": str(converted_checkpoint), "tensor_parallel": 2}
    resp = client.post("/v1/admin/models", json=body, headers=ADMIN)
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["param"] == "tensor_parallel"
    assert error["message"] == ("tensor_parallel: tensor_parallel = 2 does not fit model type 'llama': KV heads "
                                "(num_key_value_heads) = 1 is not divisible by 2")
    resp = client.post("/v1/admin/models", json={**body, "tensor_parallel": 3}, headers=ADMIN)
    message = resp.get_json()["error"]["message"]
    for part in ("attention heads (num_attention_heads) = 2", "KV heads (num_key_value_heads) = 1",
                 "MLP intermediate size (intermediate_size) = 64", "vocabulary (vocab_size) = 64"):
        assert part in message
    assert harness.registry.models() == []


def test_deploy_accepts_a_degree_that_splits_the_model(client, harness, tiny_llama_dir):
    # The tiny dev Llama: 4 heads, 2 KV heads, intermediate 128, vocabulary 1024.
    body = {"name": "tp", "source": str(tiny_llama_dir), "size_bytes": 1000, "tensor_parallel": 2}
    resp = client.post("/v1/admin/models", json=body, headers=ADMIN)
    assert resp.status_code == 201 and resp.get_json()["tensor_parallel"] == 2
    assert [m.tensor_parallel for m in harness.registry.models()] == [2]


def test_deploy_refuses_gpus_that_do_not_divide_among_the_ranks(client, harness):
    body = {"name": "m", "source": str(harness.source("m")), "size_bytes": 1, "gpus": 3, "tensor_parallel": 2}
    resp = client.post("/v1/admin/models", json=body, headers=ADMIN)
    assert resp.status_code == 400
    assert "gpus (3) must be a multiple of tensor_parallel (2)" in resp.get_json()["error"]["message"]


def test_a_tensor_parallel_cpu_instance_takes_one_slot_per_rank_on_one_node(make_harness, tiny_llama_dir):
    """tensor_parallel = 2 without GPUs: two CPU slots of one node, and the agent is asked for two ranks."""
    from hpcllm.controller.protocol import ModelSpec

    h = make_harness(cpu_slots_per_node=2, allocate_on_demand=False)
    h.controller.deploy(ModelSpec(name="tp", source=str(tiny_llama_dir), size_bytes=1000, tensor_parallel=2))
    h.deploy("one")
    h.register("n1", gpus=0)
    outcome = h.controller.route("tp")
    assert outcome.status == "starting"
    assert (h.agents.started[-1][1], h.agents.tensor_parallel[-1]) == ("tp", 2)
    h.heartbeat("n1", tier="sharedfs")
    # n1's two slots are the TP instance's: another model only fits by moving it off (one slot would have been free
    # were it counted as one).
    h.backend.down = True
    assert h.controller.route("one").status == "starting"
    assert [model for _, model, _ in h.agents.started] == ["tp", "one"]
    assert [iid for _, iid in h.agents.stopped] == [outcome.instance_id]

    # One slot per node is too small for two ranks: the instance spans two nodes, in an allocation of its own (never
    # on n1's agent, which has room for one); without allocations the reason says what the model needs.
    small = make_harness(cpu_slots_per_node=1, allocate_on_demand=False)
    model, _ = small.controller.deploy(ModelSpec(name="tp", source=str(tiny_llama_dir), size_bytes=1000,
                                                 tensor_parallel=2))
    assert (model.nodes, model.ranks_per_node) == (2, 1)
    small.register("n1", gpus=0)
    resp = small.app_client().get("/v1/internal/route?model=tp", headers=INTERNAL)
    message = resp.get_json()["error"]["message"]
    assert resp.status_code == 503 and "(2 ranks over 2 nodes, an allocation of its own)" in message, message
    assert "allocate_on_demand is off" in message
    assert small.agents.started == []


def test_a_tensor_parallel_estimate_counts_each_rank_s_bytes_and_its_node_s_slice_copy(make_harness, tiny_llama_dir,
                                                                                       tmp_path):
    """Deploy plans each rank's bytes; placement takes the slowest rank: a node holding only rank 0's slices loads
    as slowly as rank 1 reads the shared FS, a node holding both ranks' slices loads from NVMe and wins."""
    from hpcllm.checkpoint import convert
    from hpcllm.controller.protocol import ModelSpec
    from hpcllm.tp.mpiload import estimate_rank_reads

    source = tmp_path / "tp-llama"
    convert(tiny_llama_dir, source, progress=False)
    h = make_harness(cpu_slots_per_node=2, allocate_on_demand=False)
    model, _ = h.controller.deploy(ModelSpec(name="tp", source=str(source), tensor_parallel=2))
    assert model.rank_bytes == [nbytes for nbytes, _ in estimate_rank_reads(source, 2)]
    # rank 1 reads about half; rank 0 also the replicated tensors it broadcasts (a large share of this tiny model)
    assert model.rank_bytes[1] < 0.6 * model.size_bytes and model.rank_bytes[1] < model.rank_bytes[0] < \
        model.size_bytes

    h.register("n2", gpus=0, cached=(("tp", "nvme", 2, 0), ("tp", "nvme", 4, 1)))  # rank 1 of 2 only on the shared FS
    assert h.controller.route("tp").status == "starting"
    breakdown = h.registry.instances(model="tp")[0].placement
    assert (breakdown["node"], breakdown["tier"], breakdown["slowest_rank"]) == ("n2", "sharedfs", 1)
    assert breakdown["load_seconds"] == pytest.approx(model.rank_bytes[1] / 1e9)  # shared FS at 1 GB/s

    h2 = make_harness(cpu_slots_per_node=2, allocate_on_demand=False)
    h2.controller.deploy(ModelSpec(name="tp", source=str(source), tensor_parallel=2))
    h2.register("n1", gpus=0, cached=(("tp", "nvme", 2, 0), ("tp", "nvme", 2, 1)))
    h2.register("n2", gpus=0, cached=(("tp", "nvme", 2, 0),))
    assert h2.controller.route("tp").status == "starting"
    breakdown = h2.registry.instances(model="tp")[0].placement
    assert (breakdown["node"], breakdown["tier"], breakdown["slowest_rank"]) == ("n1", "nvme", 0)
    assert breakdown["load_seconds"] == pytest.approx(model.rank_bytes[0] / 4e9)  # rank 0 reads more, NVMe 4 GB/s
    # the controller's status lists the slice copies as such
    cached = {(c.tier, c.tensor_parallel, c.rank) for n in h2.controller.status().nodes for c in n.cached}
    assert cached == {("nvme", 2, 0), ("nvme", 2, 1)}


def test_status_shows_a_tensor_parallel_instance_s_ranks_and_their_nodes(make_harness, tiny_llama_dir, capsys,
                                                                           monkeypatch, tmp_path):
    from hpcllm.checkpoint import convert
    from hpcllm.controller.cli import print_status
    from hpcllm.controller.protocol import ModelSpec

    h = make_harness(cpu_slots_per_node=2, allocate_on_demand=False)
    convert(tiny_llama_dir, tmp_path / "tp", progress=False)
    h.controller.deploy(ModelSpec(name="tp", source=str(tmp_path / "tp"), tensor_parallel=2))
    h.deploy("one")
    url = h.register("n1", gpus=0)
    h.register("n2", gpus=0)
    iid = h.controller.route("tp").instance_id
    assert [(i.tensor_parallel, i.rank_nodes) for i in h.controller.status().instances] == [(2, [])]  # placed

    # the agent reports where its ranks run
    info = h.agents.agents[url].instances[iid]
    h.agents.agents[url].instances[iid] = info.model_copy(update={"tensor_parallel": 2, "rank_nodes": ["n1", "n1"]})
    h.heartbeat("n1", tier="sharedfs")
    h.controller.route("one")
    status = {i.model: i for i in h.controller.status().instances}
    assert (status["tp"].tensor_parallel, status["tp"].rank_nodes) == (2, ["n1", "n1"])
    assert (status["one"].tensor_parallel, status["one"].rank_nodes) == (1, [])

    monkeypatch.setenv("COLUMNS", "300")
    print_status(h.controller.status())
    lines = capsys.readouterr().out.splitlines()
    assert "ranks" in next(line for line in lines if "instance" in line and "model" in line)
    assert "2 (n1, n1)" in next(line for line in lines if iid in line)
    assert "sharedfs 0.00 s (slowest rank 0)" in next(line for line in lines if iid in line)
    one = next(line for line in lines if status["one"].instance_id in line)
    assert " 1 " in one

    # Once loaded, the agent reports where each rank read (the lead's per-rank report): kept and shown per rank.
    info = h.agents.agents[url].instances[iid]
    h.agents.agents[url].instances[iid] = info.model_copy(update={"rank_tiers": ["nvme", "sharedfs"]})
    h.heartbeat("n1")
    [tp] = [i for i in h.controller.status().instances if i.model == "tp"]
    assert tp.rank_tiers == ["nvme", "sharedfs"]
    print_status(h.controller.status())
    assert "2 (n1 nvme, n1 sharedfs)" in next(line for line in capsys.readouterr().out.splitlines() if iid in line)


def test_a_failed_instance_and_its_reason_show_in_status(client, harness, capsys, monkeypatch):
    """An instance whose worker failed (here a vLLM that cannot be imported) leaves the registry, nothing stays
    allocated on its node, and `hpcllm status` lists it with the agent's reason, once however often reported."""
    from hpcllm.controller.cli import print_status
    from hpcllm.controller.protocol import ClusterStatus

    harness.deploy("m", size_bytes=GB, gpus=1)
    assert client.post("/v1/internal/nodes/register", json=registration_body("n1"), headers=INTERNAL).status_code == 200
    reason = "vLLM cannot be imported by /opt/venv/bin/python: No module named 'vllm' (make vllm-venv)"
    failed = {"instance_id": "i-bad", "model": "m", "state": "failed", "worker_url": None, "gpu_ids": [0],
              "running_requests": 0, "error": reason}
    for _ in range(2):  # the agent reports it in every heartbeat until it is removed
        hb = {"cached": [], "instances": [failed]}
        assert client.post("/v1/internal/nodes/n1/heartbeat", json=hb, headers=INTERNAL).status_code == 200

    status = client.get("/v1/admin/status", headers=ADMIN).get_json()
    assert status["instances"] == []
    assert [node["free_gpus"] for node in status["nodes"]] == [2]
    [failure] = status["failed_instances"]
    assert (failure["instance_id"], failure["model"], failure["node_id"], failure["error"]) == (
        "i-bad", "m", "n1", reason)

    monkeypatch.setenv("COLUMNS", "300")
    print_status(ClusterStatus.model_validate(status))
    out = capsys.readouterr().out
    assert "failed instances" in out and reason in out


def test_status_prints_rank_slices_and_reasons_with_brackets_as_they_are(client, harness, capsys, monkeypatch):
    """`hpcllm status` prints a node's tensor-parallel slices as `model@tier[rank R/N]` and an agent's reason as
    the agent wrote it: square brackets are text, not markup of the table library (which dropped `[rank 0/2]`
    and failed with a traceback on a reason naming `[/dev/shm]`), and `:key:` is text, not an emoji code."""
    from hpcllm.controller.cli import print_status
    from hpcllm.controller.protocol import ClusterStatus

    harness.deploy("m", size_bytes=GB, gpus=1)
    harness.register("n1", cached=(("m", "nvme", 2, 0),))
    reason = "worker exited: no space left on device [/dev/shm] while loading [rank 1]: missing config key :key:"
    failed = {"instance_id": "i-bad", "model": "m", "state": "failed", "worker_url": None, "gpu_ids": [0],
              "running_requests": 0, "error": reason}
    hb = {"cached": [{"model": "m", "tier": "nvme", "bytes": 1, "verified": True, "tensor_parallel": 2, "rank": 0}],
          "instances": [failed]}
    assert client.post("/v1/internal/nodes/n1/heartbeat", json=hb, headers=INTERNAL).status_code == 200

    monkeypatch.setenv("COLUMNS", "300")
    print_status(ClusterStatus.model_validate(client.get("/v1/admin/status", headers=ADMIN).get_json()))
    out = capsys.readouterr().out
    assert "m@nvme[rank 0/2]" in next(line for line in out.splitlines() if "n1" in line and "nvme" in line)
    assert reason in out


def test_a_running_instance_holds_the_cpu_slots_of_the_ranks_it_started_with(make_harness, tiny_llama_dir):
    """A model redeployed with another tensor_parallel leaves its running instances as they are: one started with
    two ranks still holds two CPU slots, so another model does not go into a slot its ranks use."""
    from hpcllm.controller.protocol import ModelSpec

    h = make_harness(cpu_slots_per_node=2, allocate_on_demand=False)
    spec = ModelSpec(name="tp", source=str(tiny_llama_dir), size_bytes=1000, tensor_parallel=2)
    h.controller.deploy(spec)
    h.deploy("one")
    h.register("n1", gpus=0)
    first = h.controller.route("tp").instance_id
    h.heartbeat("n1", tier="sharedfs")
    h.controller.deploy(spec.model_copy(update={"tensor_parallel": 1}))
    h.backend.down = True
    assert h.controller.route("one").status == "starting"
    assert [iid for _, iid in h.agents.stopped] == [first]  # moved off to make room, not started beside it
