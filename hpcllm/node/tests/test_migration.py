"""Live migration on the node agent's side: the drain moves running requests to the instance the controller names
before stopping the workers, the migrate-out endpoint moves one instance, and nothing is lost when a migration
fails (the worker is stopped; the gateway resumes from tokens). Workers are `fake_worker.py` processes (the
contract's source endpoints, no model); the controller is the real app in a thread with a Slurm double."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hpcllm.config import parse_config
from hpcllm.controller.agents import AgentClient
from hpcllm.controller.errors import AgentError
from hpcllm.controller.protocol import Heartbeat, InstanceInfo, ModelSpec, NodeRegistration
from hpcllm.controller.server import build_service
from hpcllm.controller.tests.doubles import RecordingBackend, checkpoint_folder
from hpcllm.credentials import issue_ticket
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.httpkit.tests.thread_server import ThreadServer
from hpcllm.node.app import create_app
from hpcllm.node.protocol import StartInstance
from hpcllm.node.tests.test_agent import AUTH, SECRET, make_agent, wait_for

MODEL = "m"
DESTINATION = "http://127.0.0.1:9/n2-worker"  # never called: the fake source worker only reports it


def ticket_for(instance_id: str, destination_url: str = DESTINATION) -> dict:
    """The controller's ticket for moving instance_id's requests to destination_url (these agents' key: SECRET)."""
    return issue_ticket(model=MODEL, source_instance=instance_id, source_key=SECRET, destination_url=destination_url,
                        destination_instance="n2-instance", destination_key=SECRET).model_dump()


@pytest.fixture
def controller(tmp_path):
    """The real controller app over HTTP; `make(**settings)` starts it (Slurm is a recording double)."""
    started = []

    def make(**settings):
        config = parse_config({"cluster": {"shared_secret": SECRET}, "paths": {"state_dir": str(tmp_path / "ctl")},
                               "controller": {"database_url": f"sqlite:///{tmp_path / 'ctl.db'}", **settings}})
        service = build_service(config, backend=RecordingBackend())
        server = ThreadServer(service.app)
        source = checkpoint_folder(tmp_path / "models" / MODEL)
        service.controller.deploy(ModelSpec(name=MODEL, source=str(source), size_bytes=10**6, max_instances=2))
        started.append((service, server))
        return service, server.url, source

    yield make
    for service, server in started:
        server.stop()
        service.controller.registry.close()


def add_ready_node(service, node_id: str, worker_url: str = DESTINATION) -> None:
    """Another node whose agent reports a ready instance of MODEL (the migration target)."""
    service.controller.register(NodeRegistration(node_id=node_id, agent_url=f"http://{node_id}:1", gpus=0))
    service.controller.heartbeat(node_id, Heartbeat(instances=[InstanceInfo(
        instance_id=f"{MODEL}-on-{node_id}", model=MODEL, state="ready", worker_url=worker_url)]))


def metric(service, name: str, **labels) -> float:
    text = service.app.test_client().get("/metrics").get_data(as_text=True)
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def events(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


@pytest.fixture
def make_node(tmp_path, monkeypatch):
    """An agent named n1 whose instances are fake workers; make(controller_url, requests, mode, **node settings)."""
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    made = []

    def make(controller_url: str | None, requests=("r1", "r2"), mode: str = "ok", **node):
        agent = make_agent(tmp_path / f"agent{len(made)}", **node)
        record = tmp_path / f"worker{len(made)}.jsonl"

        def fake_worker(req, path, url_file):
            return [sys.executable, "-m", "hpcllm.node.tests.fake_worker", "--url-file", str(url_file),
                    "--record", str(record), "--requests", ",".join(requests), "--mode", mode, "--slow-seconds", "30"]

        agent.workers._command = fake_worker
        if controller_url:
            agent.controller_url = controller_url
            agent.start_server(create_app(agent))
            assert agent.register()
        made.append(agent)
        return agent, record

    yield make
    for agent in made:
        agent.workers.stop_all(timeout=5)
        agent.shutdown()


def start_ready(agent, source: Path):
    inst = agent.workers.start(StartInstance(model=MODEL, source=str(source)))
    wait_for(lambda: inst.state == "ready" and inst.running_requests, 30, "the fake worker to be ready")
    return inst


def test_drain_live_migrates_running_requests_to_another_node_before_stopping(controller, make_node):
    service, url, source = controller()
    add_ready_node(service, "n2")
    agent, record = make_node(url)
    inst = start_ready(agent, source)

    agent.drain()

    migrate, sigterm = events(record)
    assert migrate["event"] == "migrate" and migrate["destination_url"] == DESTINATION
    assert sigterm["event"] == "sigterm" and sigterm["requests"] == []  # stopped only after both requests moved
    [outcome] = agent.migrations
    assert outcome.complete and [m.request_id for m in outcome.migrated] == ["r1", "r2"]
    assert 0 < migrate["timeout_seconds"] <= 20  # the worker bounds its calls to the destination by what is left
    assert inst.process.poll() is not None and agent.state == "stopped"
    assert metric(service, "hpcllm_controller_migration_targets_total", model_name=MODEL, outcome="ready") == 1
    # The last heartbeat said the node runs nothing: the controller forgot its instance, the target stays; the
    # node itself is draining, so nothing new is placed there.
    assert [i.node_id for i in service.controller.registry.instances(model=MODEL)] == ["n2"]
    assert service.controller.registry.get_node("n1").state == "draining"


def test_on_preempt_restart_stops_the_workers_without_migrating_even_with_a_target(controller, make_node):
    # The preemption-with-restart baseline (node.on_preempt = "restart"): a ready instance elsewhere is not used;
    # SIGTERM aborts the requests and the gateway resumes them from their tokens.
    service, url, source = controller()
    add_ready_node(service, "n2")
    agent, record = make_node(url, on_preempt="restart")
    start_ready(agent, source)

    agent.drain()

    assert [e["event"] for e in events(record)] == ["sigterm"]
    assert agent.migrations == [] and agent.state == "stopped"
    assert metric(service, "hpcllm_controller_migration_targets_total", model_name=MODEL) == 0


def test_no_other_instance_anywhere_drains_at_once_and_leaves_requests_to_the_gateway(controller, make_node):
    service, url, source = controller(allocate_on_demand=False)  # nothing else can start either
    agent, record = make_node(url, migrate_timeout_seconds=30)
    start_ready(agent, source)

    began = time.monotonic()
    agent.drain()

    assert time.monotonic() - began < 10  # a 404 needs no waiting for the migrate timeout
    assert [e["event"] for e in events(record)] == ["sigterm"]  # nothing was asked to move; SIGTERM aborts them
    assert agent.migrations == []
    assert metric(service, "hpcllm_controller_migration_targets_total", model_name=MODEL, outcome="none") == 1


def test_a_target_that_is_still_being_allocated_is_waited_for_only_until_the_migrate_timeout(controller, make_node):
    service, url, source = controller(allocate_on_demand=True, route_retry_after_seconds=0.5)
    agent, record = make_node(url, migrate_timeout_seconds=2)
    start_ready(agent, source)

    began = time.monotonic()
    agent.drain()

    assert time.monotonic() - began < 8
    assert [e["event"] for e in events(record)] == ["sigterm"]
    # The controller asked Slurm for a replacement node (never this one), so later requests have somewhere to go.
    [job] = service.controller.registry.allocations()
    assert job.model == MODEL and "n1" not in job.preferred_nodes
    assert metric(service, "hpcllm_controller_migration_targets_total", model_name=MODEL, outcome="allocating") >= 1


def test_a_refused_migration_is_reported_and_the_worker_still_stops(controller, make_node):
    service, url, source = controller()
    add_ready_node(service, "n2")
    agent, record = make_node(url, mode="refuse")
    start_ready(agent, source)

    agent.drain()

    [outcome] = agent.migrations
    assert not outcome.complete and "destination" in outcome.error and "refused" in outcome.error
    assert [e["event"] for e in events(record)] == ["migrate", "sigterm"]
    assert events(record)[1]["requests"] == ["r1", "r2"]  # still on the source: the gateway resumes them
    assert agent.state == "stopped"


def test_a_hanging_migration_is_cut_at_the_migrate_timeout(controller, make_node):
    service, url, source = controller()
    add_ready_node(service, "n2")
    agent, record = make_node(url, mode="slow", migrate_timeout_seconds=1.5)
    start_ready(agent, source)

    began = time.monotonic()
    agent.drain()

    assert time.monotonic() - began < 10
    [outcome] = agent.migrations
    assert "did not migrate its requests" in outcome.error and "timed out" in outcome.error
    assert [e["event"] for e in events(record)] == ["migrate", "sigterm"]


def test_a_worker_moving_until_its_deadline_is_heard_before_it_is_stopped(controller, make_node, caplog):
    """The worker's moves may take all of the order's timeout_seconds, and its answer comes a little after: the
    agent orders a deadline earlier than its own, so it hears that both requests moved (and says so) before it
    stops the worker. Before, both sides used the same timeout: the agent gave up at the worker's deadline, logged
    that the worker "did not migrate its requests" and stopped it while it answered that they had moved."""
    service, url, source = controller()
    add_ready_node(service, "n2")
    agent, record = make_node(url, mode="deadline", migrate_timeout_seconds=5)
    start_ready(agent, source)

    with caplog.at_level("INFO", logger="hpcllm.node.workers"):
        agent.drain()

    [outcome] = agent.migrations
    assert outcome.error is None and [m.request_id for m in outcome.migrated] == ["r1", "r2"], outcome
    assert [e["event"] for e in events(record)] == ["migrate", "sigterm"]
    assert events(record)[1]["requests"] == []  # stopped after they moved
    assert "2 requests live-migrated" in caplog.text and "did not migrate" not in caplog.text


def test_migrate_out_moves_one_instance_then_stops_it(controller, make_node):
    service, url, source = controller()
    agent, record = make_node(url, requests=("a", "b", "c"), mode="partial")
    inst = start_ready(agent, source)
    agents = AgentClient(SECRET)
    try:
        ticket = issue_ticket(model=MODEL, source_instance=inst.instance_id, source_key=SECRET,
                              destination_url=DESTINATION, destination_instance="n2-instance", destination_key=SECRET)
        result = agents.migrate_out(agent.agent_url, inst.instance_id, DESTINATION, timeout=30, ticket=ticket)
        assert [m.request_id for m in result.migrated] == ["a"]
        assert [f.request_id for f in result.failed] == ["b", "c"]
        assert result.error is None and result.state == "stopped" and result.model == MODEL
        assert [e["event"] for e in events(record)] == ["migrate", "sigterm"]
        assert agent.workers.instances() == []

        with pytest.raises(AgentError, match="HTTP 404"):
            agents.migrate_out(agent.agent_url, inst.instance_id, DESTINATION, timeout=30, ticket=ticket)
    finally:
        agents.close()


def test_migrate_out_says_what_to_fix(make_node, tmp_path):
    agent, _ = make_node(None, requests=())
    client = create_app(agent).test_client()
    source = tmp_path / "src"
    source.mkdir()
    inst = agent.workers.start(StartInstance(model=MODEL, source=str(source)))
    path = f"/v1/internal/instances/{inst.instance_id}/migrate-out"
    assert client.post(path, json={"destination_url": DESTINATION}).status_code == 401
    resp = client.post(path, json={"destination_url": "n2:8000"}, headers=AUTH)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "destination_url"
    resp = client.post("/v1/internal/instances/nope/migrate-out", json={"destination_url": DESTINATION},
                       headers=AUTH)
    assert resp.status_code == 404 and "nope" in resp.get_json()["error"]["message"]
    # Nothing runs on it (loading or idle): nothing moves, it is just stopped.
    resp = client.post(path, json={"destination_url": DESTINATION, "ticket": ticket_for(inst.instance_id)},
                       headers=AUTH)
    assert resp.status_code == 200 and resp.get_json()["migrated"] == [] and resp.get_json()["state"] == "stopped"


def test_migrate_out_needs_a_ticket_for_that_instance_and_moves_nothing_without_one(make_node, tmp_path):
    """The controller's ticket covers one instance's requests: without a ticket, with one issued for another of the
    node's instances, or for another destination, the agent refuses (403) and the instance keeps serving."""
    agent, record = make_node(None, requests=("a",))
    source = tmp_path / "src"
    source.mkdir()
    inst = start_ready(agent, source)
    path = f"/v1/internal/instances/{inst.instance_id}/migrate-out"
    client = create_app(agent).test_client()
    for ticket in (None, ticket_for("another-instance"), ticket_for(inst.instance_id, "http://127.0.0.1:9/elsewhere")):
        resp = client.post(path, json={"destination_url": DESTINATION, "ticket": ticket}, headers=AUTH)
        assert resp.status_code == 403, resp.get_json()
        assert agent.workers.get(inst.instance_id).state == "ready" and events(record) == []
    resp = client.post(path, json={"destination_url": DESTINATION, "ticket": ticket_for(inst.instance_id)},
                       headers=AUTH)
    assert resp.status_code == 200 and [m["request_id"] for m in resp.get_json()["migrated"]] == ["a"]


@pytest.mark.parametrize("url", ["http://", "http://n2:99999", "https://[::1"])
def test_migrate_out_to_a_malformed_url_is_a_400_and_leaves_the_instance_running(make_node, tmp_path, url):
    agent, record = make_node(None, requests=("a",))
    source = tmp_path / "src"
    source.mkdir()
    inst = start_ready(agent, source)
    resp = create_app(agent).test_client().post(f"/v1/internal/instances/{inst.instance_id}/migrate-out",
                                                json={"destination_url": url}, headers=AUTH)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "destination_url"
    assert "http://HOST:PORT" in resp.get_json()["error"]["message"]
    assert agent.workers.get(inst.instance_id).state == "ready" and events(record) == []


def test_migration_target_over_http_needs_the_secret(controller):
    _, url, _ = controller()
    resp = httpx.post(f"{url}/v1/internal/migration-target", json={"model": MODEL})
    assert resp.status_code == 401
    resp = httpx.post(f"{url}/v1/internal/migration-target", json={"model": MODEL, "exclude_node": "n1",
                                                                   "start_if_missing": False},
                      headers={SECRET_HEADER: SECRET})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "no_migration_target"


def test_a_drain_budget_beyond_slurms_signal_lead_time_is_warned_about(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    fits = make_agent(tmp_path / "fits")  # defaults: 20 s migration + 10 s stop inside the 60 s lead time
    fits.check_drain_budget()
    assert "exceeds slurm.signal_seconds" not in caplog.text
    too_long = make_agent(tmp_path / "long", migrate_timeout_seconds=55)
    too_long.check_drain_budget()
    assert "= 65 s exceeds slurm.signal_seconds = 60 s" in caplog.text
    for agent in (fits, too_long):
        agent.workers.close()


def test_a_bad_migrate_timeout_is_a_config_error_naming_the_field():
    from hpcllm.errors import ConfigError

    with pytest.raises(ConfigError, match="node.migrate_timeout_seconds"):
        parse_config({"node": {"migrate_timeout_seconds": 0}})
