import threading

import httpx
import pytest

from hpcllm.config import InternalHttpConfig
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.worker.client import WorkerClient, WorkerError
from hpcllm.worker.protocol import FinalLine, GenerateRequest, TokenLine
import hpcllm.worker.server as server_module
from hpcllm.worker.server import ModelForServing, WorkerService
from hpcllm.worker.stream_writer import KEEPALIVE

from .conftest import SECRET, cancelled, handed_over, hold_at, ticketed, wait_until

PROMPT = "hello world, this"


def test_streaming_generate_matches_the_engine(load_pair, start_worker):
    worker = start_worker(load_pair("llama"))
    expected = worker.service.engine.generate(GenerateRequest(request_id="solo", prompt=PROMPT, max_tokens=20,
                                                              temperature=0, ignore_eos=True))
    body = GenerateRequest(request_id="http-1", prompt=PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
    with worker.client.generate(body) as stream:
        lines = list(stream)
    tokens = [line for line in lines if isinstance(line, TokenLine)]
    assert [t.index for t in tokens] == list(range(20))
    assert [t.token_id for t in tokens] == expected.token_ids
    assert "".join(t.text for t in tokens) == expected.text
    assert isinstance(lines[-1], FinalLine) and stream.final.finish_reason == "length"
    assert stream.final.usage.completion_tokens == 20


def test_tokens_arrive_while_generating(load_pair, start_worker):
    worker = start_worker(load_pair("llama"))
    looked = threading.Event()
    hold_at(worker.service.engine, "live", 1, looked)  # still running when the test looks
    body = GenerateRequest(request_id="live", prompt=PROMPT, max_tokens=30, ignore_eos=True, seed=3)
    with worker.client.generate(body) as stream:
        lines = iter(stream)
        first = next(lines)
        assert isinstance(first, TokenLine) and first.index == 0
        during = worker.client.tokens("live")
        looked.set()
        assert during.state == "running" and 1 <= len(during.output_token_ids) < 30
        assert during.output_token_ids[0] == first.token_id and during.seed == 3
        rest = list(lines)
    assert rest[-1].finish_reason == "length"
    assert worker.client.tokens("live").state == "finished"


def test_wrong_or_missing_secret_is_401(load_pair, start_worker):
    worker = start_worker(load_pair("llama"))
    bad = WorkerClient(worker.url, "wrong")
    with pytest.raises(WorkerError) as caught:
        bad.generate(GenerateRequest(request_id="x", prompt=PROMPT))
    assert caught.value.status == 401 and SECRET_HEADER in str(caught.value)
    response = httpx.get(worker.url + "/v1/internal/requests/x/tokens")
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(worker.url + "/health").status_code == 200  # health and metrics stay open
    assert worker.service.engine.counts() == (0, 0)


def test_bad_requests_get_400_with_the_reason(load_pair, start_worker):
    worker = start_worker(load_pair("llama"))
    post = lambda body: httpx.post(worker.url + "/v1/internal/generate", headers={SECRET_HEADER: SECRET}, json=body)
    response = post({"request_id": "a", "prompt": "x", "temperature": -1})
    assert response.status_code == 400 and "temperature" in response.json()["error"]["message"]
    response = post({"request_id": "a"})
    assert response.status_code == 400 and "exactly one of" in response.json()["error"]["message"]
    limit = worker.service.engine.max_model_len
    response = post({"request_id": "a", "prompt_token_ids": [3] * (limit + 1), "max_tokens": 1})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded"
    assert f"maximum context length is {limit} tokens" in error["message"]
    assert httpx.get(worker.url + "/v1/internal/requests/none/tokens", headers={SECRET_HEADER: SECRET}).status_code == 404


def test_client_disconnect_cancels_and_frees_the_slot(load_pair, start_worker):
    worker = start_worker(load_pair("llama"), max_running_requests=1)
    engine = worker.service.engine
    hold_at(engine, "gone", 2, cancelled(engine, "gone"))  # running until its keep-alives find the client gone
    stream = worker.client.generate(GenerateRequest(request_id="gone", prompt=PROMPT, max_tokens=120, ignore_eos=True))
    lines = iter(stream)
    next(lines), next(lines)
    stream.close()  # the client goes away mid-generation
    assert wait_until(lambda: engine.tokens("gone").state == "finished")
    assert engine.tokens("gone").finish_reason == "abort"
    assert len(engine.tokens("gone").output_token_ids) < 120
    assert engine.counts() == (0, 0)
    with worker.client.generate(GenerateRequest(request_id="next", prompt=PROMPT, max_tokens=3)) as stream:
        assert list(stream)[-1].finish_reason in ("length", "stop")


def test_streams_and_live_migration_over_tls_with_the_site_ca(load_pair, start_worker, site_ca):
    tls = InternalHttpConfig(tls_cert_file=site_ca.cert, tls_key_file=site_ca.key, tls_ca_file=site_ca.ca)
    source, destination = (start_worker(load_pair("llama"), http=tls) for _ in range(2))
    assert source.url.startswith("https://")
    with source.client.generate(GenerateRequest(request_id="whole", prompt=PROMPT, max_tokens=5)) as stream:
        assert list(stream)[-1].finish_reason in ("length", "stop")
    hold_at(source.service.engine, "moving", 1, handed_over(source.service.engine))  # running at the migration
    stream = source.client.generate(GenerateRequest(request_id="moving", prompt=PROMPT, max_tokens=40,
                                                    ignore_eos=True))
    lines = iter(stream)
    next(lines)
    # The source calls the destination itself, verifying it against the site CA.
    moved = source.client.migrate("moving", ticketed(destination.url))
    assert moved.destination_url == destination.url
    final = [line for line in lines if isinstance(line, FinalLine)][-1]
    assert final.finish_reason == "migrated"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(source.url + "/health")


def test_disconnect_while_queued_is_noticed_through_keepalives(load_pair, start_worker):
    worker = start_worker(load_pair("llama"), max_running_requests=1)
    engine = worker.service.engine
    checked = threading.Event()
    hold_at(engine, "busy", 1, checked)  # it holds the one slot, running, until the test has looked
    busy = worker.client.generate(GenerateRequest(request_id="busy", prompt=PROMPT, max_tokens=120, ignore_eos=True))
    busy_lines = iter(busy)  # kept: dropping a partly read iterator closes the connection
    next(busy_lines)
    queued = worker.client.generate(GenerateRequest(request_id="queued", prompt=PROMPT, max_tokens=5))
    assert wait_until(lambda: engine.counts() == (1, 1))
    queued.close()
    assert wait_until(lambda: engine.tokens("queued").state == "finished", timeout=10)
    assert engine.tokens("queued").output_token_ids == []
    assert engine.tokens("busy").state == "running"
    checked.set()
    busy.close()


def test_cancel_then_resume_on_a_second_worker(load_pair, start_worker):
    pair = load_pair("qwen2")
    first, second = start_worker(pair), start_worker(pair)
    body = dict(prompt="🙂 hello wörld", max_tokens=40, temperature=0.8, seed=9, ignore_eos=True)
    with first.client.generate(GenerateRequest(request_id="whole", **body)) as stream:
        whole = [line for line in stream if isinstance(line, TokenLine)]

    stream = first.client.generate(GenerateRequest(request_id="moving", **body))
    received = []
    for line in stream:
        if isinstance(line, TokenLine):
            received.append(line)
        if len(received) == 6:
            state = first.client.cancel("moving")
        if isinstance(line, FinalLine):
            assert line.finish_reason == "abort"
    assert [line.token_id for line in received] == state.output_token_ids

    resume = GenerateRequest(request_id="moving", prompt_token_ids=state.prompt_token_ids,
                             resume_token_ids=state.output_token_ids, seed=state.seed, max_tokens=40,
                             temperature=0.8, ignore_eos=True)
    with second.client.generate(resume) as stream:
        rest = [line for line in stream if isinstance(line, TokenLine)]
    assert rest[0].index == len(received)
    assert [l.token_id for l in received + rest] == [l.token_id for l in whole]
    assert "".join(l.text for l in received + rest) == "".join(l.text for l in whole)


def test_ready_waits_for_the_load_and_health_reports_failures(load_pair, start_worker):
    release = threading.Event()
    pair = load_pair("gpt2")

    def slow_loader():
        release.wait(20)
        return ModelForServing(*pair, tier="sharedfs", load_seconds=1.25)

    worker = start_worker(loader=slow_loader)
    assert httpx.get(worker.url + "/health").json()["state"] == "loading"
    assert httpx.get(worker.url + "/ready").status_code == 503
    with pytest.raises(WorkerError) as caught:
        worker.client.generate(GenerateRequest(request_id="early", prompt=PROMPT))
    assert caught.value.status == 503 and "loading" in str(caught.value)
    release.set()
    assert wait_until(lambda: worker.client.ready() is not None)
    ready = worker.client.ready()
    assert ready["max_model_len"] == pair[0].config.max_position_embeddings
    assert (ready["load_tier"], ready["load_seconds"]) == ("sharedfs", 1.25)
    assert (ready["tokens_in_flight"], ready["prefill_tokens_per_second"]) == (0, None)  # nothing prefilled yet
    metrics = worker.client.metrics_text()
    assert 'hpcllm_model_load_seconds{model_name="tiny-llama",tier="sharedfs"} 1.25' in metrics

    def broken_loader():
        raise OSError("checkpoint vanished")

    failed = start_worker(loader=broken_loader)
    assert wait_until(lambda: httpx.get(failed.url + "/health").status_code == 503)
    assert "checkpoint vanished" in httpx.get(failed.url + "/health").json()["error"]["message"]
    assert httpx.get(failed.url + "/ready").status_code == 503


def test_health_turns_503_when_the_engine_dies(load_pair, start_worker):
    worker = start_worker(load_pair("llama"))
    engine = worker.service.engine

    def broken_forward(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    engine._forward = broken_forward
    with worker.client.generate(GenerateRequest(request_id="boom", prompt=PROMPT, max_tokens=3)) as stream:
        final = list(stream)[-1]
    assert final.finish_reason == "error" and "illegal memory access" in final.error.message
    assert wait_until(lambda: httpx.get(worker.url + "/health").status_code == 503)
    assert httpx.get(worker.url + "/ready").status_code == 503


def test_a_step_that_never_ends_fails_the_engine_its_streams_and_health(load_pair, start_worker):
    """A forward that hangs (a GPU or a collective that never returns) must not hold its streams forever - their
    keep-alives would hide it from the gateway's read timeout - nor leave /health at 200: past step_timeout the
    stream ends with an engine_unavailable error (the gateway resumes it elsewhere) and the worker says it is dead."""
    worker = start_worker(load_pair("llama"), step_timeout=0.5)
    engine = worker.service.engine
    forward, hung, release = engine._forward, threading.Event(), threading.Event()

    def forward_that_hangs(*args, **kwargs):
        if hung.is_set():
            hung.clear()
            release.wait(60)  # a kernel that does not return (let go when the test ends)
        return forward(*args, **kwargs)

    engine._forward = forward_that_hangs
    try:
        body = GenerateRequest(request_id="stuck", prompt=PROMPT, max_tokens=400, ignore_eos=True)
        with worker.client.generate(body) as stream:
            lines = iter(stream)
            assert isinstance(next(lines), TokenLine)
            hung.set()
            final = list(lines)[-1]
        assert final.finish_reason == "error" and final.error.type == "engine_unavailable"
        assert "has not finished a step" in final.error.message
        health = httpx.get(worker.url + "/health")
        assert health.status_code == 503 and "has not finished a step" in health.json()["error"]["message"]
        with pytest.raises(WorkerError) as refused:
            worker.client.generate(GenerateRequest(request_id="after", prompt=PROMPT, max_tokens=3))
        assert refused.value.status == 503
    finally:
        release.set()


def test_metrics_count_requests_and_tokens(load_pair, start_worker):
    worker = start_worker(load_pair("llama"))
    for i in range(2):
        with worker.client.generate(GenerateRequest(request_id=f"m{i}", prompt_token_ids=[5, 6, 7], max_tokens=4,
                                                    ignore_eos=True)) as stream:
            list(stream)
    text = httpx.get(worker.url + "/metrics").text
    label = 'model_name="tiny-llama"'
    assert f"hpcllm_prompt_tokens_total{{{label}}} 6.0" in text
    assert f"hpcllm_generation_tokens_total{{{label}}} 8.0" in text
    assert f'hpcllm_request_success_total{{finished_reason="length",{label}}} 2.0' in text
    assert f"hpcllm_time_to_first_token_seconds_count{{{label}}} 2.0" in text
    assert f"hpcllm_inter_token_latency_seconds_count{{{label}}} 6.0" in text
    assert f"hpcllm_e2e_request_latency_seconds_count{{{label}}} 2.0" in text
    assert f"hpcllm_request_queue_time_seconds_count{{{label}}} 2.0" in text
    assert f"hpcllm_num_requests_running{{{label}}} 0.0" in text
    assert f"hpcllm_num_requests_waiting{{{label}}} 0.0" in text


def test_a_stream_that_fell_behind_its_engine_sends_the_queued_tokens_in_one_write(load_pair, start_worker):
    """On its own HTTP thread (no raw connection to hand to the stream writer: a server other than hpcllm's)."""
    from hpcllm.worker.server import _render_lines

    worker = start_worker(load_pair("llama"))
    first_read = threading.Event()
    hold_at(worker.service.engine, "behind", 1, first_read)  # the first write holds the first token alone
    body = GenerateRequest(request_id="behind", prompt=PROMPT, max_tokens=12, ignore_eos=True, temperature=0)
    stream = worker.service.engine.submit(body)
    writes = worker.service.stream_writer.body(stream, None, _render_lines)
    first = next(data for data in writes if data != KEEPALIVE)  # keep-alives while the first token is computed
    first_read.set()
    assert wait_until(lambda: worker.service.engine.tokens("behind").state == "finished", timeout=30)
    rest = list(writes)  # the engine finished while this reader slept: everything left is one write
    assert first.count(b"\n") == 1 and len(rest) == 1 and rest[0].count(b"\n") == 12  # 11 tokens + the final line


def test_a_worker_process_freezes_its_heap_once_its_engine_is_built_and_an_embedded_service_does_not(
        load_pair, monkeypatch):
    frozen = []
    monkeypatch.setattr(server_module, "freeze_startup_heap", lambda: frozen.append(True))
    model, tokenizer = load_pair("llama")
    for freeze_heap in (False, True):
        service = WorkerService("tiny", "secret", freeze_heap=freeze_heap, batching="sequential")
        service.attach(ModelForServing(model, tokenizer, tier="test"))
        service.shutdown()
    assert frozen == [True]  # only the one that owns its process (run_worker's)


def test_an_empty_prompt_is_a_400_and_the_worker_serves_on(load_pair, start_worker):
    from hpcllm.worker.protocol import PrepareMigration

    worker = start_worker(load_pair("llama"))
    empty = GenerateRequest(request_id="e", prompt="", max_tokens=3)
    for call in (lambda: list(worker.client.generate(empty)),
                 lambda: worker.client.prepare_migration(PrepareMigration(request_id="e", generate=empty))):
        with pytest.raises(WorkerError) as refused:
            call()
        assert refused.value.status == 400 and "prompt is empty once tokenized" in str(refused.value)
    with pytest.raises(WorkerError) as attach:
        list(worker.client.attach("e", 0))
    assert attach.value.status == 404
    with worker.client.generate(GenerateRequest(request_id="after", prompt=PROMPT, max_tokens=3)) as stream:
        assert list(stream)[-1].finish_reason in ("length", "stop")
    assert httpx.get(worker.url + "/health").status_code == 200


def test_loosely_typed_fields_are_a_400_naming_the_field(load_pair, start_worker):
    worker = start_worker(load_pair("llama"))
    post = lambda raw: httpx.post(worker.url + "/v1/internal/generate", content=raw,
                                  headers={SECRET_HEADER: SECRET, "Content-Type": "application/json"})
    for fields, field in (('"prompt_token_ids":[true]', "prompt_token_ids"),
                          ('"prompt_token_ids":["5"]', "prompt_token_ids"),
                          ('"prompt_token_ids":[5],"ignore_eos":"yes"', "ignore_eos"),
                          ('"prompt_token_ids":[5],"max_tokens":"2"', "max_tokens"),
                          ('"prompt_token_ids":[5],"max_tokens":2.0', "max_tokens"),
                          ('"prompt_token_ids":[5],"temperature":Infinity', "temperature"),
                          ('"prompt_token_ids":[5],"top_p":NaN', "top_p"),
                          # Overflowing float32 in the sampler (the request ended with an error in its stream).
                          ('"prompt_token_ids":[5],"repetition_penalty":1e39', "repetition_penalty"),
                          ('"prompt_token_ids":[5],"repetition_penalty":1e-40', "repetition_penalty"),
                          ('"prompt_token_ids":[5],"repetition_penalty":Infinity', "repetition_penalty")):
        response = post('{"request_id":"a",' + fields + "}")
        assert response.status_code == 400 and field in response.json()["error"]["message"], fields
    with worker.client.generate(GenerateRequest(request_id="b", prompt_token_ids=[5], max_tokens=2,
                                                temperature=1, ignore_eos=True)) as stream:  # an int for a float
        assert list(stream)[-1].finish_reason == "length"


def test_a_malformed_worker_url_is_a_worker_error():
    with pytest.raises(WorkerError, match="is not a valid URL"):
        WorkerClient("http://[::1", SECRET).tokens("r")
