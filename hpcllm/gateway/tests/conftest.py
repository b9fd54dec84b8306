"""Gateway test fixtures: a real worker serving a tiny real model, and real gateway servers in threads.

The worker is hpcllm.worker's own app (engine + Flask) around a tiny Llama loaded with transformers'
from_pretrained; the gateway is create_app() served by werkzeug's threaded server, so tests go through real
HTTP, real SSE and the official `openai` client.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hpcllm.config import Config, parse_config
from hpcllm.httpkit.tests.thread_server import ThreadServer

SECRET = "gateway-test-secret"
MODEL = "tiny-llama"
USER_KEY = "sk-test-user"
ADMIN_KEY = "sk-test-admin"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny seeded Llama with a trained BPE tokenizer and a chat template (hpcllm.devmodels)."""
    from hpcllm.devmodels import make_model

    return make_model("llama", tmp_path_factory.mktemp("gateway-models") / MODEL)


@pytest.fixture(scope="session")
def hf_pair(tiny_model_dir):
    """(model, tokenizer) loaded straight with transformers: the reference outputs are computed with these."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def worker_url(tiny_model_dir) -> Iterator[str]:
    """A real hpcllm worker serving the tiny model over its internal HTTP API."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.worker.server import ModelForServing, WorkerService, create_app

    service = WorkerService(MODEL, secret=SECRET, keepalive_seconds=0.5)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    service.attach(ModelForServing(model, AutoTokenizer.from_pretrained(tiny_model_dir), tier="dram", load_seconds=0.1))
    server = ThreadServer(create_app(service))
    yield server.url
    server.stop()
    service.shutdown()


def vllm_python() -> str:
    """The vLLM interpreter (make vllm-venv); the test skips, saying why, where there is none (fails in CI)."""
    from hpcllm.worker.vllm_launch import VllmInterpreterMissing, vllm_python as configured

    try:
        return configured(Config())
    except VllmInterpreterMissing as exc:
        if os.environ.get("CI"):  # CI builds .venv-vllm (make test): a missing one is a failure there, not a skip
            pytest.fail(f"CI must run the vLLM tests: no vLLM interpreter: {exc}", pytrace=False)
        pytest.skip(f"no vLLM interpreter: {exc} (make vllm-venv)")


@pytest.fixture(scope="package")
def vllm_checkpoint(small_llama_dir, tmp_path_factory) -> Path:
    """The small dev Llama (head size 64: vLLM's CPU attention has no kernel for the tiny model's 16), converted."""
    from hpcllm.checkpoint.converter import convert

    return convert(small_llama_dir, tmp_path_factory.mktemp("vllm") / "small-llama", progress=False).root


def start_vllm_worker_for_test(checkpoint: Path, tmp_path_factory, **options) -> Iterator[tuple[str, Path]]:
    """`hpcllm worker --engine vllm` run by the vLLM interpreter, as the node agent starts it: yields (url, log
    path), stops it after. options: start_vllm_worker's (lora_modules, ...)."""
    from hpcllm.worker.vllm_launch import start_vllm_worker

    python = vllm_python()
    try:
        server = start_vllm_worker(checkpoint, name=MODEL, secret=SECRET, kv_cache_gb=1, python=python,
                                   log_dir=tmp_path_factory.mktemp("vllm-worker"), keepalive_seconds=0.5, **options)
    except RuntimeError as exc:  # it exited or never became ready: the message holds its log's tail
        pytest.fail(f"vLLM worker did not start: {exc}")
    try:
        yield server.url, server.log_path
    finally:
        server.stop()


@pytest.fixture(scope="package")
def vllm_lora_x(small_llama_dir, tmp_path_factory) -> tuple[Path, dict]:
    """LoRA adapter "x" of the small Llama (every projection, seed 7), which vllm_server starts with: (its PEFT
    folder, {module name: the delta merging adds})."""
    from hpcllm.worker.tests.test_lora import load, write_adapter

    model, _ = load({"llama": small_llama_dir})
    folder = tmp_path_factory.mktemp("vllm-lora") / "x"
    return folder, write_adapter(folder, model, seed=7)


@pytest.fixture(scope="package")
def vllm_server(vllm_checkpoint, vllm_lora_x, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """One vLLM worker over vllm_checkpoint for test_vllm_worker.py and test_vllm_lora.py (each start costs 30-120 s
    on these shared 2 cores): (url, log path). Started with adapter "x" (vLLM's --enable-lora), as a worker of a
    model deployed with lora_adapters is; a request naming no adapter gets the base model. A test that loads or
    unloads adapters restores "x" alone before it ends. The trade-off of one start: the base-model checks here run on
    an engine with LoRA enabled (max_loras=1); the plain engine most deployments run is test_vllm_worker.py's
    thinkers worker (its greedy check against transformers) and its second worker (the long migration test)."""
    yield from start_vllm_worker_for_test(vllm_checkpoint, tmp_path_factory,
                                          lora_modules={"x": str(vllm_lora_x[0])})


def gateway_config(tmp_path: Path, worker: str, source: Path, **gateway) -> Config:
    gateway.setdefault("api_keys", [{"key": USER_KEY, "name": "alice"}])
    gateway.setdefault("admin_key", ADMIN_KEY)
    gateway.setdefault("static_models", {MODEL: {"worker_url": worker, "source": str(source)}})
    return parse_config({
        "paths": {"state_dir": str(tmp_path / "state")},
        "cluster": {"shared_secret": SECRET},
        "gateway": gateway,
    })


@dataclass
class RunningGateway:
    url: str
    app: object
    config: Config

    @property
    def state(self):
        from hpcllm.gateway.app import gateway_of

        return gateway_of(self.app)

    def client(self, key: str = USER_KEY, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60, **kwargs)

    def post(self, path: str, key: str | None = USER_KEY, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=60, **kwargs)

    def get(self, path: str, key: str | None = USER_KEY, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=60, **kwargs)


def raw_post(gateway: RunningGateway, path: str, body: dict, key: str = USER_KEY):
    """Send a POST on a plain socket and return the socket unread: the test plays a client that hangs up
    (client.close()) while its answer is being prepared."""
    import json
    import socket
    from urllib.parse import urlsplit

    sent = json.dumps(body).encode()
    parts = urlsplit(gateway.url)
    client = socket.create_connection((parts.hostname, parts.port))
    client.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Authorization: Bearer {key}\r\nContent-Length: {len(sent)}\r\n\r\n".encode() + sent)
    return client


def read_completion_stream(stream, on_text: Callable[[list[str]], None] = lambda texts: None):
    """(texts, usage, finish_reason) of an openai completions stream of one choice (usage where include_usage asked
    for it); on_text(texts so far) after each text chunk."""
    texts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        texts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
        on_text(texts)
    return texts, usage, finish


class GatewayFactory:
    def __init__(self, root: Path, worker: str, source: Path):
        self.root, self.worker, self.source = root, worker, source
        self.running: list[tuple[ThreadServer, object]] = []

    def __call__(self, router=None, **gateway) -> RunningGateway:
        from hpcllm.gateway.app import create_app

        config = gateway_config(self.root / f"gw{len(self.running)}", self.worker, self.source, **gateway)
        app = create_app(config, router=router)
        server = ThreadServer(app)
        self.running.append((server, app))
        return RunningGateway(server.url, app, config)

    def stop_all(self) -> None:
        from hpcllm.gateway.app import gateway_of

        for server, app in self.running:
            server.stop()
            gateway_of(app).close()


@contextmanager
def scripted_gateway(root: Path, name: str, chat_template: str, script, **gateway) -> Iterator[RunningGateway]:
    """A gateway serving `name`, a devmodels Llama with `chat_template` (its tokenizer and template), on a scripted
    stand-in worker answering what `script` (stand_in_worker.Script) is set to (`gateway`: its config section's
    overrides, as GatewayFactory's); all stopped on leaving."""
    from hpcllm.devmodels import make_model

    from .stand_in_worker import scripted_worker_app

    model_dir = make_model("llama", root / name, chat_template=chat_template)
    worker = ThreadServer(scripted_worker_app(script))
    factory = GatewayFactory(root / "gateway", worker.url, model_dir)
    try:
        yield factory(static_models={name: {"worker_url": worker.url, "source": str(model_dir)}}, **gateway)
    finally:
        factory.stop_all()
        worker.stop()


@pytest.fixture
def make_gateway(tmp_path, worker_url, tiny_model_dir) -> Iterator[Callable[..., RunningGateway]]:
    """make_gateway(router=None, **gateway_section_overrides) -> a running gateway in front of the real worker."""
    factory = GatewayFactory(tmp_path, worker_url, tiny_model_dir)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, worker_url, tiny_model_dir) -> Iterator[RunningGateway]:
    """One default gateway shared by a test module (tests that change its state use make_gateway)."""
    factory = GatewayFactory(tmp_path_factory.mktemp("gateway"), worker_url, tiny_model_dir)
    yield factory()
    factory.stop_all()


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server for the session (the controller's tests' pg_server); skipped, with the reason,
    where there is no server or no psycopg."""
    from hpcllm.controller.tests import pg_server

    reason = pg_server.missing_reason()
    if reason:
        if os.environ.get("CI"):  # make test installs postgresql: under CI a missing server is a failure
            pytest.fail(f"CI must run the PostgreSQL tests: {reason}", pytrace=False)
        pytest.skip(f"PostgreSQL tests need a local server: {reason}")
    with pg_server.postgres_server() as url:
        yield url


@pytest.fixture
def empty_postgres(postgres_url) -> str:
    """The session's PostgreSQL server with no tables: each test starts from empty limits."""
    from hpcllm.controller.tests import pg_server

    pg_server.reset_database(postgres_url)
    return postgres_url


@pytest.fixture(params=["sqlite", "postgresql"])
def limits_url(request, tmp_path) -> str:
    """An empty limits database of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "limits.db")
    return request.getfixturevalue("empty_postgres")
