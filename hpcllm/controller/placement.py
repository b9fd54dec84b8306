"""Locality-aware placement (pure functions, no I/O): which node starts a model instance the soonest.

For every candidate node (see docs/placement.md):

    startup = queue_wait                      0 when the node runs an agent with a free slot now; else the estimated
                                              wait for a pending allocation / a new Slurm job on an idle node
            + size_bytes / bandwidth(tier)    the fastest measured tier on that node holding the checkpoint
                                              (DRAM, node NVMe; the shared FS always holds it: it is the origin)
            + migration                       when slots must be freed: the cheapest set of other instances to move,
                                              each costing tokens_in_flight / prefill rate or a configured cost
            + start                           what a start costs beyond reading bytes (worker process start; for a
                                              tensor-parallel model srun, MPI start and every rank's imports): the
                                              median measured overhead of this controller's recent cold starts of
                                              the model (else its kind), the configured default before any
                                              (StartCosts); one number per decision, the same for every candidate

The smallest estimate wins; ties go to the node whose name sorts first. Every decision carries its breakdown.

A tensor-parallel model (N ranks) loads when its slowest rank has read its bytes (`rank_bytes[r]`: about 1/N of the
model plus the replicated tensors, planned from the checkpoint at deploy), each rank from the fastest tier holding
what it reads on its node: a whole copy there, or that rank's slice copy (holding item `slice_holding("nvme", r)`).

Baselines for the benches (controller.placement_policy, docs/placement.md "Baseline policies") change only what
`place()` is given or how it picks: "no-locality", "random", "serverlessllm"; "hpcllm" is the policy above.

Two implementations of the same arithmetic: `estimate()` is the readable per-node specification (also used to
explain the chosen node), `ClusterView` precomputes per-node arrays and a per-model load-time matrix so one decision
over thousands of nodes is a few vectorized numpy operations (bench/placement.py measures it).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hpcllm.controller.protocol import PlacementBreakdown

TIERS = ("dram", "nvme", "sharedfs")  # also the preference order when two tiers load equally fast
ORIGIN_TIER = "sharedfs"
POLICIES = ("hpcllm", "no-locality", "random", "serverlessllm")
BYTES_PER_GB = 1e9


@dataclass(frozen=True)
class MovableInstance:
    """An instance (of another model) that could be moved away to free slots, and what moving it costs."""

    instance_id: str
    slots: int
    cost_seconds: float


@dataclass(frozen=True)
class NodeCandidate:
    node: str
    kind: str  # "running" (agent up), "pending" (allocation queued), "idle" (a new allocation could land here)
    queue_wait_seconds: float
    free_slots: int
    bandwidth_gbps: Mapping[str, float]  # measured read bandwidth per tier; must include "sharedfs"
    movable: tuple[MovableInstance, ...] = ()
    queue_wait_source: str = ""  # where queue_wait_seconds comes from (Slurm's estimate, the constant, ...)


@dataclass(frozen=True)
class Estimate:
    node: str
    kind: str
    total_seconds: float
    queue_wait_seconds: float
    load_seconds: float
    migration_seconds: float
    tier: str
    bandwidth_gbps: float
    migrate: tuple[str, ...] = ()
    queue_wait_source: str = ""
    slowest_rank: int | None = None  # a tensor-parallel model: the rank whose load decides load_seconds
    start_seconds: float = 0.0  # the start's fixed cost (StartCosts), in total_seconds


@dataclass(frozen=True)
class Decision:
    chosen: Estimate | None
    considered: int

    def breakdown(self) -> PlacementBreakdown | None:
        if self.chosen is None:
            return None
        c = self.chosen
        return PlacementBreakdown(node=c.node, kind=c.kind, total_seconds=c.total_seconds,
                                  queue_wait_seconds=c.queue_wait_seconds, load_seconds=c.load_seconds,
                                  migration_seconds=c.migration_seconds, tier=c.tier, bandwidth_gbps=c.bandwidth_gbps,
                                  migrate=list(c.migrate), considered=self.considered,
                                  queue_wait_source=c.queue_wait_source or None, slowest_rank=c.slowest_rank,
                                  start_seconds=c.start_seconds)


# --------------------------------------------------------------------------------------- the specification


def load_time(size_bytes: int, bandwidth_gbps: float) -> float:
    return size_bytes / (bandwidth_gbps * BYTES_PER_GB)


def best_tier(size_bytes: int, bandwidth_gbps: Mapping[str, float], holding: Collection[str]) -> tuple[str, float]:
    """(tier, load seconds) of what a node loads: its fastest cache tier holding the checkpoint in the tiers' order
    (DRAM, then NVMe: the node agent's CacheManager.best_copy), else the shared FS, which always does. The time
    counts that tier's measured bandwidth, even where the shared FS measured faster (a busy local disk): the agent
    reads its own copy, which spares the shared FS everyone else reads, and the estimate says what will happen.
    A held tier the node never measured counts at the shared FS's bandwidth."""
    for tier in TIERS:
        if tier != ORIGIN_TIER and tier in holding:
            gbps = bandwidth_gbps.get(tier) or bandwidth_gbps[ORIGIN_TIER]
            return tier, load_time(size_bytes, gbps)
    return ORIGIN_TIER, load_time(size_bytes, bandwidth_gbps[ORIGIN_TIER])


def slice_holding(tier: str, rank: int) -> str:
    """The holding item of a node that keeps rank `rank`'s slices of a model in `tier` (a slice copy)."""
    return f"{tier}:r{rank}"


def rank_holding(holding: Collection[str], rank: int) -> set[str]:
    """The tiers from which rank `rank` can read what it needs on a node: whole copies and its own slice copy."""
    own = {t.split(":", 1)[0] for t in holding if ":" in t and t.split(":", 1)[1] == f"r{rank}"}
    return {t for t in holding if ":" not in t} | own


def slowest_rank(rank_bytes: Sequence[int], rank_nodes: Sequence[tuple[Mapping[str, float], Collection[str]]]
                 ) -> tuple[int, str, float]:
    """(rank, tier, seconds) of the rank that loads last: rank r reads rank_bytes[r] from the fastest tier of its
    node (rank_nodes[r]: the node's measured bandwidths and what it holds of the model) that holds its part.
    Ties go to the lowest rank."""
    slowest = (0, ORIGIN_TIER, -1.0)
    for rank, (nbytes, (bandwidths, holding)) in enumerate(zip(rank_bytes, rank_nodes, strict=True)):
        tier, seconds = best_tier(nbytes, bandwidths, rank_holding(holding, rank))
        if seconds > slowest[2]:
            slowest = (rank, tier, seconds)
    return slowest


def node_load(size_bytes: int, rank_bytes: Sequence[int] | None, bandwidths: Mapping[str, float],
              holding: Collection[str]) -> tuple[str, float, int | None]:
    """(tier, load seconds, slowest rank or None) of a model on one node: every rank of a tensor-parallel model runs
    there (one node per instance today), each reading its own bytes from the best tier holding its part."""
    if not rank_bytes or len(rank_bytes) == 1:
        return (*best_tier(size_bytes, bandwidths, {t for t in holding if ":" not in t}), None)
    rank, tier, seconds = slowest_rank(rank_bytes, [(bandwidths, holding)] * len(rank_bytes))
    return tier, seconds, rank


def cheapest_migration(movable: Sequence[MovableInstance], slots_to_free: int) -> tuple[float, tuple[str, ...]] | None:
    """The cheapest set of instances whose slots add up to at least `slots_to_free` (0/1 knapsack cover, exact).

    None when moving everything would still not free enough.
    """
    if slots_to_free <= 0:
        return 0.0, ()
    # best[j] = (cost, ids) of the cheapest set freeing at least j slots
    best: list[tuple[float, tuple[str, ...]]] = [(0.0, ())] + [(math.inf, ())] * slots_to_free
    for inst in movable:
        for j in range(slots_to_free, 0, -1):
            base_cost, base_ids = best[max(0, j - inst.slots)]
            if base_cost + inst.cost_seconds < best[j][0]:
                best[j] = (base_cost + inst.cost_seconds, base_ids + (inst.instance_id,))
    cost, ids = best[slots_to_free]
    return None if math.isinf(cost) else (cost, ids)


def estimate(candidate: NodeCandidate, size_bytes: int, slots: int, holding: Collection[str],
             rank_bytes: Sequence[int] | None = None, start_seconds: float = 0.0) -> Estimate | None:
    """Startup estimate of one node with its breakdown; None when the node cannot host the instance at all.
    `rank_bytes`: a tensor-parallel model's bytes per rank (the slowest rank's load counts); `start_seconds`: the
    start's fixed cost (StartCosts.seconds)."""
    migration = cheapest_migration(candidate.movable, slots - candidate.free_slots)
    if migration is None:
        return None
    migration_seconds, migrate = migration
    tier, load_seconds, rank = node_load(size_bytes, rank_bytes, candidate.bandwidth_gbps, holding)
    total = candidate.queue_wait_seconds + load_seconds + migration_seconds + start_seconds
    return Estimate(candidate.node, candidate.kind, total, candidate.queue_wait_seconds, load_seconds,
                    migration_seconds, tier, candidate.bandwidth_gbps[tier], migrate, candidate.queue_wait_source,
                    rank, start_seconds)


def place(size_bytes: int, slots: int, candidates: Sequence[NodeCandidate],
          holding: Mapping[str, Collection[str]], rank_bytes: Sequence[int] | None = None, policy: str = "hpcllm",
          rng: random.Random | None = None, start_seconds: float = 0.0) -> Decision:
    """Place one instance of one model: `holding` maps node -> tiers holding its checkpoint (and slice_holding
    items for its ranks' slice copies); `rank_bytes` for a tensor-parallel model. `policy` is hpcllm's or one of
    the baselines the benches compare it with (POLICIES); `rng` drives "random". `start_seconds`: the start's fixed
    cost, added to every candidate (StartCosts.seconds)."""
    if policy == "no-locality":
        holding = {}  # every node is estimated (and ranked) as loading from the shared FS
    elif policy == "serverlessllm":
        candidates = serverlessllm_candidates(candidates, slots)
    elif policy == "random":
        return place_randomly(size_bytes, slots, candidates, holding, rng or random.Random(0), start_seconds)
    elif policy != "hpcllm":
        raise ValueError(f"unknown placement policy {policy!r} (one of {', '.join(POLICIES)})")
    view = ClusterView(candidates, {"model": size_bytes}, {"model": holding},
                       {"model": rank_bytes} if rank_bytes else {})
    return view.decide("model", slots, start_seconds)


def serverlessllm_candidates(candidates: Sequence[NodeCandidate], slots: int) -> list[NodeCandidate]:
    """ServerlessLLM's view of the cluster: a fixed set of servers, ranked by load time from their best tier alone.
    Nodes with the slots free now, if any; otherwise the allocation candidates with their Slurm queue waits taken
    as 0. Never a node whose instances would have to move (no migration), nor a residency wait."""
    free_now = [dataclasses.replace(c, movable=()) for c in candidates
                if c.kind == "running" and c.free_slots >= slots]
    if free_now:
        return free_now
    return [dataclasses.replace(c, queue_wait_seconds=0.0, movable=()) for c in candidates
            if c.kind in ("pending", "idle")]


def place_randomly(size_bytes: int, slots: int, candidates: Sequence[NodeCandidate],
                   holding: Mapping[str, Collection[str]], rng: random.Random, start_seconds: float = 0.0
                   ) -> Decision:
    """Any node that can host the instance now (free slots, no wait), drawn uniformly; when there is none, any
    candidate that can host it at all (moving instances, a pending or new allocation)."""
    feasible = [e for c in candidates if c.kind != "residency"
                and (e := estimate(c, size_bytes, slots, holding.get(c.node, ()), None, start_seconds)) is not None]
    now = [e for e in feasible if e.kind == "running" and not e.migrate]
    pool = sorted(now or feasible, key=lambda e: e.node)  # sorted: the same seed draws the same node
    return Decision(rng.choice(pool) if pool else None, len(candidates))


# ------------------------------------------------------------------------------ instances whose ranks span nodes

ANY_NODES = "*"  # a spanning allocation on whichever nodes Slurm picks


@dataclass(frozen=True)
class NodeSetCandidate:
    """Where an instance spanning nodes could run: a set of K nodes (in Slurm's order: node i runs ranks
    [i*N/K, (i+1)*N/K), srun's block distribution), or ANY_NODES with K copies of the default bandwidths."""

    name: str  # "n1,n2" or ANY_NODES
    nodes: tuple[str, ...]  # () for ANY_NODES
    kind: str  # "running" (its allocation is up), "idle" (a new allocation of this shape)
    queue_wait_seconds: float
    bandwidth_gbps: tuple[Mapping[str, float], ...]  # per node of the set, each including "sharedfs"
    queue_wait_source: str = ""


def slurm_order(nodes: Collection[str]) -> list[str]:
    """Node names as Slurm orders a job's nodes (and srun's block distribution its tasks): by name, numbers by
    value (n2 before n10)."""
    return sorted(nodes, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])


def spanning_holding(holding: Collection[str]) -> set[str]:
    """What a spanning instance's rank can use on its node: slice copies and a whole NVMe copy, which every rank
    finds on its own node (hpcllm worker --tensor-parallel); not a DRAM copy (an agent's, in its memory)."""
    return {t for t in holding if ":" in t or t == "nvme"}


NODE_COPY_TIER = "nvme"  # where a spanning rank's node copies are: its slice copy or the node's whole NVMe copy


def spanning_rank_read(nbytes: int, bandwidths: Mapping[str, float], held: Collection[str], rank: int
                       ) -> tuple[str, float, float]:
    """(tier, seconds, GB/s) of what a spanning instance's rank reads on its node. It takes its node's copy (its
    slice copy, else the node's whole NVMe copy) whenever there is one, without comparing bandwidths (hpcllm worker
    --tensor-parallel: node_slice_copy, node_model_copy), so the estimate counts that copy at the node's measured
    NVMe bandwidth even where the shared FS measured faster (the shared FS's when the node measured no NVMe);
    without a copy, the origin on the shared FS."""
    if NODE_COPY_TIER in rank_holding(spanning_holding(held), rank):
        gbps = bandwidths.get(NODE_COPY_TIER) or bandwidths[ORIGIN_TIER]
        return NODE_COPY_TIER, load_time(nbytes, gbps), gbps
    gbps = bandwidths[ORIGIN_TIER]
    return ORIGIN_TIER, load_time(nbytes, gbps), gbps


def spanning_rank_loads(candidate: NodeSetCandidate, size_bytes: int, degree: int,
                        rank_bytes: Sequence[int] | None, holding: Mapping[str, Collection[str]]
                        ) -> list[tuple[str, float, float]]:
    """(tier, seconds, GB/s) of each rank of a spanning instance on a node set: rank r reads its bytes (the whole
    model when they were not planned) on its node (block r // (degree / nodes)) as spanning_rank_read says."""
    per_node = degree // len(candidate.bandwidth_gbps)
    nbytes = list(rank_bytes) if rank_bytes and len(rank_bytes) == degree else [size_bytes] * degree
    loads = []
    for rank in range(degree):
        node = rank // per_node
        held = holding.get(candidate.nodes[node], ()) if candidate.nodes else ()
        loads.append(spanning_rank_read(nbytes[rank], candidate.bandwidth_gbps[node], held, rank))
    return loads


def spanning_estimate(candidate: NodeSetCandidate, size_bytes: int, degree: int, rank_bytes: Sequence[int] | None,
                      holding: Mapping[str, Collection[str]], start_seconds: float = 0.0) -> Estimate:
    """Startup estimate of a spanning instance on a node set: the queue wait of an allocation of the whole shape
    plus the load of its slowest rank (ties: the lowest rank), each rank reading from its own node, plus the start's
    fixed cost."""
    loads = spanning_rank_loads(candidate, size_bytes, degree, rank_bytes, holding)
    rank = max(range(degree), key=lambda r: (loads[r][1], -r))
    tier, seconds, bandwidth = loads[rank]
    return Estimate(candidate.name, candidate.kind, candidate.queue_wait_seconds + seconds + start_seconds,
                    candidate.queue_wait_seconds, seconds, 0.0, tier, bandwidth, (), candidate.queue_wait_source,
                    rank, start_seconds)


def node_sets_to_ask(idle: Collection[str], holding: Mapping[str, Collection[str]], nodes: int, degree: int,
                     size_bytes: int, rank_bytes: Sequence[int] | None, bandwidths: Mapping[str, Mapping[str, float]],
                     limit: int = 3, max_pool: int = 12) -> list[tuple[str, ...]]:
    """The `limit` most promising sets of `nodes` idle nodes for a spanning instance (each in Slurm's order), by
    their slowest rank's load, then the sum of every rank's load (more ranks on their slice copies), then name;
    before queue waits, which cost a Slurm call per set. Sets are drawn from the idle nodes holding slices of the
    model (at most max_pool) and, to fill sets, other idle nodes; each set has a node holding slices. Empty when no
    idle node holds any (a new allocation anywhere is then as good)."""
    holders = slurm_order(n for n in idle if spanning_holding(holding.get(n, ())))[:max_pool]
    if not holders:
        return []
    others = [n for n in slurm_order(idle) if n not in holders]
    pool = slurm_order(holders + others[: max(nodes - 1, max_pool - len(holders))])
    scored = []
    for combo in itertools.islice(itertools.combinations(pool, nodes), 500):
        if not any(n in holders for n in combo):
            continue
        candidate = NodeSetCandidate(",".join(combo), combo, "idle", 0.0, tuple(bandwidths[n] for n in combo))
        loads = [seconds for _, seconds, _ in spanning_rank_loads(candidate, size_bytes, degree, rank_bytes,
                                                                   holding)]
        scored.append((max(loads), sum(loads), combo))
    return [combo for *_, combo in sorted(scored)[:limit]]


def place_spanning(size_bytes: int, degree: int, rank_bytes: Sequence[int] | None,
                   candidates: Sequence[NodeSetCandidate], holding: Mapping[str, Collection[str]],
                   start_seconds: float = 0.0) -> Decision:
    """The node set where a spanning instance could serve soonest. Ties go to the name that sorts first: ANY_NODES
    ("*") before node names, so a named set wins only when strictly better (its nodes hold slices, or measured a
    faster shared FS)."""
    estimates = [spanning_estimate(c, size_bytes, degree, rank_bytes, holding, start_seconds) for c in candidates]
    best = min(estimates, key=lambda e: (e.total_seconds, e.node), default=None)
    return Decision(best, len(candidates))


# ------------------------------------------------------------------------------------ the fast, precomputed form


@dataclass
class ClusterView:
    """Candidates and models precomputed into arrays; `decide()` is then O(nodes) in numpy.

    Nodes are stored sorted by name, so numpy's argmin (first minimum) breaks ties by node name.
    - queue_wait[n], and migration_cost[n, k]: seconds to have k free slots on node n (0 when free, inf if
      impossible), for k up to the largest slot count any node can offer.
    - load_seconds[m, n]: model m's load time on node n from its best tier - the precomputed per-model residency.
    """

    candidates: Sequence[NodeCandidate]
    model_sizes: Mapping[str, int]
    residency: Mapping[str, Mapping[str, Collection[str]]]  # model -> node -> tiers holding its checkpoint
    rank_bytes: Mapping[str, Sequence[int]] = field(default_factory=dict)  # tensor-parallel models: bytes per rank
    nodes: list[NodeCandidate] = field(init=False)
    model_index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = sorted(self.candidates, key=lambda c: c.node)
        node_index = {c.node: i for i, c in enumerate(self.nodes)}
        self.model_index = {name: i for i, name in enumerate(self.model_sizes)}
        self.queue_wait = np.array([c.queue_wait_seconds for c in self.nodes], dtype=np.float64)
        # 0 at least: where every node is over-claimed (negative free_slots) none can host anything
        self.max_slots = max([c.free_slots + sum(m.slots for m in c.movable) for c in self.nodes] + [0])
        self.migration_cost = self._migration_matrix()
        self.load_seconds = self._load_matrix(node_index)

    def _migration_matrix(self) -> np.ndarray:
        cost = np.full((len(self.nodes), self.max_slots + 1), np.inf)
        for n, c in enumerate(self.nodes):
            cost[n, : max(c.free_slots, 0) + 1] = 0.0
            # From column 1 (no placement asks for 0 slots): an over-claimed node's free_slots is negative, and
            # column free_slots + 1 would index from the end, leaving a cost where the node cannot host at all.
            for k in range(max(c.free_slots + 1, 1), self.max_slots + 1):
                found = cheapest_migration(c.movable, k - c.free_slots)
                if found is None:
                    break
                cost[n, k] = found[0]
        return cost

    def _load_matrix(self, node_index: Mapping[str, int]) -> np.ndarray:
        # what the slowest reader reads from the shared FS: the whole model, or a tensor-parallel model's largest rank
        sizes = np.array([max(self.rank_bytes.get(m) or [self.model_sizes[m]]) for m in self.model_index],
                         dtype=np.float64)
        origin_bw = np.array([c.bandwidth_gbps[ORIGIN_TIER] for c in self.nodes], dtype=np.float64) * BYTES_PER_GB
        load = sizes[:, None] / origin_bw[None, :]
        for model, by_node in self.residency.items():
            m = self.model_index.get(model)
            if m is None:
                continue
            for node, tiers in by_node.items():
                n = node_index.get(node)
                if n is not None:
                    load[m, n] = node_load(self.model_sizes[model], self.rank_bytes.get(model),
                                           self.nodes[n].bandwidth_gbps, tiers)[1]
        return load

    def decide(self, model: str, slots: int, start_seconds: float = 0.0) -> Decision:
        """The node starting `model` soonest; `start_seconds` (the start's fixed cost) is in every total."""
        if not self.nodes or slots > self.max_slots:
            return Decision(None, len(self.nodes))
        m = self.model_index[model]
        total = self.queue_wait + self.load_seconds[m] + self.migration_cost[:, slots] + start_seconds
        n = int(np.argmin(total))
        if math.isinf(total[n]):
            return Decision(None, len(self.nodes))
        node = self.nodes[n]
        holding = self.residency.get(model, {}).get(node.node, ())
        return Decision(estimate(node, self.model_sizes[model], slots, holding, self.rank_bytes.get(model),
                                 start_seconds), len(self.nodes))


# ------------------------------------------------------------------------------- the start's fixed cost, learned

START_COST_WINDOW = 20  # the last cold starts whose median is the learned cost
START_COST_MIN_MODEL_STARTS = 3  # a model's own median needs this many of its starts; else its kind's


def start_kind(tensor_parallel: int) -> str:
    """What a start's fixed cost depends on most: one worker process, or srun + MPI + every rank's imports."""
    return "tensor-parallel" if tensor_parallel > 1 else "one-rank"


@dataclass(frozen=True)
class StartOverhead:
    """One measured cold start on a running node: (ready - requested) - the worker's own load time."""

    model: str
    tensor_parallel: int
    seconds: float


@dataclass(frozen=True)
class StartCosts:
    """What a start costs beyond reading bytes: per model and per kind (start_kind), learned from cold starts."""

    by_model: Mapping[tuple[str, int], float]
    by_kind: Mapping[str, float]
    defaults: Mapping[str, float]  # start_kind -> configured seconds before any record of that kind

    def seconds(self, model: str, tensor_parallel: int) -> float:
        """The model's own median when it has START_COST_MIN_MODEL_STARTS starts of this degree, else its kind's,
        else the configured default."""
        kind = start_kind(tensor_parallel)
        found = self.by_model.get((model, tensor_parallel))
        if found is None:
            found = self.by_kind.get(kind)
        return self.defaults[kind] if found is None else found


def learn_start_costs(overheads: Sequence[StartOverhead], defaults: Mapping[str, float],
                      window: int = START_COST_WINDOW) -> StartCosts:
    """The median of the last `window` overheads (newest first in `overheads`) of each model (and degree) and of each
    kind; a negative median (clocks, a worker counting its start in its load) counts as 0."""
    per_model: dict[tuple[str, int], list[float]] = {}
    per_kind: dict[str, list[float]] = {}
    for o in overheads:
        model_starts = per_model.setdefault((o.model, o.tensor_parallel), [])
        if len(model_starts) < window:
            model_starts.append(o.seconds)
        kind_starts = per_kind.setdefault(start_kind(o.tensor_parallel), [])
        if len(kind_starts) < window:
            kind_starts.append(o.seconds)
    return StartCosts(
        {key: max(0.0, statistics.median(v)) for key, v in per_model.items()
         if len(v) >= START_COST_MIN_MODEL_STARTS},
        {kind: max(0.0, statistics.median(v)) for kind, v in per_kind.items()},
        dict(defaults))
