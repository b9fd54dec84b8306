"""A generation whose worker goes away mid-stream continues on another worker from the tokens received."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest

from hpcllm.gateway.errors import ModelNotFound
from hpcllm.gateway.routing import Endpoint, ModelCard, Router
from hpcllm.tests.ports import free_port

from .conftest import MODEL, SECRET, USER_KEY, ThreadServer


class ScriptedRouter(Router):
    """Answers each resolve with the next worker URL of a list (the last repeats): routing decisions are the
    controller's business; here they are fixed so the test knows which worker serves which part."""

    def __init__(self, source, urls: list[str]):
        self.card = ModelCard(name=MODEL, source=source, max_model_len=512, created=0)
        self.urls = list(urls)
        self.resolved: list[str] = []

    def list_models(self):
        return [self.card]

    def resolve(self, model, wait_s, group=None, abandoned=None):
        if model != MODEL:
            raise ModelNotFound(model)
        url = self.urls.pop(0) if len(self.urls) > 1 else self.urls[0]
        self.resolved.append(url)
        return Endpoint(model=model, instance_id=url, worker_url=url)

    def check_ready(self):
        return None


def second_worker(tiny_model_dir, **options):
    """A second real worker on the same model, served over HTTP in a thread: (service, url, server)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.worker.server import ModelForServing, WorkerService, create_app

    service = WorkerService(MODEL, secret=SECRET, keepalive_seconds=0.5, **options)
    service.attach(ModelForServing(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                                   AutoTokenizer.from_pretrained(tiny_model_dir)))
    server = ThreadServer(create_app(service))
    return service, server.url, server


@pytest.fixture
def doomed_worker(tiny_model_dir):
    """A second real worker on the same model, which the test shuts down mid-generation."""
    service, url, server = second_worker(tiny_model_dir)
    yield service, url
    server.stop()
    service.shutdown()


# Seeded sampling whose every draw depends on the tokens so far (the penalties): the resumed worker must count the
# tokens received before the shutdown as its own output.
PENALIZED = {"temperature": 0.9, "seed": 5, "frequency_penalty": 1.0, "presence_penalty": 0.5,
             "repetition_penalty": 1.2, "min_p": 0.05, "logit_bias": {"17": 2.0}}


def stream_interrupted_after_three_events(gateway, body: dict, interrupt) -> list[str]:
    """Stream a completion, call interrupt() after its third event, read the rest; the texts of every event. The
    stream must still end whole: its last event has finish_reason "length" and no error, then [DONE]."""
    texts = []
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json={**body, "stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {USER_KEY}"}) as stream:
        lines = (line for line in stream.iter_lines() if line)
        for line in lines:
            texts.append(json.loads(line.removeprefix("data: "))["choices"][0]["text"])
            if len(texts) == 3:
                interrupt()
                break
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
    assert "error" not in events[-1], events[-1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    return texts + [e["choices"][0]["text"] for e in events]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, PENALIZED], ids=["greedy", "penalized"])
def test_stream_resumes_on_another_worker_when_its_worker_shuts_down(make_gateway, doomed_worker, worker_url,
                                                                     tiny_model_dir, sampling):
    service, doomed_url = doomed_worker
    router = ScriptedRouter(tiny_model_dir, [doomed_url, worker_url])
    gateway = make_gateway(router=router)
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 200, "ignore_eos": True, **sampling}

    # The engine aborts the running generation: finish_reason "abort".
    texts = stream_interrupted_after_three_events(gateway, body, service.shutdown)
    assert router.resolved[:2] == [doomed_url, worker_url]

    # Same text as one uninterrupted greedy run on the surviving worker.
    uninterrupted = gateway.post("/v1/completions", json=body).json()
    assert "".join(texts) == uninterrupted["choices"][0]["text"]
    assert uninterrupted["usage"]["completion_tokens"] == 200
    assert f'hpcllm_request_resumes_total{{model_name="{MODEL}"}} 1.0' in httpx.get(f"{gateway.url}/metrics").text


@pytest.fixture
def worker_with_model_process(tiny_model_dir):
    """A second real worker whose forward runs in a model process (the CPU default), which the test kills."""
    service, url, server = second_worker(tiny_model_dir, model_process=True)
    yield service, url
    server.stop()
    service.shutdown()


def test_stream_resumes_on_another_worker_when_its_workers_model_process_is_killed(make_gateway, worker_url,
                                                                                  worker_with_model_process,
                                                                                  tiny_model_dir):
    """The worker lives on, but its engine died (its final line: finish_reason "error", engine_unavailable): that is
    the worker's failure, not the request's, so the generation goes on elsewhere instead of ending in an error."""
    import os
    import signal

    service, dying_url = worker_with_model_process
    router = ScriptedRouter(tiny_model_dir, [dying_url, worker_url])
    gateway = make_gateway(router=router)
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 480, "temperature": 0.9, "seed": 11,
            "ignore_eos": True}

    texts = stream_interrupted_after_three_events(
        gateway, body, lambda: os.kill(service.engine.model_process_pid, signal.SIGKILL))
    assert router.resolved[:2] == [dying_url, worker_url]
    assert not service.engine.alive  # it was the engine's death, not the end of the generation, that moved it

    uninterrupted = gateway.post("/v1/completions", json=body).json()
    assert "".join(texts) == uninterrupted["choices"][0]["text"]
    assert f'hpcllm_request_resumes_total{{model_name="{MODEL}"}} 1.0' in httpx.get(f"{gateway.url}/metrics").text


def test_embeddings_go_to_another_worker_when_the_routed_one_is_gone(make_gateway, worker_url, tiny_model_dir):
    """As a generation does: a worker that died before the controller noticed is forgotten and the request routed
    again (an embedding was a 503 at once)."""
    gone = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on: the dead worker's
    router = ScriptedRouter(tiny_model_dir, [gone, worker_url])
    gateway = make_gateway(router=router)
    answer = gateway.post("/v1/embeddings", json={"model": MODEL, "input": ["hello world", "the"]})
    assert answer.status_code == 200, answer.text
    assert [len(item["embedding"]) for item in answer.json()["data"]] == [64, 64]
    assert router.resolved == [gone, worker_url]


def worker_dying_before_its_final_line_app(tokenizer, last_tokens):
    """A stand-in worker that streams last_tokens(request)'s token ids, then drops the connection before its final
    line (its process killed between the two writes): they already end the generation."""
    from flask import Flask, Response, request

    from hpcllm.worker.protocol import GENERATE_PATH, GenerateRequest, TokenLine

    app = Flask("dies-before-its-final-line")

    @app.post(GENERATE_PATH)
    def generate():
        req = GenerateRequest.model_validate_json(request.get_data())

        def lines():
            for index, token in enumerate(last_tokens(req)):
                text = tokenizer.decode([token], skip_special_tokens=True)
                yield TokenLine(index=index, token_id=token, text=text).model_dump_json() + "\n"
            raise ConnectionAbortedError("killed before the final line")  # werkzeug drops the connection

        return Response(lines(), mimetype="application/x-ndjson")

    return app


WORDS = "hello world the end"
# (request body, the tokens the dying worker streams before it is lost, how the choice ended)
ENDED_BEFORE_THE_FINAL_LINE = {
    "max_tokens": ({"prompt": "hello", "max_tokens": 4}, lambda tok, req: [100, 101, 102, 103], "length"),
    "eos": ({"prompt": "hello", "max_tokens": 8}, lambda tok, req: [100, 101, tok.eos_token_id], "stop"),
    "stop_string": ({"prompt": "hello", "max_tokens": 16, "stop": ["end"]},
                    lambda tok, req: tok(WORDS, add_special_tokens=False)["input_ids"], "stop"),
    # A chat request without max_tokens that filled the context (the workers' max_model_len is 512; the gateway's
    # card does not know it, so the request goes without max_tokens).
    "context_full": ({"messages": [{"role": "user", "content": "hello"}]},
                     lambda tok, req: [100] * (512 - len(req.prompt_token_ids)), "length"),
}


@pytest.mark.parametrize("case", list(ENDED_BEFORE_THE_FINAL_LINE))
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_worker_lost_after_its_last_token_ends_the_choice_as_it_ended(make_gateway, worker_url, tiny_model_dir,
                                                                        hf_pair, stream, case):
    """Every token of the choice was delivered (max_tokens reached, the context full, EOS, a stop string's last
    token) before the worker went away: the resume worker answers that end, so the answer is whole with the
    finish_reason the first worker would have sent, not a 400 error event blaming the request."""
    body, last_tokens, finish_reason = ENDED_BEFORE_THE_FINAL_LINE[case]
    tokenizer = hf_pair[1]
    streamed: list[int] = []

    def stream_then_die(req):
        streamed[:] = last_tokens(tokenizer, req)
        return streamed

    dying = ThreadServer(worker_dying_before_its_final_line_app(tokenizer, stream_then_die))
    try:
        router = ScriptedRouter(tiny_model_dir, [dying.url, worker_url])
        if case == "context_full":
            router.card = dataclasses.replace(router.card, max_model_len=None)
        gateway = make_gateway(router=router)
        chat = "messages" in body
        answer = gateway.post("/v1/chat/completions" if chat else "/v1/completions",
                              json={"model": MODEL, **body, "stream": stream})
        assert answer.status_code == 200, answer.text
        if stream:
            lines = [line for line in answer.text.splitlines() if line]
            assert lines[-1] == "data: [DONE]"
            events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
            assert all("error" not in event for event in events), events
            assert events[-1]["choices"][0]["finish_reason"] == finish_reason
        else:
            assert answer.json()["choices"][0]["finish_reason"] == finish_reason
            assert answer.json()["usage"]["completion_tokens"] == len(streamed)
        metrics = httpx.get(f"{gateway.url}/metrics").text  # counted once, as a whole answer
        assert f'hpcllm_request_success_total{{finished_reason="{finish_reason}",model_name="{MODEL}"}} 1.0' in metrics
        assert 'finished_reason="abort"' not in metrics
    finally:
        dying.stop()


def pick_first(monkeypatch, urls: list[str], url: str) -> None:
    """StaticRouter picks from a generator seeded so that its first random.choice(urls) is url (the global
    `random` is left alone)."""
    import random

    from hpcllm.gateway import routing

    seed = next(seed for seed in range(100) if random.Random(seed).choice(urls) == url)
    monkeypatch.setattr(routing, "random", random.Random(seed))


def test_a_static_model_skips_its_worker_that_is_down(make_gateway, worker_url, tiny_model_dir, monkeypatch):
    """A static model on two workers, one down: a request routed to the dead one is routed again to the live one
    (the dead one is forgotten for a while), never answered 503 because the random pick hit the dead one on every
    attempt; the next requests go straight to the live one."""
    from hpcllm.gateway.routing import StaticRouter

    gone = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on: the dead worker's
    models = {MODEL: {"worker_url": [gone, worker_url], "source": str(tiny_model_dir)}}
    gateway = make_gateway(static_models=models)
    pick_first(monkeypatch, [gone, worker_url], gone)  # the first request goes to the dead worker
    for _ in range(10):
        answer = gateway.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 1})
        assert answer.status_code == 200, answer.text
    router = gateway.state.router
    assert isinstance(router, StaticRouter)
    assert {router.resolve(MODEL, 0).worker_url for _ in range(50)} == {worker_url}


def refusing_worker_app(refused: list, status: int = 429, error_type: str = "overloaded"):
    """A stand-in worker that refuses every generation: by default 429 (full), as a worker at max_waiting_requests
    does; each refusal goes into `refused`."""
    from flask import Flask

    from hpcllm.worker.protocol import GENERATE_PATH

    app = Flask("refusing")

    @app.post(GENERATE_PATH)
    def generate():
        refused.append(1)
        return {"error": {"message": "worker refuses (8 running, 16 waiting); retry later", "type": error_type,
                          "param": None, "code": None}}, status

    return app


def test_a_static_model_does_not_skip_its_busy_worker_for_long(make_gateway, worker_url, tiny_model_dir,
                                                               monkeypatch):
    """A static model on two workers, one full (429): the request it refused goes to the other (the short skip made
    long there, so the retry never races it), and the full one is picked again once its short skip is over (made
    zero), not skipped for 30 s like a worker that is gone, which sent all of the load to the other worker and filled
    that one too."""
    from hpcllm.gateway.routing import StaticRouter

    refused: list = []
    full = ThreadServer(refusing_worker_app(refused))
    try:
        urls = [full.url, worker_url]
        gateway = make_gateway(static_models={MODEL: {"worker_url": urls, "source": str(tiny_model_dir)}})
        router = gateway.state.router
        assert isinstance(router, StaticRouter)
        pick_first(monkeypatch, urls, full.url)  # the first pick is the full worker
        monkeypatch.setattr(router, "BUSY_SKIP_S", 3600.0)
        answer = gateway.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 1})
        assert answer.status_code == 200, answer.text
        assert len(refused) == 1  # it went to the full worker first, then (skipped a moment) to the other
        monkeypatch.setattr(router, "BUSY_SKIP_S", 0.0)
        assert {router.resolve(MODEL, 0).worker_url for _ in range(50)} == set(urls)
    finally:
        full.stop()


def test_a_static_model_skips_its_worker_without_an_engine_for_long(make_gateway, worker_url, tiny_model_dir,
                                                                    monkeypatch):
    """A static model on two workers, one answering 503 engine_unavailable (its model still loads, failed to load,
    or died): it is skipped like a worker that is gone, not for the busy worker's short skip (made zero here), after
    which it was picked again and again, each pick a refused attempt and a back-off."""
    from hpcllm.gateway.routing import StaticRouter
    from hpcllm.worker.protocol import ENGINE_UNAVAILABLE

    refused: list = []
    unloaded = ThreadServer(refusing_worker_app(refused, 503, ENGINE_UNAVAILABLE))
    try:
        urls = [unloaded.url, worker_url]
        gateway = make_gateway(static_models={MODEL: {"worker_url": urls, "source": str(tiny_model_dir)}})
        router = gateway.state.router
        assert isinstance(router, StaticRouter)
        monkeypatch.setattr(router, "BUSY_SKIP_S", 0.0)
        pick_first(monkeypatch, urls, unloaded.url)
        answer = gateway.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 1})
        assert answer.status_code == 200, answer.text
        assert len(refused) == 1
        assert {router.resolve(MODEL, 0).worker_url for _ in range(50)} == {worker_url}
    finally:
        unloaded.stop()


def test_the_choices_of_a_request_follow_the_first_to_the_worker_that_took_it(make_gateway, worker_url,
                                                                              tiny_model_dir):
    """n choices whose routed worker turns out dead: the first choice is routed again, and the others open where it
    went, not each at the dead worker first (another refusal, routing and back-off per choice)."""
    gone = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on: the dead worker's
    router = ScriptedRouter(tiny_model_dir, [gone, worker_url])
    gateway = make_gateway(router=router)
    answer = gateway.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2, "n": 4})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"]) == 4
    assert router.resolved == [gone, worker_url]


def worker_answering_app(tokens: int, finish_reason: str, error: str | None = None):
    """A stand-in worker answering every generation with `tokens` token lines, then a final line with
    finish_reason (and, for "error", that message)."""
    from flask import Flask, Response

    from hpcllm.worker.protocol import GENERATE_PATH, ErrorInfo, FinalLine, TokenLine, Usage

    app = Flask(f"answers-{finish_reason}")

    @app.post(GENERATE_PATH)
    def generate():
        usage = Usage(prompt_tokens=1, completion_tokens=tokens, total_tokens=1 + tokens)
        final = FinalLine(finish_reason=finish_reason, usage=usage,
                          error=ErrorInfo(message=error, type="internal_error") if error else None)
        lines = [TokenLine(index=i, token_id=100, text="x") for i in range(tokens)] + [final]
        return Response("".join(line.model_dump_json() + "\n" for line in lines), mimetype="application/x-ndjson")

    return app


def metric_value(gateway, sample: str) -> float | None:
    """The value of one sample (name and labels as /metrics writes them) on the gateway's /metrics, None without."""
    for line in httpx.get(f"{gateway.url}/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return None


def test_a_resumed_request_is_counted_once_in_the_queue_time(make_gateway, tiny_model_dir):
    """hpcllm_request_queue_time_seconds has one observation per request, as vLLM's: the wait before a worker took
    it. A request resumed on another worker (its first one ended the generation early) is still one request."""
    aborting = ThreadServer(worker_answering_app(1, "abort"))
    finishing = ThreadServer(worker_answering_app(3, "length"))
    try:
        router = ScriptedRouter(tiny_model_dir, [aborting.url, finishing.url])
        gateway = make_gateway(router=router)
        resp = gateway.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 3})
    finally:
        aborting.stop()
        finishing.stop()
    assert resp.status_code == 200, resp.text
    assert router.resolved == [aborting.url, finishing.url]  # resumed on the second worker
    assert metric_value(gateway, f'hpcllm_request_resumes_total{{model_name="{MODEL}"}}') == 1
    assert metric_value(gateway, f'hpcllm_request_queue_time_seconds_count{{model_name="{MODEL}"}}') == 1


def test_a_request_that_ended_before_its_first_token_is_counted_in_the_e2e_latency(make_gateway, tiny_model_dir):
    """hpcllm_e2e_request_latency_seconds observes every request a worker took, as vLLM's observes every finished
    request: one its worker failed before any token too (else the failures vanish from the latency histogram)."""
    failing = ThreadServer(worker_answering_app(0, "error", error="a bad step"))
    try:
        gateway = make_gateway(router=ScriptedRouter(tiny_model_dir, [failing.url]))
        resp = gateway.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 3})
    finally:
        failing.stop()
    assert resp.status_code == 500, resp.text
    assert resp.json()["error"]["code"] == "generation_failed"
    assert metric_value(gateway, f'hpcllm_e2e_request_latency_seconds_count{{model_name="{MODEL}"}}') == 1
