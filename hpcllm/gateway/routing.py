"""Where a request for a model goes: the Router interface and its two implementations.

The gateway keeps no placement state in its processes: every request asks its Router. ControllerRouter asks the
controller's route API (the normal, multi-node path: the controller owns placement, cold starts and load
balancing); StaticRouter maps model names to fixed worker URLs from config (a single-node deployment without a
controller). Both describe models with a ModelCard so the gateway can tokenize and check context lengths.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from hpcllm.checkpoint.context import ContextLengthError, source_max_model_len
from hpcllm.config import InternalHttpConfig, ToolCallFormat
from hpcllm.controller import protocol as controller_wire
from hpcllm.controller.errors import NoCapacity, NoCapacityPossible
from hpcllm.errors import ConfigError
from hpcllm.gateway.errors import ClientClosedRequest, ModelNotFound, ServiceUnavailable
from hpcllm.gateway.known_routes import KnownInstance, KnownRoutes
from hpcllm.httpkit.auth import secret_headers
from hpcllm.httpkit.client import error_of, internal_client, json_object, retry_after_s

log = logging.getLogger(__name__)

WireT = TypeVar("WireT", bound=BaseModel)

# Once the gateway drains, a wait for a route (a cold start, capacity) polls at least this often: the drain timeout's
# 503 gateway_shutdown (Gateway.stop_generations) must reach it within the shutdown's grace (server.ABORT_GRACE_S).
DRAINING_POLL_S = 1.0
# Each open status page polls the gateway's /v1/status every 2 s: a ControllerRouter asks the controller for its
# status at most once per this many seconds, whatever the number of pages (they get the same answer), so a storm of
# tabs costs the controller nothing.
STATUS_CACHE_S = 1.0
STATUS_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ModelCard:
    name: str
    # Directory holding tokenizer files and config.json (the converted checkpoint on the shared FS).
    source: Path
    max_model_len: int | None
    created: int
    owned_by: str = "hpcllm"
    tool_call_parser: ToolCallFormat | None = None  # the model config's; None: read from the chat template
    # A LoRA adapter served on a deployed model (its lora_adapters): that model's name. Requests for the adapter go
    # to the base model's instances and name the adapter (GenerateRequest.lora).
    parent: str | None = None
    engine: controller_wire.EngineName = "hpcllm"  # the deployment's, or a static model's `engine`

    @property
    def pools(self) -> bool:
        """Whether its workers answer the embed call (embeddings, score, rerank, classify): vLLM's worker refuses
        it (worker/vllm_engine.py)."""
        return self.engine != "vllm"

    @property
    def base_model(self) -> str:
        """The deployed model whose instances serve this card's requests."""
        return self.parent or self.name

    @property
    def lora(self) -> str | None:
        """The adapter a request for this card runs with (None: the model itself)."""
        return self.name if self.parent is not None else None


@dataclass(frozen=True)
class ColdStart:
    """How the routed instance was loaded (its cold start), as the controller reports it.

    Every route to that instance carries it; the gateway counts it once per instance id (SharedState)."""

    instance_id: str
    tier: str
    load_seconds: float | None


@dataclass(frozen=True)
class Endpoint:
    model: str
    instance_id: str
    worker_url: str
    # Seconds the request spent waiting for a ready instance (queue + cold start).
    waited_seconds: float = 0.0
    cold_start: ColdStart | None = None
    # The key this worker accepts, when it is not the cluster secret (a token-registered node; docs/security.md).
    worker_key: str | None = None
    # A live migration's destination, named by the source worker's stream and reached with the migration's grant
    # alone: the gateway sends it no key of its own (a group's pool may have named it).
    grant_only: bool = False

    def key(self, shared_secret: str) -> str:
        """The key requests are opened with on this worker: its own, else the cluster secret."""
        if self.grant_only:
            raise RuntimeError(f"{self.worker_url} was reached through a migration grant: no key of the gateway's "
                               f"may go there")
        return self.worker_key or shared_secret

    def migrated_to(self, worker_url: str) -> Endpoint:
        """Where a live migration moved a generation: the destination (so a worker lost later is the one forgotten),
        with none of this endpoint's credentials."""
        return Endpoint(model=self.model, instance_id=f"migrated:{worker_url}", worker_url=worker_url,
                        grant_only=True)


class Router(ABC):
    @abstractmethod
    def list_models(self) -> list[ModelCard]:
        """The models a client may ask for (deployed, not necessarily running)."""

    def get_model(self, name: str, wait: bool = True) -> ModelCard:
        """The model's card; ModelNotFound. wait=False: a model list not fetched yet is a ServiceUnavailable at once,
        not waited for through a controller outage as a request waits (a batch's create: its requests wait when they
        run)."""
        cards = self._model_list(wait)
        for card in cards:
            if card.name == name:
                return card
        raise ModelNotFound(name, [card.name for card in cards])

    def _model_list(self, wait: bool) -> list[ModelCard]:
        return self.list_models()

    @abstractmethod
    def resolve(self, model: str, wait_s: float, group: str | None = None,
                abandoned: Callable[[], bool] | None = None) -> Endpoint:
        """A ready worker for `model`, waiting up to wait_s for one to start; ModelNotFound / ServiceUnavailable.
        abandoned: asked while waiting; True (the client left) ends the wait with ClientClosedRequest, an error it
        raises (the gateway's shutdown) with that error."""

    @abstractmethod
    def check_ready(self) -> str | None:
        """None when requests can be served now, else the reason they cannot."""

    def start_draining(self) -> None:
        """The gateway drains: from now on a wait asks `abandoned` at least every DRAINING_POLL_S."""

    def forget(self, endpoint: Endpoint, busy: bool = False) -> None:
        """The endpoint's worker refused or could not be reached (the caller routes again). busy: it answered,
        refusing for now (full), so it is still there."""

    def close(self) -> None:
        """Release connections."""


def _static_max_model_len(name: str, spec) -> int:
    """The context length of a static model, by the rule the worker applies (so both refuse the same requests)."""
    try:
        return source_max_model_len(spec.source, spec.max_model_len)
    except ContextLengthError as exc:
        raise ConfigError(f"gateway.static_models.{name}: {exc}") from None


class StaticRouter(Router):
    """Fixed model -> worker URL(s) from [gateway.static_models]; picks a worker at random per request, among those
    not forgotten while another is left: one gone (unreachable, failed) for FORGET_S seconds, a busy one for
    BUSY_SKIP_S, long enough for the request's next attempt to go elsewhere."""

    FORGET_S = 30.0
    # A full worker skipped for long would send the whole load to the others, and fill them too.
    BUSY_SKIP_S = 2.0

    def __init__(self, static_models: dict, *, shared_secret: str, timeout_s: float = 2.0,
                 http: InternalHttpConfig | None = None):
        created = int(time.time())
        self._cards: dict[str, ModelCard] = {}
        for name, spec in static_models.items():
            card = self._cards[name] = ModelCard(name=name, source=Path(spec.source),
                                                 max_model_len=_static_max_model_len(name, spec), created=created,
                                                 tool_call_parser=spec.tool_call_parser, engine=spec.engine)
            for adapter in spec.lora_adapters:
                if adapter in static_models or adapter in self._cards:
                    raise ConfigError(f"gateway.static_models.{name}.lora_adapters: {adapter!r} is already the name "
                                      "of a model or adapter; requests name either")
                self._cards[adapter] = dataclasses.replace(card, name=adapter, parent=name)
        self._urls = {name: [url.rstrip("/") for url in spec.worker_urls] for name, spec in static_models.items()}
        self._forgotten: dict[str, tuple[float, bool]] = {}  # worker URL -> (time.monotonic() then, busy)
        self._http = internal_client(http, timeout=timeout_s, headers=secret_headers(shared_secret))

    def list_models(self) -> list[ModelCard]:
        return list(self._cards.values())

    def resolve(self, model: str, wait_s: float, group: str | None = None,
                abandoned: Callable[[], bool] | None = None) -> Endpoint:
        if model not in self._urls:
            raise ModelNotFound(model, list(self._urls))
        urls = self._urls[model]
        now = time.monotonic()
        # A worker that just failed is skipped: a random pick would send the retry back to it.
        live = [url for url in urls if not self._skipped(url, now)]
        url = random.choice(live or urls)
        return Endpoint(model=model, instance_id=f"static:{url}", worker_url=url)

    def forget(self, endpoint: Endpoint, busy: bool = False) -> None:
        self._forgotten[endpoint.worker_url] = (time.monotonic(), busy)

    def _skipped(self, url: str, now: float) -> bool:
        if url not in self._forgotten:
            return False
        when, busy = self._forgotten[url]
        return now - when < (self.BUSY_SKIP_S if busy else self.FORGET_S)

    def check_ready(self) -> str | None:
        for name, urls in self._urls.items():
            for url in urls:
                try:
                    if self._http.get(f"{url}/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            else:  # /ready is open: no internal addresses in its answer
                log.debug("no worker of model %r is ready (%s)", name, ", ".join(urls))
                return f"no worker of model {name!r} is ready"
        return None

    def close(self) -> None:
        self._http.close()


class ControllerUnreachable(ServiceUnavailable):
    code = "controller_unreachable"


# What clients are told while the controller cannot be asked; where and why go to the gateway's log.
CONTROLLER_DOWN = "hpcllm's controller cannot be reached just now; retry shortly"


# Controller answers that mean "the controller is in trouble", not "no such model" or "no capacity" (its 503).
CONTROLLER_TROUBLE = frozenset({500, 502, 504})
# The controller's 503 code for "no room now" (hpcllm.controller.errors.NoCapacity): worth waiting for.
NO_CAPACITY = NoCapacity.code
# Its 503 code for "no capacity can ever come" (NoCapacityPossible: the model as deployed fits no node): no waiting.
NO_CAPACITY_POSSIBLE = NoCapacityPossible.code


class ControllerRouter(Router):
    """Asks the controller: GET /v1/internal/route?model=&wait= (200 ready, 202 starting, 404, 503).

    While the controller cannot be asked (unreachable, or answering 500/502/504), requests go to the instances it
    routed this model to within known_route_ttl_s (a model pool's: known_pool_route_ttl_s; KnownRoutes), each
    checked with the worker's /ready; a model
    with none (a cold start) and the model list of a process that never fetched one wait for the controller, up
    to outage_wait_s."""

    def __init__(self, controller_url: str, *, shared_secret: str, route_poll_s: float = 20.0,
                 connect_timeout_s: float = 5.0, models_ttl_s: float = 2.0, known_route_ttl_s: float = 600.0,
                 known_pool_route_ttl_s: float = 30.0, outage_wait_s: float = 60.0,
                 http: InternalHttpConfig | None = None):
        self.controller_url = controller_url.rstrip("/")
        self.route_poll_s = route_poll_s
        self.outage_wait_s = outage_wait_s
        self._http = internal_client(
            http, base_url=self.controller_url, headers=secret_headers(shared_secret),
            timeout=httpx.Timeout(connect_timeout_s, read=route_poll_s + 30.0),
        )
        self._workers_http = internal_client(http, timeout=2.0)  # workers' /ready checks during an outage
        # A short-lived copy of the model list so a burst of requests does not ask the controller for every one.
        # While the controller is unreachable the last copy is used, however old.
        self._models_ttl_s = models_ttl_s
        self._models: tuple[float, list[ModelCard]] | None = None
        self._known = KnownRoutes(known_route_ttl_s, known_pool_route_ttl_s)
        # After a failed call the controller is not asked again for 2 s (a controller host that drops packets
        # would otherwise cost every request the connect timeout).
        self._skip_controller_until = 0.0
        self._outage: str | None = None  # why the controller could not be asked, while it cannot
        self._poll_s = route_poll_s  # DRAINING_POLL_S at most once the gateway drains
        # The controller's status (admin_status) as last asked for: (time.monotonic() then, its body or None).
        self._status_lock = threading.Lock()
        self._status: tuple[float, dict | None] | None = None

    def _get(self, path: str, **params) -> httpx.Response:
        if self._outage is not None and time.monotonic() < self._skip_controller_until:
            raise ControllerUnreachable(CONTROLLER_DOWN, retry_after=5)
        try:
            resp = self._http.get(path, params=params or None)
        except httpx.HTTPError as exc:
            raise self._controller_failed(f"the controller at {self.controller_url} is unreachable ({exc})") from None
        if resp.status_code in CONTROLLER_TROUBLE:
            raise self._controller_failed(f"the controller at {self.controller_url} answered {resp.status_code}")
        if self._outage is not None:
            log.warning("the controller at %s answers again", self.controller_url)
            self._outage = None
        return resp

    def _controller_failed(self, reason: str) -> ControllerUnreachable:
        if self._outage is None:
            log.warning("%s: serving the instances it named ready, new cold starts wait for it", reason)
        self._outage = reason
        self._skip_controller_until = time.monotonic() + 2.0
        return ControllerUnreachable(CONTROLLER_DOWN, retry_after=5)

    def list_models(self) -> list[ModelCard]:
        return self._list_models(wait_s=0.0)

    def _model_list(self, wait: bool) -> list[ModelCard]:
        return self._list_models(wait_s=self.outage_wait_s if wait else 0.0)

    def _list_models(self, wait_s: float) -> list[ModelCard]:
        now = time.monotonic()
        if self._models and now - self._models[0] < self._models_ttl_s:
            return self._models[1]
        deadline = now + wait_s
        while True:
            try:
                resp = self._get("/v1/internal/models")
                break
            except ControllerUnreachable:
                if self._models:  # the last list, however old: the controller's deployments rarely change
                    return self._models[1]
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if resp.status_code != 200:
            raise ServiceUnavailable(f"the controller answered {resp.status_code} listing models",
                                     code="controller_error", retry_after=5)
        cards = [card for model in self._read(controller_wire.ModelList, resp).models for card in self._cards(model)]
        self._models = (now, cards)
        return cards

    @staticmethod
    def _cards(card: controller_wire.ModelCard) -> list[ModelCard]:
        """A deployed model's card, and one per LoRA adapter it serves (same tokenizer and context length)."""
        source = Path(card.source)
        base = ModelCard(name=card.name, source=source, max_model_len=card.max_model_len or _derived_or_none(source),
                         created=int(card.created_at), tool_call_parser=card.tool_call_parser, engine=card.engine)
        return [base, *(dataclasses.replace(base, name=name, parent=card.name) for name in sorted(card.lora_adapters))]

    def _read(self, wire: type[WireT], resp: httpx.Response) -> WireT:
        """The controller's answer as its wire type; an unreadable one is the controller's fault: 503."""
        try:
            return wire.model_validate(json_object(resp))
        except ValidationError as exc:
            # Where the controller is and what was wrong go to the log, not the client; the answer's values (worker
            # addresses, node keys) nowhere.
            log.error("the controller at %s sent an unreadable %s: %s", self.controller_url, wire.__name__,
                      exc.errors(include_input=False, include_url=False))
            raise ServiceUnavailable(f"hpcllm's controller sent an answer this gateway cannot read ({wire.__name__}: "
                                     f"are they the same hpcllm version?); ask the operator", code="controller_error",
                                     retry_after=5) from None

    def admin_status(self, admin_key: str) -> dict | None:
        """The controller's whole status (its GET /v1/admin/status, asked with the admin key), or None where it did
        not give it, as this process last asked for it: at most once per STATUS_CACHE_S; calls arriving while it is
        asked wait for its answer instead of asking too. Every caller gets the same dict: read it, never change it."""
        with self._status_lock:
            if self._status is None or time.monotonic() - self._status[0] >= STATUS_CACHE_S:
                status = self._fetch_status(admin_key)
                self._status = (time.monotonic(), status)
            return self._status[1]

    def _fetch_status(self, admin_key: str) -> dict | None:
        if self._outage is not None and time.monotonic() < self._skip_controller_until:  # as _get: not asked now
            return None
        try:
            # The router's connect timeout (a host dropping packets: every poll waits behind this one's connect).
            timeout = httpx.Timeout(STATUS_TIMEOUT_S, connect=self._http.timeout.connect)
            resp = self._http.get("/v1/admin/status", timeout=timeout,
                                  headers={"Authorization": f"Bearer {admin_key}"})
            resp.raise_for_status()
            status = resp.json()
        except (httpx.HTTPError, ValueError) as exc:  # where and why: the log's (users never see internal addresses)
            log.warning("the controller at %s did not give its status: %s", self.controller_url, exc)
            return None
        if not isinstance(status, dict):  # a proxy's or another service's JSON: the views read it as an object
            log.warning("the controller at %s did not give its status: its answer is JSON but not an object (%s)",
                        self.controller_url, type(status).__name__)
            return None
        return status

    def start_draining(self) -> None:
        self._poll_s = min(self.route_poll_s, DRAINING_POLL_S)

    def resolve(self, model: str, wait_s: float, group: str | None = None,
                abandoned: Callable[[], bool] | None = None) -> Endpoint:
        start = time.monotonic()
        deadline = start + wait_s
        while True:
            # Between polls (route_poll_s each, DRAINING_POLL_S draining): a client that left frees its thread,
            # stream slot and reservation now, not when the cold start or the wait for capacity ends.
            if abandoned is not None and abandoned():
                raise ClientClosedRequest(f"the client closed the connection while model {model!r} was being "
                                          f"routed ({time.monotonic() - start:.0f} s); request dropped")
            remaining = deadline - time.monotonic()
            params = {"model": model, "wait": round(max(0.0, min(remaining, self._poll_s)), 1)}
            if group:  # the API key's group: its own pools may serve it too
                params["group"] = group
            called = time.monotonic()
            try:
                resp = self._get("/v1/internal/route", **params)
            except ControllerUnreachable:
                remembered = self._remembered(model, start, group)
                if remembered is not None:
                    return remembered
                remaining = min(deadline, start + self.outage_wait_s) - time.monotonic()
                if remaining <= 0:
                    raise
                log.info("no ready instance of %s is known: waiting for the controller", model)
                time.sleep(min(1.0, remaining))
                continue
            if resp.status_code == 200:
                route = self._read(controller_wire.RouteReady, resp)
                endpoint = self._endpoint(model, route, time.monotonic() - start)
                self._known.remember(model, KnownInstance(endpoint.instance_id, endpoint.worker_url,
                                                          endpoint.worker_key, group, pool=route.pool))
                return endpoint
            if resp.status_code == 404:
                raise ModelNotFound(model)
            if resp.status_code == 202:
                waiting = self._read(controller_wire.RouteWaiting, resp)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServiceUnavailable(
                        f"model {model!r} is still starting after {wait_s:.0f} s; retry shortly",
                        code="model_starting", retry_after=waiting.retry_after or 5)
                # The controller long-polls when it honours `wait`; sleep only if it answered at once.
                time.sleep(min(remaining, waiting.retry_after or 1.0, 1.0))
                continue
            error, message = error_of(resp)
            if resp.status_code == 503 and error.get("code") == NO_CAPACITY_POSSIBLE:
                # Certain at the first call: the client learns at once what to change, and no Retry-After (asking
                # again cannot help).
                raise ServiceUnavailable(message, code=NO_CAPACITY_POSSIBLE)
            if resp.status_code == 503 and error.get("code") == NO_CAPACITY:
                # Like a job queued in Slurm: the request waits (the controller long-polled `wait` for capacity
                # already) until capacity frees up or its budget is over.
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    time.sleep(max(0.0, min(remaining, 1.0 - (time.monotonic() - called))))  # >= 1 s per call
                    continue
                raise ServiceUnavailable(f"no capacity to serve model {model!r} after waiting {wait_s:g} s "
                                         f"(gateway.route_timeout_seconds): {message}",
                                         code="no_capacity", retry_after=_retry_after(resp, 10))
            if resp.status_code == 503:  # e.g. Slurm refused the allocation the model needs: waiting cannot help
                raise ServiceUnavailable(message or f"no capacity to serve model {model!r} now",
                                         code="no_capacity", retry_after=_retry_after(resp, 10))
            raise ServiceUnavailable(f"the controller answered {resp.status_code} routing {model!r}: {message}",
                                     code="controller_error", retry_after=5)

    def _remembered(self, model: str, start: float, group: str | None) -> Endpoint | None:
        """A remembered instance of the model, routed for this group, whose worker says, now, that it serves this
        model and is ready."""
        for known in self._known.candidates(model, group):
            if self._worker_serves(known.worker_url, model):
                return Endpoint(model=model, instance_id=known.instance_id, worker_url=known.worker_url,
                                waited_seconds=time.monotonic() - start, worker_key=known.worker_key)
            self._known.forget(model, known.worker_url)
        return None

    def _worker_serves(self, worker_url: str, model: str) -> bool:
        try:
            # Without a credential (/ready is open): the cluster secret never goes to a URL a node reported.
            resp = self._workers_http.get(f"{worker_url}/ready")
            return resp.status_code == 200 and json_object(resp).get("model") == model
        except httpx.HTTPError:
            return False

    def forget(self, endpoint: Endpoint, busy: bool = False) -> None:
        self._known.forget(endpoint.model, endpoint.worker_url)

    @staticmethod
    def _endpoint(model: str, route: controller_wire.RouteReady, waited: float) -> Endpoint:
        cold = None
        if route.load_tier:
            cold = ColdStart(instance_id=route.instance_id, tier=route.load_tier, load_seconds=route.load_seconds)
        return Endpoint(model=model, instance_id=route.instance_id, worker_url=route.worker_url.rstrip("/"),
                        waited_seconds=waited, cold_start=cold, worker_key=route.worker_key)

    def check_ready(self) -> str | None:
        try:
            resp = self._http.get("/health", timeout=2.0)
        except httpx.HTTPError as exc:
            if self._known:
                return None  # the instances it named ready are served from memory meanwhile
            log.debug("the controller at %s is unreachable (%s)", self.controller_url, exc)
            return CONTROLLER_DOWN  # /ready is open: no internal addresses in its answer
        return None if resp.status_code == 200 else f"the controller answered {resp.status_code} on /health"

    def close(self) -> None:
        self._http.close()
        self._workers_http.close()


def _derived_or_none(source: Path) -> int | None:
    """A deployed model the controller recorded no context length for (a registry from before it recorded one,
    its source unreadable when the controller started): the model's own, or None (then only the worker checks)."""
    try:
        return source_max_model_len(source)
    except ContextLengthError:
        return None


def _retry_after(resp: httpx.Response, default: float) -> float:
    seconds = retry_after_s(resp)
    return default if seconds is None else seconds


def make_router(config) -> Router:
    """The Router the config asks for ([gateway].router: auto | controller | static)."""
    gw = config.gateway
    kind = gw.router
    if kind == "auto":
        kind = "static" if gw.static_models else "controller"
    if kind == "static":
        return StaticRouter(gw.static_models, shared_secret=config.cluster.shared_secret,
                            timeout_s=gw.upstream_connect_timeout_seconds, http=config.internal_http)
    url = gw.controller_url or f"{config.internal_http.scheme}://{config.controller.host}:{config.controller.port}"
    return ControllerRouter(url, shared_secret=config.cluster.shared_secret, route_poll_s=gw.route_poll_seconds,
                            connect_timeout_s=gw.upstream_connect_timeout_seconds,
                            known_route_ttl_s=gw.known_route_ttl_seconds,
                            known_pool_route_ttl_s=gw.known_pool_route_ttl_seconds,
                            outage_wait_s=min(gw.route_timeout_seconds, gw.controller_outage_wait_seconds),
                            http=config.internal_http)
