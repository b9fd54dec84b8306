"""Live migration seen through the gateway: the source worker hands the generation over mid-stream, the gateway
attaches to the destination, and the client's stream goes on with the same text and token count as an
uninterrupted run (openai client and plain SSE); if the attach fails the gateway resumes from tokens instead."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from hpcllm.worker.client import WorkerClient
from hpcllm.worker.engine import EngineUnavailable
from hpcllm.worker.migration import ticketed_request

from .conftest import MODEL, SECRET, USER_KEY, ThreadServer, read_completion_stream
from .test_resume import ScriptedRouter

LABEL = f'model_name="{MODEL}"'
HOLD_TIMEOUT_S = 60.0  # only bounds a failed test: a hold is released by its move, never by time


class Hold:
    """A worker's generation held at a point: once `requests` requests generate there (attached, not leaving) with
    at least `tokens` output tokens each, its engine's next step waits until release() (once). A migration ordered
    then always finds them running, however slowly the client reads: it needs no step of the held engine (its
    rounds' delta is empty, the hand-over pauses and ends the streams under the engine's lock)."""

    def __init__(self, engine, tokens: int, requests: int):
        self.engine, self.tokens, self.requests = engine, tokens, requests
        self.reached, self.released = threading.Event(), threading.Event()

    def wait_if_due(self) -> None:
        if self.released.is_set() or not self._due():
            return
        self.reached.set()
        self.released.wait(HOLD_TIMEOUT_S)

    def _due(self) -> bool:
        ids = self.engine.migratable_request_ids()
        return len(ids) >= self.requests and all(
            len(self.engine.tokens(request_id).output_token_ids) >= self.tokens for request_id in ids)

    def release(self) -> None:
        self.released.set()


class Worker:
    """hpcllm's own engine over a model (in this process), served on a local port; its generation can be held
    (hold_at)."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hpcllm.worker.server import ModelForServing, WorkerService, create_app

        self.service = WorkerService(MODEL, secret=SECRET, keepalive_seconds=0.5)
        self.service.attach(ModelForServing(AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                                            AutoTokenizer.from_pretrained(model_dir)))
        self.server = ThreadServer(create_app(self.service))
        self.url = self.server.url

    @property
    def engine(self):
        return self.service.engine

    def hold_at(self, tokens: int, requests: int = 1) -> Hold:
        """Hold this worker's generation once `requests` requests have `tokens` output tokens here (Hold)."""
        hold, forward = Hold(self.engine, tokens, requests), self.engine._forward

        def held_forward(*args, **kwargs):
            hold.wait_if_due()
            return forward(*args, **kwargs)

        self.engine._forward = held_forward
        return hold

    def migrate_everything_to(self, destination_url: str):
        with WorkerClient(self.url, SECRET) as client:
            return client.migrate_all(ticketed_request(destination_url, model=MODEL, key=SECRET))

    def stop(self):
        self.server.stop()
        self.service.shutdown()


def move_when_held(hold: Hold, source: Worker, destination_url: str):
    """Once `hold` holds the source's generation: move everything to the destination (a worker of either engine),
    then let the source go on."""
    assert hold.reached.wait(HOLD_TIMEOUT_S), "the generation never reached the point where it is moved"
    try:
        return source.migrate_everything_to(destination_url)
    finally:
        hold.release()


@pytest.fixture
def two_workers(tiny_model_dir):
    workers = Worker(tiny_model_dir), Worker(tiny_model_dir)
    yield workers
    for worker in workers:
        worker.stop()


def metric(gateway, line: str) -> bool:
    return line in httpx.get(f"{gateway.url}/metrics").text


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_openai_stream_follows_a_live_migration(make_gateway, two_workers, tiny_model_dir, sampling):
    source, destination = two_workers
    gateway = make_gateway(router=ScriptedRouter(tiny_model_dir, [source.url]))
    client = gateway.client()
    request = dict(model=MODEL, prompt="hello world", max_tokens=40, extra_body={"ignore_eos": True}, **sampling)
    reference = client.completions.create(**request)
    hold = source.hold_at(tokens=5)  # moved after its 5th token, while the client reads the stream

    with ThreadPoolExecutor(1) as mover:
        moving = mover.submit(move_when_held, hold, source, destination.url)
        texts, usage, finish = read_completion_stream(
            client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
        moved = moving.result()

    assert len(moved.migrated) == 1 and moved.failed == [], moved
    assert "".join(texts) == reference.choices[0].text
    assert usage.completion_tokens == reference.usage.completion_tokens == 40  # no token lost or repeated
    assert finish == "length"
    assert destination.engine.tokens(moved.migrated[0].request_id).finish_reason == "length"
    assert metric(gateway, f"hpcllm_request_migrations_total{{{LABEL}}} 1.0")
    assert metric(gateway, f"hpcllm_migration_pause_seconds_count{{{LABEL}}} 1.0")
    assert not metric(gateway, f"hpcllm_request_resumes_total{{{LABEL}}} 1.0")


def test_a_failed_attach_falls_back_to_resuming_from_tokens(make_gateway, two_workers, tiny_model_dir):
    source, destination = two_workers
    router = ScriptedRouter(tiny_model_dir, [source.url, destination.url])
    gateway = make_gateway(router=router)
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    reference = gateway.post("/v1/completions", json=body).json()
    router.urls = [source.url, destination.url]
    hold = source.hold_at(tokens=4)

    def attach_refused(*args, **kwargs):
        raise EngineUnavailable("destination is shutting down")

    destination.engine.attach = attach_refused
    texts = []
    with ThreadPoolExecutor(1) as mover:
        moving = mover.submit(move_when_held, hold, source, destination.url)
        for event in completion_events(gateway, body, lambda events: None):
            assert "error" not in event, event
            texts.append(event["choices"][0]["text"])
        assert len(moving.result().migrated) == 1

    assert "".join(texts) == reference["choices"][0]["text"]
    assert router.resolved[-2:] == [source.url, destination.url]  # routed again for the resume
    assert metric(gateway, f"hpcllm_request_resumes_total{{{LABEL}}} 1.0")
    assert not metric(gateway, f"hpcllm_request_migrations_total{{{LABEL}}} 1.0")


def test_a_migration_without_a_grant_is_resumed_and_never_gets_the_gateways_secret(make_gateway, tiny_model_dir,
                                                                                  two_workers):
    """A source worker's stream names where its generation went: a group's own pool controls that stream. Without
    the grant of the controller's ticket the gateway must not attach there with its cluster secret (that would
    hand the secret to any URL a pool names); it resumes from tokens on a worker the router gives instead."""
    from flask import Flask, Response, request

    from hpcllm.worker.protocol import FinalLine, MigratedTo, TokenLine, Usage

    seen_headers: list[dict] = []
    elsewhere = Flask("elsewhere")

    @elsewhere.route("/<path:path>", methods=["GET", "POST"])
    def record(path: str):
        seen_headers.append(dict(request.headers))
        return Response("{}", status=404, mimetype="application/json")

    elsewhere_server = ThreadServer(elsewhere)
    pool = Flask("pool")

    @pool.post("/v1/internal/generate")
    def generate():
        body = request.get_json()
        first = TokenLine(index=0, token_id=100, text="x")
        moved = FinalLine(finish_reason="migrated", usage=Usage(prompt_tokens=2, completion_tokens=1, total_tokens=3),
                          migrated_to=MigratedTo(worker_url=elsewhere_server.url, request_id=body["request_id"],
                                                 from_index=1, grant=None))
        lines = first.model_dump_json() + "\n" + moved.model_dump_json() + "\n"
        return Response(lines, mimetype="application/x-ndjson")

    pool_server = ThreadServer(pool)
    honest = two_workers[0]
    try:
        gateway = make_gateway(router=ScriptedRouter(tiny_model_dir, [pool_server.url, honest.url]))
        resp = gateway.client().completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0,
                                                   extra_body={"ignore_eos": True})
    finally:
        pool_server.stop()
        elsewhere_server.stop()
    assert resp.usage.completion_tokens == 8 and resp.choices[0].text.startswith("x")  # resumed after the pool's token
    assert seen_headers == []  # no attach there at all, so no X-Hpcllm-Secret either
    assert metric(gateway, f"hpcllm_request_resumes_total{{{LABEL}}} 1.0")


class ForgetfulRouter(ScriptedRouter):
    """Records the workers the gateway gave up on (a ControllerRouter forgets them from its known routes)."""

    def __init__(self, source, urls):
        super().__init__(source, urls)
        self.forgotten: list[str] = []

    def forget(self, endpoint, busy=False):
        self.forgotten.append(endpoint.worker_url)


def test_a_destination_lost_after_the_attach_is_the_worker_forgotten(make_gateway, tiny_model_dir, two_workers):
    """The gateway followed a live migration, then the destination died: it gives up on the destination (with the
    controller down, a known route that would fail again), not on the source it was first routed to - and the
    destination, which it reached with the migration's grant, still never gets a key of the gateway's."""
    from flask import Flask, Response, request

    from hpcllm.credentials import GRANT_HEADER
    from hpcllm.httpkit.auth import SECRET_HEADER
    from hpcllm.worker.protocol import ATTACH_MIGRATION_PATH, FinalLine, MigratedTo, TokenLine, Usage

    destination_headers: list[dict] = []
    destination = Flask("destination")

    @destination.post(ATTACH_MIGRATION_PATH.replace("{request_id}", "<request_id>"))
    def attach(request_id: str):
        destination_headers.append(dict(request.headers))
        return Response(TokenLine(index=1, token_id=101, text="y").model_dump_json() + "\n",  # then it dies
                        mimetype="application/x-ndjson")

    destination_server = ThreadServer(destination)
    source = Flask("source")

    @source.post("/v1/internal/generate")
    def generate():
        body = request.get_json()
        moved = FinalLine(finish_reason="migrated", usage=Usage(prompt_tokens=2, completion_tokens=1, total_tokens=3),
                          migrated_to=MigratedTo(worker_url=destination_server.url, request_id=body["request_id"],
                                                 from_index=1, grant="the-grant"))
        lines = TokenLine(index=0, token_id=100, text="x").model_dump_json() + "\n" + moved.model_dump_json() + "\n"
        return Response(lines, mimetype="application/x-ndjson")

    source_server = ThreadServer(source)
    honest = two_workers[0]
    router = ForgetfulRouter(tiny_model_dir, [source_server.url, honest.url])
    try:
        gateway = make_gateway(router=router)
        resp = gateway.client().completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0,
                                                   extra_body={"ignore_eos": True})
    finally:
        source_server.stop()
        destination_server.stop()
    assert resp.usage.completion_tokens == 8 and resp.choices[0].text.startswith("xy")  # resumed after both
    assert router.forgotten == [destination_server.url]
    assert router.resolved == [source_server.url, honest.url]
    assert [h.get(GRANT_HEADER) for h in destination_headers] == ["the-grant"]
    assert not any(SECRET_HEADER in h for h in destination_headers)


def test_a_migration_destination_carries_none_of_the_routed_workers_credentials():
    from hpcllm.gateway.routing import Endpoint

    routed = Endpoint(model=MODEL, instance_id="i-1", worker_url="http://source:1", worker_key="the-pools-key")
    moved = routed.migrated_to("http://destination:2")
    assert (moved.worker_url, moved.worker_key) == ("http://destination:2", None)
    assert routed.key(SECRET) == "the-pools-key"
    with pytest.raises(RuntimeError, match="migration grant"):  # not even the cluster secret
        moved.key(SECRET)


def completion_events(gateway, body: dict, after_event) -> list[dict]:
    """A streamed completion's SSE events, after_event(events so far) called after each."""
    events = []
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json={**body, "stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {USER_KEY}"}) as stream:
        for line in stream.iter_lines():
            if line and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
                after_event(events)
    return events


def per_choice(events: list[dict]) -> tuple[dict, dict, list, dict]:
    """(text, logprob tokens, finish reasons) per choice index, and the usage chunks."""
    texts, tokens, finishes = {}, {}, {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            tokens.setdefault(choice["index"], []).extend((choice.get("logprobs") or {}).get("tokens") or [])
            if choice.get("finish_reason"):
                finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
    return texts, tokens, [e["usage"] for e in events if e.get("usage")], finishes


def test_two_choices_with_echo_and_logprobs_follow_a_migration_there_and_back(make_gateway, two_workers,
                                                                                tiny_model_dir):
    """n = 2 with echo and logprobs, moved to the destination and back again mid-stream: each choice's text and
    logprobs are the unmoved run's, usage comes once with prompt tokens counted once, every choice ends once, and
    the stream keeps one id."""
    source, destination = two_workers
    gateway = make_gateway(router=ScriptedRouter(tiny_model_dir, [source.url]))
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 30, "temperature": 0, "ignore_eos": True,
            "n": 2, "echo": True, "logprobs": 1, "stream_options": {"include_usage": True}}
    reference = completion_events(gateway, body, lambda events: None)
    # Both choices run on the source until their 4th token, move, run on the destination until their 12th, move back.
    there, back = source.hold_at(tokens=4, requests=2), destination.hold_at(tokens=12, requests=2)

    def move_twice():
        return [move_when_held(there, source, destination.url), move_when_held(back, destination, source.url)]

    with ThreadPoolExecutor(1) as mover:
        moving = mover.submit(move_twice)
        moved = completion_events(gateway, body, lambda events: None)
        moves = moving.result()
    assert [(len(m.migrated) > 0, m.failed) for m in moves] == [(True, [])] * 2, moves
    assert per_choice(moved) == per_choice(reference)
    texts, _, usage, finishes = per_choice(moved)
    assert len(texts) == 2 and finishes == {0: ["length"], 1: ["length"]} and len(usage) == 1
    assert len({event["id"] for event in moved}) == 1
    assert metric(gateway, f"hpcllm_request_migrations_total{{{LABEL}}} 4.0")  # each choice's stream moved twice
    assert f"hpcllm_request_resumes_total{{{LABEL}}}" not in httpx.get(f"{gateway.url}/metrics").text
