"""The controller's registry: models, nodes, cache residency, instances, allocations, cold starts - in SQLite (or
PostgreSQL, databases.py).

SQLite in WAL mode with synchronous=NORMAL: a committed transaction survives the controller being killed (kill -9)
at any point; only an OS crash can lose the last few commits. Every change that touches several rows (a node
registering with its cache list, a heartbeat replacing instances and cache entries, an undeploy stopping instances)
runs in ONE `BEGIN IMMEDIATE` transaction, so a crash never leaves anything half-registered.

Time is always passed in (`now`, seconds since the epoch) so the autoscaler and tests can drive a fake clock; the
values are wall-clock because they must mean the same after a restart.
"""

from __future__ import annotations

import functools
import json
import re
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hpcllm.controller.errors import AgentReplaced, DatabaseError, InstanceTaken, NodeTaken, UnknownNode
from hpcllm.controller.protocol import (
    CacheEntry,
    DeployedModel,
    Heartbeat,
    InstanceInfo,
    NodeRegistration,
    Tiers,
)
from hpcllm.controller.registry.databases import open_database, sqlite_path_from_url, table_columns

log = logging.getLogger(__name__)

SCHEMA_VERSION = 8
RESERVED_PREFIX = "reserved:"

# Node states: "up" (heartbeating, routable), "draining" (retiring: no new instances), "lost" (missed heartbeats),
# "gone" (its Slurm job ended; only persistent cache entries and measured bandwidths are kept, for placement).
NODE_LIVE_STATES = ("up", "draining")
# Allocation states: pending, running, draining (we are retiring it), cancelling (scancel sent, Slurm has not
# confirmed the end yet), ended.
ALLOCATION_ACTIVE_STATES = ("pending", "running", "draining", "cancelling")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    deployed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    agent_url TEXT NOT NULL,
    slurm_job_id TEXT,
    job_scoped INTEGER NOT NULL,
    gpus INTEGER NOT NULL,
    tiers TEXT NOT NULL,
    h2d_gbps REAL,
    state TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_heartbeat REAL,
    pool_model TEXT,
    credential_id TEXT,
    serves_group TEXT,
    job_end REAL,
    agent_process TEXT
);
CREATE TABLE IF NOT EXISTS cache (
    node_id TEXT NOT NULL,
    model TEXT NOT NULL,
    tier TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    verified INTEGER NOT NULL,
    last_used REAL NOT NULL,
    persistent INTEGER NOT NULL,
    PRIMARY KEY (node_id, model, tier)
);
CREATE INDEX IF NOT EXISTS cache_by_model ON cache (model);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    node_id TEXT NOT NULL,
    state TEXT NOT NULL,
    worker_url TEXT,
    gpu_ids TEXT NOT NULL,
    running_requests INTEGER NOT NULL DEFAULT 0,
    routed_since_heartbeat INTEGER NOT NULL DEFAULT 0,
    tokens_in_flight INTEGER,
    prefill_tps REAL,
    requested_at REAL NOT NULL,
    last_used REAL NOT NULL,
    load_tier TEXT,
    load_seconds REAL,
    placement TEXT,
    ranks TEXT
);
CREATE INDEX IF NOT EXISTS instances_by_model ON instances (model);
CREATE INDEX IF NOT EXISTS instances_by_node ON instances (node_id);
CREATE TABLE IF NOT EXISTS allocations (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    model TEXT,
    preferred_nodes TEXT NOT NULL,
    nodes TEXT NOT NULL,
    partition TEXT,
    time_limit_seconds REAL,
    submitted_at REAL NOT NULL,
    started_at REAL,
    walltime_end REAL,
    retire_at REAL,
    idle_since REAL,
    ended_at REAL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS allocation_intents (
    tag TEXT PRIMARY KEY,
    model TEXT,
    preferred_nodes TEXT NOT NULL,
    partition TEXT,
    time_limit_seconds REAL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cold_starts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    node_id TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    tier TEXT,
    load_seconds REAL,
    requested_at REAL NOT NULL,
    ready_at REAL,
    estimate_seconds REAL,
    placement_kind TEXT,
    queue_wait_seconds REAL,
    migration_seconds REAL,
    tensor_parallel INTEGER
);
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    model TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    trigger_kind TEXT NOT NULL,
    outcome TEXT NOT NULL,
    target_instance TEXT,
    moved INTEGER NOT NULL,
    not_moved INTEGER NOT NULL,
    seconds REAL NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS credentials (
    credential_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    model TEXT,
    group_name TEXT,
    shared INTEGER NOT NULL DEFAULT 0,
    job_tag TEXT,
    job_id TEXT,
    created_at REAL NOT NULL,
    revoked_at REAL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS credentials_by_job ON credentials (job_id);
CREATE TABLE IF NOT EXISTS demand (
    model TEXT PRIMARY KEY,
    since REAL NOT NULL,
    last REAL NOT NULL,
    groups TEXT
);
"""

# How a database written by an older hpcllm is brought up to SCHEMA_VERSION, in place and keeping its data:
# version -> the (table, column, DDL) that version added. _SCHEMA above is the newest form (for new databases); the
# upgrade runs in one transaction with the version bump, so a crash leaves either the old or the new schema.
_MIGRATIONS: dict[int, list[tuple[str, str, str]]] = {
    2: [("nodes", "pool_model", "ALTER TABLE nodes ADD COLUMN pool_model TEXT")],  # model pools (hpcllm node --model)
    # tensor parallelism: {"tensor_parallel": N, "nodes": [node of each rank]}; NULL: one rank
    3: [("instances", "ranks", "ALTER TABLE instances ADD COLUMN ranks TEXT")],
    # Credentials by role (docs/security.md): the credential a node registered with, and the group it serves
    # exclusively. The credentials table itself is new, so _SCHEMA's CREATE TABLE IF NOT EXISTS adds it.
    4: [("nodes", "credential_id", "ALTER TABLE nodes ADD COLUMN credential_id TEXT"),
        ("nodes", "serves_group", "ALTER TABLE nodes ADD COLUMN serves_group TEXT")],
    # The learned start cost (docs/placement.md "Start cost"): what placement estimated of each cold start, and its
    # ranks. Older rows keep NULL: they never count as a start on a running node.
    5: [("cold_starts", "placement_kind", "ALTER TABLE cold_starts ADD COLUMN placement_kind TEXT"),
        ("cold_starts", "queue_wait_seconds", "ALTER TABLE cold_starts ADD COLUMN queue_wait_seconds REAL"),
        ("cold_starts", "migration_seconds", "ALTER TABLE cold_starts ADD COLUMN migration_seconds REAL"),
        ("cold_starts", "tensor_parallel", "ALTER TABLE cold_starts ADD COLUMN tensor_parallel INTEGER")],
    # A model pool's job end as its agent reports it (the pool is handed over before it; docs/controller.md).
    6: [("nodes", "job_end", "ALTER TABLE nodes ADD COLUMN job_end REAL")],
    # The agent process that registered the node (NodeRegistration.agent_process): another's heartbeat is refused.
    7: [("nodes", "agent_process", "ALTER TABLE nodes ADD COLUMN agent_process TEXT")],
    # Whose requests found no capacity (a JSON list of groups, null: a key without a group): a group's own pool
    # answers its group's demand only. NULL (rows of older controllers): everyone's, as they were counted.
    8: [("demand", "groups", "ALTER TABLE demand ADD COLUMN groups TEXT")],
}


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    agent_url: str
    slurm_job_id: str | None
    job_scoped: bool
    gpus: int
    tiers: Tiers
    h2d_gbps: float | None
    state: str
    registered_at: float
    last_heartbeat: float | None
    pool_model: str | None = None  # a model pool's node: its agent owns its instances (never placed on)
    credential_id: str | None = None  # what its agent registered with ("cluster": the secret; else a token's id)
    serves_group: str | None = None  # a group's own pool: only that group's API keys are routed here
    job_end: float | None = None  # when its Slurm job ends, as its agent (a model pool's) last reported it
    agent_process: str | None = None  # the agent process that registered it; None: an agent without process ids

    @property
    def is_pool(self) -> bool:
        return self.pool_model is not None

    @property
    def persistent_nvme(self) -> bool:
        return self.tiers.nvme is not None and self.tiers.nvme.scope == "persistent"


@dataclass(frozen=True)
class CacheRecord:
    node_id: str
    model: str
    tier: str
    bytes: int
    verified: bool
    last_used: float
    persistent: bool
    tensor_parallel: int | None = None  # a slice copy: rank `rank` of a tensor_parallel = N instance's slices
    rank: int | None = None


# The cache table's tier column of a slice copy: "nvme:tp<N>.r<R>" (so a node's whole NVMe copy and its slice copies
# of one model are distinct rows under the (node, model, tier) key).
_SLICE_TIER = re.compile(r"^(?P<tier>[a-z]+):tp(?P<degree>\d+)\.r(?P<rank>\d+)$")


def _tier_column(entry: CacheEntry) -> str:
    return entry.tier if entry.tensor_parallel is None else f"{entry.tier}:tp{entry.tensor_parallel}.r{entry.rank}"


def _cache_record(row) -> CacheRecord:
    tier, degree, rank = row["tier"], None, None
    found = _SLICE_TIER.match(tier)
    if found:
        tier, degree, rank = found.group("tier"), int(found.group("degree")), int(found.group("rank"))
    return CacheRecord(row["node_id"], row["model"], tier, row["bytes"], bool(row["verified"]), row["last_used"],
                       bool(row["persistent"]), degree, rank)


@dataclass(frozen=True)
class InstanceRecord:
    instance_id: str
    model: str
    node_id: str
    state: str
    worker_url: str | None
    gpu_ids: list[int]
    running_requests: int
    routed_since_heartbeat: int
    tokens_in_flight: int | None
    prefill_tps: float | None
    requested_at: float
    last_used: float
    load_tier: str | None
    load_seconds: float | None
    placement: dict | None
    tensor_parallel: int = 1
    rank_nodes: list[str] = field(default_factory=list)
    rank_tiers: list[str] = field(default_factory=list)

    @property
    def reserved(self) -> bool:
        """Placed by us, but the node agent has not confirmed it yet."""
        return self.instance_id.startswith(RESERVED_PREFIX)

    @property
    def load(self) -> int:
        return self.running_requests + self.routed_since_heartbeat


@dataclass(frozen=True)
class AllocationRecord:
    job_id: str
    state: str
    model: str | None
    preferred_nodes: list[str]
    nodes: list[str]
    partition: str | None
    time_limit_seconds: float | None
    submitted_at: float
    started_at: float | None
    walltime_end: float | None
    retire_at: float | None
    idle_since: float | None
    ended_at: float | None
    reason: str | None


@dataclass(frozen=True)
class CredentialRecord:
    """A token the controller minted (allocation) or an admin issued (pool); only its secret's hash is kept."""

    credential_id: str
    kind: str
    secret_hash: str
    model: str | None
    group: str | None
    shared: bool
    job_tag: str | None  # allocation: the intent tag of its job (known before sbatch answers)
    job_id: str | None  # allocation: its Slurm job, once known
    created_at: float
    revoked_at: float | None
    note: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class DemandRecord:
    """A model's route requests that found no capacity: the first and the latest, and whose (API key groups; None:
    a key without a group)."""

    since: float
    last: float
    groups: frozenset[str | None]


@dataclass(frozen=True)
class AllocationIntent:
    """An allocation about to be submitted, written BEFORE sbatch runs: the job carries `tag` as its comment, so
    after a crash between submit and record the job can be found in Slurm and adopted (or the intent dropped)."""

    tag: str
    model: str | None
    preferred_nodes: list[str]
    partition: str | None
    time_limit_seconds: float | None
    created_at: float


@dataclass(frozen=True)
class ColdStartRecord:
    model: str
    node_id: str
    instance_id: str
    tier: str | None
    load_seconds: float | None
    requested_at: float
    ready_at: float | None
    estimate_seconds: float | None
    placement_kind: str | None = None  # the placement's candidate kind ("running": its agent was up, no queue)
    queue_wait_seconds: float | None = None  # what the placement estimated
    migration_seconds: float | None = None
    tensor_parallel: int = 1

    @property
    def start_overhead_seconds(self) -> float | None:
        """What the start cost beyond the worker's own load: process start, srun/MPI, registration lag. Only for a
        start on a running node that moved nothing (otherwise a queue wait or migration is in it), else None."""
        if self.placement_kind != "running" or self.migration_seconds or self.ready_at is None \
                or self.load_seconds is None:
            return None
        return (self.ready_at - self.requested_at) - self.load_seconds


@dataclass(frozen=True)
class MigrationRecord:
    """One instance's running requests moved off its node, as the controller saw it. Made by the controller
    (placement making room, retirement) with outcome "migrated" (every running request moved live), "partial" (some
    moved, the rest resume from tokens), "failed" (the migration failed; the instance was stopped and its requests
    resume from tokens), "no_target" (nowhere to move them: stopped, requests resume from tokens) or "idle" (nothing
    ran: stopped); or asked for by a draining node's agent (trigger "node_drain"): outcome "target_assigned" (the
    ready instance named). `at` is when it was recorded."""

    model: str
    instance_id: str
    node_id: str
    trigger: str
    outcome: str
    target_instance: str | None = None
    moved: int = 0
    not_moved: int = 0
    seconds: float = 0.0
    error: str | None = None
    at: float = 0.0


@dataclass
class HeartbeatOutcome:
    """What a heartbeat changed: instances that became ready (cold starts finished), failed or disappeared."""

    became_ready: list[ColdStartRecord] = field(default_factory=list)
    failed: list[InstanceInfo] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)


def _no_instance(instance_id: str) -> bool:
    """Registry.heartbeat's default: no start confirmed a moment ago, no stop."""
    return False


class Registry:
    """All controller state. Thread-safe: one connection guarded by a lock (SQLite serializes writers anyway)."""

    def __init__(self, database_url: str):
        self._db = open_database(database_url)
        self.path = self._db.label  # the SQLite file, or the PostgreSQL URL without its password
        self.kind = self._db.kind
        self._conn = self._db.conn
        self._lock = threading.RLock()
        try:
            self._migrate()
        except DatabaseError:
            self._db.close()
            raise
        except Exception as exc:  # sqlite3.DatabaseError, psycopg.Error: not a database we can use
            self._db.close()
            raise DatabaseError(f"cannot open the controller database {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------------ plumbing

    def _migrate(self) -> None:
        with self._lock:
            # Idempotent DDL (IF NOT EXISTS), outside _tx (SQLite's executescript commits on its own).
            self._db.create_schema(_SCHEMA)
        with self._tx() as db:
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row["version"] > SCHEMA_VERSION:
                raise DatabaseError(
                    f"the controller database {self.path} has schema version {row['version']}, written by a newer "
                    f"hpcllm (this one understands up to {SCHEMA_VERSION}); upgrade hpcllm or use another database"
                )
            elif row["version"] < SCHEMA_VERSION:
                self._upgrade(db, row["version"])

    def _upgrade(self, db, version: int) -> None:
        """Bring a database of an older schema version up to SCHEMA_VERSION (inside _migrate's transaction)."""
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for table, column, ddl in _MIGRATIONS.get(target, []):
                if column not in table_columns(db, table):
                    db.execute(self._db.dialect(ddl))
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        log.info("controller database %s upgraded from schema version %d to %d", self.path, version, SCHEMA_VERSION)

    def schema_version(self) -> int:
        with self._read() as db:
            return db.execute("SELECT version FROM schema_version").fetchone()["version"]

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """One write transaction: everything inside commits together or not at all."""
        with self._lock:
            self._conn.execute(self._db.begin_write)
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[Any]:
        """A consistent read snapshot over several SELECTs."""
        with self._lock:
            self._conn.execute(self._db.begin_read)
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    # -------------------------------------------------------------------------------------------------- models

    def put_model(self, model: DeployedModel) -> bool:
        """Insert or replace a deployed model; True when it is new."""
        with self._tx() as db:
            existed = db.execute("SELECT 1 FROM models WHERE name = ?", (model.name,)).fetchone() is not None
            db.execute(
                "INSERT INTO models (name, spec, size_bytes, deployed_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, size_bytes = excluded.size_bytes,"
                " deployed_at = excluded.deployed_at",
                (model.name, model.model_dump_json(), model.size_bytes, model.deployed_at),
            )
        return not existed

    def delete_model(self, name: str) -> list[InstanceRecord] | None:
        """Remove a model, its instances and its pending demand in one transaction. None when it is unknown.

        Returns the instances that were removed so the caller can ask their node agents to stop them.
        """
        with self._tx() as db:
            if db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone() is None:
                return None
            removed = [_instance(r) for r in db.execute("SELECT * FROM instances WHERE model = ?", (name,))]
            db.execute("DELETE FROM instances WHERE model = ?", (name,))
            db.execute("DELETE FROM demand WHERE model = ?", (name,))
            db.execute("DELETE FROM models WHERE name = ?", (name,))
        return removed

    def get_model(self, name: str) -> DeployedModel | None:
        with self._read() as db:
            row = db.execute("SELECT spec FROM models WHERE name = ?", (name,)).fetchone()
        return _deployed(row["spec"]) if row else None

    def models(self) -> list[DeployedModel]:
        with self._read() as db:
            rows = db.execute("SELECT spec FROM models ORDER BY name").fetchall()
        return [_deployed(r["spec"]) for r in rows]

    # --------------------------------------------------------------------------------------------------- nodes

    def register_node(self, reg: NodeRegistration, now: float, live_after: float | None = None,
                      credential_id: str | None = None, serves_group: str | None = None,
                      job_nodes: list[str] | None = None) -> NodeRecord:
        """Record a node agent (new, restarted, or back in a new Slurm job) with its cache, atomically.

        A registration means the agent (re)started: instances we had for that node belong to its previous life
        and are dropped; the agent reports its live instances in its next heartbeat. With live_after, an agent of
        another Slurm job is refused (NodeTaken) while the node's agent heartbeated after that time. credential_id:
        what the agent authenticated with (its heartbeats must use the same); serves_group: the only group whose
        requests go there (a group's pool); job_nodes: every node of its Slurm job, as Slurm said just now (an
        allocation spanning nodes has an agent on its first node only), else the allocation learns its nodes from
        its agents and the next Slurm poll.
        """
        persistent_nvme = reg.tiers.nvme is not None and reg.tiers.nvme.scope == "persistent"
        with self._tx() as db:
            if live_after is not None:
                _refuse_a_second_agent(db, reg, now, live_after)
            db.execute("DELETE FROM instances WHERE node_id = ?", (reg.node_id,))
            db.execute(
                "INSERT INTO nodes (node_id, agent_url, slurm_job_id, job_scoped, gpus, tiers, h2d_gbps,"
                " state, registered_at, last_heartbeat, pool_model, credential_id, serves_group, job_end,"
                " agent_process) VALUES (?, ?, ?, ?, ?, ?, ?, 'up', ?, ?, ?, ?, ?, NULL, ?)"
                " ON CONFLICT (node_id) DO UPDATE SET agent_url = excluded.agent_url,"
                " slurm_job_id = excluded.slurm_job_id, job_scoped = excluded.job_scoped, gpus = excluded.gpus,"
                " tiers = excluded.tiers, h2d_gbps = excluded.h2d_gbps, state = excluded.state,"
                " registered_at = excluded.registered_at, last_heartbeat = excluded.last_heartbeat,"
                " pool_model = excluded.pool_model, credential_id = excluded.credential_id,"
                " serves_group = excluded.serves_group, job_end = excluded.job_end,"
                " agent_process = excluded.agent_process",
                (reg.node_id, reg.agent_url, reg.slurm_job_id, int(reg.job_scoped), reg.gpus,
                 reg.tiers.model_dump_json(), reg.h2d_gbps, now, now, reg.pool_model, credential_id, serves_group,
                 reg.agent_process),
            )
            _replace_cache(db, reg.node_id, reg.cached, persistent_nvme)
            if reg.slurm_job_id:
                _attach_node_to_allocation(db, reg.slurm_job_id, reg.node_id, now, job_nodes or [])
            row = db.execute("SELECT * FROM nodes WHERE node_id = ?", (reg.node_id,)).fetchone()
        return _node(row)

    def heartbeat(self, node_id: str, hb: Heartbeat, now: float, just_started: Callable[[str], bool] = _no_instance,
                  stopped: Callable[[str], bool] = _no_instance,
                  overtaken: Callable[[], bool] = lambda: False) -> HeartbeatOutcome:
        """Replace a node's cache list and instance list (and its tiers' rates, when given) with what its agent
        reports, atomically. just_started: whether the report was built before the agent took an instance's start
        (kept while loading when unreported); stopped: whether it was built before the controller had its agent stop
        an instance (a report of it alive is dropped); overtaken: whether a later report of the agent was applied
        already (then only the node's liveness is noted). The controller's AgentChanges tell them.
        All are asked inside the transaction: a start, stop or heartbeat made while this heartbeat waited counts."""
        outcome = HeartbeatOutcome()
        with self._tx() as db:
            row = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
            if row is None or row["state"] not in NODE_LIVE_STATES:
                raise UnknownNode(f"node {node_id!r} is not registered (or was declared lost): register again")
            node = _node(row)
            check_agent_process(node, hb)  # again in the transaction: a registration may have come meanwhile
            if overtaken():
                db.execute("UPDATE nodes SET last_heartbeat = ? WHERE node_id = ?", (now, node_id))
                return outcome
            db.execute("UPDATE nodes SET last_heartbeat = ?, job_end = ? WHERE node_id = ?", (now, hb.job_end, node_id))
            if hb.tiers is not None:  # measured again: placement counts with the new rates
                db.execute("UPDATE nodes SET tiers = ?, h2d_gbps = ? WHERE node_id = ?",
                           (hb.tiers.model_dump_json(), hb.h2d_gbps, node_id))
            _replace_cache(db, node_id, hb.cached, node.persistent_nvme)
            instances = [i for i in hb.instances if i.state in ("stopped", "failed") or not stopped(i.instance_id)]
            known = {r["instance_id"]: _instance(r)
                     for r in db.execute("SELECT * FROM instances WHERE node_id = ?", (node_id,))}
            _refuse_other_nodes_instances(db, node_id, [i.instance_id for i in instances
                                                        if i.instance_id not in known])
            reported = set()
            for info in instances:
                reported.add(info.instance_id)
                if info.state in ("stopped", "failed"):
                    db.execute("DELETE FROM instances WHERE instance_id = ?", (info.instance_id,))
                    if info.state == "failed":
                        outcome.failed.append(info)
                    continue
                previous = known.get(info.instance_id)
                became_ready = info.state == "ready" and (previous is None or previous.state == "loading")
                _upsert_reported_instance(db, node_id, info, previous, now, became_ready)
                if became_ready:
                    outcome.became_ready.append(_record_cold_start(db, node_id, info, previous, now))
            for instance_id, record in known.items():
                starting = record.state == "loading" and just_started(instance_id)
                if instance_id not in reported and not record.reserved and not starting:
                    db.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))
                    outcome.vanished.append(instance_id)
        return outcome

    def get_node(self, node_id: str) -> NodeRecord | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return _node(row) if row else None

    def nodes(self, states: tuple[str, ...] | None = None) -> list[NodeRecord]:
        with self._read() as db:
            if states:
                marks = ",".join("?" * len(states))
                rows = db.execute(f"SELECT * FROM nodes WHERE state IN ({marks}) ORDER BY node_id", states)
            else:
                rows = db.execute("SELECT * FROM nodes ORDER BY node_id")
            return [_node(r) for r in rows]

    def set_node_state(self, node_id: str, state: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE nodes SET state = ? WHERE node_id = ?", (state, node_id))

    def node_left(self, node_id: str, state: str) -> list[InstanceRecord]:
        """The node's agent is gone ("lost": silent, "gone": its job ended): drop its instances and the cache
        entries that died with it; keep persistent NVMe entries so placement can still prefer this node."""
        with self._tx() as db:
            removed = [_instance(r) for r in db.execute("SELECT * FROM instances WHERE node_id = ?", (node_id,))]
            db.execute("DELETE FROM instances WHERE node_id = ?", (node_id,))
            db.execute("DELETE FROM cache WHERE node_id = ? AND persistent = 0", (node_id,))
            db.execute("UPDATE nodes SET state = ? WHERE node_id = ?", (state, node_id))
        return removed

    def cache(self, node_id: str | None = None, model: str | None = None) -> list[CacheRecord]:
        clauses, args = [], []
        if node_id is not None:
            clauses.append("node_id = ?")
            args.append(node_id)
        if model is not None:
            clauses.append("model = ?")
            args.append(model)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._read() as db:
            rows = db.execute(f"SELECT * FROM cache {where} ORDER BY node_id, model, tier", args).fetchall()
        return [_cache_record(r) for r in rows]

    # ----------------------------------------------------------------------------------------------- instances

    def reserve_instance(self, model: str, node_id: str, gpu_ids: list[int], now: float,
                         placement: dict | None = None, tensor_parallel: int = 1) -> str:
        """Claim GPUs on a node for a cold start before asking its agent, so concurrent routes do not double-book."""
        reservation = f"{RESERVED_PREFIX}{uuid.uuid4().hex}"
        with self._tx() as db:
            db.execute(
                "INSERT INTO instances (instance_id, model, node_id, state, worker_url, gpu_ids, requested_at,"
                " last_used, placement, ranks) VALUES (?, ?, ?, 'loading', NULL, ?, ?, ?, ?, ?)",
                (reservation, model, node_id, json.dumps(gpu_ids), now, now,
                 json.dumps(placement) if placement is not None else None, _ranks_column(tensor_parallel, [])),
            )
            # The node's allocation is busy again: its idle (node-level keep-alive) clock restarts.
            db.execute("UPDATE allocations SET idle_since = NULL"
                       " WHERE job_id = (SELECT slurm_job_id FROM nodes WHERE node_id = ?)", (node_id,))
        return reservation

    def confirm_instance(self, reservation: str, instance_id: str, worker_url: str | None) -> bool:
        """The agent accepted the start: the reservation becomes its real instance id, in one statement. False, and
        nothing changed, when the reservation is gone: its model was undeployed (delete_model takes the reservations
        with it; maybe deployed again since) or its node lost meanwhile, and the instance serves nothing the
        registry still wants.

        If the agent's heartbeat already reported the instance (a race), the reservation is simply dropped.
        """
        with self._tx() as db:
            row = db.execute("SELECT requested_at, placement FROM instances WHERE instance_id = ?",
                             (reservation,)).fetchone()
            if row is None:
                return False
            if db.execute("SELECT 1 FROM instances WHERE instance_id = ?", (instance_id,)).fetchone():
                db.execute("UPDATE instances SET requested_at = ?, placement = ? WHERE instance_id = ?",
                           (row["requested_at"], row["placement"], instance_id))
                db.execute("DELETE FROM instances WHERE instance_id = ?", (reservation,))
            else:
                db.execute("UPDATE instances SET instance_id = ?, worker_url = ? WHERE instance_id = ?",
                           (instance_id, worker_url, reservation))
        return True

    def delete_instance(self, instance_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,)).rowcount > 0

    def set_instance_state(self, instance_id: str, state: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE instances SET state = ? WHERE instance_id = ?", (state, instance_id))

    def get_instance(self, instance_id: str) -> InstanceRecord | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM instances WHERE instance_id = ?", (instance_id,)).fetchone()
        return _instance(row) if row else None

    def instances(self, model: str | None = None, node_id: str | None = None) -> list[InstanceRecord]:
        clauses, args = [], []
        if model is not None:
            clauses.append("model = ?")
            args.append(model)
        if node_id is not None:
            clauses.append("node_id = ?")
            args.append(node_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._read() as db:
            rows = db.execute(f"SELECT * FROM instances {where} ORDER BY model, node_id, instance_id", args)
            return [_instance(r) for r in rows]

    def note_routed(self, instance_id: str, now: float) -> None:
        """A request was sent to this instance: count it until the next heartbeat reports real load."""
        with self._tx() as db:
            db.execute("UPDATE instances SET last_used = ?, routed_since_heartbeat = routed_since_heartbeat + 1"
                       " WHERE instance_id = ?", (now, instance_id))

    # --------------------------------------------------------------------------------------------- allocations

    def add_allocation(self, job_id: str, model: str | None, preferred_nodes: list[str], partition: str | None,
                       time_limit_seconds: float | None, now: float) -> None:
        with self._tx() as db:
            _insert_allocation(db, job_id, model, preferred_nodes, partition, time_limit_seconds, now)

    def add_allocation_intent(self, tag: str, model: str | None, preferred_nodes: list[str], partition: str | None,
                              time_limit_seconds: float | None, now: float) -> None:
        """Record an allocation about to be submitted (its job will carry `tag`); settle it once the outcome is
        known."""
        with self._tx() as db:
            db.execute("INSERT INTO allocation_intents (tag, model, preferred_nodes, partition, time_limit_seconds,"
                       " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                       (tag, model, json.dumps(preferred_nodes), partition, time_limit_seconds, now))

    def allocation_intents(self) -> list[AllocationIntent]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM allocation_intents ORDER BY created_at, tag").fetchall()
        return [AllocationIntent(r["tag"], r["model"], json.loads(r["preferred_nodes"]), r["partition"],
                                 r["time_limit_seconds"], r["created_at"]) for r in rows]

    def settle_allocation_intent(self, tag: str, job_id: str | None) -> bool:
        """The intent's outcome is known: with a job id, it becomes a pending allocation (submitted when the intent
        was made); without one, nothing was submitted. One transaction: a crash leaves either the intent or the
        allocation. Returns whether an allocation row was written (False: no such intent, or nothing submitted).

        Slurm numbers jobs afresh when its state is wiped (the dev cluster's `make down` / `make up`), so the id may
        be an old allocation's: Slurm just gave it to the job carrying this intent's tag, so whatever the old row
        described is gone and the new job replaces it. (Keeping the old row left the new job unrecorded, and every
        route poll submitted another allocation.)"""
        with self._tx() as db:
            row = db.execute("SELECT * FROM allocation_intents WHERE tag = ?", (tag,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM allocation_intents WHERE tag = ?", (tag,))
            if job_id is None:  # nothing was submitted: its token will never be used
                db.execute("DELETE FROM credentials WHERE kind = 'allocation' AND job_tag = ?", (tag,))
                return False
            db.execute("UPDATE credentials SET job_id = ? WHERE kind = 'allocation' AND job_tag = ?", (job_id, tag))
            db.execute("DELETE FROM allocations WHERE job_id = ?", (job_id,))
            _insert_allocation(db, job_id, row["model"], json.loads(row["preferred_nodes"]), row["partition"],
                               row["time_limit_seconds"], row["created_at"])
            return True

    def update_allocation(self, job_id: str, **fields) -> None:
        allowed = {"state", "nodes", "started_at", "walltime_end", "retire_at", "idle_since", "ended_at", "reason"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown allocation fields {sorted(unknown)}")
        if "nodes" in fields:
            fields["nodes"] = json.dumps(fields["nodes"])
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._tx() as db:
            db.execute(f"UPDATE allocations SET {assignments} WHERE job_id = ?", (*fields.values(), job_id))

    def get_allocation(self, job_id: str) -> AllocationRecord | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM allocations WHERE job_id = ?", (job_id,)).fetchone()
        return _allocation(row) if row else None

    def allocations(self, active_only: bool = False) -> list[AllocationRecord]:
        with self._read() as db:
            if active_only:
                marks = ",".join("?" * len(ALLOCATION_ACTIVE_STATES))
                rows = db.execute(f"SELECT * FROM allocations WHERE state IN ({marks}) ORDER BY submitted_at, job_id",
                                  ALLOCATION_ACTIVE_STATES)
            else:
                rows = db.execute("SELECT * FROM allocations ORDER BY submitted_at, job_id")
            return [_allocation(r) for r in rows]

    # --------------------------------------------------------------------------------------------- credentials

    def add_credential(self, credential_id: str, kind: str, secret_hash: str, now: float, *, model: str | None = None,
                       group: str | None = None, shared: bool = False, job_tag: str | None = None,
                       note: str | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO credentials (credential_id, kind, secret_hash, model, group_name, shared, job_tag,"
                       " created_at, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (credential_id, kind, secret_hash, model, group, int(shared), job_tag, now, note))

    def get_credential(self, credential_id: str) -> CredentialRecord | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM credentials WHERE credential_id = ?", (credential_id,)).fetchone()
        return _credential(row) if row else None

    def credentials(self, kind: str | None = None) -> list[CredentialRecord]:
        with self._read() as db:
            if kind:
                rows = db.execute("SELECT * FROM credentials WHERE kind = ? ORDER BY created_at, credential_id",
                                  (kind,))
            else:
                rows = db.execute("SELECT * FROM credentials ORDER BY created_at, credential_id")
            return [_credential(r) for r in rows]

    def revoke_credential(self, credential_id: str, now: float) -> bool:
        """Revoke one credential; False when there is no such (unrevoked) credential."""
        with self._tx() as db:
            return db.execute("UPDATE credentials SET revoked_at = ? WHERE credential_id = ? AND revoked_at IS NULL",
                              (now, credential_id)).rowcount > 0

    def revoke_job_credentials(self, job_id: str | None, now: float, job_tag: str | None = None) -> int:
        """Revoke the allocation tokens of a job that ended (or of a submission that never became one)."""
        with self._tx() as db:
            return db.execute("UPDATE credentials SET revoked_at = ? WHERE kind = 'allocation' AND revoked_at IS NULL"
                              " AND (job_id = ? OR job_tag = ?)", (now, job_id, job_tag)).rowcount

    # ------------------------------------------------------------------------------------------ demand & stats

    def note_demand(self, model: str, now: float, group: str | None = None) -> None:
        """A route request of an API key in `group` (None: without one) found no capacity for this model: the
        autoscaler should get some where that group's requests may go."""
        with self._tx() as db:
            row = db.execute("SELECT groups FROM demand WHERE model = ?", (model,)).fetchone()
            groups = _demand_groups(row["groups"]) if row is not None else frozenset()
            db.execute("INSERT INTO demand (model, since, last, groups) VALUES (?, ?, ?, ?)"
                       " ON CONFLICT(model) DO UPDATE SET last = excluded.last, groups = excluded.groups",
                       (model, now, now, _groups_json(groups | {group})))

    def clear_demand(self, model: str, groups: frozenset[str | None] | None = None) -> None:
        """Forget the model's demand of these groups (answered, or nobody asked for long); all of it for None."""
        with self._tx() as db:
            row = db.execute("SELECT groups FROM demand WHERE model = ?", (model,)).fetchone()
            left = _demand_groups(row["groups"]) - groups if row is not None and groups is not None else frozenset()
            if left:
                db.execute("UPDATE demand SET groups = ? WHERE model = ?", (_groups_json(left), model))
            else:
                db.execute("DELETE FROM demand WHERE model = ?", (model,))

    def demand(self) -> dict[str, DemandRecord]:
        with self._read() as db:
            return {r["model"]: DemandRecord(r["since"], r["last"], _demand_groups(r["groups"]))
                    for r in db.execute("SELECT * FROM demand")}

    def prune_history(self, before: float) -> int:
        """Forget allocations that ended and cold starts that finished before `before`; returns rows removed."""
        with self._tx() as db:
            removed = db.execute("DELETE FROM allocations WHERE state = 'ended' AND ended_at < ?", (before,)).rowcount
            removed += db.execute("DELETE FROM cold_starts WHERE ready_at < ?", (before,)).rowcount
            removed += db.execute("DELETE FROM migrations WHERE at < ?", (before,)).rowcount
        return removed

    def cold_starts(self, limit: int = 50) -> list[ColdStartRecord]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM cold_starts ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_cold_start(r) for r in rows]

    def running_node_cold_starts(self, limit: int = 500) -> list[ColdStartRecord]:
        """The latest cold starts on running nodes that moved nothing (newest first): the learned start cost's
        input (ColdStartRecord.start_overhead_seconds)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM cold_starts WHERE placement_kind = 'running' AND COALESCE(migration_seconds, 0) = 0"
                " AND ready_at IS NOT NULL AND load_seconds IS NOT NULL ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_cold_start(r) for r in rows]

    def record_migration(self, record: MigrationRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO migrations (at, model, instance_id, node_id, trigger_kind, outcome, target_instance,"
                " moved, not_moved, seconds, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.at, record.model, record.instance_id, record.node_id, record.trigger, record.outcome,
                 record.target_instance, record.moved, record.not_moved, record.seconds, record.error),
            )

    def migrations(self, limit: int = 50) -> list[MigrationRecord]:
        """The newest migrations first (the status page's and `hpcllm status`'s history)."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM migrations ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [MigrationRecord(r["model"], r["instance_id"], r["node_id"], r["trigger_kind"], r["outcome"],
                                r["target_instance"], r["moved"], r["not_moved"], r["seconds"], r["error"], r["at"])
                for r in rows]


# ------------------------------------------------------------------------------------------------ row helpers


def check_agent_process(node: NodeRecord, hb: Heartbeat) -> None:
    """A heartbeat counts only from the agent process that registered the node last (one without a process id, an
    older agent, only when that registration had none either): a late one of the process before a restart lists
    instances that died with it, and would show them for a heartbeat period (routes to a dead worker). A lost node's
    registration holds no more: any process gets 404 (register again), and the one still alive does."""
    if node.state in NODE_LIVE_STATES and node.agent_process is not None and hb.agent_process != node.agent_process:
        raise AgentReplaced(f"node {node.node_id} is served by another agent process now (it registered after this "
                            f"one); this heartbeat changes nothing")


def _refuse_a_second_agent(db, reg: NodeRegistration, now: float, live_after: float) -> None:
    row = db.execute("SELECT slurm_job_id, state, last_heartbeat FROM nodes WHERE node_id = ?",
                     (reg.node_id,)).fetchone()
    if (row is None or row["state"] not in NODE_LIVE_STATES or row["slurm_job_id"] in (None, reg.slurm_job_id)
            or row["last_heartbeat"] is None or row["last_heartbeat"] <= live_after):
        return
    raise NodeTaken(
        f"node {reg.node_id} is served by the hpcllm agent of Slurm job {row['slurm_job_id']} (heartbeat "
        f"{now - row['last_heartbeat']:.0f} s ago); the agent of job {reg.slurm_job_id or '(none)'} cannot register "
        f"there while it lives: one agent per node (Slurm put two agent jobs on one node)")


def _replace_cache(db, node_id: str, entries: list[CacheEntry], persistent_nvme: bool) -> None:
    db.execute("DELETE FROM cache WHERE node_id = ?", (node_id,))
    db.executemany(
        "INSERT INTO cache (node_id, model, tier, bytes, verified, last_used, persistent)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id, model, tier) DO UPDATE SET bytes = excluded.bytes,"
        " verified = excluded.verified, last_used = excluded.last_used, persistent = excluded.persistent",
        [(node_id, e.model, _tier_column(e), e.bytes, int(e.verified), e.last_used,
          int(e.tier == "nvme" and persistent_nvme)) for e in entries],
    )


def _insert_allocation(db, job_id: str, model: str | None, preferred_nodes: list[str],
                       partition: str | None, time_limit_seconds: float | None, submitted_at: float) -> None:
    db.execute(
        "INSERT INTO allocations (job_id, state, model, preferred_nodes, nodes, partition,"
        " time_limit_seconds, submitted_at) VALUES (?, 'pending', ?, ?, '[]', ?, ?, ?)",
        (job_id, model, json.dumps(preferred_nodes), partition, time_limit_seconds, submitted_at),
    )


def _attach_node_to_allocation(db, job_id: str, node_id: str, now: float, job_nodes: list[str]) -> None:
    row = db.execute("SELECT state, nodes, started_at FROM allocations WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        return  # an agent started by hand (a user's sbatch): it serves, but no allocation of ours owns it
    if row["state"] == "ended":
        # Slurm requeued a job we had written off (preemption on a site that requeues by default): it runs again,
        # so it is ours to manage (retire, release when idle) once more.
        db.execute("UPDATE allocations SET state = 'running', nodes = ?, started_at = ?, walltime_end = NULL,"
                   " retire_at = NULL, idle_since = NULL, ended_at = NULL, reason = 'requeued' WHERE job_id = ?",
                   (json.dumps(sorted({node_id, *job_nodes})), now, job_id))
        return
    # Slurm's list when given (a pending allocation has none recorded yet), else what the agents told so far.
    nodes = set(job_nodes) if job_nodes else set(json.loads(row["nodes"]))
    nodes.add(node_id)
    state = "running" if row["state"] == "pending" else row["state"]
    db.execute("UPDATE allocations SET nodes = ?, state = ?, started_at = COALESCE(started_at, ?), idle_since = NULL"
               " WHERE job_id = ?",
               (json.dumps(sorted(nodes)), state, now, job_id))
    if state in ("draining", "cancelling"):  # a restarted agent of an allocation on its way out gets nothing new
        db.execute("UPDATE nodes SET state = 'draining' WHERE node_id = ?", (node_id,))


def _refuse_other_nodes_instances(db, node_id: str, new_ids: list[str]) -> None:
    """InstanceTaken when an id a heartbeat reports as new on node_id is another node's instance: its row would be
    deleted (reported stopped) or inserted twice (a unique-id failure of the whole heartbeat)."""
    for start in range(0, len(new_ids), 500):  # a bounded number of parameters per statement
        chunk = new_ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        row = db.execute(f"SELECT instance_id, node_id FROM instances WHERE instance_id IN ({marks}) AND node_id <> ?"
                         f" LIMIT 1", (*chunk, node_id)).fetchone()
        if row is not None:
            raise InstanceTaken(f"instances: instance {row['instance_id']!r} is registered on node "
                                f"{row['node_id']!r}, not on {node_id!r}; an instance id names one instance on one "
                                f"node (is another agent reporting the same instances?)", param="instances")


def _upsert_reported_instance(db, node_id: str, info: InstanceInfo,
                              previous: InstanceRecord | None, now: float, became_ready: bool) -> None:
    if previous is None:
        db.execute(
            "INSERT INTO instances (instance_id, model, node_id, state, worker_url, gpu_ids, running_requests,"
            " tokens_in_flight, prefill_tps, requested_at, last_used, load_tier, load_seconds, ranks)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (info.instance_id, info.model, node_id, info.state, info.worker_url, json.dumps(info.gpu_ids),
             info.running_requests, info.tokens_in_flight, info.prefill_tokens_per_second,
             info.started_at or now, now, info.load_tier, info.load_seconds,
             _ranks_column(info.tensor_parallel, info.rank_nodes, info.rank_tiers)),
        )
        return
    # Draining is our decision (retirement, migration): an agent still saying "ready" does not undo it.
    state = "draining" if previous.state == "draining" and info.state == "ready" else info.state
    # Idle time counts from readiness: a load longer than the keep-alive must not make a new instance idle at once.
    last_used = now if info.running_requests > 0 or became_ready else previous.last_used
    db.execute(
        "UPDATE instances SET state = ?, worker_url = ?, gpu_ids = ?, running_requests = ?,"
        " routed_since_heartbeat = 0, tokens_in_flight = ?, prefill_tps = ?, last_used = ?,"
        " load_tier = COALESCE(?, load_tier), load_seconds = COALESCE(?, load_seconds),"
        " ranks = COALESCE(?, ranks) WHERE instance_id = ?",
        (state, info.worker_url or previous.worker_url, json.dumps(info.gpu_ids or previous.gpu_ids),
         info.running_requests, info.tokens_in_flight, info.prefill_tokens_per_second, last_used,
         info.load_tier, info.load_seconds, _ranks_column(info.tensor_parallel, info.rank_nodes, info.rank_tiers),
         info.instance_id),
    )


def _record_cold_start(db, node_id: str, info: InstanceInfo, previous: InstanceRecord | None,
                       now: float) -> ColdStartRecord:
    requested_at = previous.requested_at if previous else (info.started_at or now)
    placement = (previous.placement if previous else None) or {}
    record = ColdStartRecord(info.model, node_id, info.instance_id, info.load_tier, info.load_seconds,
                             requested_at, now, placement.get("total_seconds"), placement.get("kind"),
                             placement.get("queue_wait_seconds"), placement.get("migration_seconds"),
                             max(info.tensor_parallel, previous.tensor_parallel if previous else 1))
    db.execute(
        "INSERT INTO cold_starts (model, node_id, instance_id, tier, load_seconds, requested_at, ready_at,"
        " estimate_seconds, placement_kind, queue_wait_seconds, migration_seconds, tensor_parallel)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (record.model, record.node_id, record.instance_id, record.tier, record.load_seconds, record.requested_at,
         record.ready_at, record.estimate_seconds, record.placement_kind, record.queue_wait_seconds,
         record.migration_seconds, record.tensor_parallel),
    )
    return record


@functools.lru_cache(maxsize=4096)
def _deployed(spec: str) -> DeployedModel:
    """Decoded once per distinct spec (a redeploy writes a new one): the autoscaler and placement read every model
    on every tick and cold start, and pydantic's validation of each was a tenth of the simulation's time. Records
    are never modified in place (model_copy makes changed ones)."""
    return DeployedModel.model_validate_json(spec)


@functools.lru_cache(maxsize=1024)
def _tiers(text: str) -> Tiers:
    """Decoded once per distinct value: every read of the nodes decodes every row, and nodes of one kind register
    the same tiers (placement at 1,000 nodes spent most of its reads here). Records are never modified in place."""
    return Tiers.model_validate_json(text)


def _node(r) -> NodeRecord:
    return NodeRecord(r["node_id"], r["agent_url"], r["slurm_job_id"], bool(r["job_scoped"]), r["gpus"],
                      _tiers(r["tiers"]), r["h2d_gbps"], r["state"], r["registered_at"],
                      r["last_heartbeat"], r["pool_model"], r["credential_id"], r["serves_group"], r["job_end"],
                      r["agent_process"])


def _ranks_column(tensor_parallel: int, rank_nodes: list[str], rank_tiers: list[str] = ()) -> str | None:
    if tensor_parallel == 1:
        return None
    return json.dumps({"tensor_parallel": tensor_parallel, "nodes": rank_nodes, "tiers": list(rank_tiers)})


def _instance(r) -> InstanceRecord:
    ranks = json.loads(r["ranks"]) if r["ranks"] else {}
    return InstanceRecord(r["instance_id"], r["model"], r["node_id"], r["state"], r["worker_url"],
                          json.loads(r["gpu_ids"]), r["running_requests"], r["routed_since_heartbeat"],
                          r["tokens_in_flight"], r["prefill_tps"], r["requested_at"], r["last_used"], r["load_tier"],
                          r["load_seconds"], json.loads(r["placement"]) if r["placement"] else None,
                          ranks.get("tensor_parallel", 1), ranks.get("nodes", []), ranks.get("tiers", []))


def _demand_groups(text: str | None) -> frozenset[str | None]:
    """A demand row's groups; a row of a controller before they were kept (NULL) is everyone's."""
    return frozenset([None]) if text is None else frozenset(json.loads(text))


def _groups_json(groups: frozenset[str | None]) -> str:
    return json.dumps(sorted(groups, key=lambda g: (g is not None, g or "")))


def _names(text: str) -> list[str]:
    """A JSON list of node names; most are empty, and json.loads of every allocation row on every read showed in
    placement's profile."""
    return [] if text == "[]" else json.loads(text)


def _allocation(r) -> AllocationRecord:
    return AllocationRecord(r["job_id"], r["state"], r["model"], _names(r["preferred_nodes"]),
                            _names(r["nodes"]), r["partition"], r["time_limit_seconds"], r["submitted_at"],
                            r["started_at"], r["walltime_end"], r["retire_at"], r["idle_since"], r["ended_at"],
                            r["reason"])


def _cold_start(r) -> ColdStartRecord:
    return ColdStartRecord(r["model"], r["node_id"], r["instance_id"], r["tier"], r["load_seconds"],
                           r["requested_at"], r["ready_at"], r["estimate_seconds"], r["placement_kind"],
                           r["queue_wait_seconds"], r["migration_seconds"], r["tensor_parallel"] or 1)


def _credential(r) -> CredentialRecord:
    return CredentialRecord(r["credential_id"], r["kind"], r["secret_hash"], r["model"], r["group_name"],
                            bool(r["shared"]), r["job_tag"], r["job_id"], r["created_at"], r["revoked_at"], r["note"])
