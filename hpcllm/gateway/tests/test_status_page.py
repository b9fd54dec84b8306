"""The status page (GET /status) against a real controller (its app, service and SQLite registry; node agents and
Slurm are the controller tests' doubles) holding 1,000 nodes: what the page shows in headless Chromium, who may see
it, and that users never see internal addresses.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from hpcllm.controller.app import create_app as create_controller_app
from hpcllm.controller.protocol import Heartbeat, InstanceInfo, MigrationTargetRequest, NodeRegistration
from hpcllm.controller.tests.conftest import Harness
from hpcllm.tests.ports import free_port

from .browser import cells, dump_dom, rows, screenshot, summary
from .conftest import ADMIN_KEY, USER_KEY, ThreadServer

NODES = 1000
ROWS_SHOWN = 200  # the page's MAX_ROWS
ONE_POLL = "?every_ms=600000"  # one status fetch within the browser's virtual-time budget


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A controller with 1,000 registered nodes, three models, two ready instances (two cold starts), one
    migration target named for a draining node, and one pending allocation."""
    # The controller's admin key is the gateway's (one config in a deployment): the users' view asks with it.
    h = Harness(tmp_path_factory.mktemp("status-controller"), admin_key=ADMIN_KEY)
    h.deploy("llama-7b", max_instances=2)
    h.deploy("mistral-7b", engine="vllm")
    h.deploy("qwen-72b", tensor_parallel=2, gpus=2)
    for i in range(NODES):
        cached = (("llama-7b", "nvme"),) if i % 10 == 0 else ()
        h.register(f"gpu{i:04d}", gpus=2, cached=cached, job=str(5000 + i))
    for model, node in (("llama-7b", "gpu0000"), ("mistral-7b", "gpu0001")):
        h.controller.start_instance(h.registry.get_model(model))
    for node in {i.node_id for i in h.registry.instances()}:
        h.heartbeat(node, tier="nvme", load_seconds=2.5)
    leaving = h.registry.instances(model="llama-7b")[0].node_id
    h.controller.start_instance(h.registry.get_model("llama-7b"))  # a second one, so a drain has a target
    for node in {i.node_id for i in h.registry.instances(model="llama-7b")}:
        h.heartbeat(node, tier="dram", load_seconds=0.02)
    h.controller.migration_target(MigrationTargetRequest(model="llama-7b", exclude_node=leaving))
    h.allocator.submit(h.registry.get_model("qwen-72b"), [], h.clock.now)
    failed = InstanceInfo(instance_id="bad-1", model="mistral-7b", state="failed", gpu_ids=[0],
                          error="vLLM cannot be imported (make vllm-venv)")
    h.controller.heartbeat("gpu0999", Heartbeat(instances=[failed]))
    server = ThreadServer(create_controller_app(h.controller))
    yield h, server.url, leaving
    server.stop()
    h.registry.close()


@pytest.fixture
def status_gateway(make_gateway, cluster):
    def make(**settings):
        _, controller_url, _ = cluster
        return make_gateway(router=None, static_models={}, controller_url=controller_url, **settings)

    return make


def test_the_page_is_served_without_a_key_and_holds_no_data(status_gateway):
    gw = status_gateway()
    resp = gw.get("/status", key=None)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "gpu0000" not in resp.text and "llama-7b" not in resp.text


def test_users_get_403_unless_the_operator_opens_the_status_to_them(status_gateway):
    closed = status_gateway()
    resp = closed.get("/v1/status", key=USER_KEY)
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "status_admins_only" and "status_page_users" in resp.json()["error"]["message"]
    assert closed.get("/v1/status", key=None).status_code == 401


def test_users_view_has_no_internal_addresses(status_gateway, cluster):
    gw = status_gateway(status_page_users=True)
    resp = gw.get("/v1/status", key=USER_KEY)
    assert resp.status_code == 200, resp.text
    status = resp.json()
    assert len(status["nodes"]) == NODES and len(status["instances"]) == 3
    assert "agent_url" not in resp.text and "worker_url" not in resp.text and "http://gpu" not in resp.text
    admin = gw.get("/v1/admin/status", key=ADMIN_KEY).json()
    assert all(n["agent_url"].startswith("http://gpu") for n in admin["nodes"])


def test_chromium_shows_a_1000_node_cluster_to_the_admin(status_gateway, cluster):
    _, _, leaving = cluster
    gw = status_gateway()
    url = f"{gw.url}/status{ONE_POLL}#key={ADMIN_KEY}"

    dom = dump_dom(url)

    assert 'data-state="ok"' in dom and 'data-view="admin"' in dom, dom[:2000]
    assert summary(dom, "nodes up") == f"{NODES} / {NODES}"
    assert summary(dom, "instances ready") == "3 / 3"
    assert summary(dom, "models") == "3"
    assert summary(dom, "pending") == "1"
    # 1,000 nodes: the first 200 rows and a count, the filter narrows.
    assert len(rows(dom, "nodes")) == ROWS_SHOWN
    assert f"showing {ROWS_SHOWN} of {NODES} matching nodes" in dom
    models = {cells(r)[0]: cells(r) for r in rows(dom, "models")}
    assert models["mistral-7b"][1] == "vllm" and models["qwen-72b"][2] == "2"
    assert models["llama-7b"][4] == "2 / 2" and "nvme ×100" in models["llama-7b"][6]
    node0 = next(cells(r) for r in rows(dom, "nodes") if 'data-node="gpu0000"' in r)
    assert node0[1] == "up" and node0[2] == "5000" and "dram 20.0" in node0[4] and "llama-7b (nvme" in node0[5]
    cold = [cells(r) for r in rows(dom, "cold-starts")]
    assert sorted(c[3] for c in cold) == ["dram", "nvme", "nvme"]
    [migration] = [cells(r) for r in rows(dom, "migrations")]
    assert migration[1:3] == ["llama-7b", leaving] and migration[4:6] == ["node_drain", "target_assigned"]
    [failure] = [cells(r) for r in rows(dom, "failures")]
    assert failure[1:] == ["bad-1", "mistral-7b", "gpu0999", "vLLM cannot be imported (make vllm-venv)"]
    [alloc] = [cells(r) for r in rows(dom, "allocations")]
    assert alloc[1:3] == ["pending", "qwen-72b"]
    shot = screenshot(url, "status-page-1000-nodes.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_keeps_polling(status_gateway):
    gw = status_gateway()
    dom = dump_dom(f"{gw.url}/status?every_ms=1000&node=gpu0001#key={ADMIN_KEY}", budget_ms=4500)
    assert int(re.search(r'data-polls="(\d+)"', dom).group(1)) >= 3


def test_chromium_filters_nodes_by_name_or_cached_model(status_gateway):
    gw = status_gateway()
    dom = dump_dom(f"{gw.url}/status{ONE_POLL}&node=gpu099#key={ADMIN_KEY}")
    assert sorted(re.findall(r'data-node="([^"]+)"', dom)) == [f"gpu{i:04d}" for i in range(990, 1000)]
    assert f"10 of {NODES} nodes" in dom
    dom = dump_dom(f"{gw.url}/status{ONE_POLL}&node=llama-7b#key={ADMIN_KEY}")
    assert len(re.findall(r'data-node="', dom)) == NODES // 10  # the nodes caching it


def test_chromium_offers_the_node_states_of_the_latest_poll(make_gateway):
    """The node-state filter lists the states the nodes have now: a draining node that went down (as many states
    as before, other ones) is offered as `down`, no longer as `draining`."""
    from flask import Flask

    polls = []
    controller = Flask("scripted-controller")

    @controller.get("/v1/admin/status")
    def status():
        polls.append(1)
        leaving = "draining" if len(polls) == 1 else "down"
        nodes = [{"node_id": node, "state": state, "gpus": 2, "free_gpus": 2, "cached": [], "tiers": {},
                  "slurm_job_id": None, "pool_model": None, "last_heartbeat": None}
                 for node, state in (("n1", "up"), ("n2", leaving))]
        return {"now": 0.0, "models": [], "nodes": nodes, "instances": [], "allocations": [], "cold_starts": [],
                "migrations": [], "failed_instances": []}

    server = ThreadServer(controller)
    try:
        gw = make_gateway(router=None, static_models={}, controller_url=server.url)
        dom = dump_dom(f"{gw.url}/status?every_ms=1000#key={ADMIN_KEY}", budget_ms=3500)
    finally:
        server.stop()
    assert int(re.search(r'data-polls="(\d+)"', dom).group(1)) >= 2
    offered = re.findall(r"<option[^>]*>([^<]*)</option>", re.search(r'<select id="node-state">(.*?)</select>',
                                                                      dom, re.S).group(1))
    assert offered == ["any state", "down", "up"]


def test_chromium_says_why_a_wrong_key_shows_nothing(status_gateway):
    gw = status_gateway()
    dom = dump_dom(f"{gw.url}/status{ONE_POLL}#key=not-a-key")
    assert 'data-state="error"' in dom and "gpu0000" not in dom
    banner = re.search(r'id="banner"[^>]*>([^<]*)<', dom).group(1)
    assert banner == "status unavailable: this key is neither the admin key nor an API key of this gateway"


def test_chromium_tells_a_user_that_the_status_is_for_admins(status_gateway):
    gw = status_gateway()
    dom = dump_dom(f"{gw.url}/status{ONE_POLL}#key={USER_KEY}")
    assert 'data-state="error"' in dom and "gpu0000" not in dom
    assert "the cluster status is for admins on this gateway" in dom


def test_chromium_shows_users_the_status_without_addresses_when_allowed(status_gateway):
    gw = status_gateway(status_page_users=True)
    dom = dump_dom(f"{gw.url}/status{ONE_POLL}#key={USER_KEY}")
    assert 'data-state="ok"' in dom and 'data-view="user"' in dom
    assert summary(dom, "nodes up") == f"{NODES} / {NODES}"
    assert "http://gpu" not in dom


def test_users_see_no_other_groups_pools_nor_credential_ids(make_gateway, tmp_path):
    """A group's own model pool is that group's business: another group's users see neither its node nor what runs
    there; nobody but the admin sees which credential a node holds."""
    from hpcllm.controller.protocol import PoolTokenRequest
    from hpcllm.credentials import parse_token
    from hpcllm.gateway.tests.conftest import USER_KEY

    h = Harness(tmp_path, admin_key=ADMIN_KEY)
    h.deploy("llama-7b")
    h.register("svc1")
    token = h.controller.issue_pool_token(PoolTokenRequest(model="llama-7b", group="physics")).token
    h.backend.run_job("77", "phys1")  # the group's pool job
    h.controller.register(NodeRegistration(node_id="phys1", agent_url="http://phys1:9000", pool_model="llama-7b",
                                           slurm_job_id="77"), principal=h.controller.authenticate_token(token))
    server = ThreadServer(create_controller_app(h.controller))
    try:
        keys = [{"key": USER_KEY, "name": "alice", "group": "chemistry"},
                {"key": "sk-physics-user", "name": "bob", "group": "physics"}]
        gw = make_gateway(router=None, static_models={}, controller_url=server.url, status_page_users=True,
                          api_keys=keys)
        chemistry = gw.get("/v1/status", key=USER_KEY).json()
        physics = gw.get("/v1/status", key="sk-physics-user").json()
        admin = gw.get("/v1/admin/status", key=ADMIN_KEY).json()
    finally:
        server.stop()
        h.registry.close()
    assert [n["node_id"] for n in chemistry["nodes"]] == ["svc1"]
    assert sorted(n["node_id"] for n in physics["nodes"]) == ["phys1", "svc1"]
    assert all("credential_id" not in n for n in chemistry["nodes"] + physics["nodes"])
    assert any(n.get("credential_id") == parse_token(token)[0] for n in admin["nodes"])


def users_and_admins_view(make_gateway, h: Harness):
    """The users' answer to GET /v1/status and the admin's status (JSON) through a gateway in front of h's
    controller; closes the controller and its registry."""
    server = ThreadServer(create_controller_app(h.controller))
    try:
        gw = make_gateway(router=None, static_models={}, controller_url=server.url, status_page_users=True)
        return gw.get("/v1/status", key=USER_KEY), gw.get("/v1/admin/status", key=ADMIN_KEY).json()
    finally:
        server.stop()
        h.registry.close()


def test_users_view_of_a_failed_migration_names_no_node_agents_address(make_gateway, tmp_path):
    """A migration that failed keeps the controller's error, which names the node agent's internal address
    ("node agent http://n1:9000: ..."): the admin sees it, a user's view of the migrations does not."""
    from hpcllm.controller.tests.test_migration import full_cluster

    made = []

    def make_harness(**settings):
        made.append(Harness(tmp_path / "controller", admin_key=ADMIN_KEY, **settings))
        return made[-1]

    h, agents, _, _ = full_cluster(make_harness)
    agents.fail_migration = "ReadTimeout (test)"
    assert h.controller.route("b").status == "starting"  # moving a's instance off n1 failed
    user, admin = users_and_admins_view(make_gateway, h)
    assert admin["migrations"][0]["error"] == "node agent http://n1:9000: ReadTimeout (test)"
    assert user.status_code == 200 and [m["outcome"] for m in user.json()["migrations"]] == ["failed"]
    assert "http://n1" not in user.text, user.text


def test_a_status_answer_that_is_not_a_json_object_is_a_503(make_gateway, counted_status, caplog):
    """Something at the controller's address (a proxy, another service) answering JSON that is not an object: the
    users' view says the controller did not give its status (503 controller_unreachable), not a 500."""
    def a_json_list(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'["not", "a", "status"]']

    counted_status.on_status = a_json_list
    gw = make_gateway(router=None, static_models={}, controller_url=counted_status.server.url, status_page_users=True)
    resp = gw.get("/v1/status", key=USER_KEY)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "controller_unreachable", resp.text
    assert "127.0.0.1" not in resp.text, resp.text
    assert "JSON but not an object" in caplog.text


def test_users_are_not_told_the_controllers_address_when_it_is_down(make_gateway, caplog):
    """The users' view never names internal addresses, its error neither: a controller that does not answer is a
    503 controller_unreachable; where it is and why goes to the gateway's log."""
    down = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on: the controller's, down
    gw = make_gateway(router=None, static_models={}, controller_url=down, status_page_users=True)
    resp = gw.get("/v1/status", key=USER_KEY)
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "controller_unreachable"
    assert "127.0.0.1" not in resp.text, resp.text
    assert down in caplog.text


def test_users_view_names_no_checkpoint_or_adapter_paths_nor_slurm_accounts(make_gateway, tmp_path):
    """Where a model's checkpoint and adapters lie on the shared filesystem, and which Slurm account, partition and
    qos its allocations are charged to, are the admin's: a user's view lists the model and its adapters by name."""
    from hpcllm.controller.protocol import SlurmOverrides
    from hpcllm.controller.tests.test_lora_adapters import adapter_folder

    h = Harness(tmp_path / "controller", admin_key=ADMIN_KEY)
    adapter = adapter_folder(tmp_path / "adapters" / "legal")
    h.deploy("llama-7b", lora_adapters={"llama-legal": adapter},
             slurm=SlurmOverrides(account="proj-secret", partition="debug", qos="vip-qos"))
    user, admin = users_and_admins_view(make_gateway, h)
    assert admin["models"][0]["lora_adapters"] == {"llama-legal": adapter}
    assert admin["models"][0]["slurm"]["account"] == "proj-secret"
    assert user.status_code == 200, user.text
    [model] = user.json()["models"]
    assert model["name"] == "llama-7b" and model["lora_adapters"] == ["llama-legal"]
    for secret in (str(tmp_path), "proj-secret", "vip-qos", "\"slurm\""):
        assert secret not in user.text, secret


def test_a_key_whose_request_budget_is_used_up_still_reads_status_files_and_batches(status_gateway):
    """requests_per_minute counts the requests that use a model: a key whose budget is used up (a running batch,
    a loop of completions) is 429 there, but still reads its batch's progress, its files and the status page (which
    polls every 2 s), and still uploads files, creates and cancels batches (test_errors.py: the models)."""
    import io
    import json

    from hpcllm.gateway.ratelimit import _bucket_id

    gw = status_gateway(status_page_users=True,
                        api_keys=[{"key": USER_KEY, "name": "alice", "requests_per_minute": 2}])
    key = gw.state.api_keys[USER_KEY]
    # Both taken, and 1 more, as of an hour from now: the bucket stays empty for this test.
    gw.state.shared.take(_bucket_id(key, "requests"), capacity=2, per_second=2 / 60, cost=3,
                         now=time.time() + 3600)
    for path, body in (("/v1/completions", {"model": "llama-7b", "prompt": "hi", "max_tokens": 1}),
                       ("/v1/embeddings", {"model": "llama-7b", "input": "hi"})):
        resp = gw.post(path, json=body)
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limit_exceeded", resp.text

    client = gw.client()
    line = {"custom_id": "r0", "method": "POST", "url": "/v1/completions",
            "body": {"model": "llama-7b", "prompt": "hi", "max_tokens": 1}}
    source = client.files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/completions", completion_window="24h")
    for _ in range(3):
        for path in (f"/v1/batches/{batch.id}", "/v1/batches", "/v1/files", f"/v1/files/{source.id}", "/v1/status"):
            resp = gw.get(path)
            assert resp.status_code == 200, (path, resp.text)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    assert gw.get("/v1/files", key="sk-wrong").status_code == 401  # every /v1 path still needs a key


class CountedStatus:
    """A real controller (llama-7b deployed, node gpu0001) behind a server that counts its /v1/admin/status calls
    (`asked`), and the clock of the gateway's ControllerRouter (its status cache), standing still until
    next_period(). on_status(environ, start_response), where set, runs at each such call first and answers instead
    of the controller where it returns a body."""

    def __init__(self, tmp_path, monkeypatch):
        from types import SimpleNamespace

        from hpcllm.gateway import routing

        self.h = Harness(tmp_path, admin_key=ADMIN_KEY)
        self.h.deploy("llama-7b")
        self.h.register("gpu0001")
        self.asked: list[str] = []
        self.on_status = None
        self._now = 1000.0
        monkeypatch.setattr(routing, "time", SimpleNamespace(monotonic=lambda: self._now, sleep=time.sleep,
                                                             time=time.time))
        self._period = routing.STATUS_CACHE_S
        controller_app = create_controller_app(self.h.controller)

        def counting(environ, start_response):
            if environ["PATH_INFO"] == "/v1/admin/status":
                self.asked.append(environ["PATH_INFO"])
                answer = self.on_status(environ, start_response) if self.on_status else None
                if answer is not None:
                    return answer
            return controller_app(environ, start_response)

        self.server = ThreadServer(counting)

    def next_period(self) -> None:
        self._now += self._period + 0.1

    def close(self) -> None:
        self.server.stop()
        self.h.registry.close()


@pytest.fixture
def counted_status(tmp_path, monkeypatch):
    counted = CountedStatus(tmp_path, monkeypatch)
    yield counted
    counted.close()


def test_many_status_polls_within_a_second_reach_the_controller_once(make_gateway, counted_status, monkeypatch):
    """Every open status tab polls /v1/status every 2 s: a gateway process answers them from the controller's status
    it fetched within the last STATUS_CACHE_S, so N tabs (polling at once too) cost the controller one call per
    period, not N. Each group still gets its own view of it (chemistry's polls, filtering out physics' pool node, do
    not hide it from the physics polls that share the copy). An admin's poll is passed through, uncached."""
    import threading

    from hpcllm.controller.protocol import PoolTokenRequest

    h, asked = counted_status.h, counted_status.asked
    token = h.controller.issue_pool_token(PoolTokenRequest(model="llama-7b", group="physics")).token
    h.backend.run_job("77", "phys1")  # physics' own pool job
    h.controller.register(NodeRegistration(node_id="phys1", agent_url="http://phys1:9000", pool_model="llama-7b",
                                           slurm_job_id="77"), principal=h.controller.authenticate_token(token))
    all_polls_in = threading.Event()
    # The answer comes once all 8 polls wait for it (or could ask themselves).
    counted_status.on_status = lambda environ, start_response: all_polls_in.wait(timeout=60) and None
    keys = [{"key": USER_KEY, "name": "alice", "group": "chemistry"},
            {"key": "sk-physics-user", "name": "bob", "group": "physics"}]
    gw = make_gateway(router=None, static_models={}, controller_url=counted_status.server.url,
                      status_page_users=True, api_keys=keys)
    polls_in = []

    def counting_polls(admin_key, admin_status=gw.state.router.admin_status):
        polls_in.append(admin_key)
        if len(polls_in) == 8:
            all_polls_in.set()
        return admin_status(admin_key)

    monkeypatch.setattr(gw.state.router, "admin_status", counting_polls)
    answers, groups_keys = [], [USER_KEY, "sk-physics-user"] * 4  # chemistry and physics alternately
    polls = [threading.Thread(target=lambda key=key: answers.append((key, gw.get("/v1/status", key=key))))
             for key in groups_keys]
    for poll in polls:
        poll.start()
    for poll in polls:
        poll.join()
    assert all_polls_in.is_set()  # all 8 were in flight together while the controller held its answer
    answers += [(key, gw.get("/v1/status", key=key)) for key in groups_keys]
    assert [a.status_code for _, a in answers] == [200] * 16
    seen = {USER_KEY: ["gpu0001"], "sk-physics-user": ["gpu0001", "phys1"]}  # each group its own view
    assert [sorted(n["node_id"] for n in a.json()["nodes"]) for _, a in answers] == [seen[k] for k, _ in answers]
    assert len(asked) == 1
    for _ in range(2):  # the admin's polls within the period: each reaches the controller
        assert gw.get("/v1/admin/status", key=ADMIN_KEY).status_code == 200
    assert len(asked) == 3
    counted_status.next_period()  # the period is over: the next poll asks again
    assert gw.get("/v1/status").status_code == 200
    assert len(asked) == 4


def test_a_failed_status_fetch_is_kept_for_the_period_only(make_gateway, counted_status):
    """A controller that did not give its status is not asked again by every poll of the period (a storm of tabs on
    a struggling controller), but only for STATUS_CACHE_S: the next period's poll shows the status again."""
    asked = counted_status.asked

    def failing_once(environ, start_response):
        if len(asked) == 1:  # the first call fails, as a controller restarting or overloaded
            start_response("500 INTERNAL SERVER ERROR", [("Content-Type", "text/plain")])
            return [b"internal error"]
        return None

    counted_status.on_status = failing_once
    gw = make_gateway(router=None, static_models={}, controller_url=counted_status.server.url, status_page_users=True)
    for _ in range(2):  # within the period: the failure is remembered, the controller not asked again
        resp = gw.get("/v1/status")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "controller_unreachable", resp.text
    assert len(asked) == 1
    counted_status.next_period()  # the period is over: the next poll asks again, and gets it
    resp = gw.get("/v1/status")
    assert resp.status_code == 200, resp.text
    assert [n["node_id"] for n in resp.json()["nodes"]] == ["gpu0001"]
    assert len(asked) == 2


def test_a_controller_found_unreachable_is_not_asked_for_its_status_meanwhile(make_gateway, counted_status,
                                                                               monkeypatch):
    """A controller host dropping packets: the status fetch waited its own 30 s to connect (every poll of the process
    queued behind it), not the router's connect timeout, and asked even while the router's other calls skip the
    controller after a failure (2 s). Now it connects within the router's connect timeout, and a poll within the skip
    answers 503 at once."""
    from hpcllm.gateway.routing import ControllerUnreachable

    gw = make_gateway(router=None, static_models={}, controller_url=counted_status.server.url, status_page_users=True,
                      upstream_connect_timeout_seconds=3.0)
    router, fetches = gw.state.router, []
    get = router._http.get

    def recorded(path, **kwargs):
        if path == "/v1/admin/status":
            fetches.append(httpx.Timeout(kwargs["timeout"]))
        return get(path, **kwargs)

    monkeypatch.setattr(router._http, "get", recorded)
    assert gw.get("/v1/status").status_code == 200
    assert [timeout.connect for timeout in fetches] == [3.0]
    counted_status.server.stop()  # the controller's host goes away
    with pytest.raises(ControllerUnreachable):  # a request finds the controller unreachable
        router.list_models()
    counted_status.next_period()  # a new status period, within the skip
    resp = gw.get("/v1/status")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "controller_unreachable", resp.text
    assert len(fetches) == 1, "the status was asked of a controller the router skips"

