"""Bad input to the controller: deeply nested JSON, an admin key that fell back to the secret (issue 15), and the
bad-input audit of heartbeats, migration-target requests, model specs, body sizes, paths and the CLI's names: each a
clear 4xx that names the field, nothing recorded, never a 500."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest
from werkzeug.test import EnvironBuilder, run_wsgi_app

from hpcllm.cli.main import main
from hpcllm.controller.app import create_app
from hpcllm.controller.cli import read_model_file
from hpcllm.controller.errors import InvalidModelConfig
from hpcllm.controller.protocol import (INT64_MAX, MAX_CACHE_ENTRIES, MAX_ERROR_CHARS, MAX_NODE_GPUS,
                                        MAX_NODE_INSTANCES, MAX_REQUEST_BYTES, Heartbeat)
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.httpkit.server import InternalServer

from .conftest import ADMIN_KEY, SECRET, Harness

DEEP = 100_000
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_deeply_nested_json_is_a_400_without_a_traceback(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    client = create_app(Harness(tmp_path).controller).test_client()
    nested = b'{"node_id": "n1", "tiers": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    resp = client.post("/v1/internal/nodes/register", data=nested, headers={SECRET_HEADER: SECRET},
                       content_type="application/json")
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert "nested deeper than 200 levels" in resp.get_json()["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_the_admin_key_never_falls_back_to_the_cluster_secret(tmp_path):
    without = Harness(tmp_path, admin_key=None)
    client = create_app(without.controller).test_client()
    resp = client.get("/v1/admin/status", headers={"Authorization": f"Bearer {SECRET}"})
    assert resp.status_code == 401
    assert "controller.admin_key is not set" in resp.get_json()["error"]["message"]

    with_key = create_app(Harness(tmp_path / "k").controller).test_client()
    assert with_key.get("/v1/admin/status", headers={"Authorization": f"Bearer {SECRET}"}).status_code == 401
    assert with_key.get("/v1/admin/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


# ---------------------------------------------------------------------------------------- heartbeat bodies

INSTANCE = {"instance_id": "m-0a1b2c3d", "model": "m", "state": "ready", "worker_url": "http://n1:9100"}


def _agents(tmp_path) -> tuple[Harness, object]:
    h = Harness(tmp_path)
    h.register("n1")
    h.register("n2")
    return h, h.app_client()


def _heartbeat(client, node: str, body: dict):
    return client.post(f"/v1/internal/nodes/{node}/heartbeat", json=body, headers={SECRET_HEADER: SECRET})


@pytest.mark.parametrize("field, value, param", [
    ("running_requests", 2**63, "instances.0.running_requests"),  # was an OverflowError in SQLite: a 500
    ("tokens_in_flight", 2**64, "instances.0.tokens_in_flight"),
    ("model", "", "instances.0.model"),
    ("instance_id", "reserved:1", "instances.0.instance_id"),  # would pass for a placement's reservation
    ("instance_id", "x" * 300, "instances.0.instance_id"),
    ("gpu_ids", [-1], "instances.0.gpu_ids.0"),
    ("gpu_ids", [MAX_NODE_GPUS], "instances.0.gpu_ids.0"),
    ("worker_url", "n1:9100", "instances.0.worker_url"),
    ("started_at", -1.0, "instances.0.started_at"),
    ("started_at", 1.7e12, "instances.0.started_at"),  # milliseconds, or a made-up time: stored and obeyed
    ("running_requests", "5", "instances.0.running_requests"),  # text or booleans were read as numbers
    ("running_requests", True, "instances.0.running_requests"),
    ("gpu_ids", ["1"], "instances.0.gpu_ids.0"),
    ("tensor_parallel", 2.0, "instances.0.tensor_parallel"),
    ("load_seconds", "3", "instances.0.load_seconds"),
    ("prefill_tokens_per_second", 1e200, "instances.0.prefill_tokens_per_second"),
    ("rank_nodes", [""], "instances.0.rank_nodes.0"),
    ("rank_nodes", ["n1"] * 65, "instances.0.rank_nodes"),
])
def test_a_bad_instance_in_a_heartbeat_is_a_400_naming_the_field(tmp_path, field, value, param):
    h, client = _agents(tmp_path)
    resp = _heartbeat(client, "n1", {"instances": [{**INSTANCE, field: value}]})
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["param"] == param
    assert h.registry.instances() == []  # nothing of it recorded


@pytest.mark.parametrize("field, value", [
    ("slurm_job_id", "42; scancel -u everyone"), ("slurm_job_id", "4" * 100_000), ("slurm_job_id", ""),
    ("agent_url", "http://n1:9000/" + "x" * 5000),
    ("gpus", "2"), ("gpus", True), ("job_scoped", "no"),  # text and booleans were read as numbers and booleans
    ("tiers", {"dram": {"read_gbps": "12.5"}}),
    ("tiers", {"nvme": {"read_gbps": 1e200}}), ("h2d_gbps", 1e200),  # every load there would look free
])
def test_a_registration_with_no_job_id_or_url_is_a_400_naming_it(tmp_path, field, value):
    """Both are kept in the registry and shown in every status: a job id is a Slurm job id, a URL a URL's length."""
    h = Harness(tmp_path)
    body = {"node_id": "n1", "agent_url": "http://n1:9000", field: value}
    resp = h.app_client().post("/v1/internal/nodes/register", json=body, headers={SECRET_HEADER: SECRET})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"].split(".")[0] == field
    assert h.registry.get_node("n1") is None


@pytest.mark.parametrize("body, param", [
    ({"draining": "yes"}, "draining"),  # it decides whether anything is placed there: "yes" or 1 is no answer
    ({"draining": 1}, "draining"),
    ({"cached": [{"model": "m", "tier": "dram", "bytes": 1, "verified": "true"}]}, "cached.0.verified"),
    ({"cached": [{"model": "m", "tier": "dram", "bytes": 1, "last_used": -5.0}]}, "cached.0.last_used"),
    # A copy "used" in the year 50000 would never be the least recently used one.
    ({"cached": [{"model": "m", "tier": "dram", "bytes": 1, "last_used": 1.5e12}]}, "cached.0.last_used"),
    ({"cached": [{"model": "m", "tier": "dram", "bytes": "1"}]}, "cached.0.bytes"),
    ({"instances": [INSTANCE] * (MAX_NODE_INSTANCES + 1)}, "instances"),
    # A node's tiers measured again: bounded as at registration, and a host-to-device rate only with them.
    ({"tiers": {"nvme": {"read_gbps": 1e200}}}, "tiers.nvme.read_gbps"),
    ({"tiers": {}, "h2d_gbps": "12"}, "h2d_gbps"),
    ({"h2d_gbps": 12.0}, None),
])
def test_a_bad_heartbeat_field_is_a_400_naming_it(tmp_path, body, param):
    h, client = _agents(tmp_path)
    resp = _heartbeat(client, "n1", body)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["param"] == param
    assert h.registry.get_node("n1").state == "up"


def test_an_instance_listed_twice_in_one_heartbeat_is_a_400_not_a_500(tmp_path):
    h, client = _agents(tmp_path)
    resp = _heartbeat(client, "n1", {"instances": [INSTANCE, INSTANCE]})
    assert resp.status_code == 400, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert error["param"] == "instances" and "listed twice" in error["message"]
    assert h.registry.instances() == []


@pytest.mark.parametrize("state", ["ready", "stopped"])
def test_a_heartbeat_cannot_report_or_remove_another_nodes_instance(tmp_path, state):
    h, client = _agents(tmp_path)
    assert _heartbeat(client, "n1", {"instances": [INSTANCE]}).status_code == 200
    # n2 names n1's instance: as its own (was a 500: the unique instance id) or as stopped (was a 200 that deleted
    # n1's instance from the registry).
    resp = _heartbeat(client, "n2", {"instances": [{**INSTANCE, "state": state}]})
    assert resp.status_code == 409, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert error["code"] == "instance_taken" and "'n1'" in error["message"] and "'n2'" in error["message"]
    assert [(i.instance_id, i.node_id, i.state) for i in h.registry.instances()] == [(INSTANCE["instance_id"], "n1",
                                                                                       "ready")]


def test_a_long_instance_error_is_cut_not_refused(tmp_path):
    h, client = _agents(tmp_path)
    failed = {**INSTANCE, "state": "failed", "error": "Traceback " + "x" * 100_000}
    assert _heartbeat(client, "n1", {"instances": [failed]}).status_code == 200
    [failure] = h.controller.status().failed_instances
    assert failure.error.startswith("Traceback ") and len(failure.error) == MAX_ERROR_CHARS


# ------------------------------------------------------------------------------- migration-target bodies


def _ask_target(client, body: dict):
    return client.post("/v1/internal/migration-target", json=body, headers={SECRET_HEADER: SECRET})


@pytest.mark.parametrize("field, value", [
    ("exclude_node", ""),  # excluded no node: a target could be picked on the draining node itself
    ("exclude_node", "n1\n"),
    ("instance_id", "m-1?x"),
    ("instance_id", "i" * 300),
    ("start_if_missing", "no"),  # read as False, "yes" as True: it decides whether an instance is started
    ("start_if_missing", 0),
])
def test_a_bad_migration_target_request_is_a_400_naming_the_field(tmp_path, field, value):
    h, client = _agents(tmp_path)
    h.deploy("m")
    resp = _ask_target(client, {"model": "m", "exclude_node": "n1", field: value})
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["param"] == field
    assert h.registry.instances() == [] and h.agents.started == []


# ------------------------------------------------------------------------------------ model spec: strict


@pytest.mark.parametrize("field, value", [
    ("gpus", "2"), ("gpus", True), ("tensor_parallel", "2"), ("nodes", True), ("max_model_len", "512"),
    ("size_bytes", "1000"), ("keep_alive_seconds", "60"), ("keep_alive_seconds", True), ("min_instances", False),
    ("max_instances", "3"), ("gpus", 1.0),
])
def test_a_model_spec_number_given_as_text_or_boolean_is_refused_naming_the_field(tmp_path, field, value):
    h = Harness(tmp_path)
    body = {"name": "m", "source": str(h.source("m")), "size_bytes": 1000, field: value}
    resp = h.app_client().post("/v1/admin/models", json=body, headers=ADMIN)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: Input should be a valid")
    assert h.registry.models() == []


@pytest.mark.parametrize("field, value, param", [
    ("name", 7, "name"), ("engine", 1, "engine"),
    ("cache_on_load", ["dram"] * 1000, "cache_on_load"), ("slurm", {"partition": "p" * 300}, "slurm.partition"),
])
def test_a_model_spec_with_an_unbounded_or_mistyped_value_is_refused_naming_it(tmp_path, field, value, param):
    h = Harness(tmp_path)
    body = {"name": "m", "source": str(h.source("m")), "size_bytes": 1000, field: value}
    resp = h.app_client().post("/v1/admin/models", json=body, headers=ADMIN)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == param, resp.get_data(as_text=True)
    assert h.registry.models() == []


def test_a_model_file_with_a_quoted_number_is_refused_and_real_numbers_still_load(tmp_path):
    source = tmp_path / "src"
    (tmp_path / "bad.toml").write_text(f'name = "m"\nsource = "{source}"\ngpus = "2"\n')
    with pytest.raises(InvalidModelConfig, match="gpus: Input should be a valid integer"):
        read_model_file(tmp_path / "bad.toml")
    (tmp_path / "good.toml").write_text(f'name = "m"\nsource = "{source}"\ngpus = 2\ntensor_parallel = 2\n'
                                        f'keep_alive_seconds = 900\nmax_instances = 3\n')
    spec = read_model_file(tmp_path / "good.toml")  # TOML's integers, also for a float field
    assert (spec.gpus, spec.tensor_parallel, spec.keep_alive_seconds, spec.max_instances) == (2, 2, 900.0, 3)


def test_a_vllm_model_over_several_ranks_is_refused_at_deploy(tmp_path):
    """The agents run vLLM as one process per instance: such a model deployed would fail every start."""
    h = Harness(tmp_path)
    body = {"name": "m", "source": str(h.source("m")), "size_bytes": 1000, "engine": "vllm", "tensor_parallel": 2}
    resp = h.app_client().post("/v1/admin/models", json=body, headers=ADMIN)
    assert resp.status_code == 400 and "runs on hpcllm's engine only" in resp.get_json()["error"]["message"]
    assert h.registry.models() == []


# -------------------------------------------------------------------------------------- request body size


def _largest_heartbeat() -> dict:
    """A heartbeat at every bound of the wire types (protocol.MAX_*), with long but real names: node names of 64
    characters, 128-character model names, instance ids MODEL-8 hex digits."""
    model = "m" * 128
    cached = [{"model": f"{i:05d}" + "c" * 123, "tier": tier, "bytes": INT64_MAX, "verified": True,
               "last_used": 1.7e9 + 0.123456}
              for i in range(MAX_CACHE_ENTRIES // 2) for tier in ("dram", "nvme")]
    instances = [{"instance_id": f"{model}-{i:08x}", "model": model, "state": "failed",
                  "worker_url": f"http://{'n' * 64}.cluster.example.org:{40000 + i}", "gpu_ids": [i],
                  "running_requests": 10**6, "started_at": 1.7e9 + 0.123456, "load_tier": "sharedfs",
                  "load_seconds": 123.456789, "tokens_in_flight": 10**9, "prefill_tokens_per_second": 12345.6789,
                  "error": "e" * MAX_ERROR_CHARS, "tensor_parallel": 64, "rank_nodes": [f"{r:02d}" + "n" * 62
                                                                                          for r in range(64)],
                  "rank_tiers": ["sharedfs"] * 64}
                 for i in range(MAX_NODE_INSTANCES)]
    return {"cached": cached, "instances": instances, "draining": False}


def test_the_largest_legitimate_heartbeat_fits_the_body_limit(tmp_path):
    body = json.dumps(_largest_heartbeat()).encode()  # about 10 MB
    assert len(body) < MAX_REQUEST_BYTES <= 2 * len(body)  # fitted to it: not the 64 MiB every body was allowed
    Heartbeat.model_validate_json(body)  # valid: the limit is what it is for


def test_a_body_over_the_limit_is_a_413_in_the_error_shape(tmp_path):
    client = Harness(tmp_path).app_client()
    body = b'{"node_id": "n1", "agent_url": "http://n1:9000", "slurm_job_id": "' + b"1" * MAX_REQUEST_BYTES + b'"}'
    resp = client.post("/v1/internal/nodes/register", data=body, headers={SECRET_HEADER: SECRET},
                       content_type="application/json")
    assert resp.status_code == 413, resp.get_data(as_text=True)[:300]
    error = resp.get_json()["error"]
    assert error["code"] == "request_too_large" and str(MAX_REQUEST_BYTES) in error["message"]


def test_a_chunked_body_over_the_limit_is_a_413_not_a_json_error(tmp_path):
    app = Harness(tmp_path).app_client().application
    environ = EnvironBuilder(path="/v1/internal/nodes/register", method="POST",
                             headers={SECRET_HEADER: SECRET, "Transfer-Encoding": "chunked"},
                             content_type="application/json",
                             input_stream=io.BytesIO(b"{" + b" " * MAX_REQUEST_BYTES + b"}")).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input_terminated"] = True  # what a server that reads chunked bodies says (werkzeug's rule)
    answer, status, _ = run_wsgi_app(app, environ)
    assert status.startswith("413"), status
    assert json.loads(b"".join(answer))["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_controllers_server_answers_an_over_limit_body_with_the_413(tmp_path, chunked):
    """Over hpcllm.httpkit.server (what `hpcllm controller` runs): it reads bodies up to internal_http's 64 MiB,
    the controller's own limit answers in the error shape."""
    h = Harness(tmp_path)
    server = InternalServer(create_app(h.controller), "127.0.0.1", 0, http=h.config.internal_http, threads=2,
                            name="controller")
    server.start()
    body = b"{" + b" " * (MAX_REQUEST_BYTES + 1) + b"}"
    content = (body[i:i + 2**20] for i in range(0, len(body), 2**20)) if chunked else body
    try:
        resp = httpx.post(f"http://127.0.0.1:{server.port}/v1/internal/nodes/register", content=content,
                          headers={SECRET_HEADER: SECRET, "Content-Type": "application/json"}, timeout=60)
    finally:
        server.stop()
    assert resp.status_code == 413, resp.text[:300]
    assert resp.json()["error"]["code"] == "request_too_large"


# ------------------------------------------------------------------------------------ paths and methods


def test_undeploy_without_a_name_says_so_in_the_error_shape(tmp_path):
    resp = Harness(tmp_path).app_client().delete("/v1/admin/models/", headers=ADMIN)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert error["param"] == "name" and "no model name" in error["message"]


@pytest.mark.parametrize("method, path, status, words", [
    ("get", "/v1/admin/nothing", 404, "no such endpoint: GET /v1/admin/nothing"),
    ("delete", "/v1/admin/models/a/b", 404, "no such endpoint: DELETE /v1/admin/models/a/b"),
    ("put", "/v1/admin/models", 405, "PUT is not allowed on /v1/admin/models (allowed: OPTIONS, POST)"),
])
def test_unknown_paths_and_methods_are_named_in_the_error_shape(tmp_path, method, path, status, words):
    resp = getattr(Harness(tmp_path).app_client(), method)(path, headers=ADMIN)
    assert resp.status_code == status
    assert words in resp.get_json()["error"]["message"]


@pytest.mark.parametrize("args, words", [
    (["undeploy", ""], "'' is not a model name"),
    (["undeploy", "tiny?x"], "'tiny?x' is not a model name"),  # was DELETE .../models/tiny?x: undeployed tiny
    (["undeploy", "a/b"], "'a/b' is not a model name"),
    (["pool", "token", "revoke", ""], "give the id of the token to revoke"),
])
def test_the_cli_refuses_a_name_that_is_no_name_before_calling(capsys, args, words):
    # The URL points nowhere: the name must be refused first.
    assert main([*args, "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_the_slurm_refusal_hints_name_exactly_the_keys_a_model_may_override():
    # A refused submission's hint tells the admin which model-level key to change (hpcllm.slurm.errors); the keys
    # it may name are the model's [slurm] table's own.
    from hpcllm.controller.protocol import SlurmOverrides
    from hpcllm.slurm.errors import MODEL_OVERRIDES

    assert set(MODEL_OVERRIDES) == set(SlurmOverrides.model_fields)
