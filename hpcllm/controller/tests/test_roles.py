"""Credentials by role on the controller (docs/security.md): allocation tokens, pool tokens, group routing.

Through the HTTP API (Flask test client) as a node agent, a group and the gateway would call it; Slurm and the node
agents are the in-memory doubles of conftest.Harness.
"""

from __future__ import annotations

import sqlite3

import pytest

from hpcllm.controller.protocol import InstanceInfo
from hpcllm.controller.tests.conftest import ADMIN_KEY, SECRET
from hpcllm.credentials import TOKEN_ENV, TOKEN_HEADER, check_ticket, node_key, parse_token
from hpcllm.slurm.templates import render_batch_script

INTERNAL = {"X-Hpcllm-Secret": SECRET}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def registration(node: str, job: str | None = None, pool_model: str | None = None) -> dict:
    return {"node_id": node, "agent_url": f"http://{node}:9000", "slurm_job_id": job, "pool_model": pool_model}


def heartbeat(client, node: str, headers: dict, *instances: InstanceInfo, draining: bool = False):
    return client.post(f"/v1/internal/nodes/{node}/heartbeat", headers=headers,
                       json={"instances": [i.model_dump() for i in instances], "draining": draining})


def ready(instance_id: str, model: str, node: str) -> InstanceInfo:
    return InstanceInfo(instance_id=instance_id, model=model, state="ready",
                        worker_url=f"http://{node}:9000/workers/{instance_id}")


def submitted_allocation(h) -> tuple[str, str]:
    """Ask for a model nobody serves: the controller submits an allocation. (job id, the job's token)."""
    outcome = h.controller.route_once("m")
    assert outcome.status == "allocating", outcome
    [spec] = h.backend.submitted()
    return outcome.job_id, spec.env[TOKEN_ENV]


# --------------------------------------------------------------------------------------- allocation tokens


def test_each_allocation_gets_its_own_token_in_its_environment_only(harness):
    harness.deploy("m", gpus=1)
    job_id, token = submitted_allocation(harness)
    [spec] = harness.backend.submitted()
    credential_id, secret = parse_token(token)
    # Never in the batch script (sbatch reads it from stdin; Slurm keeps it) nor on a command line.
    assert token not in render_batch_script(spec) and secret not in render_batch_script(spec)
    # The registry keeps only a hash, bound to the job.
    [record] = harness.registry.credentials()
    assert (record.credential_id, record.kind, record.job_id) == (credential_id, "allocation", job_id)
    with sqlite3.connect(harness.config.controller.database_url.removeprefix("sqlite:///")) as raw:
        assert secret not in repr(raw.execute("SELECT * FROM credentials").fetchall())
    # A second allocation gets another token.
    harness.deploy("m2", gpus=1)
    harness.controller.route_once("m2")
    assert harness.backend.submitted()[1].env[TOKEN_ENV] != token


def test_an_allocation_token_registers_its_own_node_only_and_dies_with_its_job(harness):
    harness.deploy("m", gpus=1)
    job_id, token = submitted_allocation(harness)
    client = harness.app_client()
    with_token = {TOKEN_HEADER: token}
    # Slurm cannot say where the job runs yet (still pending in its view, or not answering): retry, not refused.
    resp = client.post("/v1/internal/nodes/register", headers=with_token, json=registration("n2", job_id))
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "job_not_located"
    harness.backend.start(job_id, "n2", harness.clock.now)

    # From another node, or claiming another job: refused.
    resp = client.post("/v1/internal/nodes/register", headers=with_token, json=registration("n1", job_id))
    assert resp.status_code == 403 and f"nodes of job {job_id} (n2), not on n1" in resp.get_json()["error"]["message"]
    resp = client.post("/v1/internal/nodes/register", headers=with_token, json=registration("n2", "999"))
    assert resp.status_code == 403 and "not to job 999" in resp.get_json()["error"]["message"]
    # Nor can it make a model pool.
    resp = client.post("/v1/internal/nodes/register", headers=with_token, json=registration("n2", job_id, "m"))
    assert resp.status_code == 403

    resp = client.post("/v1/internal/nodes/register", headers=with_token, json=registration("n2", job_id))
    assert resp.status_code == 200, resp.get_json()
    key = resp.get_json()["node_key"]
    assert key == node_key(SECRET, parse_token(token)[0], "n2") and key != SECRET
    assert heartbeat(client, "n2", with_token).status_code == 200
    # The controller calls that agent with its node key, not the cluster secret.
    assert harness.agents._keys["http://n2:9000"] == key

    # It speaks for n2 only: not for a node another credential registered.
    assert client.post("/v1/internal/nodes/register", headers=INTERNAL, json=registration("n3")).status_code == 200
    resp = heartbeat(client, "n3", with_token, ready("fake", "m", "n3"))
    assert resp.status_code == 403 and "n3 was not registered with this token" in resp.get_json()["error"]["message"]
    # And never for the gateway's route API.
    assert client.get("/v1/internal/route?model=m", headers=with_token).status_code == 403

    # The job ends: the token is revoked at the next poll.
    harness.backend.finish(job_id)
    harness.tick(1, heartbeats=False)
    resp = heartbeat(client, "n2", with_token)
    assert resp.status_code == 401 and "revoked (its Slurm job ended)" in resp.get_json()["error"]["message"]
    resp = client.post("/v1/internal/nodes/register", headers=with_token, json=registration("n2", job_id))
    assert resp.status_code == 401


def test_a_forged_or_unknown_token_is_refused(harness):
    client = harness.app_client()
    for token in ("hpcllm_pool-000000000000_guess", "not-a-token"):
        resp = client.post("/v1/internal/nodes/register", headers={TOKEN_HEADER: token}, json=registration("n1"))
        assert resp.status_code == 401, token
    harness.deploy("m", gpus=1)
    _, token = submitted_allocation(harness)
    credential_id, _ = parse_token(token)
    resp = client.post("/v1/internal/nodes/register", headers={TOKEN_HEADER: f"hpcllm_{credential_id}_wrong"},
                       json=registration("n1"))
    assert resp.status_code == 401


# --------------------------------------------------------------------------------------------- pool tokens


def issue(client, model: str, group: str, shared: bool = False) -> str:
    resp = client.post("/v1/admin/pool-tokens", headers=ADMIN, json={"model": model, "group": group,
                                                                      "shared": shared})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["token"]


def test_pool_tokens_are_issued_by_admins_for_a_deployed_model(harness):
    client = harness.app_client()
    harness.deploy("m", gpus=1)
    resp = client.post("/v1/admin/pool-tokens", headers=INTERNAL, json={"model": "m", "group": "physics"})
    assert resp.status_code == 401  # the cluster secret is not the admin key
    resp = client.post("/v1/admin/pool-tokens", headers=ADMIN, json={"model": "nope", "group": "physics"})
    assert resp.status_code == 404 and "deploy it before" in resp.get_json()["error"]["message"]
    for loose in ("yes", 1):  # `shared` decides whose requests the pool serves: only true or false
        resp = client.post("/v1/admin/pool-tokens", headers=ADMIN, json={"model": "m", "group": "physics",
                                                                          "shared": loose})
        assert resp.status_code in (400, 422) and resp.get_json()["error"]["param"] == "shared"
    token = issue(client, "m", "physics")
    [listed] = client.get("/v1/admin/credentials", headers=ADMIN).get_json()["credentials"]
    assert (listed["kind"], listed["model"], listed["group"], listed["shared"]) == ("pool", "m", "physics", False)
    assert "token" not in listed and token not in str(listed)


def test_a_pool_token_cannot_register_or_announce_another_model(harness):
    harness.deploy("m", gpus=1)
    harness.deploy("other", gpus=1)
    client = harness.app_client()
    harness.backend.run_job("77", "n1")  # the group's pool job
    pool = {TOKEN_HEADER: issue(client, "m", "physics")}

    for wrong in (registration("n1", "77", "other"), registration("n1", "77")):  # another model, or no pool
        resp = client.post("/v1/internal/nodes/register", headers=pool, json=wrong)
        assert resp.status_code == 403 and "pools of model 'm' only" in resp.get_json()["error"]["message"]
    resp = client.post("/v1/internal/nodes/register", headers=pool, json=registration("n1", "77", "m"))
    assert resp.status_code == 200 and resp.get_json()["node_key"]

    # Announcing a ready instance of another model (routing would then send that model's prompts there): refused,
    # and nothing of it is recorded.
    resp = heartbeat(client, "n1", pool, ready("evil", "other", "n1"))
    assert resp.status_code == 403 and "not other" in resp.get_json()["error"]["message"]
    assert harness.registry.instances(model="other") == []
    assert heartbeat(client, "n1", pool, ready("p1", "m", "n1")).status_code == 200
    # Nor may it ask where another model's requests could go.
    resp = client.post("/v1/internal/migration-target", headers=pool,
                       json={"model": "other", "exclude_node": "n1"})
    assert resp.status_code == 403


def test_a_pool_token_lists_its_own_model_only(harness):
    """A group's pool agent reads the model list for its pinned model's card; the other models' cards (their
    checkpoint folders, LoRA adapter folders) are none of the group's business (docs/security.md)."""
    harness.deploy("m", gpus=1)
    harness.deploy("other", gpus=1)
    client = harness.app_client()
    pool = {TOKEN_HEADER: issue(client, "m", "physics")}
    resp = client.get("/v1/internal/models", headers=pool)
    assert resp.status_code == 200 and [c["name"] for c in resp.get_json()["models"]] == ["m"]
    listed = client.get("/v1/internal/models", headers=INTERNAL).get_json()["models"]
    assert sorted(c["name"] for c in listed) == ["m", "other"]


def test_a_pool_cannot_claim_the_services_job_nor_another_nodes_agent(harness):
    """A pool registering with one of the service's allocation job ids rewrote that allocation's record (state,
    nodes); one naming a live node's agent URL had the controller call that agent with the pool's key (by URL)."""
    harness.deploy("m", gpus=1, max_instances=1)
    client = harness.app_client()
    harness.backend.run_job("77", "p1")
    job_id, _ = submitted_allocation(harness)
    before = harness.registry.get_allocation(job_id)
    pool = {TOKEN_HEADER: issue(client, "m", "physics")}
    resp = client.post("/v1/internal/nodes/register", headers=pool, json=registration("px", job_id, "m"))
    assert resp.status_code == 403 and "one of the service's allocations" in resp.get_json()["error"]["message"]
    assert harness.registry.get_allocation(job_id) == before

    assert client.post("/v1/internal/nodes/register", headers=INTERNAL, json=registration("svc1")).status_code == 200
    heartbeat(client, "svc1", INTERNAL)
    borrowed = {**registration("p1", "77", "m"), "agent_url": "http://svc1:9000"}
    resp = client.post("/v1/internal/nodes/register", headers=pool, json=borrowed)
    assert resp.status_code == 409 and "agent of live node svc1" in resp.get_json()["error"]["message"]
    assert "http://svc1:9000" not in harness.agents._keys  # svc1's agent is still called with the cluster secret


def test_a_pool_registers_only_a_node_its_own_slurm_job_runs_on(harness):
    """A pool token could name any node: the service's next allocation on that node was then refused while the
    pool heartbeated. Slurm says where the pool's job runs (503 to retry while it cannot say)."""
    harness.deploy("m", gpus=1, max_instances=1)
    client = harness.app_client()
    pool = {TOKEN_HEADER: issue(client, "m", "physics")}
    harness.backend.run_job("77", "n1")
    resp = client.post("/v1/internal/nodes/register", headers=pool, json=registration("n2", "77", "m"))
    assert resp.status_code == 403 and "Slurm job 77 runs on n1, not on n2" in resp.get_json()["error"]["message"]
    resp = client.post("/v1/internal/nodes/register", headers=pool, json=registration("n2", None, "m"))
    assert resp.status_code == 403 and "names no slurm_job_id" in resp.get_json()["error"]["message"]
    harness.backend.down = True
    resp = client.post("/v1/internal/nodes/register", headers=pool, json=registration("n1", "77", "m"))
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "job_not_located"
    harness.backend.down = False
    assert client.post("/v1/internal/nodes/register", headers=pool,
                       json=registration("n1", "77", "m")).status_code == 200
    assert harness.registry.get_node("n2") is None


def test_a_groups_pool_serves_only_that_groups_keys(harness):
    harness.deploy("m", gpus=1, max_instances=1)
    client = harness.app_client()
    harness.backend.run_job("77", "n1")
    pool = {TOKEN_HEADER: issue(client, "m", "physics")}
    client.post("/v1/internal/nodes/register", headers=pool, json=registration("n1", "77", "m"))
    heartbeat(client, "n1", pool, ready("p1", "m", "n1"))
    pool_key = harness.agents._keys["http://n1:9000"]

    physics = client.get("/v1/internal/route?model=m&group=physics", headers=INTERNAL)
    assert physics.status_code == 200 and physics.get_json()["instance_id"] == "p1"
    assert physics.get_json()["worker_key"] == pool_key  # the gateway calls the pool's worker with its node key
    # Another group's requests (and keys without a group) never go there; the pool does not count against
    # max_instances for them, so the controller starts an instance of its own (here: submits an allocation).
    for query in ("group=chemistry", ""):
        other = client.get(f"/v1/internal/route?model=m&{query}", headers=INTERNAL)
        assert other.status_code == 202 and other.get_json()["status"] == "allocating", other.get_json()

    # A draining service node's requests (anyone's) never migrate into the group's pool.
    client.post("/v1/internal/nodes/register", headers=INTERNAL, json=registration("n2"))
    heartbeat(client, "n2", INTERNAL, ready("s1", "m", "n2"))
    resp = client.post("/v1/internal/migration-target", headers=INTERNAL,
                       json={"model": "m", "exclude_node": "n2", "start_if_missing": False})
    assert resp.status_code == 404, resp.get_json()
    # The pool's own requests may go to the service's instance, with a ticket its worker accepts - while the pool
    # drains: a ticket's grant opens the service's worker, so a live pool gets none.
    ask = {"model": "m", "exclude_node": "n1", "instance_id": "p1", "start_if_missing": False}
    resp = client.post("/v1/internal/migration-target", headers=pool, json=ask)
    assert resp.status_code == 403 and "not draining" in resp.get_json()["error"]["message"]
    heartbeat(client, "n1", pool, ready("p1", "m", "n1"), draining=True)
    resp = client.post("/v1/internal/migration-target", headers=pool, json=ask)
    assert resp.status_code == 200 and resp.get_json()["instance_id"] == "s1"
    target = resp.get_json()
    from hpcllm.credentials import MigrationTicket

    ticket = MigrationTicket.model_validate(target["ticket"])
    check_ticket(ticket, key=pool_key, model="m", destination_url=target["worker_url"])
    assert ticket.source_instance == "p1"


def test_a_draining_pools_ticket_covers_one_of_its_instances_and_its_requests_only(harness):
    """A draining pool got a ticket (whose grant opens the service's worker) naming any instance, or none: its grant
    prepared requests there without end. Now it names one of its node's instances of the model, and the ticket
    covers that instance's requests (heartbeat count, routes since, one batch more); it holds a few at a time."""
    from hpcllm.credentials import MigrationTicket, check_grant

    harness.deploy("m", gpus=1, max_instances=1)
    client = harness.app_client()
    harness.backend.run_job("77", "n1")
    pool = {TOKEN_HEADER: issue(client, "m", "physics", shared=True)}
    client.post("/v1/internal/nodes/register", headers=pool, json=registration("n1", "77", "m"))
    client.post("/v1/internal/nodes/register", headers=INTERNAL, json=registration("n2"))
    heartbeat(client, "n2", INTERNAL, ready("s1", "m", "n2"))
    busy = ready("p1", "m", "n1").model_copy(update={"running_requests": 5})
    heartbeat(client, "n1", pool, busy, draining=True)

    for instance in ({}, {"instance_id": "s1"}, {"instance_id": "nope"}):  # none, another node's, unknown
        resp = client.post("/v1/internal/migration-target", headers=pool,
                           json={"model": "m", "exclude_node": "n1", "start_if_missing": False, **instance})
        assert resp.status_code == 403, instance
        assert "is not one on n1" in resp.get_json()["error"]["message"]
    resp = client.post("/v1/internal/migration-target", headers=pool,
                       json={"model": "m", "exclude_node": "n1", "instance_id": "p1", "start_if_missing": False})
    ticket = MigrationTicket.model_validate(resp.get_json()["ticket"])
    batch = harness.config.worker.max_running_requests
    assert (ticket.source_instance, ticket.max_requests) == ("p1", 5 + batch)
    destination_key = harness.config.cluster.shared_secret  # s1 runs on an operator-run node
    assert check_grant(ticket.grant, key=destination_key).max_requests == 5 + batch

    # Nor does asking again and again give it grants without end: a few live tickets per instance (a retry or two).
    from hpcllm.controller.service import MAX_LIVE_TICKETS

    ask = {"model": "m", "exclude_node": "n1", "instance_id": "p1", "start_if_missing": False}
    for _ in range(MAX_LIVE_TICKETS - 1):
        assert client.post("/v1/internal/migration-target", headers=pool, json=ask).status_code == 200
    resp = client.post("/v1/internal/migration-target", headers=pool, json=ask)
    assert resp.status_code == 429 and resp.get_json()["error"]["code"] == "too_many_migration_tickets"
    assert "p1 already holds 4 live migration tickets" in resp.get_json()["error"]["message"]


def test_a_shared_pool_serves_everyone_and_a_revoked_one_nobody(harness):
    harness.deploy("m", gpus=1, max_instances=1)
    client = harness.app_client()
    harness.backend.run_job("77", "n1")
    token = issue(client, "m", "physics", shared=True)
    pool = {TOKEN_HEADER: token}
    client.post("/v1/internal/nodes/register", headers=pool, json=registration("n1", "77", "m"))
    heartbeat(client, "n1", pool, ready("p1", "m", "n1"))
    resp = client.get("/v1/internal/route?model=m&group=chemistry", headers=INTERNAL)
    assert resp.status_code == 200 and resp.get_json()["instance_id"] == "p1"

    credential_id, _ = parse_token(token)
    assert client.delete(f"/v1/admin/credentials/{credential_id}", headers=ADMIN).status_code == 200
    # At once: no more routes there (not only once its heartbeats have been missed for node_timeout_seconds).
    assert harness.registry.get_node("n1").state == "lost" and harness.registry.instances(model="m") == []
    assert heartbeat(client, "n1", pool, ready("p1", "m", "n1")).status_code == 401
    assert client.delete("/v1/admin/credentials/nope", headers=ADMIN).status_code == 404


@pytest.mark.parametrize("path", ["/v1/internal/route?model=m", "/v1/internal/nodes/register"])
def test_internal_calls_without_a_credential_are_refused(harness, path):
    client = harness.app_client()
    resp = client.get(path) if "route" in path else client.post(path, json=registration("n1"))
    assert resp.status_code == 401


def test_a_token_cannot_take_over_a_live_node_of_another_credential(harness):
    """Claiming the node's own job id does not help: the live agent registered with another credential."""
    harness.deploy("m", gpus=1)
    client = harness.app_client()
    harness.backend.run_job("42", "n1")
    assert client.post("/v1/internal/nodes/register", headers=INTERNAL, json=registration("n1", "42")).status_code \
        == 200
    pool = {TOKEN_HEADER: issue(client, "m", "physics")}
    resp = client.post("/v1/internal/nodes/register", headers=pool, json=registration("n1", "42", "m"))
    assert resp.status_code == 409 and "another credential" in resp.get_json()["error"]["message"]
    assert harness.registry.get_node("n1").credential_id == "cluster"
    harness.clock.advance(harness.config.controller.node_timeout_seconds + 1)  # that agent went silent
    resp = client.post("/v1/internal/nodes/register", headers=pool, json=registration("n1", "42", "m"))
    assert resp.status_code == 200
