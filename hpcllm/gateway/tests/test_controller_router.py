"""ControllerRouter against the real controller (its Flask app, service and SQLite registry).

Only the node agent is replaced: an in-process AgentClient that "starts" an instance by pointing it at the real
worker fixture and, a moment later, heartbeats it as ready - what a real node agent reports after loading. The
gateway then sees the controller's whole route contract: 202 while starting, a long-poll woken by the heartbeat,
200 with the load tier, and the admin API proxied with the admin key.
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

from hpcllm.config import parse_config
from hpcllm.controller.agents import AgentClient, StartedInstance
from hpcllm.controller.allocations import Allocator
from hpcllm.controller.app import create_app as create_controller_app
from hpcllm.controller.protocol import Heartbeat, InstanceInfo, ModelSpec, NodeRegistration, TierInfo, Tiers
from hpcllm.controller.registry import Registry
from hpcllm.controller.service import Controller

from .conftest import ADMIN_KEY, MODEL, SECRET, USER_KEY, ThreadServer, raw_post
from .test_errors import assert_error
from .test_openai_api import hf_greedy

NODE = "n1"
LOAD_DELAY_S = 0.8


class InProcessAgents(AgentClient):
    """Node agents whose instances are the real worker; each becomes ready after LOAD_DELAY_S."""

    def __init__(self, worker_url: str):
        self.worker_url = worker_url
        self.controller: Controller | None = None
        self.instances: dict[str, InstanceInfo] = {}
        self.started: list[tuple[str, int | None]] = []  # (model, max_model_len) of every start asked for
        self._ids = itertools.count(1)
        self._keys: dict[str, str] = {}

    def close(self) -> None:
        pass

    def start_instance(self, agent_url, model, source, gpu_ids, max_model_len=None, engine="hpcllm",
                       cache_on_load=None, tensor_parallel=1, nodes=1, lora_adapters=None) -> StartedInstance:
        self.started.append((model, max_model_len))
        instance_id = f"inst-{next(self._ids)}"
        self.instances[instance_id] = InstanceInfo(instance_id=instance_id, model=model, state="loading",
                                                   worker_url=self.worker_url, gpu_ids=gpu_ids)
        threading.Timer(LOAD_DELAY_S, self._loaded, args=(instance_id,)).start()
        return StartedInstance(instance_id, self.worker_url)

    def _loaded(self, instance_id: str) -> None:
        info = self.instances[instance_id]
        self.instances[instance_id] = info.model_copy(
            update={"state": "ready", "load_tier": "nvme", "load_seconds": 0.5, "started_at": time.time()})
        self.controller.heartbeat(NODE, Heartbeat(instances=list(self.instances.values())))

    def stop_instance(self, agent_url, instance_id) -> None:
        self.instances.pop(instance_id, None)

    def list_instances(self, agent_url):
        return list(self.instances.values())


@pytest.fixture
def agents(worker_url) -> InProcessAgents:
    return InProcessAgents(worker_url)


@contextmanager
def serve_controller(tmp_path, agents, tiny_model_dir, model_gpus: int, node_gpus: int, **model_config):
    """A real controller app (no Slurm backend, no allocations) with MODEL deployed (with model_config's other
    fields) and one node agent up; stopped on leaving."""
    config = parse_config({
        "paths": {"state_dir": str(tmp_path / "cstate"), "models_dir": str(tmp_path / "models")},
        "cluster": {"shared_secret": SECRET},
        "controller": {"admin_key": ADMIN_KEY, "database_url": f"sqlite:///{tmp_path / 'controller.db'}",
                       "allocate_on_demand": False},
    })
    registry = Registry(config.controller.database_url)
    controller = Controller(config, registry, agents, Allocator(config, registry, None, "http://unused"))
    agents.controller = controller
    controller.deploy(ModelSpec(name=MODEL, source=str(tiny_model_dir), size_bytes=10**6, gpus=model_gpus,
                                **model_config))
    controller.register(NodeRegistration(node_id=NODE, agent_url="http://n1:9000", gpus=node_gpus,
                                         tiers=Tiers(sharedfs=TierInfo(read_gbps=1.0))))
    server = ThreadServer(create_controller_app(controller))
    try:
        yield server
    finally:
        server.stop()
        registry.close()


@pytest.fixture
def controller_server(tmp_path, agents, tiny_model_dir):
    with serve_controller(tmp_path, agents, tiny_model_dir, model_gpus=0, node_gpus=0) as server:
        yield server


@pytest.fixture
def controller_url(controller_server):
    return controller_server.url


@pytest.fixture
def routed_gateway(make_gateway, controller_url):
    return make_gateway(static_models={}, controller_url=controller_url, route_poll_seconds=5)


def metric(gateway, line_start: str) -> float | None:
    for line in httpx.get(f"{gateway.url}/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_cold_start_through_the_controller_then_warm_requests(routed_gateway, hf_pair):
    client = routed_gateway.client()
    assert [m.id for m in client.models.list().data] == [MODEL]

    started = time.monotonic()
    resp = client.completions.create(model=MODEL, prompt="hello world", max_tokens=10, temperature=0)
    assert time.monotonic() - started >= LOAD_DELAY_S  # it really waited for the instance to load
    expected_text, _, _ = hf_greedy(hf_pair, hf_pair[1]("hello world")["input_ids"], 10)
    assert resp.choices[0].text == expected_text

    cold = f'hpcllm_cold_starts_total{{model_name="{MODEL}",tier="nvme"}}'
    assert metric(routed_gateway, cold) == 1.0
    assert metric(routed_gateway, 'hpcllm_model_load_seconds_count{tier="nvme"}') == 1.0
    assert metric(routed_gateway, 'hpcllm_model_load_seconds_sum{tier="nvme"}') == 0.5

    # Warm: routed at once to the ready instance; no new cold start is counted.
    started = time.monotonic()
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert metric(routed_gateway, cold) == 1.0
    assert metric(routed_gateway, f'hpcllm_request_queue_time_seconds_count{{model_name="{MODEL}"}}') == 2.0


def test_unknown_model_and_ready_follow_the_controller(routed_gateway, controller_url):
    resp = routed_gateway.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{routed_gateway.url}/ready").status_code == 200


def test_admin_api_is_proxied_with_the_admin_key(routed_gateway, tiny_model_dir):
    status = routed_gateway.get("/v1/admin/status", key=ADMIN_KEY)
    assert status.status_code == 200, status.text
    assert [m["name"] for m in status.json()["models"]] == [MODEL]

    spec = {"name": "tiny-two", "source": str(tiny_model_dir), "size_bytes": 10**6, "gpus": 0}
    deployed = routed_gateway.post("/v1/admin/models", key=ADMIN_KEY, json=spec)
    assert deployed.status_code == 201, deployed.text
    # The controller's own validation errors come back unchanged, in the error shape.
    bad = routed_gateway.post("/v1/admin/models", key=ADMIN_KEY, json={"name": "x"})
    assert bad.status_code == 400 and "source" in bad.json()["error"]["message"]
    too_long = routed_gateway.post("/v1/admin/models", key=ADMIN_KEY, json={**spec, "max_model_len": 2048})
    assert too_long.status_code == 400
    assert "max_model_len = 2048 is more than the model's context length of 512 tokens" in \
        too_long.json()["error"]["message"]
    assert routed_gateway.get("/v1/admin/status", key=USER_KEY).status_code == 401

    time.sleep(2.1)  # the gateway's copy of the model list lives 2 s
    assert sorted(m.id for m in routed_gateway.client().models.list().data) == [MODEL, "tiny-two"]
    gone = httpx.delete(f"{routed_gateway.url}/v1/admin/models/tiny-two",
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert gone.status_code == 200 and gone.json()["undeployed"] == "tiny-two"


def test_controller_down_is_503_and_not_ready(make_gateway):
    gw = make_gateway(static_models={}, controller_url="http://127.0.0.1:9", upstream_connect_timeout_seconds=1,
                      controller_outage_wait_seconds=1.5)
    started = time.monotonic()
    resp = gw.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "controller_unreachable"
    assert time.monotonic() - started >= 1.5  # it waited for the controller to come back, then gave up
    assert resp.headers["Retry-After"]
    ready = httpx.get(f"{gw.url}/ready")
    assert ready.status_code == 503
    for answer in (resp, ready):  # open to anyone: no internal address (the gateway's log has it)
        assert "127.0.0.1:9" not in answer.text, answer.text
    assert httpx.get(f"{gw.url}/health").status_code == 200


# ----------------------------------------------------------------------------------- controller outages


def controller_metric(url: str, line_start: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
                if line.startswith(line_start + " "))


def restart_on_same_port(server: ThreadServer, after_s: float) -> threading.Thread:
    """Starts the stopped controller app again on its old port after after_s (a controller restart)."""
    def restart():
        time.sleep(after_s)
        server.start_again()

    thread = threading.Thread(target=restart)
    thread.start()
    return thread


def test_ready_instances_keep_serving_while_the_controller_is_down(routed_gateway, controller_server, agents):
    client = routed_gateway.client()
    first = client.completions.create(model=MODEL, prompt="hello world", max_tokens=6, temperature=0)
    assert len(agents.started) == 1
    controller_server.stop()  # as kill -9: connections are refused from now on
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{controller_server.url}/health")

    # The instance the controller named ready keeps serving: streaming, non-streaming, the model list, /ready.
    for _ in range(3):
        again = client.completions.create(model=MODEL, prompt="hello world", max_tokens=6, temperature=0)
        assert again.choices[0].text == first.choices[0].text
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True, extra_body={"ignore_eos": True}))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    time.sleep(2.1)  # past the model list's 2 s: the last copy is used while the controller is away
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{routed_gateway.url}/ready").status_code == 200
    assert len(agents.started) == 1

    # When the controller is back the gateway asks it again (after the 2 s it leaves a failed controller alone).
    restart_on_same_port(controller_server, 0).join()
    routed = f'hpcllm_controller_routes_total{{model_name="{MODEL}",outcome="ready"}}'
    before = controller_metric(controller_server.url, routed)
    time.sleep(2.1)
    client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
    assert controller_metric(controller_server.url, routed) == before + 1


def test_a_cold_start_waits_for_the_controller_to_come_back(routed_gateway, controller_server, agents):
    controller_server.stop()
    restart = restart_on_same_port(controller_server, 2.0)
    started = time.monotonic()
    resp = routed_gateway.client().completions.create(model=MODEL, prompt="hello world", max_tokens=4)
    assert time.monotonic() - started >= 2.0 and resp.usage.completion_tokens == 4
    assert len(agents.started) == 1  # the cold start went through the restarted controller
    restart.join()


def test_a_remembered_worker_serving_another_model_is_not_used(controller_server, worker_url):
    """A worker's port reused by another model's worker after a restart: its /ready names the other model, so the
    prompts of this one never go there; requests wait for the controller instead (here: give up after 1 s)."""
    from hpcllm.gateway.errors import ServiceUnavailable
    from hpcllm.gateway.known_routes import KnownInstance
    from hpcllm.gateway.routing import ControllerRouter

    router = ControllerRouter(controller_server.url, shared_secret=SECRET, outage_wait_s=1.0)
    router._known.remember("other-model", KnownInstance("inst-x", worker_url))  # the worker serves MODEL
    controller_server.stop()
    with pytest.raises(ServiceUnavailable) as refused:
        router.resolve("other-model", wait_s=30)
    assert refused.value.code == "controller_unreachable"
    assert router._known.candidates("other-model") == []  # and it is forgotten
    router.close()


def test_an_unreadable_route_answer_is_a_503_that_tells_the_client_no_key_or_address(caplog):
    """A controller whose route answer this gateway cannot read (another hpcllm version's, mid-upgrade): a 503
    controller_error; what was wrong and the controller's address go to the gateway's log only (the validation error
    quoted the whole answer to the client), and the answer's values (the worker's node key, its address) to neither."""
    from flask import Flask

    from hpcllm.gateway.errors import ServiceUnavailable
    from hpcllm.gateway.routing import ControllerRouter

    app = Flask("newer-controller")

    @app.get("/v1/internal/route")
    def route():  # no node_id, which this gateway's RouteReady requires
        return {"status": "ready", "model": MODEL, "instance_id": "inst-1", "worker_url": "http://10.1.2.3:8101",
                "worker_key": "nk-node-secret"}

    server = ThreadServer(app)
    router = ControllerRouter(server.url, shared_secret=SECRET)
    try:
        with pytest.raises(ServiceUnavailable) as refused:
            router.resolve(MODEL, wait_s=5)
    finally:
        router.close()
        server.stop()
    assert refused.value.code == "controller_error"
    assert "RouteReady" in refused.value.message
    for secret in ("nk-node-secret", "10.1.2.3", server.url):
        assert secret not in refused.value.message, refused.value.message
    [logged] = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert "RouteReady" in logged and "node_id" in logged and server.url in logged
    for value in ("nk-node-secret", "10.1.2.3"):  # pydantic's input_value shows what fits of the answer
        assert value not in logged, logged


# ------------------------------------------------------------------------------------------- context length


def test_chat_without_max_tokens_gets_the_rest_of_the_context(routed_gateway, agents, tiny_model_dir, hf_pair):
    """What most chat clients send: no max_tokens. The deploy (no max_model_len) recorded the model's 512
    positions; the gateway fills in 512 - prompt tokens and the worker, told the same number, serves it."""
    from hpcllm.checkpoint.context import source_max_model_len

    limit = source_max_model_len(tiny_model_dir)
    assert limit == hf_pair[0].config.max_position_embeddings == 512
    client = routed_gateway.client()
    messages = [{"role": "user", "content": "hello there, how are you today?"}]
    # The prompt the worker gets is the rendered chat template: the gateway counts exactly those tokens.
    template_ids = hf_pair[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(hf_pair[1](template_ids, add_special_tokens=False)["input_ids"])

    resp = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert resp.usage.prompt_tokens == prompt_tokens
    # The seeded tiny model never says EOS here, so greedy decoding runs to the very end of the context.
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens == limit
    assert agents.started == [(MODEL, limit)]  # the worker was started with the gateway's number

    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content and chunks[-1].usage == resp.usage


def test_completion_without_max_tokens_near_the_end_of_the_context(routed_gateway, hf_pair):
    """/v1/completions defaults to 16 tokens (OpenAI's and vLLM's default), shortened to what the context holds."""
    client = routed_gateway.client()
    prompt_ids = hf_pair[1]("hello world " * 300)["input_ids"][:505]
    resp = client.completions.create(model=MODEL, prompt=prompt_ids, temperature=0)
    assert resp.usage.prompt_tokens == 505 and resp.usage.completion_tokens <= 512 - 505
    chunks = list(client.completions.create(model=MODEL, prompt=prompt_ids, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == resp.choices[0].text


def test_prompt_beyond_the_context_is_refused_before_any_cold_start(routed_gateway, agents):
    client = routed_gateway.client()
    long_chat = [{"role": "user", "content": "hello world " * 600}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=long_chat)
    assert refused.value.code == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in refused.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hello world " * 600, stream=True)
    assert agents.started == []  # no instance was started for requests that cannot fit


# ------------------------------------------------------------------------------------------ groups and pools


class PhysicsPool:
    """A pool registered with a pool token for group physics (docs/security.md), its worker (real, in a thread)
    holding only the node key the controller handed out and heartbeated ready."""

    def __init__(self, controller_url: str, tiny_model_dir):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hpcllm.credentials import TOKEN_HEADER
        from hpcllm.worker.server import ModelForServing, WorkerService
        from hpcllm.worker.server import create_app as create_worker_app

        issued = httpx.post(f"{controller_url}/v1/admin/pool-tokens", json={"model": MODEL, "group": "physics"},
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert issued.status_code == 201, issued.text
        self.credential_id = issued.json()["credential_id"]
        token = {TOKEN_HEADER: issued.json()["token"]}
        registered = httpx.post(f"{controller_url}/v1/internal/nodes/register", headers=token,
                                json={"node_id": "p1", "agent_url": "http://p1:9000", "pool_model": MODEL})
        assert registered.status_code == 200, registered.text
        self.service = WorkerService(MODEL, secret=registered.json()["node_key"], keepalive_seconds=0.5)
        self.service.attach(ModelForServing(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                                            AutoTokenizer.from_pretrained(tiny_model_dir), tier="dram",
                                            load_seconds=0.1))
        self.worker = ThreadServer(create_worker_app(self.service))
        ready = InstanceInfo(instance_id="pool-1", model=MODEL, state="ready", worker_url=self.worker.url)
        beat = httpx.post(f"{controller_url}/v1/internal/nodes/p1/heartbeat", headers=token,
                          json={"instances": [ready.model_dump()]})
        assert beat.status_code == 200, beat.text

    def served(self, response_id: str) -> bool:
        from hpcllm.worker.engine import UnknownRequest

        try:
            return self.service.engine.tokens(response_id + "-0-0").finish_reason is not None
        except UnknownRequest:
            return False

    def stop(self) -> None:
        self.worker.stop()
        self.service.shutdown()


@pytest.fixture
def physics_pool(controller_url, tiny_model_dir):
    pool = PhysicsPool(controller_url, tiny_model_dir)
    yield pool
    pool.stop()


GROUP_KEYS = [{"key": "sk-physics", "name": "ada", "group": "physics"},
              {"key": "sk-chemistry", "name": "marie", "group": "chemistry"}]


def test_a_groups_pool_gets_that_groups_prompts_only(make_gateway, controller_url, agents, physics_pool, hf_pair):
    """A physics key's request is served by physics' pool (the gateway calls it with the pool's node key); a
    chemistry key's request never reaches it - the controller starts an instance of its own for chemistry."""
    gateway = make_gateway(static_models={}, controller_url=controller_url, route_poll_seconds=5,
                           api_keys=GROUP_KEYS)
    expected, _, _ = hf_greedy(hf_pair, hf_pair[1]("hello world")["input_ids"], 6)

    physics = gateway.client("sk-physics").completions.create(model=MODEL, prompt="hello world", max_tokens=6,
                                                              temperature=0)
    assert physics.choices[0].text == expected
    assert agents.started == []  # served by the pool: nothing was started
    assert physics_pool.served(physics.id)  # it ran on the pool's worker

    chemistry = gateway.client("sk-chemistry").completions.create(model=MODEL, prompt="hello world",
                                                                  max_tokens=6, temperature=0)
    assert chemistry.choices[0].text == expected
    assert [model for model, _ in agents.started] == [MODEL]  # its own instance, on the service's node
    assert not physics_pool.served(chemistry.id)  # the chemistry request was never on the pool's worker


def test_a_pool_revoked_before_a_controller_outage_is_not_served_from_memory(make_gateway, controller_server,
                                                                            physics_pool):
    """An admin revokes physics' pool token, then the controller goes down before the gateway could learn of it.
    The service's own instance goes on serving from memory; the pool is remembered only for
    known_pool_route_ttl_seconds (here 0): physics' requests wait for the controller instead of reaching it."""
    gateway = make_gateway(static_models={}, controller_url=controller_server.url, route_poll_seconds=5,
                           api_keys=GROUP_KEYS, known_pool_route_ttl_seconds=0, controller_outage_wait_seconds=0.5)
    physics, chemistry = gateway.client("sk-physics"), gateway.client("sk-chemistry")
    request = dict(model=MODEL, prompt="hello world", max_tokens=4, temperature=0)
    assert physics_pool.served(physics.completions.create(**request).id)
    assert not physics_pool.served(chemistry.completions.create(**request).id)  # the service's instance
    revoked = httpx.delete(f"{controller_server.url}/v1/admin/credentials/{physics_pool.credential_id}",
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert revoked.status_code == 200, revoked.text
    controller_server.stop()

    assert chemistry.completions.create(**request).usage.completion_tokens == 4  # shared: served on
    with pytest.raises(openai.InternalServerError) as waited:
        physics.with_options(max_retries=0).completions.create(**request)
    assert waited.value.status_code == 503 and waited.value.code == "controller_unreachable"


def test_a_pools_route_is_remembered_for_the_shorter_pool_ttl():
    from hpcllm.gateway.known_routes import KnownInstance, KnownRoutes

    now = 0.0
    known = KnownRoutes(600.0, 30.0, clock=lambda: now)
    service = KnownInstance("inst-1", "http://n1:9001", "node-key", "physics")
    pool = KnownInstance("pool-1", "http://p1:9001", "pool-node-key", "physics", pool=True)
    known.remember(MODEL, service)
    known.remember(MODEL, pool)
    now = 30.0
    assert set(known.candidates(MODEL, "physics")) == {service, pool}
    now = 30.5
    assert known.candidates(MODEL, "physics") == [service]
    now = 600.5
    assert known.candidates(MODEL, "physics") == []


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}),
    ("/v1/embeddings", {"model": MODEL, "input": "x"}),
], ids=["completions", "embeddings"])
def test_a_request_waiting_for_a_cold_start_when_the_gateway_shuts_down_gets_gateway_shutdown(
        make_gateway, controller_url, agents, monkeypatch, path, body):
    """The drain timeout ends the running generations with 503 gateway_shutdown (Gateway.stop_generations), but one
    still waiting for its model's cold start went on waiting, and gunicorn's stop cut its connection unanswered.
    Now the wait ends with the shutdown's 503 (a generation's, and a pooling request's that is no generation); and
    once the gateway drains, its route polls are short enough for that answer to come within the shutdown's grace,
    not after a whole route_poll_seconds."""
    from hpcllm.gateway.routing import DRAINING_POLL_S
    from hpcllm.gateway.server import ABORT_GRACE_S

    monkeypatch.setattr(agents, "_loaded", lambda instance_id: None)  # its instance never finishes loading
    gw = make_gateway(static_models={}, controller_url=controller_url, route_poll_seconds=3,
                      route_timeout_seconds=60)
    router, polls = gw.state.router, []  # per route poll: the wait it asked for
    get = router._get

    def recording_get(path, **params):
        if path == "/v1/internal/route":
            polls.append(params["wait"])
        return get(path, **params)

    monkeypatch.setattr(router, "_get", recording_get)
    answers: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(gw.post(path, json=body)))
    waiting.start()
    deadline = time.monotonic() + 30
    while not agents.started:  # its cold start began: the request waits for it
        assert time.monotonic() < deadline, "no cold start"
        time.sleep(0.05)
    gw.state.start_draining()
    # The one request polls in turn: the poll it may be computing now may not know of the drain, the next ones do.
    drained_from = len(polls) + 1
    while len(polls) <= drained_from:  # a route poll asked while draining
        assert time.monotonic() < deadline + 30, "no route poll while draining"
        time.sleep(0.05)
    gw.state.stop_generations(grace_s=ABORT_GRACE_S)
    waiting.join(90)
    assert answers, "no answer"
    assert_error(answers[0], 503, "gateway_shutdown")
    assert all(wait <= DRAINING_POLL_S for wait in polls[drained_from:]), polls


# ----------------------------------------------------------------------------------------- no capacity now


@pytest.fixture
def empty_cluster(tmp_path, agents, tiny_model_dir):
    """A controller with the model deployed but no node agent yet, and no allocation it may submit: no capacity
    until an agent registers (an allocation's, a group's pool, a node freed by another model)."""
    config = parse_config({
        "paths": {"state_dir": str(tmp_path / "cstate"), "models_dir": str(tmp_path / "models")},
        "cluster": {"shared_secret": SECRET},
        "controller": {"admin_key": ADMIN_KEY, "database_url": f"sqlite:///{tmp_path / 'controller.db'}",
                       "allocate_on_demand": False, "allocation_start_estimate_seconds": 7},
    })
    registry = Registry(config.controller.database_url)
    controller = Controller(config, registry, agents, Allocator(config, registry, None, "http://unused"))
    agents.controller = controller
    controller.deploy(ModelSpec(name=MODEL, source=str(tiny_model_dir), size_bytes=10**6, gpus=0))
    server = ThreadServer(create_controller_app(controller))
    yield server, controller
    server.stop()
    registry.close()


def test_a_request_waits_for_capacity_then_is_served(make_gateway, empty_cluster, agents):
    """Before, the gateway answered 503 no_capacity at once; now the request queues until a node can take it."""
    server, controller = empty_cluster
    gw = make_gateway(static_models={}, controller_url=server.url, route_poll_seconds=1, route_timeout_seconds=30)
    agent_up = threading.Timer(2.0, controller.register, args=(NodeRegistration(
        node_id=NODE, agent_url="http://n1:9000", gpus=0, tiers=Tiers(sharedfs=TierInfo(read_gbps=1.0))),))
    agent_up.start()
    started = time.monotonic()
    resp = gw.client().completions.create(model=MODEL, prompt="hello world", max_tokens=4)
    assert resp.usage.completion_tokens == 4
    assert time.monotonic() - started >= 2.0 + LOAD_DELAY_S  # waited for the node, then for the cold start
    assert len(agents.started) == 1


def test_no_capacity_within_the_budget_is_a_clear_503_with_retry_after(make_gateway, empty_cluster):
    server, _ = empty_cluster
    gw = make_gateway(static_models={}, controller_url=server.url, route_poll_seconds=1, route_timeout_seconds=2.5)
    started = time.monotonic()
    resp = gw.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert time.monotonic() - started >= 2.5  # it queued for its whole budget
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "no_capacity"
    assert "after waiting 2.5 s" in error["message"] and "no Slurm backend" in error["message"], error
    assert resp.headers["Retry-After"] == "7"


# --------------------------------------------------------------------------------- no capacity possible


@pytest.fixture
def unfit_cluster(tmp_path, agents, tiny_model_dir):
    """A model of 4 GPUs per instance, one node agent up with 2, and no allocation the controller may submit: no
    capacity can ever come for it."""
    with serve_controller(tmp_path, agents, tiny_model_dir, model_gpus=4, node_gpus=2) as server:
        yield server


def test_no_capacity_possible_is_a_503_at_once_not_after_the_route_timeout(make_gateway, unfit_cluster, agents):
    gw = make_gateway(static_models={}, controller_url=unfit_cluster.url, route_poll_seconds=5,
                      route_timeout_seconds=60)
    started = time.monotonic()
    resp = gw.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert time.monotonic() - started < 4.0  # under one 5 s route poll; before: 60 s of waiting for the same answer
    assert resp.status_code == 503, resp.text
    assert "Retry-After" not in resp.headers  # asking again cannot help
    error = resp.json()["error"]
    assert error["code"] == "no_capacity_possible" and error["type"] == "service_unavailable", error
    assert "needs 4 GPUs on one node" in error["message"] and "largest node registered has 2 GPUs" in error["message"]
    assert "no Slurm backend is configured" in error["message"] and "Fix:" in error["message"], error
    assert agents.started == []


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2, "stream": True}),
    ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2}),
    ("/v1/embeddings", {"model": MODEL, "input": "hello"}),
], ids=["stream", "whole", "embeddings"])
def test_a_client_that_leaves_while_its_request_waits_for_capacity_frees_its_slot(make_gateway, empty_cluster,
                                                                                   monkeypatch, path, body):
    """A client gives up on a request queued for capacity (or a cold start): the gateway stops waiting for it within
    a route poll, so its stream slot, token reservation and thread come back, not after route_timeout_seconds (a
    user retrying was told 429 too_many_streams by its own abandoned request)."""
    server, _ = empty_cluster
    gw = make_gateway(static_models={}, controller_url=server.url, route_poll_seconds=1, route_timeout_seconds=300,
                      api_keys=[{"key": USER_KEY, "max_concurrent_streams": 1}])
    limiter, settled = gw.state.limiter, []
    settle = limiter.settle_tokens

    def settle_tokens(key, reserved, used):  # what the request gives back of its reservation, and gives it back
        settled.append((reserved, used))
        settle(key, reserved, used)

    monkeypatch.setattr(limiter, "settle_tokens", settle_tokens)
    client = raw_post(gw, path, body)
    deadline = time.monotonic() + 30
    while not gw.state.in_flight:  # admitted: its slot and reservation taken, waiting for capacity
        assert time.monotonic() < deadline, "the request never came in"
        time.sleep(0.05)
    client.close()  # the client gives up
    deadline = time.monotonic() + 30  # a tenth of the route timeout: a few route polls
    while gw.state.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not gw.state.in_flight, "the abandoned request still waits for capacity"
    assert not gw.state._generations
    [(reserved, used)] = settled  # its whole reservation came back: it used nothing
    assert reserved > 0 and used == 0
    if body.get("stream"):
        with gw.state.shared.connection() as db:  # its stream slot is free
            assert db.conn.execute("SELECT COUNT(*) AS n FROM gateway_stream_slots").fetchone()["n"] == 0


class NeverLoadingAgents(InProcessAgents):
    """Node agents whose instances load for ever: a request for MODEL waits for its route."""

    def _loaded(self, instance_id: str) -> None:
        return


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/embeddings"])  # a generation, a pooling request
def test_a_gateway_process_closing_cancels_a_batch_request_waiting_for_its_route_and_hands_the_batch_back(
        make_gateway, tmp_path, tiny_model_dir, endpoint):
    """A quick stop closes a gateway process while its batch's request waits for its model to start: the close
    cancelled only generating requests, so the run kept waiting (up to route_timeout_seconds) and the batch stayed
    held by the exiting process, a lease's length. Now the waiting request ends too, not recorded, and the batch is
    released for another process to run by the time close() returns (the process exits then), though the route's
    poll in flight lasts route_poll_seconds (6 s here, the default's 20 s: well past the quick close's 1 s)."""
    import json

    from hpcllm.gateway.server import QUICK_CLOSE_S

    from .test_batches_api import chat_line, service_of, submit, wait_until

    agents = NeverLoadingAgents("http://127.0.0.1:9")
    with serve_controller(tmp_path, agents, tiny_model_dir, model_gpus=0, node_gpus=0) as controller:
        gw = make_gateway(static_models={}, controller_url=controller.url, route_timeout_seconds=300,
                          route_poll_seconds=6, batch_lease_seconds=300, batch_concurrency=1)
        body = {"model": MODEL, "input": "hi"} if endpoint == "/v1/embeddings" else chat_line("a", "hi")["body"]
        submit(gw.client(), [{"custom_id": "a", "method": "POST", "url": endpoint, "body": body}], endpoint=endpoint)
        wait_until(lambda: agents.started)  # the request asked for its route: the model starts (for ever)
        runner = service_of(gw).runner
        gw.state.close(QUICK_CLOSE_S)

        def batch_row():
            with service_of(gw).batches.shared.connection() as db:
                return db.conn.execute("SELECT status, lease_holder, batch FROM gateway_batches").fetchone()

        row = batch_row()
        assert row["lease_holder"] is None and row["status"] == "in_progress"  # released as close() returns
        counts = json.loads(row["batch"])["request_counts"]
        assert (counts["completed"], counts["failed"]) == (0, 0)  # not recorded: the next process runs it
        wait_until(lambda: not runner.running, timeout_s=120)  # the poll in flight returns: the run ends
        row = batch_row()
        assert row["lease_holder"] is None
        assert json.loads(row["batch"])["request_counts"] == counts  # it wrote nothing after handing the batch back
