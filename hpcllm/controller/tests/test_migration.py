"""Live migration on the controller's side: the migration-target API (where a draining node's requests go) and
placement's "move victims" path (migrate the victim's requests to another instance, then stop it; plain stop when
there is no target), with what happened logged and counted in hpcllm_controller_migrations_total."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hpcllm.controller.agents import AgentClient
from hpcllm.controller.cli import print_status
from hpcllm.controller.errors import AgentError
from hpcllm.controller.tests.doubles import FakeAgents
from hpcllm.controller.tests.conftest import ADMIN_KEY
from hpcllm.credentials import MigrationTicket, check_ticket
from hpcllm.node.protocol import MigratedOut
from hpcllm.worker.protocol import MigrationResult

INTERNAL = {"X-Hpcllm-Secret": "test-secret"}


class MigratingAgents(FakeAgents):
    """FakeAgents plus the node agent's migrate-out: records the call, answers like the agent, stops the instance.
    `moving` sets how many running requests each migrate-out reports as moved; `fail_migration` makes it fail."""

    def __init__(self):
        super().__init__()
        self.migrations: list[tuple[str, str, str]] = []  # (agent_url, instance_id, destination_url)
        self.moving = 2
        self.fail_migration: str | None = None

    def migrate_out(self, agent_url, instance_id, destination_url, timeout, ticket=None):
        agent = self._agent(agent_url)
        self.migrations.append((agent_url, instance_id, destination_url))
        if self.fail_migration:
            raise AgentError(f"node agent {agent_url}: {self.fail_migration}")
        model = agent.remove(instance_id).model
        migrated = [MigrationResult(request_id=f"r{i}", destination_url=destination_url, destination_request_id=f"r{i}",
                                    rounds=2, tokens_per_round=[9, 1], handover_seconds=0.01, total_seconds=0.1,
                                    output_tokens_at_handover=5) for i in range(self.moving)]
        return MigratedOut(instance_id=instance_id, model=model, destination_url=destination_url, migrated=migrated)


def use_migrating_agents(h) -> MigratingAgents:
    h.agents = h.controller.agents = MigratingAgents()
    return h.agents


def ready_instance(h, node: str, model: str, running: int = 0, **reported) -> str:
    """Start one instance of model on node (placement must choose node), report it ready with `running` requests
    (and other InstanceInfo fields the worker reports, such as tokens_in_flight)."""
    url = f"http://{node}:9000"
    h.controller.start_instance(h.registry.get_model(model))
    instance_id = next(i for i, info in h.agents.agents[url].instances.items() if info.state == "loading")
    h.heartbeat(node, tier="sharedfs")
    info = h.agents.agents[url].instances[instance_id]
    h.agents.agents[url].instances[instance_id] = info.model_copy(update={"running_requests": running, **reported})
    h.heartbeat(node)
    return instance_id


def metric(client, name: str, **labels) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def target(client, body: dict):
    return client.post("/v1/internal/migration-target", json=body, headers=INTERNAL)


# ------------------------------------------------------------------------------------- migration-target API


def test_target_is_the_least_loaded_ready_instance_on_another_node(make_harness):
    h = make_harness(cpu_slots_per_node=1)
    use_migrating_agents(h)
    h.deploy("m", max_instances=3)
    for node in ("n1", "n2", "n3"):
        h.register(node, gpus=0)
    h.backend.down = True  # placement may only use the registered nodes, one instance each
    on = {node: ready_instance(h, node, "m", running=r) for node, r in (("n1", 1), ("n2", 3), ("n3", 1))}
    client = h.app_client()

    resp = target(client, {"model": "m", "exclude_node": "n1"})
    assert resp.status_code == 200, resp.get_json()
    answer = resp.get_json()
    ticket = MigrationTicket.model_validate(answer.pop("ticket"))
    assert answer == {"worker_url": f"http://n3:9000/workers/{on['n3']}", "instance_id": on["n3"], "node_id": "n3"}
    # The ticket names the destination, signed with the key n1's workers hold (here the cluster secret).
    assert (ticket.destination_url, ticket.destination_instance, ticket.model) == (answer["worker_url"], on["n3"], "m")
    check_ticket(ticket, key=h.config.cluster.shared_secret, model="m", destination_url=answer["worker_url"])
    # Each pick counts as load until the next heartbeat: n3 (1+1) against n2 (3) -> n3 again; then n3 (1+2) against
    # n2 (3): equal load, the smaller instance id wins (deterministic).
    second = target(client, {"model": "m", "exclude_node": "n1"}).get_json()["instance_id"]
    third = target(client, {"model": "m", "exclude_node": "n1"}).get_json()["instance_id"]
    assert second == on["n3"]
    assert third == min(on["n2"], on["n3"])
    assert metric(client, "hpcllm_controller_migration_targets_total", model_name="m", outcome="ready") == 3
    # The status history (status page, `hpcllm status`) shows each named target, newest first.
    history = client.get("/v1/admin/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).get_json()["migrations"]
    assert [(m["trigger"], m["node_id"], m["outcome"], m["target_instance"]) for m in history] == [
        ("node_drain", "n1", "target_assigned", third), ("node_drain", "n1", "target_assigned", second),
        ("node_drain", "n1", "target_assigned", on["n3"])]


def test_draining_instances_and_the_leaving_node_are_never_targets(make_harness):
    h = make_harness(cpu_slots_per_node=1, allocate_on_demand=False)
    use_migrating_agents(h)
    h.deploy("m", max_instances=2)
    h.register("n1", gpus=0)
    h.register("n2", gpus=0)
    ready_instance(h, "n1", "m")
    on_n2 = ready_instance(h, "n2", "m")
    h.registry.set_instance_state(on_n2, "draining")  # n2 is leaving too (retirement, its own drain)
    client = h.app_client()

    resp = target(client, {"model": "m", "exclude_node": "n1", "start_if_missing": False})
    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "no_migration_target"
    assert "no ready instance of 'm' on another node" in resp.get_json()["error"]["message"]
    assert metric(client, "hpcllm_controller_migration_targets_total", model_name="m", outcome="none") == 1


def test_no_ready_target_starts_one_elsewhere_and_answers_202_until_it_is_ready(make_harness):
    h = make_harness(cpu_slots_per_node=2)
    use_migrating_agents(h)
    h.deploy("m", max_instances=2)
    h.register("n1", gpus=0, cached=(("m", "dram"),))
    h.register("n2", gpus=0)
    leaving = ready_instance(h, "n1", "m", running=2)  # n1 has a free slot and the checkpoint in DRAM...
    h.registry.set_instance_state(leaving, "draining")
    client = h.app_client()

    resp = target(client, {"model": "m", "exclude_node": "n1"})
    assert resp.status_code == 202 and resp.get_json()["status"] == "starting"
    assert int(resp.headers["Retry-After"]) >= 1
    assert [(url, model) for url, model, _ in h.agents.started][-1] == ("http://n2:9000", "m")  # ...but not now
    again = target(client, {"model": "m", "exclude_node": "n1"})
    assert again.status_code == 202 and again.get_json()["instance_id"] == resp.get_json()["instance_id"]

    h.heartbeat("n2", tier="dram")
    done = target(client, {"model": "m", "exclude_node": "n1"})
    assert done.status_code == 200 and done.get_json()["node_id"] == "n2"


def test_a_draining_agent_takes_its_node_out_of_placement_until_it_registers_again(make_harness):
    from hpcllm.controller.protocol import Heartbeat

    h = make_harness(allocate_on_demand=False)
    use_migrating_agents(h)
    h.deploy("m")
    h.register("n1", gpus=0, cached=(("m", "dram"),))  # the better node while it is up
    h.register("n2", gpus=0)
    h.controller.heartbeat("n1", Heartbeat(draining=True))
    assert h.registry.get_node("n1").state == "draining"

    assert h.controller.route("m").node_id == "n2"

    h.register("n1", gpus=0, cached=(("m", "dram"),))  # the requeued job's agent is back
    assert h.registry.get_node("n1").state == "up"


def test_target_requests_are_validated(harness):
    client = harness.app_client()
    harness.deploy("m")
    assert client.post("/v1/internal/migration-target", json={"model": "m"}).status_code == 401
    resp = target(client, {"model": "bad name!"})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "model"
    resp = target(client, {"model": "m", "exclude": "n1"})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "exclude"
    resp = target(client, {"model": "nope"})
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "model_not_found"


# ------------------------------------------------------------------------------ placement moving victims


def full_cluster(make_harness, n1: dict | None = None, n2: dict | None = None):
    """n1 and n2 (one CPU slot each) run one busy instance of `a` each (with what their workers report: n1, n2);
    `b` can only start by moving one."""
    h = make_harness(cpu_slots_per_node=1)
    agents = use_migrating_agents(h)
    h.deploy("a", max_instances=2)
    h.deploy("b")
    h.register("n1", gpus=0)
    h.register("n2", gpus=0)
    h.backend.down = True  # no allocation possible: moving an instance is the only way
    a1 = ready_instance(h, "n1", "a", running=2, **(n1 or {}))
    a2 = ready_instance(h, "n2", "a", running=2, **(n2 or {}))
    return h, agents, a1, a2


def test_placement_live_migrates_a_busy_victim_before_starting_in_its_place(make_harness, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    h, agents, a1, a2 = full_cluster(make_harness)
    client = h.app_client()

    outcome = h.controller.route("b")

    assert outcome.status == "starting" and outcome.node_id == "n1"  # equal move costs: the first node by name
    assert agents.migrations == [("http://n1:9000", a1, f"http://n2:9000/workers/{a2}")]
    assert agents.stopped == []  # migrate-out stopped it: no second, plain stop
    assert agents.started[-1][:2] == ("http://n1:9000", "b")  # started only once the victim was gone
    assert metric(client, "hpcllm_controller_migrations_total", model_name="a", trigger="placement",
                  outcome="migrated") == 1
    assert metric(client, "hpcllm_controller_migrated_requests_total", model_name="a", trigger="placement") == 2
    [event] = h.controller.status().migrations
    assert (event.model, event.instance_id, event.node_id, event.trigger, event.outcome, event.target_instance,
            event.moved) == ("a", a1, "n1", "placement", "migrated", a2, 2)
    print_status(h.controller.status())  # `hpcllm status` lists it
    [line] = [line for line in capsys.readouterr().out.splitlines() if "placement" in line and "migrated" in line]
    assert a1 in line and a2 in line
    # The moved requests count on the target until its agent's next heartbeat.
    assert h.registry.get_instance(a2).load == 2 + 1


def test_the_reported_tokens_in_flight_decide_which_busy_instance_moves(make_harness):
    # n1's instance holds 30,000 tokens to re-prefill at 1,000 tokens/s (30 s), n2's 300 (0.3 s): n2 is cheaper,
    # although n1 wins every tie by name.
    h, agents, _, a2 = full_cluster(make_harness, n1={"tokens_in_flight": 30_000, "prefill_tokens_per_second": 1e3},
                                    n2={"tokens_in_flight": 300, "prefill_tokens_per_second": 1e3})

    outcome = h.controller.route("b")

    assert outcome.status == "starting" and outcome.node_id == "n2"
    assert [m[1] for m in agents.migrations] == [a2]
    status = h.controller.status()
    decision = status.instances[-1].placement
    assert decision.node == "n2" and decision.migrate == [a2]
    assert decision.migration_seconds == pytest.approx(0.3 + h.controller.settings.eviction_seconds)
    # Status shows what moving each instance costs now and from what the workers reported.
    [a1_now] = [i for i in status.instances if i.node_id == "n1"]
    assert (a1_now.tokens_in_flight, a1_now.prefill_tokens_per_second) == (30_000, 1e3)
    assert a1_now.move_seconds == pytest.approx(30 + h.controller.settings.eviction_seconds)
    assert status.instances[-1].move_seconds is None  # b is loading: placement never moves it


def test_status_table_shows_the_move_cost_and_its_inputs(make_harness, capsys, monkeypatch):
    h, _, a1, _ = full_cluster(make_harness, n1={"tokens_in_flight": 1200, "prefill_tokens_per_second": 800.0})
    monkeypatch.setenv("COLUMNS", "300")
    print_status(h.controller.status())
    row = next(line for line in capsys.readouterr().out.splitlines() if a1 in line)
    eviction = h.controller.settings.eviction_seconds
    assert f"{1.5 + eviction:.2f} s (1200 tok at 800 tok/s)" in row, row


def test_placement_stops_the_victim_when_no_other_instance_can_take_its_requests(make_harness):
    # No allocation can be made (max_allocations 0): stopping a's busy instance is the only way to start b.
    h = make_harness(cpu_slots_per_node=1, max_allocations=0)
    agents = use_migrating_agents(h)
    h.deploy("a")
    h.deploy("b")
    h.register("n1", gpus=0)
    a1 = ready_instance(h, "n1", "a", running=1)
    client = h.app_client()

    assert h.controller.route("b").status == "starting"

    assert agents.migrations == [] and agents.stopped == [("http://n1:9000", a1)]
    assert metric(client, "hpcllm_controller_migrations_total", model_name="a", trigger="placement",
                  outcome="no_target") == 1


def test_placement_allocates_rather_than_stop_a_busy_instance_nothing_else_can_serve(make_harness):
    # a's only instance runs a request; b could start at once in its place, but a's request would then wait for a
    # cold start of a (a queue wait of its own): placement counts that and asks for an allocation for b instead.
    # Stopping busy instances to avoid queue waits made placement churn (each stopped model stopped another).
    h = make_harness(cpu_slots_per_node=1)
    agents = use_migrating_agents(h)
    h.deploy("a")
    h.deploy("b")
    h.register("n1", gpus=0)
    a1 = ready_instance(h, "n1", "a", running=1)

    assert h.controller.route("b").status == "allocating"
    assert agents.migrations == [] and agents.stopped == []
    assert h.registry.get_instance(a1).state == "ready"

    # Once a's instance is idle, moving it costs nobody a wait: b takes its slot rather than wait for the queue.
    h.agents.agents["http://n1:9000"].instances[a1] = \
        h.agents.agents["http://n1:9000"].instances[a1].model_copy(update={"running_requests": 0})
    h.heartbeat("n1")
    assert h.controller.route("b").status == "starting"
    assert agents.stopped == [("http://n1:9000", a1)]


def test_a_failed_migration_still_frees_the_slots_and_is_counted(make_harness):
    h, agents, a1, _ = full_cluster(make_harness)
    agents.fail_migration = "ReadTimeout (test)"
    client = h.app_client()

    assert h.controller.route("b").status == "starting"

    assert [m[1] for m in agents.migrations] == [a1]
    assert agents.stopped == [("http://n1:9000", a1)]  # plain stop after the failure: the gateway resumes
    assert metric(client, "hpcllm_controller_migrations_total", model_name="a", trigger="placement", outcome="failed") == 1
    assert metric(client, "hpcllm_controller_migrated_requests_total", model_name="a") == 0
    [event] = h.controller.status().migrations
    assert (event.outcome, event.error) == ("failed", "node agent http://n1:9000: ReadTimeout (test)")


def test_an_idle_victim_is_just_stopped_and_counted_as_idle(make_harness):
    h, agents, a1, _ = full_cluster(make_harness)
    agents.moving = 0  # the worker had nothing running by the time it was asked
    client = h.app_client()

    assert h.controller.route("b").status == "starting"

    assert metric(client, "hpcllm_controller_migrations_total", model_name="a", trigger="placement", outcome="idle") == 1


# ----------------------------------------------------------------------------------------------- retirement


def test_retirement_live_migrates_requests_to_an_instance_outside_the_retiring_allocation(make_harness):
    h = make_harness(retire_lead_seconds=300, drain_seconds=60, max_allocations=2, cpu_slots_per_node=1)
    agents = use_migrating_agents(h)
    h.deploy("m", max_instances=2, keep_alive_seconds=3600)
    job = h.controller.route("m").job_id
    h.backend.start(job, "n1", h.clock.now, walltime=1000)
    h.tick()
    h.register("n1", job=job)
    h.tick()  # the demand starts m on n1, the node allocated for it
    h.heartbeat("n1", tier="sharedfs")
    [old] = h.registry.instances()
    h.register("n9", gpus=0)  # a node outside the allocation, with its own instance of m
    h.backend.down = True
    other = ready_instance(h, "n9", "m")
    h.backend.down = False
    h.agents.agents["http://n1:9000"].instances[old.instance_id] = \
        h.agents.agents["http://n1:9000"].instances[old.instance_id].model_copy(update={"running_requests": 2})
    h.heartbeat("n1")
    client = h.app_client()

    report = h.tick(700)  # walltime end - retire_lead: the allocation retires

    assert ("retire", job) in report.kinds()
    assert agents.migrations == [("http://n1:9000", old.instance_id, f"http://n9:9000/workers/{other}")]
    assert metric(client, "hpcllm_controller_migrations_total", model_name="m", trigger="retire", outcome="migrated") == 1


def test_an_instance_list_that_is_no_json_is_the_agents_error():
    """After a move the controller reads the agent's instance-list version (reconcile its list): a 200 answer that
    is no JSON (a proxy's page) is an AgentError its callers log, not a ValueError escaping a finished migration."""
    client = AgentClient("test-secret")
    client._http = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(
        200, text="<html>502 Bad Gateway</html>")))
    try:
        for read in (client.instances_version, client.list_instances):
            with pytest.raises(AgentError, match=r"node agent http://n1:9000/v1/internal/instances sent an "
                                                 r"unreadable instance list: '<html>502 Bad Gateway</html>'"):
                read("http://n1:9000")
    finally:
        client.close()
