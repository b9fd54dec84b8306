"""Where a request for a model goes: the Router interface and its two implementations.

The gateway keeps no placement state in its processes: every request asks its Router. ControllerRouter asks the
controller's route API (the normal, multi-node path: the controller owns placement, cold starts and load
balancing); StaticRouter maps model names to fixed worker URLs from config (a single-node deployment without a
controller). Both describe models with a ModelCard so the gateway can tokenize and check context lengths.
"""

from __future__ import annotations

import logging
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import httpx

from hpcllm.checkpoint.context import ContextLengthError, source_max_model_len
from hpcllm.errors import ConfigError
from hpcllm.gateway.errors import ModelNotFound, ServiceUnavailable

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Hpcllm-Secret"


@dataclass(frozen=True)
class ModelCard:
    name: str
    # Directory holding tokenizer files and config.json (the converted checkpoint on the shared FS).
    source: Path
    max_model_len: int | None
    created: int
    owned_by: str = "hpcllm"


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


class Router(ABC):
    @abstractmethod
    def list_models(self) -> list[ModelCard]:
        """The models a client may ask for (deployed, not necessarily running)."""

    def get_model(self, name: str) -> ModelCard:
        cards = self.list_models()
        for card in cards:
            if card.name == name:
                return card
        raise ModelNotFound(name, [card.name for card in cards])

    @abstractmethod
    def resolve(self, model: str, wait_s: float, group: str | None = None) -> Endpoint:
        """A ready worker for `model`, waiting up to wait_s for one to start; ModelNotFound / ServiceUnavailable."""

    @abstractmethod
    def check_ready(self) -> str | None:
        """None when requests can be served now, else the reason they cannot."""

    def close(self) -> None:
        """Release connections."""


def _static_max_model_len(name: str, spec) -> int:
    """The context length of a static model, by the rule the worker applies (so both refuse the same requests)."""
    try:
        return source_max_model_len(spec.source, spec.max_model_len)
    except ContextLengthError as exc:
        raise ConfigError(f"gateway.static_models.{name}: {exc}") from None


class StaticRouter(Router):
    """Fixed model -> worker URL(s) from [gateway.static_models]; picks a worker at random per request."""

    def __init__(self, static_models: dict, *, shared_secret: str, timeout_s: float = 2.0):
        created = int(time.time())
        self._cards = {
            name: ModelCard(name=name, source=Path(spec.source),
                            max_model_len=_static_max_model_len(name, spec), created=created)
            for name, spec in static_models.items()
        }
        self._urls = {name: [url.rstrip("/") for url in spec.worker_urls] for name, spec in static_models.items()}
        self._http = httpx.Client(timeout=timeout_s, headers={SECRET_HEADER: shared_secret})

    def list_models(self) -> list[ModelCard]:
        return list(self._cards.values())

    def resolve(self, model: str, wait_s: float, group: str | None = None) -> Endpoint:
        if model not in self._urls:
            raise ModelNotFound(model, list(self._urls))
        url = random.choice(self._urls[model])
        return Endpoint(model=model, instance_id=f"static:{url}", worker_url=url)

    def check_ready(self) -> str | None:
        for name, urls in self._urls.items():
            for url in urls:
                try:
                    if self._http.get(f"{url}/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            else:
                return f"no worker of model {name!r} is ready ({', '.join(urls)})"
        return None

    def close(self) -> None:
        self._http.close()


class ControllerRouter(Router):
    """Asks the controller: GET /v1/internal/route?model=&wait= (200 ready, 202 starting, 404, 503)."""

    def __init__(self, controller_url: str, *, shared_secret: str, route_poll_s: float = 20.0,
                 connect_timeout_s: float = 5.0, models_ttl_s: float = 2.0):
        self.controller_url = controller_url.rstrip("/")
        self.route_poll_s = route_poll_s
        self._http = httpx.Client(
            base_url=self.controller_url, headers={SECRET_HEADER: shared_secret},
            timeout=httpx.Timeout(connect_timeout_s, read=route_poll_s + 30.0),
        )
        # A short-lived copy of the model list so a burst of requests does not ask the controller for every one.
        self._models_ttl_s = models_ttl_s
        self._models: tuple[float, list[ModelCard]] | None = None

    def _get(self, path: str, **params) -> httpx.Response:
        try:
            return self._http.get(path, params=params or None)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the controller at {self.controller_url} is unreachable ({exc})",
                                     code="controller_unreachable", retry_after=5) from None

    def list_models(self) -> list[ModelCard]:
        now = time.monotonic()
        if self._models and now - self._models[0] < self._models_ttl_s:
            return self._models[1]
        resp = self._get("/v1/internal/models")
        if resp.status_code != 200:
            raise ServiceUnavailable(f"the controller answered {resp.status_code} listing models",
                                     code="controller_error", retry_after=5)
        cards = [self._card(record) for record in _records(resp.json())]
        self._models = (now, cards)
        return cards

    @staticmethod
    def _card(record: dict) -> ModelCard:
        source = Path(record["source"])
        max_len = record.get("max_model_len") or _derived_or_none(source)
        created = record.get("created_at") or record.get("created") or time.time()
        return ModelCard(name=record["name"], source=source, max_model_len=max_len, created=int(created))

    def resolve(self, model: str, wait_s: float, group: str | None = None) -> Endpoint:
        start = time.monotonic()
        deadline = start + wait_s
        while True:
            remaining = deadline - time.monotonic()
            params = {"model": model, "wait": round(max(0.0, min(remaining, self.route_poll_s)), 1)}
            if group:  # the API key's group: its own pools may serve it too
                params["group"] = group
            resp = self._get("/v1/internal/route", **params)
            body = _json(resp)
            if resp.status_code == 200:
                return self._endpoint(model, body, time.monotonic() - start)
            if resp.status_code == 404:
                raise ModelNotFound(model)
            if resp.status_code == 202:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServiceUnavailable(
                        f"model {model!r} is still starting after {wait_s:.0f} s; retry shortly",
                        code="model_starting", retry_after=body.get("retry_after") or 5)
                # The controller long-polls when it honours `wait`; sleep only if it answered at once.
                time.sleep(min(remaining, float(body.get("retry_after") or 1.0), 1.0))
                continue
            message = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) else None
            if resp.status_code == 503:
                raise ServiceUnavailable(message or f"no capacity to serve model {model!r} now",
                                         code="no_capacity", retry_after=_retry_after(resp, 10))
            raise ServiceUnavailable(f"the controller answered {resp.status_code} routing {model!r}: {message}",
                                     code="controller_error", retry_after=5)

    @staticmethod
    def _endpoint(model: str, body: dict, waited: float) -> Endpoint:
        cold = None
        tier = body.get("load_tier")
        if tier:
            cold = ColdStart(instance_id=body["instance_id"], tier=str(tier),
                             load_seconds=body.get("load_seconds"))
        return Endpoint(model=model, instance_id=body["instance_id"], worker_url=body["worker_url"].rstrip("/"),
                        waited_seconds=waited, cold_start=cold, worker_key=body.get("worker_key"))

    def check_ready(self) -> str | None:
        try:
            resp = self._http.get("/health", timeout=2.0)
        except httpx.HTTPError as exc:
            return f"the controller at {self.controller_url} is unreachable ({exc})"
        return None if resp.status_code == 200 else f"the controller answered {resp.status_code} on /health"

    def close(self) -> None:
        self._http.close()


def _json(resp: httpx.Response) -> dict:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _records(body) -> list[dict]:
    if isinstance(body, dict):
        body = body.get("models", body.get("data", []))
    return [record for record in body if isinstance(record, dict) and "name" in record and "source" in record]


def _derived_or_none(source: Path) -> int | None:
    """A deployed model the controller recorded no context length for (a registry from before it recorded one,
    its source unreadable when the controller started): the model's own, or None (then only the worker checks)."""
    try:
        return source_max_model_len(source)
    except ContextLengthError:
        return None


def _retry_after(resp: httpx.Response, default: float) -> float:
    try:
        return float(resp.headers.get("Retry-After", default))
    except ValueError:
        return default


def make_router(config) -> Router:
    """The Router the config asks for ([gateway].router: auto | controller | static)."""
    gw = config.gateway
    kind = gw.router
    if kind == "auto":
        kind = "static" if gw.static_models else "controller"
    if kind == "static":
        return StaticRouter(gw.static_models, shared_secret=config.cluster.shared_secret,
                            timeout_s=gw.upstream_connect_timeout_seconds)
    url = gw.controller_url or f"http://{config.controller.host}:{config.controller.port}"
    return ControllerRouter(url, shared_secret=config.cluster.shared_secret, route_poll_s=gw.route_poll_seconds,
                            connect_timeout_s=gw.upstream_connect_timeout_seconds)
