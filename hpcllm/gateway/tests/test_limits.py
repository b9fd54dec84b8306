"""Limits that hold (issue 15): work capped before tokenizing, no reservation beyond the key's bucket, a per-key
stream cap, and non-streaming generations cancelled when their client hangs up."""

from __future__ import annotations

import json
import threading
import time

import httpx

from hpcllm.gateway.errors import ServiceUnavailable
from hpcllm.gateway.routing import Endpoint, ModelCard, Router
from hpcllm.gateway.tokenization import PromptEncoder

from .conftest import MODEL, USER_KEY, raw_post
from .test_errors import assert_error, assert_still_serving


def test_a_4mb_prompt_is_refused_without_tokenizing_it(make_gateway, monkeypatch):
    gw = make_gateway()
    encoded = []
    original = PromptEncoder.encode
    monkeypatch.setattr(PromptEncoder, "encode",
                        lambda self, text, *args, **kw: encoded.append(len(text)) or original(self, text, *args, **kw))
    prompt = "hello world " * (4 * 1024 * 1024 // 12 - 100)
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": prompt}),
                       ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}),
                       ("/v1/embeddings", {"model": MODEL, "input": prompt})):
        error = assert_error(gw.post(path, json=body), 400, "context_length_exceeded")
        assert "maximum context length is 512 tokens" in error["message"]
        assert f"({len(prompt)} characters)" in error["message"]
    assert encoded == []  # the 4 MB never reached the tokenizer
    # A prompt over the context but short enough that it might fit is tokenized and gets the exact count.
    error = assert_error(gw.post("/v1/completions", json={"model": MODEL, "prompt": "hello " * 600}), 400,
                         "context_length_exceeded")
    assert "However, your prompt has" in error["message"] and "at least" not in error["message"]
    assert encoded == [3600]
    assert_still_serving(gw)


def test_a_request_reserving_more_than_the_whole_bucket_is_429(make_gateway):
    tpm = 200_000
    gw = make_gateway(api_keys=[{"key": USER_KEY, "tokens_per_minute": tpm}])
    resp = gw.post("/v1/completions", json={"model": MODEL, "prompt": ["hello"] * 1000, "max_tokens": 300})
    error = assert_error(resp, 429, "request_over_token_limit")
    assert f"whole budget of {tpm} tokens per minute" in error["message"]
    assert "Retry-After" not in resp.headers  # it would never fit: waiting does not help
    # Nothing was taken from the bucket: a normal request right after is served.
    assert gw.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2}).status_code == 200


def open_stream(gw, key=USER_KEY, max_tokens=400):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    return httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=60,
                        headers={"Authorization": f"Bearer {key}"})


def test_concurrent_streams_per_key_are_capped(make_gateway):
    gw = make_gateway(api_keys=[{"key": USER_KEY, "max_concurrent_streams": 1}, {"key": "sk-other"}],
                      max_streams_per_key=4)
    with open_stream(gw) as first:
        lines = first.iter_lines()  # kept: dropping the iterator would close the connection
        assert next(line for line in lines if line).startswith("data: {")
        with open_stream(gw) as second:
            second.read()
            assert second.status_code == 429
            assert json.loads(second.text)["error"]["code"] == "too_many_streams"
            assert int(second.headers["Retry-After"]) >= 1
        with open_stream(gw, key="sk-other", max_tokens=2) as other:  # the cap is per key
            assert other.status_code == 200 and other.read().endswith(b"data: [DONE]\n\n")
    deadline = time.monotonic() + 10
    while gw.state._generations and time.monotonic() < deadline:  # the first stream's slot is freed on close
        time.sleep(0.05)
    with open_stream(gw, max_tokens=2) as again:
        assert again.status_code == 200 and again.read().endswith(b"data: [DONE]\n\n")


def abort_count(gw) -> float:
    line = f'hpcllm_request_success_total{{finished_reason="abort",model_name="{MODEL}"}} '
    found = [ln for ln in httpx.get(f"{gw.url}/metrics").text.splitlines() if ln.startswith(line)]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0


def test_a_non_streaming_generation_stops_when_its_client_leaves(make_gateway):
    tpm = 100_000
    gw = make_gateway(api_keys=[{"key": USER_KEY, "tokens_per_minute": tpm}])
    before = abort_count(gw)
    client = raw_post(gw, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 500,
                                               "ignore_eos": True})
    deadline = time.monotonic() + 30
    while not any(g.completion_tokens for g in list(gw.state._generations)):
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.01)
    generation = next(iter(gw.state._generations))
    client.close()  # the client hangs up mid-generation
    deadline = time.monotonic() + 10
    while gw.state._generations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not gw.state._generations
    assert generation.completion_tokens < 499  # cancelled, not run to the end
    assert abort_count(gw) == before + 1
    assert_still_serving(gw)


# ------------------------------------------------------------------ two gateway hosts, limits in one PostgreSQL


def test_two_gateway_hosts_share_a_keys_token_bucket(make_gateway, empty_postgres, tiny_model_dir):
    """Two gateways (own state dirs) on one PostgreSQL: what one reserved, the other sees. With a bucket per host
    the second request would be served."""
    from .conftest import ThreadServer
    from .stand_in_worker import slow_worker_app

    slow = ThreadServer(slow_worker_app(seconds_per_token=0.1))  # the reservation stays held while it streams
    settings = dict(api_keys=[{"key": USER_KEY, "tokens_per_minute": 500}], limits_db=empty_postgres,
                    static_models={MODEL: {"worker_url": slow.url, "source": str(tiny_model_dir)}})
    host_a, host_b = make_gateway(**settings), make_gateway(**settings)
    assert host_a.config.paths.state_dir != host_b.config.paths.state_dir
    try:
        with open_stream(host_a, max_tokens=400) as first:  # reserves ~402 of the key's 500 tokens on host a
            lines = first.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            resp = host_b.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 200})
            error = assert_error(resp, 429, "tokens_limit_exceeded")
            assert "500 tokens per minute" in error["message"] and float(resp.headers["Retry-After"]) > 5
            small = host_b.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 5})
            assert small.status_code == 200  # what is left is still usable from host b
    finally:
        slow.stop()


def test_two_gateway_hosts_share_a_keys_stream_cap_and_a_crashed_hosts_slots_come_back(
        make_gateway, empty_postgres, tiny_model_dir):
    from .conftest import ThreadServer
    from .stand_in_worker import slow_worker_app

    slow = ThreadServer(slow_worker_app(seconds_per_token=0.1))
    lease = 3.0  # renewed every 1 s: margin for a loaded machine
    settings = dict(api_keys=[{"key": USER_KEY, "max_concurrent_streams": 1}], limits_db=empty_postgres,
                    stream_lease_seconds=lease,
                    static_models={MODEL: {"worker_url": slow.url, "source": str(tiny_model_dir)}})
    host_a, host_b = make_gateway(**settings), make_gateway(**settings)
    try:
        with open_stream(host_a, max_tokens=200) as first:  # 20 s of tokens: open all through the test
            lines = first.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            time.sleep(lease * 1.5)  # past one lease: host a renewed its slot meanwhile
            with open_stream(host_b, max_tokens=2) as second:
                second.read()
                assert second.status_code == 429
                assert json.loads(second.text)["error"]["code"] == "too_many_streams"
            host_a.state.shared.stop_heartbeat()  # host a goes silent (crashed) with its stream slot taken
            deadline = time.monotonic() + lease * 2

            def third_stream() -> tuple[int, bytes]:
                with open_stream(host_b, max_tokens=2) as third:
                    return third.status_code, third.read()

            while (third := third_stream())[0] == 429 and time.monotonic() < deadline:
                time.sleep(0.2)  # refused until host a's lease runs out
            assert third[0] == 200 and third[1].endswith(b"data: [DONE]\n\n"), third  # its slot was reclaimed
    finally:
        slow.stop()


def test_a_lost_postgres_connection_is_a_503_then_reconnects(make_gateway, empty_postgres):
    gw = make_gateway(limits_db=empty_postgres)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    assert gw.post("/v1/completions", json=body).status_code == 200
    gw.state.usage.flush()  # its usage row written: the next statement on the connection is the request's
    gw.state.shared._shared_db.conn._conn.close()  # as a server restart would leave it
    error = assert_error(gw.post("/v1/completions", json=body), 503, "service_unavailable")
    assert "limits database is unreachable" in error["message"]
    assert gw.post("/v1/completions", json=body).status_code == 200  # a new connection


class ColdThenReady(Router):
    """A model still starting (scale from zero: every resolve a 503 model_starting) until the test sets `ready`;
    then served by `worker_url`."""

    def __init__(self, source, worker_url: str):
        self.card = ModelCard(name=MODEL, source=source, max_model_len=512, created=0)
        self.worker_url = worker_url
        self.ready = False

    def list_models(self):
        return [self.card]

    def resolve(self, model, wait_s, group=None, abandoned=None):
        if not self.ready:
            raise ServiceUnavailable(f"model {model!r} is still starting", code="model_starting", retry_after=5)
        return Endpoint(model=model, instance_id="ready", worker_url=self.worker_url)

    def check_ready(self):
        return None


def test_requests_no_worker_took_cost_no_tokens(make_gateway, worker_url, tiny_model_dir):
    """A request answered 503 before any worker took it (its model still starting: scale from zero) used nothing:
    its reservation comes back whole, prompt included. Clients retrying a cold model are then served when it is up,
    not told 429 for tokens nobody generated or read."""
    router = ColdThenReady(tiny_model_dir, worker_url)
    gw = make_gateway(router=router, api_keys=[{"key": USER_KEY, "tokens_per_minute": 1000}])
    body = {"model": MODEL, "prompt": "hello world " * 75, "max_tokens": 1}
    for _ in range(4):  # each reserves its ~300 prompt tokens: 4 of them are more than the key's 1000
        assert_error(gw.post("/v1/completions", json=body), 503, "model_starting")
    router.ready = True
    answer = gw.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] >= 250


def test_prompt_tokens_are_counted_once_a_worker_took_the_request(make_gateway, worker_url, tiny_model_dir):
    """hpcllm_prompt_tokens_total counts what workers were given (as a pooling request's): a 503 while the model
    starts adds nothing, however often clients retry."""
    from .test_usage import metric

    router = ColdThenReady(tiny_model_dir, worker_url)
    gw = make_gateway(router=router)
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 1}
    for stream in (False, True):
        assert_error(gw.post("/v1/completions", json={**body, "stream": stream}), 503, "model_starting")
    assert metric(gw, "hpcllm_prompt_tokens_total", model_name=MODEL) == 0.0
    router.ready = True
    served = gw.post("/v1/completions", json=body).json()["usage"]["prompt_tokens"]
    assert metric(gw, "hpcllm_prompt_tokens_total", model_name=MODEL) == served


def worker_taking_one_generation_app(prompts: list):
    """A stand-in worker that serves the first generation (one token) and refuses every later one with a 400, as a
    worker whose validation differs for the second choice would; each prompt it is given goes into `prompts`."""
    from flask import Flask, Response, request

    from hpcllm.worker.protocol import GENERATE_PATH, FinalLine, GenerateRequest, TokenLine, Usage

    app = Flask("takes-one")

    @app.post(GENERATE_PATH)
    def generate():
        req = GenerateRequest.model_validate_json(request.get_data())
        if prompts:
            return {"error": {"message": "refused", "type": "invalid_request_error", "param": None,
                              "code": "invalid_request"}}, 400
        prompts.append(req.prompt_token_ids)
        usage = Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=1,
                      total_tokens=len(req.prompt_token_ids) + 1)
        lines = [TokenLine(index=0, token_id=100, text="x"), FinalLine(finish_reason="length", usage=usage)]
        return Response("".join(line.model_dump_json() + "\n" for line in lines), mimetype="application/x-ndjson")

    return app


def test_prompt_tokens_are_counted_when_a_later_choice_fails_to_open(make_gateway, tiny_model_dir):
    """n = 2: the first choice's worker took the prompt, the second choice's open failed (400). The request's usage
    and its token settle count the prompt; hpcllm_prompt_tokens_total counts it too (it counted none)."""
    from hpcllm.httpkit.tests.thread_server import ThreadServer

    from .test_usage import metric

    prompts: list = []
    worker = ThreadServer(worker_taking_one_generation_app(prompts))
    try:
        router = ColdThenReady(tiny_model_dir, worker.url)
        router.ready = True
        gw = make_gateway(router=router)
        answer = gw.post("/v1/completions", json={"model": MODEL, "prompt": "hello world", "max_tokens": 1, "n": 2})
        assert answer.status_code == 400, answer.text
        [prompt] = prompts
        assert metric(gw, "hpcllm_prompt_tokens_total", model_name=MODEL) == len(prompt)
    finally:
        worker.stop()
