"""How the gateway streams a worker's tokens: tokens the worker sent in one write (they queued up there) go out as
one SSE event (as vLLM's own server merges what a slow reader has not taken), nothing is held back waiting for a
token not yet sent, and a token's event is byte for byte what the OpenAI wire models render."""

from __future__ import annotations

import json
import threading

import httpx
from flask import Flask, Response, request

from hpcllm.gateway.completions.protocol import CompletionChoice
from hpcllm.gateway.completions.serving import StreamChunks
from hpcllm.worker.protocol import GENERATE_PATH

from .conftest import MODEL, USER_KEY, GatewayFactory, ThreadServer

# What the fake worker sends: three token lines in one write, later a fourth with the final line.
BURST = [" one", " two", " three"]
LATE = " four"


def _token(index: int, text: str) -> bytes:
    return json.dumps({"type": "token", "index": index, "token_id": 100 + index, "text": text}).encode() + b"\n"


def _final(prompt_tokens: int, completion_tokens: int) -> bytes:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return json.dumps({"type": "final", "finish_reason": "length", "usage": usage}).encode() + b"\n"


def bursty_worker(release_late: threading.Event) -> Flask:
    """A worker whose stream sends three token lines in one write, then (once released) one more and the final
    line: a gateway that fell behind by three tokens, then caught up."""
    app = Flask("bursty-worker")

    @app.post(GENERATE_PATH)
    def generate():
        prompt_tokens = len(request.get_json()["prompt_token_ids"])

        def lines():
            yield b"".join(_token(i, text) for i, text in enumerate(BURST))
            release_late.wait(30)
            yield _token(len(BURST), LATE) + _final(prompt_tokens, len(BURST) + 1)

        return Response(lines(), mimetype="application/x-ndjson")

    return app


def test_tokens_that_arrive_together_go_out_as_one_event_and_none_is_held_back(tmp_path, tiny_model_dir):
    release_late = threading.Event()
    worker = ThreadServer(bursty_worker(release_late))
    factory = GatewayFactory(tmp_path, worker.url, tiny_model_dir)
    gateway = factory()
    events, usage = [], None
    try:
        body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}}
        with gateway.client(USER_KEY).with_options(timeout=30).completions.create(**body) as stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    events.append(chunk.choices[0].text)
                    if len(events) == 1:  # the burst reached the client before the worker sent the last token
                        release_late.set()
                if chunk.usage is not None:
                    usage = chunk.usage
        counted = gateway_generation_tokens(gateway)
    finally:
        release_late.set()
        factory.stop_all()
        worker.stop()
    assert events == ["".join(BURST), LATE]
    assert usage.completion_tokens == 4 and usage.prompt_tokens == 3
    assert counted == 4  # every token counted, merged or not


def gateway_generation_tokens(gateway) -> float:
    for line in gateway.get("/metrics", key=None).text.splitlines():
        if line.startswith(f'hpcllm_generation_tokens_total{{model_name="{MODEL}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no generation_tokens_total for the model in /metrics")


def test_a_tokens_event_is_what_the_wire_models_render():
    for include_usage in (True, False):
        chunks = StreamChunks('cmpl-"1"', 1700000000, 'a "model"', include_usage)
        for text in ["", " plain", 'quote " and \\ backslash\n\ttab \x01', "ünïcödé ✓ 😀", "\u2028</script>"]:
            for index in (0, 3):
                for finish_reason in (None, "stop", "length"):
                    expected = chunks.render([CompletionChoice(index=index, text=text, finish_reason=finish_reason)])
                    assert chunks.text(index, text, finish_reason) == expected
        event = json.loads(chunks.text(0, "x")[len(b"data: "):])
        assert ("usage" in event) == include_usage


def test_the_worker_stream_is_read_over_tls_verified_against_the_site_ca(tmp_path, tmp_path_factory, tiny_model_dir):
    """[internal_http] TLS: the gateway's stream reader (not httpx) verifies the worker against the site CA."""
    from hpcllm.config import InternalHttpConfig, parse_config
    from hpcllm.gateway.app import create_app, gateway_of
    from hpcllm.httpkit.server import InternalServer
    from hpcllm.httpkit.tests.site_ca import site_ca_or_skip

    ca = site_ca_or_skip(tmp_path_factory)
    tls = {"tls_cert_file": str(ca.cert), "tls_key_file": str(ca.key), "tls_ca_file": str(ca.ca)}
    release_late = threading.Event()
    release_late.set()
    worker = InternalServer(bursty_worker(release_late), "127.0.0.1", 0, http=InternalHttpConfig(**tls), threads=4,
                            name="tls-worker")
    worker.start()
    worker_url = f"https://localhost:{worker.port}"
    config = parse_config({
        "paths": {"state_dir": str(tmp_path / "state")},
        "cluster": {"shared_secret": "tls-test-secret"},
        "internal_http": tls,
        "gateway": {"api_keys": [{"key": USER_KEY, "name": "alice"}],
                    "static_models": {MODEL: {"worker_url": worker_url, "source": str(tiny_model_dir)}}},
    })
    app = create_app(config)
    server = ThreadServer(app)
    try:
        body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {USER_KEY}"}) as response:
            texts = [json.loads(line[6:])["choices"][0]["text"] for line in response.iter_lines()
                     if line.startswith("data: {")]
    finally:
        server.stop()
        gateway_of(app).close()
        worker.stop()
    assert "".join(texts) == "".join(BURST) + LATE
