"""Credentials by role (docs/security.md): who may register nodes, announce instances and move requests.

One module: small pure functions (token format, hashing, scopes, node keys, migration tickets), so the services'
checks (controller, node agent, worker, gateway) call the same code, and the Credential classes built on them. Nothing
here does I/O beyond reading a node's token file; the controller's registry stores what `mint_token` returns (only
the hash of the secret part).

Roles:
- cluster secret (`cluster.shared_secret`): the operator's services - controller <-> gateway, and node agents the
  operator runs by hand with the service's config. Never held by users or by groups.
- allocation token: minted by the controller for each Slurm job it submits, passed in the job's environment
  (HPCLLM_NODE_TOKEN); registers and heartbeats only that job's node(s); revoked when the job ends.
- pool token: issued by an admin (`hpcllm pool token issue --model M --group G`) for one model and one group;
  registers a model pool (slurm/model-pool.sbatch) that may only announce instances of M and serves only G's API
  keys (unless issued `--shared`).
- node key: what a token-registered agent, its workers and whoever calls them (controller, gateway) use instead of
  the cluster secret, derived from the secret, the credential and the node (`node_key`), handed out at registration.
- migration ticket: the controller names the destination of a live migration; a worker moves requests only to the
  destination of a valid ticket signed with its own key, and the destination accepts the moved requests (and the
  gateway's attach to them) with the ticket's grant, good for those requests only and for at most the number the
  ticket covers (the source instance's requests when it was issued).

The HTTP side stands on hpcllm.httpkit: the role checks are Credential classes (the end of this module) that the
services put on their blueprints with httpkit.auth.guard / requires, and a CredentialError is a ServiceError, so it
is answered in the one error shape (401 authentication_error, or 403 permission_error: known but out of scope).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

from flask import Request, g
from pydantic import Field

from hpcllm.config import HEADER_TOKEN
from hpcllm.httpkit.auth import SECRET_HEADER, SharedSecret, same
from hpcllm.httpkit.errors import ServiceError, Unauthorized
from hpcllm.httpkit.wire import MAX_CLOCK_SKEW_SECONDS, UnixTime, WireModel

# Request headers. The cluster secret (and a node key) travel in httpkit's SECRET_HEADER; tokens and grants have
# their own.
TOKEN_HEADER = "X-Hpcllm-Token"
GRANT_HEADER = "X-Hpcllm-Grant"
# Where a node agent finds its token (a job's environment; or a 0600 file named by the second).
TOKEN_ENV = "HPCLLM_NODE_TOKEN"
TOKEN_FILE_ENV = "HPCLLM_NODE_TOKEN_FILE"

TOKEN_PREFIX = "hpcllm"
KINDS = ("allocation", "pool")
# The credential id of agents that authenticate with the cluster secret (operator-run agents).
CLUSTER_CREDENTIAL = "cluster"
# How long a migration ticket (and the grant in it) is good for after the controller issued it.
TICKET_SECONDS = 600.0
# The most requests one ticket covers: what one worker holds at most (max_running + max_waiting requests), with room.
MAX_TICKET_REQUESTS = 100_000


class CredentialError(ServiceError):
    """A credential is malformed, unknown or revoked (status 401), or used outside its scope (403; 409: a node
    another live credential holds); the message says which."""

    http_status = 403
    error_type = "permission_error"
    code = "forbidden"

    def __init__(self, message: str, status: int = 403):
        super().__init__(message)
        self.http_status = status
        if status == 401:
            self.error_type, self.code = Unauthorized.error_type, Unauthorized.code

    @property
    def status(self) -> int:
        return self.http_status


# ---------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class MintedToken:
    token: str  # shown once to whoever gets it; never stored
    credential_id: str  # public: names the credential in lists, logs and revocations
    secret_hash: str  # what the registry stores


def mint_token(kind: str) -> MintedToken:
    """A new random token `hpcllm_<id>_<secret>` (id: `alloc-` or `pool-` and 12 hex digits): the id is public,
    the secret is stored hashed."""
    if kind not in KINDS:
        raise ValueError(f"unknown credential kind {kind!r}")
    credential_id = f"{kind[:5]}-{secrets.token_hex(6)}"
    secret = secrets.token_urlsafe(32)
    return MintedToken(f"{TOKEN_PREFIX}_{credential_id}_{secret}", credential_id, hash_secret(secret))


def hash_secret(secret: str) -> str:
    # Tokens are 256 random bits: a plain hash cannot be brute-forced, unlike a password (no slow KDF needed).
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str]:
    """(credential_id, secret) of a token; CredentialError (401) when it does not look like one of ours."""
    parts = token.strip().split("_", 2)  # the id has no "_"; the secret (urlsafe base64) may
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        raise CredentialError("malformed hpcllm token (expected hpcllm_<id>_<secret>)", status=401)
    return parts[1], parts[2]


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def _one_token(token: str, where: str) -> str:
    """`token` when it can be one (HEADER_TOKEN: what mint_token writes); else CredentialError naming `where` and
    never showing what it holds."""
    if not HEADER_TOKEN.fullmatch(token):
        raise CredentialError(f"{where} holds more than a token: spaces, line breaks or characters other than "
                              f"printable ASCII, which no hpcllm token has; it must hold only the one line "
                              f"`hpcllm pool token issue` gave", status=401)
    return token


def read_token_from_environment(environ) -> str | None:
    """A node agent's token: $HPCLLM_NODE_TOKEN, else the content of the file $HPCLLM_NODE_TOKEN_FILE names (which
    other users must not be able to read: refused with the fix)."""
    token = environ.get(TOKEN_ENV, "").strip()
    if token:
        return _one_token(token, f"${TOKEN_ENV}")
    path = environ.get(TOKEN_FILE_ENV, "").strip()
    if not path:
        return None
    try:
        with open(path, errors="replace") as handle:  # not UTF-8: refused below like any other non-ASCII character
            mode = os.fstat(handle.fileno()).st_mode & 0o777
            if mode & 0o077:
                raise CredentialError(f"the node token file {path} may be read by other users (mode {mode:o}): "
                                      f"run `chmod 600 {path}`", status=401)
            token = handle.read().strip()
            return _one_token(token, f"the node token file {path} ({TOKEN_FILE_ENV})") if token else None
    except OSError as exc:
        raise CredentialError(f"cannot read the node token file {path} ({TOKEN_FILE_ENV}): {exc.strerror}",
                              status=401) from None


# ------------------------------------------------------------------------------------------- principals


@dataclass(frozen=True)
class Principal:
    """Who made a request to the controller's internal API."""

    kind: str  # "cluster" (the secret), "allocation" or "pool"
    credential_id: str
    model: str | None = None  # pool: the one model it may serve
    group: str | None = None  # pool: the group whose API keys it serves
    shared: bool = False  # pool: an admin shared it with every key
    job_id: str | None = None  # allocation: the Slurm job it was minted for

    @property
    def is_cluster(self) -> bool:
        return self.kind == "cluster"

    @property
    def serves_group(self) -> str | None:
        """The group a node registered with this credential serves exclusively (None: every API key)."""
        return self.group if self.kind == "pool" and not self.shared else None


CLUSTER = Principal(kind="cluster", credential_id=CLUSTER_CREDENTIAL)


def require_cluster(principal: Principal, what: str) -> None:
    """Some calls are the operator's services' alone (the gateway's route API)."""
    if not principal.is_cluster:
        raise CredentialError(f"{what} needs the cluster secret; a {principal.kind} token cannot call it")


def check_registration(principal: Principal, node_id: str, slurm_job_id: str | None, pool_model: str | None,
                       job_nodes: list[str] | None) -> None:
    """May `principal` register `node_id`? job_nodes: the nodes Slurm gave an allocation token's job (None: unknown)."""
    if principal.kind == "allocation":
        if slurm_job_id != principal.job_id:
            raise CredentialError(f"this allocation token belongs to Slurm job {principal.job_id}, not to job "
                                  f"{slurm_job_id or '(none)'}")
        if job_nodes is None or node_id not in job_nodes:
            raise CredentialError(f"this allocation token is valid on the nodes of job {principal.job_id} "
                                  f"({', '.join(job_nodes or []) or 'none known'}), not on {node_id}")
        if pool_model is not None:
            raise CredentialError("an allocation token cannot register a model pool; an admin issues pool tokens")
    elif principal.kind == "pool":
        if pool_model != principal.model:
            raise CredentialError(f"this pool token registers pools of model {principal.model!r} only, not "
                                  f"{pool_model or 'an ordinary node'!r}")


def check_node_owner(principal: Principal, node_id: str, node_credential: str | None) -> None:
    """A token speaks only for the node it registered (heartbeats, migration targets)."""
    if principal.is_cluster:
        return
    if node_credential != principal.credential_id:
        raise CredentialError(f"node {node_id} was not registered with this token")


def check_models(principal: Principal, models: list[str]) -> None:
    """A pool token announces (and asks migration targets for) instances of its model only."""
    if principal.kind != "pool":
        return
    others = sorted({m for m in models if m != principal.model})
    if others:
        raise CredentialError(f"this pool token serves model {principal.model!r} only, not {', '.join(others)}")


def visible_to(serves_group: str | None, group: str | None) -> bool:
    """May a request of an API key in `group` go to a node that serves `serves_group` (None: everyone)?"""
    return serves_group is None or serves_group == group


# -------------------------------------------------------------------------------------------- node keys


def node_key(cluster_secret: str, credential_id: str, node_id: str) -> str:
    """The key a token-registered node's agent and workers accept (and use between themselves): only the
    controller and the gateway (holding the secret) can derive it, and it is good for that node and credential."""
    mac = hmac.new(cluster_secret.encode(), f"hpcllm-node-key\0{credential_id}\0{node_id}".encode(), hashlib.sha256)
    return mac.hexdigest()


def could_be_node_key(value: str) -> bool:
    """value has node_key's form (a SHA-256 HMAC in lower-case hex): what a call before the key is known may carry."""
    return len(value) == 2 * hashlib.sha256().digest_size and all(c in "0123456789abcdef" for c in value)


def on_cluster_secret(credential_id: str | None) -> bool:
    """Did a node with this stored credential_id register with the cluster secret (an operator-run node; None: a
    row from before credentials), not with a node token?"""
    return credential_id in (None, CLUSTER_CREDENTIAL)


def worker_key(cluster_secret: str, credential_id: str | None, node_id: str) -> str:
    """The key a node's agent and workers hold: the cluster secret on an operator-run node, else its node key."""
    if on_cluster_secret(credential_id):
        return cluster_secret
    return node_key(cluster_secret, credential_id, node_id)


# ------------------------------------------------------------------------------------- migration tickets


class MigrationTicket(WireModel):
    """The controller's leave for one live migration: a worker serving `model` may move the requests of instance
    `source_instance` (at most `max_requests` of them) to `destination_url` (instance `destination_instance`) until
    `expires_at`. `signature` is made with the source worker's key; `grant` lets the destination accept the moved
    requests (and the gateway attach to them)."""

    model: str
    source_instance: str
    destination_url: str
    destination_instance: str
    expires_at: UnixTime
    max_requests: int = Field(ge=1, le=MAX_TICKET_REQUESTS)
    nonce: str = Field(min_length=8)
    signature: str = ""
    grant: str = ""

    def signed_text(self) -> str:
        return "\0".join(["hpcllm-migration", self.model, self.source_instance, self.destination_url.rstrip("/"),
                          self.destination_instance, f"{self.expires_at:.3f}", str(self.max_requests), self.nonce])


@dataclass(frozen=True)
class Grant:
    """A checked migration grant: its nonce names it on the destination, which prepares at most max_requests
    requests with it until expires."""

    nonce: str
    expires: float
    max_requests: int


def _mac(key: str, text: str) -> str:
    return hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest()


def issue_ticket(*, model: str, source_instance: str, source_key: str, destination_url: str,
                 destination_instance: str, destination_key: str, max_requests: int = MAX_TICKET_REQUESTS,
                 now: float | None = None, seconds: float = TICKET_SECONDS) -> MigrationTicket:
    """A signed ticket (the controller's, or a test's holding both workers' keys) for moving at most max_requests
    requests."""
    expires = round((time.time() if now is None else now) + seconds, 3)
    ticket = MigrationTicket(model=model, source_instance=source_instance, destination_url=destination_url,
                             destination_instance=destination_instance, expires_at=expires,
                             max_requests=max_requests, nonce=secrets.token_hex(8))
    text = _grant_text(ticket.nonce, expires, max_requests)
    grant = f"{ticket.nonce}:{expires:.3f}:{max_requests}:{_mac(destination_key, text)}"
    return ticket.model_copy(update={"signature": _mac(source_key, ticket.signed_text()), "grant": grant})


def check_ticket(ticket: MigrationTicket | None, *, key: str, model: str, destination_url: str,
                 source_instance: str | None = None, now: float | None = None) -> None:
    """Source worker: refuse a migration the controller did not name (CredentialError, 403). source_instance: the
    instance whose requests move, where the caller knows it (the node agent does; a worker does not know its id)."""
    if ticket is None:
        raise CredentialError("a migration needs a ticket from the controller naming its destination")
    if not hmac.compare_digest(ticket.signature.encode(), _mac(key, ticket.signed_text()).encode()):
        raise CredentialError("the migration ticket was not issued for this worker (bad signature)")
    if ticket.model != model:
        raise CredentialError(f"the migration ticket is for model {ticket.model!r}, this worker serves {model!r}")
    if source_instance is not None and ticket.source_instance != source_instance:
        named = ticket.source_instance or "(none named)"
        raise CredentialError(f"the migration ticket moves the requests of instance {named}, not of {source_instance}")
    if ticket.destination_url.rstrip("/") != destination_url.rstrip("/"):
        raise CredentialError(f"the migration ticket names {ticket.destination_url}, not {destination_url}")
    _check_lifetime(ticket.expires_at, "ticket", 403, now)


def _check_lifetime(expires: float, what: str, status: int, now: float | None) -> None:
    """Expired, or good for longer than any ticket the controller issues (TICKET_SECONDS, plus clock skew)."""
    now = time.time() if now is None else now
    if now > expires:
        raise CredentialError(f"the migration {what} has expired", status=status)
    if expires - now > TICKET_SECONDS + MAX_CLOCK_SKEW_SECONDS:
        raise CredentialError(f"the migration {what} claims to be good for {expires - now:.0f} s; the controller "
                              f"issues them for {TICKET_SECONDS:.0f} s", status=status)


_GRANT = re.compile(r"(?P<nonce>[^:]+):(?P<expires>\d{1,15}\.\d{3}):(?P<max>\d{1,9}):(?P<mac>[^:]*)", re.ASCII)


def _grant_text(nonce: str, expires: float, max_requests: int) -> str:
    return f"hpcllm-migration-grant\0{nonce}\0{expires:.3f}\0{max_requests}"


def check_grant(grant: str, *, key: str, now: float | None = None) -> Grant:
    """Destination worker: the grant (`nonce:expires:max_requests:mac`) when it was issued for this worker and is
    still good."""
    parts = _GRANT.fullmatch(grant)
    if parts is None:  # as issue_ticket writes it: no inf, nan, 1e400 or -1
        raise CredentialError("malformed migration grant (expected nonce:expires:max_requests:mac)", status=401)
    nonce, expires, max_requests, mac = parts["nonce"], float(parts["expires"]), int(parts["max"]), parts["mac"]
    # Bytes: a header's non-ASCII characters are a wrong grant (compare_digest refuses non-ASCII str with TypeError).
    if not hmac.compare_digest(mac.encode(), _mac(key, _grant_text(nonce, expires, max_requests)).encode()):
        raise CredentialError("the migration grant was not issued for this worker", status=401)
    _check_lifetime(expires, "grant", 401, now)
    return Grant(nonce, expires, max_requests)


# -------------------------------------------------------------------------- the role checks (httpkit Credentials)


class TokenOrSecret:
    """The controller's internal API: a node token in X-Hpcllm-Token (an allocation's or a pool's; `authenticate`
    turns it into its Principal or raises CredentialError 401), else the cluster secret (Principal CLUSTER). The
    caller is left in flask.g.principal: the views check a token's scope (its job's nodes, its model, its node)."""

    def __init__(self, cluster_secret: str, authenticate: Callable[[str], Principal]):
        self.cluster_secret, self.authenticate = cluster_secret, authenticate

    def check(self, req: Request) -> None:
        token = req.headers.get(TOKEN_HEADER)
        if token:
            g.principal = self.authenticate(token)
        elif same(req.headers.get(SECRET_HEADER, ""), self.cluster_secret):
            g.principal = CLUSTER
        else:
            raise Unauthorized(f"missing or wrong {SECRET_HEADER} (or {TOKEN_HEADER}) header")


class ClusterOnly:
    """After TokenOrSecret: a call only the operator's services make (the gateway's route API); a token: 403."""

    def __init__(self, what: str):
        self.what = what

    def check(self, req: Request) -> None:
        require_cluster(g.principal, self.what)


class AgentKey:
    """A node agent's API: the key its workers hold, in X-Hpcllm-Secret - the cluster secret, or for an agent that
    registered with a node token the node key the controller sent (asked at each request: it arrives after the
    agent serves; until then, None, every call is refused). current_key(wait): the key, with wait True waiting a
    while for it to arrive - only for a call that carries what could be a node key: the others (no credential, a
    probe) are refused at once, never holding one of the agent's threads while it registers. Only `max_waiting` such
    calls wait at once: anyone can make up a value of a node key's form, and a few would otherwise take every
    thread; the others are answered at once (the key if it is known, else refused)."""

    def __init__(self, current_key: Callable[[bool], str | None], max_waiting: int):
        self.current_key = current_key
        self._waiting = threading.BoundedSemaphore(max_waiting)

    def check(self, req: Request) -> None:
        if could_be_node_key(req.headers.get(SECRET_HEADER, "")) and self._waiting.acquire(blocking=False):
            try:
                key = self.current_key(True)
            finally:
                self._waiting.release()
        else:
            key = self.current_key(False)
        if key is None:
            raise Unauthorized(f"missing or wrong {SECRET_HEADER} header (this agent has no key yet: it is "
                               f"registering with its node token)")
        SharedSecret(key).check(req)


class KeyOrGrant:
    """A worker's migration-destination API (/v1/internal/migrations/*): its key, or a migration ticket's grant
    (X-Hpcllm-Grant) made with that key. flask.g.grant: the checked Grant (None with the key); GrantCovers then
    limits a grant to the requests prepared with it."""

    def __init__(self, key: str):
        self.key = key

    def check(self, req: Request) -> None:
        g.grant = None
        if same(req.headers.get(SECRET_HEADER, ""), self.key):
            return
        grant = req.headers.get(GRANT_HEADER)
        if not grant:
            raise Unauthorized(f"missing or wrong {SECRET_HEADER} header")
        g.grant = check_grant(grant, key=self.key)


class GrantCovers:
    """After KeyOrGrant, on a view of one moved request (view_args request_id): under a grant, only the requests
    `granted(nonce, request_id)` says were prepared with it (403 otherwise); the key opens every request."""

    def __init__(self, granted: Callable[[str, str], bool]):
        self.granted = granted

    def check(self, req: Request) -> None:
        request_id = (req.view_args or {}).get("request_id", "")
        if g.grant is not None and not self.granted(g.grant.nonce, request_id):
            raise CredentialError(f"the migration grant does not cover request {request_id}")
