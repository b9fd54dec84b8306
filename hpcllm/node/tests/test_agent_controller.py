"""The agent against the real controller app (in-process HTTP server, SQLite in tmp, Slurm replaced by the
controller tests' recording double): registration, heartbeats, re-registration after a 404."""

from __future__ import annotations

import threading

import pytest

from hpcllm.config import parse_config
from hpcllm.controller.protocol import ModelSpec
from hpcllm.controller.server import build_service
from hpcllm.controller.tests.doubles import RecordingBackend
from hpcllm.httpkit.tests.thread_server import ThreadServer
from hpcllm.node.app import create_app
from hpcllm.node.protocol import StartInstance
from hpcllm.node.tests.test_agent import SECRET, converted, make_agent, wait_for  # noqa: F401  (converted: a fixture)


def start_controller(tmp_path, name: str):
    config = parse_config({"cluster": {"shared_secret": SECRET},
                           "paths": {"state_dir": str(tmp_path / name)},
                           "controller": {"database_url": f"sqlite:///{tmp_path / (name + '.db')}"}})
    service = build_service(config, backend=RecordingBackend())
    server = ThreadServer(service.app)
    return service, server, server.url


@pytest.fixture
def controllers(tmp_path):
    started = [start_controller(tmp_path, "first"), start_controller(tmp_path, "second")]
    yield started
    for _, server, _ in started:
        server.stop()


def test_agent_registers_heartbeats_and_registers_again_when_forgotten(tmp_path, controllers, monkeypatch):
    (first, _, first_url), (second, _, second_url) = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n9")
    agent = make_agent(tmp_path, gpus=2)
    agent.controller_url = first_url
    try:
        agent.start_server(create_app(agent))
        assert agent.register()
        [node] = first.controller.status().nodes
        assert (node.node_id, node.agent_url, node.gpus, node.pool_model) == ("n9", agent.agent_url, 2, None)
        assert node.tiers.nvme.read_gbps == 2.0 and node.tiers.sharedfs.read_gbps == 1.0
        assert agent.heartbeat()

        # A controller with a new database does not know the node: the heartbeat's 404 makes it register again.
        agent.controller_url = second_url
        assert second.controller.status().nodes == []
        assert agent.heartbeat()
        assert [n.node_id for n in second.controller.status().nodes] == ["n9"]
    finally:
        agent.shutdown()


def test_wrong_secret_is_a_clear_error_not_an_endless_retry(tmp_path, controllers):
    from hpcllm.errors import ConfigError

    (_, _, url), _ = controllers
    agent = make_agent(tmp_path)
    agent.config.cluster.shared_secret = "not-the-secret"
    agent._http.headers["X-Hpcllm-Secret"] = "not-the-secret"
    agent.controller_url = url
    agent.agent_url = "http://127.0.0.1:1"
    with pytest.raises(ConfigError, match="refused the registration: HTTP 401"):
        agent.register()
    agent.shutdown()


def test_a_pool_agent_registers_as_a_pool_of_its_model(tmp_path, controllers, monkeypatch):
    (first, _, url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n8")
    agent = make_agent(tmp_path)
    agent.pinned_model = "tiny-llama"  # `hpcllm node --model tiny-llama` (slurm/model-pool.sbatch)
    agent.controller_url = url
    try:
        agent.start_server(create_app(agent))
        assert agent.register()
        [node] = first.controller.status().nodes
        assert (node.node_id, node.pool_model) == ("n8", "tiny-llama")
        assert first.controller.registry.get_node("n8").is_pool
    finally:
        agent.shutdown()


def test_a_second_agent_on_the_node_waits_with_the_controllers_reason(tmp_path, controllers, monkeypatch, caplog):
    """Two Slurm jobs' agents on one node: the second is refused (409) while the first heartbeats, says why, and
    keeps retrying instead of taking over the node's registration."""
    (first, _, url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    agents = [make_agent(tmp_path / name) for name in ("job-41", "job-42")]
    try:
        for agent, job in zip(agents, ("41", "42")):
            agent.job_id, agent.controller_url = job, url
            agent.start_server(create_app(agent))
        assert agents[0].register()

        waiting = threading.Thread(target=agents[1].register, daemon=True)
        waiting.start()
        waiting.join(2.0)
        assert waiting.is_alive() and not agents[1].registered  # still retrying
        agents[1].drain()  # ends its retries
        waiting.join(10)
        [node] = first.controller.status().nodes
        assert node.slurm_job_id == "41" and node.agent_url == agents[0].agent_url
        assert "node n7 is served by the hpcllm agent of Slurm job 41" in caplog.text
    finally:
        for agent in agents:
            agent.shutdown()


def test_a_cache_that_cannot_be_read_keeps_the_node_beating(tmp_path, controllers, monkeypatch):
    # A cache disk gone read-only or failing (CacheError from its state file): loads read the origin, and the node
    # reports no copies; its heartbeats go on (a raised error ended the heartbeat thread: the node was declared lost).
    from hpcllm.node.cache import CacheError

    (first, _, url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    agent = make_agent(tmp_path)
    agent.controller_url = url
    try:
        agent.start_server(create_app(agent))
        assert agent.register()

        def unreadable():
            raise CacheError("cannot use the cache state file: disk I/O error")

        monkeypatch.setattr(agent.cache, "list", unreadable)
        assert agent.heartbeat()
        [node] = first.controller.status().nodes
        assert (node.node_id, node.state, node.cached) == ("n7", "up", [])
    finally:
        agent.shutdown()


def test_an_agent_whose_cache_cannot_be_read_registers_and_sends_new_rates(tmp_path, controllers, monkeypatch):
    # The NVMe capacity it reports counts the cached bytes (free space + cached): a cache that cannot be read counts
    # none, as cache_entries reports none, instead of failing the registration (the agent did not start) and every
    # heartbeat that carries tier rates measured again (the node was declared lost).
    from hpcllm.node.cache import CacheError

    (first, _, url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    agent = make_agent(tmp_path)
    agent.controller_url = url
    agent.nvme_dir.mkdir(parents=True)  # as the start makes it (its free space counts)

    def unreadable():
        raise CacheError("cannot use the cache state file: disk I/O error")

    monkeypatch.setattr(agent.cache, "list", unreadable)
    try:
        agent.start_server(create_app(agent))
        assert agent.register()
        agent._rates_changed()  # the background probes measured again: the next heartbeat carries the rates
        assert agent.heartbeat()
        [node] = first.controller.status().nodes
        assert (node.node_id, node.state, node.cached) == ("n7", "up", [])
        assert 0 < node.tiers.nvme.capacity_bytes <= agent.config.node.nvme_capacity_gb * 1e9
    finally:
        agent.shutdown()


def test_the_controller_reads_the_instance_list_version_of_each_start_stop_and_heartbeat(tmp_path, monkeypatch):
    """The controller tells a heartbeat built before one of its starts or stops by the agent's instance-list version,
    however late it arrives: what the agent reports before a start is older than the start's answer, what it
    reports before the stop older than the stop's, and its heartbeat carries the version of the list it sends."""
    import httpx

    from hpcllm.controller.agents import AgentClient

    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    broken = tmp_path / "broken"  # the worker exits at once: the start and the stop are quick
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    agent = make_agent(tmp_path)
    agent.start_server(create_app(agent))
    client = AgentClient(SECRET)
    sent = []
    monkeypatch.setattr(agent, "_post", lambda path, body, **dump: sent.append(body) or httpx.Response(
        200, json={"node_id": "n7", "state": "up"}))
    try:
        before_start = client.instances_version(agent.agent_url)
        started = client.start_instance(agent.agent_url, "broken", str(broken), [])
        assert agent.heartbeat()
        before_stop = client.instances_version(agent.agent_url)
        stopped = client.stop_instance(agent.agent_url, started.instance_id)
        after_stop = client.instances_version(agent.agent_url)
        assert before_start < started.instances_version <= before_stop < stopped <= after_stop
        assert [i.instance_id for i in sent[0].instances] == [started.instance_id]
        assert sent[0].instances_version == before_stop
        assert agent.heartbeat()
        assert (sent[1].instances, sent[1].instances_version) == ([], after_stop)
    finally:
        client.close()
        agent.shutdown()


def test_an_instance_that_fails_is_reported_with_a_newer_instance_list_version(tmp_path):
    """The controller applies no report older than one it applied: a report listing the instance failed must carry
    a newer version than the one that listed it loading (or that one, arriving late, would count and the failure
    not). Its start times out at once: failed before its worker (still importing) says where it listens."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    agent = make_agent(tmp_path, worker_start_timeout_seconds=0.01)
    try:
        started = agent.workers.start(StartInstance(model="broken", source=str(broken), gpu_ids=[]))
        wait_for(lambda: started.state == "failed", what="the instance reported failed")
        infos, version = agent.instance_listing()
        assert [i.state for i in infos] == ["failed"]
        assert version > started.added_in
    finally:
        agent.shutdown()


def test_a_restarted_agents_instance_list_versions_are_above_its_previous_process(tmp_path):
    """The controller compares the versions of one node's reports across agent restarts: a late report of the old
    process must look older than anything the new one reports (else it dropped the new process's starts)."""
    old = make_agent(tmp_path)
    try:
        _, last_of_old = old.instance_listing()
    finally:
        old.shutdown()
    new = make_agent(tmp_path)
    try:
        _, first_of_new = new.instance_listing()
        assert first_of_new > last_of_old
    finally:
        new.shutdown()


def agent_behind_an_older_controller(tmp_path, field: str, bodies: list):
    """An agent registered with its rates, whose controller predates `field`: it refuses a heartbeat carrying it
    (400, an extra input) and answers the others 200; each body sent is appended to bodies."""
    import json

    import httpx

    def older_controller(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if field in body:
            return httpx.Response(400, json={"error": {"message": f"{field}: Extra inputs are not permitted"}})
        return httpx.Response(200, json={"node_id": "n8", "state": "up"})

    agent = make_agent(tmp_path)
    agent.controller_url = "http://controller"
    agent._http = httpx.Client(transport=httpx.MockTransport(older_controller))
    agent._rates_sent = agent._rates_version  # registered with these rates: the heartbeats carry none
    return agent


def test_a_controller_older_than_the_agent_gets_heartbeats_without_the_instance_list_version(tmp_path, caplog):
    """An older controller refuses the unknown field (400): the agent keeps beating without it, not declared lost."""
    bodies = []
    agent = agent_behind_an_older_controller(tmp_path, "instances_version", bodies)
    try:
        assert agent.heartbeat() and agent.heartbeat()
        assert ["instances_version" in b for b in bodies] == [True, False, False]
        assert "refused this agent's instance-list version (instances_version: Extra inputs" in caplog.text
    finally:
        agent.shutdown()


def test_a_heartbeat_of_the_agent_process_before_a_restart_is_refused(tmp_path, controllers, monkeypatch, caplog):
    """A restarted agent registers again; the old process's heartbeat (late, or the process lingering) listed its
    instances as the node's until the new one's first heartbeat. Each process now names itself: the controller
    answers the old one's 409 and keeps the new one's."""
    (first, _, first_url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n9")
    old, new = make_agent(tmp_path / "old"), make_agent(tmp_path / "new")
    try:
        old.controller_url = new.controller_url = first_url
        assert old.register() and old.heartbeat()
        assert new.register()
        assert old.agent_process != new.agent_process
        assert not old.heartbeat()
        assert "another agent process registered node n9" in caplog.text
        assert "served by another agent process now" in caplog.text
        assert new.heartbeat()
        [node] = first.controller.status().nodes
        assert node.state == "up"
    finally:
        old.shutdown()
        new.shutdown()


def test_a_controller_older_than_the_agent_process_id_takes_the_registration_without_it(tmp_path, caplog):
    """An older controller refuses the unknown field (400): the agent registers without it (not a ConfigError that
    ends it) and its heartbeats carry none."""
    import json

    import httpx

    bodies = []

    def older_controller(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append((request.url.path, body))
        if "agent_process" in body:
            return httpx.Response(400, json={"error": {"message": "agent_process: Extra inputs are not permitted",
                                                       "param": "agent_process"}})
        if request.url.path.endswith("/register"):
            return httpx.Response(200, json={"node_id": "n8", "heartbeat_seconds": 5.0})
        return httpx.Response(200, json={"node_id": "n8", "state": "up"})

    agent = make_agent(tmp_path)
    agent.controller_url = "http://controller"
    agent._http = httpx.Client(transport=httpx.MockTransport(older_controller))
    try:
        assert agent.register() and agent.heartbeat()
        assert [(path.rsplit("/", 1)[1], "agent_process" in body) for path, body in bodies] == \
            [("register", True), ("register", False), ("heartbeat", False)]
        assert "refused this agent's process id (agent_process: Extra inputs" in caplog.text
    finally:
        agent.shutdown()


# --------------------------------------------------------------------------- a pool's job end (make before break)


def squeue_line(job: str, end: int, limit: str = "1:00:00") -> str:
    """One line of `squeue -h -O <adapter.SQUEUE_TEXT_FORMAT>` (SLURM_TIME_FORMAT=%s) for a running job."""
    return f"{job}|RUNNING|None|n8|{end - 3600}|{end}|{limit}|0|debug|{job}|hpcllm-pool|\n"


@pytest.fixture
def pool_agent(tmp_path, controllers, monkeypatch):
    """A pool agent (`hpcllm node --model tiny-llama` in Slurm job 77) registered with the first controller, with
    Slurm's commands faked; (agent, controller service, fake Slurm)."""
    from hpcllm.slurm.tests.fake_slurm import FakeSlurm

    fake = FakeSlurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", fake.path_env())
    monkeypatch.setenv("SLURMD_NODENAME", "n8")
    (first, _, url), _ = controllers
    agent = make_agent(tmp_path)
    agent.pinned_model, agent.job_id, agent.controller_url = "tiny-llama", "77", url
    agent.start_server(create_app(agent))
    assert agent.register()
    agent.state = "up"  # as run() sets it after registering
    yield agent, first, fake
    agent.workers.stop_all(timeout=5)
    agent.shutdown()


def test_a_pool_agent_reports_its_jobs_end_as_squeue_says_it_now_and_then(pool_agent):
    agent, first, fake = pool_agent
    fake.on("squeue", "--jobs=77", stdout=squeue_line("77", 1_900_000_000))
    agent.refresh_job_end()
    assert agent.heartbeat()
    assert first.controller.registry.get_node("n8").job_end == 1_900_000_000
    [node] = first.controller.status().nodes
    assert node.job_end == 1_900_000_000
    [call] = fake.calls("squeue")
    assert call["env"]["SLURM_TIME_FORMAT"] == "%s"  # epoch times whatever the user's setting

    # `scontrol update TimeLimit=...` extends the job: read again after job_end_refresh_seconds, not per heartbeat.
    fake.rules.clear()
    fake.on("squeue", "--jobs=77", stdout=squeue_line("77", 1_900_003_600, limit="2:00:00"))
    agent.refresh_job_end()
    assert len(fake.calls("squeue")) == 1 and agent.job_end == 1_900_000_000
    agent._job_end_due = 0.0  # the minute has passed
    agent.refresh_job_end()
    assert agent.heartbeat()
    assert first.controller.registry.get_node("n8").job_end == 1_900_003_600

    # A job without a time limit has no end: none reported.
    fake.rules.clear()
    fake.on("squeue", "--jobs=77", stdout=squeue_line("77", 1_931_536_000, limit="UNLIMITED"))
    agent._job_end_due = 0.0
    agent.refresh_job_end()
    assert agent.heartbeat()
    assert agent.job_end is None and first.controller.registry.get_node("n8").job_end is None


def test_a_slurm_failure_to_say_the_jobs_end_is_logged_not_fatal(pool_agent, caplog):
    agent, first, fake = pool_agent
    fake.on("squeue", "--jobs=77", stdout=squeue_line("77", 1_900_000_000))
    agent.refresh_job_end()
    fake.rules.clear()
    fake.on("squeue", "--jobs=77", stderr="squeue: error: Unable to contact slurm controller (connect failure)\n",
            rc=1)
    agent._job_end_due = 0.0
    agent.refresh_job_end()  # no exception: the heartbeat thread goes on
    assert "cannot read when Slurm job 77 ends: squeue --jobs=77: Slurm is not reachable: squeue: error: Unable to " \
        "contact slurm controller (connect failure) (check with: scontrol ping" in caplog.text  # what to check
    assert agent.heartbeat()
    assert first.controller.registry.get_node("n8").job_end == 1_900_000_000  # the last end read is kept
    assert first.controller.registry.get_node("n8").state == "up"


def test_a_pool_agent_drains_when_the_controller_hands_its_pool_over(pool_agent, converted):  # noqa: F811
    agent, first, _ = pool_agent
    # Its model deployed (on CPU, this node can start it): only the drain keeps the agent from starting it.
    first.controller.deploy(ModelSpec(name="tiny-llama", source=str(converted)))
    assert agent.heartbeat() and not agent._drain_requested.is_set()
    # The controller's autoscaler found a replacement ready before the pool's job ends (action retire_pool).
    first.controller.registry.set_node_state("n8", "draining")
    assert agent.heartbeat()
    assert agent._drain_requested.is_set()  # run() drains: requests migrate to the replacement, then it exits
    agent._keep_pinned_model()  # and its model is not started again meanwhile
    assert agent.workers.instances() == []


def test_a_controller_older_than_the_pool_agent_gets_heartbeats_without_the_job_end(tmp_path, caplog):
    """An older controller refuses the unknown field (400): the pool keeps beating without it, not declared lost."""
    bodies = []
    agent = agent_behind_an_older_controller(tmp_path, "job_end", bodies)
    agent.pinned_model, agent.job_end = "tiny-llama", 1_900_000_000.0
    try:
        assert agent.heartbeat() and agent.heartbeat()
        assert ["job_end" in b for b in bodies] == [True, False, False]
        assert "refused this pool's job end (job_end: Extra inputs are not permitted)" in caplog.text
    finally:
        agent.shutdown()


def agent_refused_once(tmp_path, bodies: list):
    """An agent whose controller answers its first heartbeat a 400 about something else than the rates or the job
    end (the instances), and the later ones 200; each body sent is appended to bodies."""
    import json

    import httpx

    def refusing_once(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if len(bodies) == 1:
            return httpx.Response(400, json={"error": {"message": "instances.0.state: Input should be 'loading'",
                                                       "param": "instances.0.state"}})
        return httpx.Response(200, json={"node_id": "n8", "state": "up"})

    agent = make_agent(tmp_path)
    agent.controller_url = "http://controller"
    agent._http = httpx.Client(transport=httpx.MockTransport(refusing_once))
    return agent


def test_a_heartbeat_refused_for_another_reason_sends_the_measured_rates_again(tmp_path):
    """A 400 that is not about the rates is no older controller refusing them: the rates measured again go with
    the next heartbeat instead of being dropped as refused."""
    bodies = []
    agent = agent_refused_once(tmp_path, bodies)
    agent._rates_sent = agent._rates_version - 1  # measured again since the registration
    try:
        assert not agent.heartbeat()  # failed: the next one goes as usual
        assert agent.heartbeat() and agent.heartbeat()
        assert ["tiers" in b for b in bodies] == [True, True, False]
    finally:
        agent.shutdown()


def test_a_heartbeat_refused_for_another_reason_keeps_reporting_the_job_end(tmp_path):
    """A 400 that is not about job_end does not turn the pool's hand-over off for good."""
    bodies = []
    agent = agent_refused_once(tmp_path, bodies)
    agent.pinned_model, agent.job_end = "tiny-llama", 1_900_000_000.0
    agent._rates_sent = agent._rates_version
    try:
        assert not agent.heartbeat()  # failed: the next one goes as usual
        assert agent.heartbeat()
        assert [b.get("job_end") for b in bodies] == [1_900_000_000.0, 1_900_000_000.0]
    finally:
        agent.shutdown()


@pytest.mark.parametrize("status, said", [(503, "the registry is unavailable"), (401, "wrong node token")])
def test_a_pool_agent_that_cannot_read_the_deployed_models_says_why(tmp_path, caplog, status, said):
    """The controller's error is what the log shows, not advice to deploy a model that is deployed; and the pool
    asks again at the next heartbeat rather than waiting out the failed-start back-off."""
    import logging

    import httpx

    agent = make_agent(tmp_path)
    agent.pinned_model, agent.controller_url = "tiny-llama", "http://controller"
    agent._http = httpx.Client(transport=httpx.MockTransport(
        lambda request: httpx.Response(status, json={"error": {"message": said}})))
    try:
        with caplog.at_level(logging.WARNING):
            agent._keep_pinned_model()
        assert f"HTTP {status}" in caplog.text and said in caplog.text
        assert "not deployed" not in caplog.text and agent._pinned_last_start == 0.0
    finally:
        agent.shutdown()
