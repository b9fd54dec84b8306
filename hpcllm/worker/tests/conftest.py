"""Worker test fixtures: the devmodels tiny models (root conftest's tiny_models), loaded once per session, and
real worker servers (the worker's Flask app on its production server, hpcllm.httpkit.server) in threads."""

from __future__ import annotations

import functools
import threading
import time

import pytest

from hpcllm.config import InternalHttpConfig
from hpcllm.devmodels import ARCHITECTURES
from hpcllm.httpkit.server import InternalServer
from hpcllm.worker.client import WorkerClient
from hpcllm.worker.protocol import GenerateRequest, PrepareMigration
from hpcllm.worker.server import CONTROL_THREADS, ModelForServing, WorkerService, create_app

ARCHS = list(ARCHITECTURES)
SECRET = "s3cret"
MODEL = "tiny-llama"  # the name test workers serve


def ticketed(destination_url: str, **fields):
    """A migration order with a valid ticket (every test worker holds SECRET)."""
    from hpcllm.worker.migration import ticketed_request

    return ticketed_request(destination_url, model=MODEL, key=SECRET, **fields)


@pytest.fixture(scope="session")
def site_ca(tmp_path_factory):
    from hpcllm.httpkit.tests.site_ca import site_ca_or_skip

    return site_ca_or_skip(tmp_path_factory)


@pytest.fixture(scope="session")
def model_dirs(tiny_models):
    return tiny_models


@pytest.fixture(scope="session")
def load_pair(model_dirs):
    """load_pair(arch) -> (model, tokenizer), loaded once per session with from_pretrained. An engine built on one
    applies the paged runner's CPU fast path to it in place (fused, packed projections; idempotent): compare
    outputs with `reference_model`, never with these."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    @functools.cache
    def load(arch):
        path = model_dirs[arch]
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)

    return load


@pytest.fixture(scope="session")
def reference_model(model_dirs):
    """reference_model(arch): the model as transformers loads it, never given to an engine: what `generate`
    answers for the checkpoint. Do not modify it."""
    from transformers import AutoModelForCausalLM

    @functools.cache
    def load(arch):
        return AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()

    return load


class RunningWorker:
    def __init__(self, service: WorkerService, http: InternalHttpConfig | None = None):
        self.service = service
        service.http = http = http or InternalHttpConfig()
        self.server = InternalServer(create_app(service), "127.0.0.1", 0, http=http,
                                     threads=service.stream_capacity() + CONTROL_THREADS, name="worker")
        self.url = f"{self.server.scheme}://{'localhost' if http.tls else '127.0.0.1'}:{self.server.port}"
        self.thread = self.server.start()
        self.client = WorkerClient(self.url, SECRET, read_timeout=60, http=http)

    def stop(self):
        self.client.close()
        self.service.shutdown()
        self.server.stop()


@pytest.fixture
def start_worker():
    workers = []

    def start(pair=None, loader=None, http=None, **engine_options) -> RunningWorker:
        service = WorkerService("tiny-llama", SECRET, keepalive_seconds=0.2, **engine_options)
        if pair is not None:
            service.attach(ModelForServing(*pair, tier="test", load_seconds=0.5))
        if loader is not None:
            service.load_in_background(loader)
        worker = RunningWorker(service, http)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def wait_until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def slow_down(engine, seconds_per_step):
    """Make every engine step take a while, so a request is reliably still running when the test acts.
    Returns a function that restores the engine's speed."""
    forward = engine._forward

    def slow_forward(*args, **kwargs):
        time.sleep(seconds_per_step)
        return forward(*args, **kwargs)

    engine._forward = slow_forward

    def restore() -> None:
        engine._forward = forward

    return restore


def hold_at(engine, request_ids: str | tuple[str, ...], output_tokens: int, until: threading.Event) -> None:
    """Once each of request_ids has `output_tokens` output tokens, make every engine step wait until `until` is set
    (60 s at most: only a failed test waits that long): they are still running, at that point, when the test acts,
    however loaded the machine (slow_down only makes that likely). Stacks: hold a request at several points."""
    forward = engine._forward
    request_ids = (request_ids,) if isinstance(request_ids, str) else request_ids

    def reached(request_id: str) -> bool:
        request = engine._live.get(request_id)
        return request is not None and len(request.output_ids) >= output_tokens

    def held_forward(*args, **kwargs):
        if not until.is_set() and all(reached(request_id) for request_id in request_ids):
            until.wait(60)
        return forward(*args, **kwargs)

    engine._forward = held_forward


def cancelled(engine, request_id: str) -> threading.Event:
    """Set once the engine was asked to cancel request_id without waiting (a stream's close: its client left); hold_at
    ... until it: the request is still running when its cancel comes."""
    cancel, asked = engine.cancel, threading.Event()

    def cancel_and_tell(cancelled_id: str, *args, **kwargs):
        tokens = cancel(cancelled_id, *args, **kwargs)
        if cancelled_id == request_id:
            asked.set()
        return tokens

    engine.cancel = cancel_and_tell
    return asked


def handed_over(engine, requests: int = 1) -> threading.Event:
    """Set once the engine paused `requests` requests for their hand-over (hold_at ... until it: a request held
    there is still running when its migration hands it over)."""
    pause, paused, count = engine.pause, threading.Event(), []

    def pause_and_tell(request_id):
        output = pause(request_id)
        count.append(request_id)
        if len(count) >= requests:
            paused.set()
        return output

    engine.pause = pause_and_tell
    return paused


@pytest.fixture
def make_engine():
    """make(model, tokenizer, **options): a started Engine ("tiny"), shut down after the test."""
    from hpcllm.worker.engine import Engine

    engines = []

    def make(model, tokenizer, **options):
        engine = Engine(model, tokenizer, model_name="tiny", **options).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


def held(request_id: str, **fields) -> PrepareMigration:
    """A request to hold; attached, it always runs to its 10 tokens ("length": sampled, EOS ended ~1% early)."""
    generate = GenerateRequest(request_id=request_id, prompt_token_ids=[5, 6, 7], max_tokens=10, temperature=0.0,
                               ignore_eos=True)
    return PrepareMigration(request_id=request_id, generate=generate, **fields)
