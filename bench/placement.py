"""Benchmark: one placement decision over 1,000 simulated nodes x 100 models (target: < 1 ms median).

    .venv/bin/python bench/placement.py [--nodes 1000] [--models 100] [--decisions 2000] [--seed 0]

Fast path: hpcllm.controller.placement.ClusterView, built once from the cluster (per-node arrays, a per-model
load-time matrix from the residency map, a per-node migration-cost table); a decision is then a few numpy operations
over the nodes. Baseline, measured in the same run on the same decisions: the obvious implementation, which per
decision finds the model's cached tiers by scanning the cluster's cache list and calls the per-node estimate() for
every node; and a middle ground, the same per-node loop over the precomputed residency map. All must pick the same
node for every decision (checked). Prints median / p90 per decision, the ratio,
the one-off build time, and the machine (CPU model, Python, numpy).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchkit import require_at_least  # noqa: E402
from hpcllm.controller.placement import ClusterView, MovableInstance, NodeCandidate, estimate  # noqa: E402

GB = 10**9
TARGET_MEDIAN_MS = 1.0


def simulate(num_nodes: int, num_models: int, seed: int):
    """A cluster: mostly running nodes (some full, with movable instances), some pending / idle ones; each model
    cached on about 5% of the nodes in DRAM and/or NVMe."""
    rng = random.Random(seed)
    nodes = []
    for i in range(num_nodes):
        kind = rng.choices(["running", "pending", "idle"], weights=[80, 10, 10])[0]
        gpus = rng.choice([4, 8])
        free = rng.randint(0, gpus) if kind == "running" else gpus
        movable = tuple(MovableInstance(f"node{i:04d}/inst{j}", rng.choice([1, 2]), rng.uniform(0.5, 20.0))
                        for j in range(rng.randint(0, 3) if free < gpus else 0))
        wait = {"running": 0.0, "pending": rng.uniform(5, 120), "idle": 30.0}[kind]
        bw = {"dram": rng.uniform(15, 25), "nvme": rng.uniform(2, 6), "sharedfs": rng.uniform(0.5, 2)}
        nodes.append(NodeCandidate(f"node{i:04d}", kind, wait, free, bw, movable))
    models = {f"model{m:03d}": rng.randint(1, 140) * GB for m in range(num_models)}
    cache_entries = []  # (node, model, tier): what node agents report
    for name in models:
        for node in rng.sample(nodes, max(1, num_nodes // 20)):
            for tier in rng.sample(["dram", "nvme"], rng.randint(1, 2)):
                cache_entries.append((node.node, name, tier))
    return nodes, models, cache_entries


def residency_map(cache_entries) -> dict[str, dict[str, set[str]]]:
    residency: dict[str, dict[str, set[str]]] = {}
    for node, model, tier in cache_entries:
        residency.setdefault(model, {}).setdefault(node, set()).add(tier)
    return residency


def naive_decide(nodes, models, cache_entries, model: str, slots: int):
    holding: dict[str, set[str]] = {}
    for node, name, tier in cache_entries:
        if name == model:
            holding.setdefault(node, set()).add(tier)
    best = None
    for node in nodes:
        e = estimate(node, models[model], slots, holding.get(node.node, ()))
        if e is not None and (best is None or (e.total_seconds, e.node) < (best.total_seconds, best.node)):
            best = e
    return best


def loop_decide(nodes, models, residency, model: str, slots: int):
    """A per-node Python loop over the precomputed residency map (no cache scan, no numpy)."""
    holding = residency.get(model, {})
    best = None
    for node in nodes:
        e = estimate(node, models[model], slots, holding.get(node.node, ()))
        if e is not None and (best is None or (e.total_seconds, e.node) < (best.total_seconds, best.node)):
            best = e
    return best


def timed(fn, queries) -> tuple[list[float], list]:
    times, answers = [], []
    for model, slots in queries:
        start = time.perf_counter_ns()
        answer = fn(model, slots)
        times.append((time.perf_counter_ns() - start) / 1e6)
        answers.append(answer)
    return times, answers


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def compare(nodes, models, cache_entries, queries, baseline_decisions: int) -> dict:
    """Times the fast path on every query and the two baselines on the first baseline_decisions of them. The
    speed-ups compare medians over the same decisions: the fast path's times on the baselines' queries."""
    build_start = time.perf_counter()
    residency = residency_map(cache_entries)
    view = ClusterView(nodes, models, residency)
    build_ms = (time.perf_counter() - build_start) * 1e3

    timed(lambda m, s: view.decide(m, s), queries[:50])  # warm-up
    fast_times, fast_answers = timed(lambda m, s: view.decide(m, s).chosen, queries)
    base_queries = queries[:baseline_decisions]
    base_times, base_answers = timed(lambda m, s: naive_decide(nodes, models, cache_entries, m, s), base_queries)
    loop_times, loop_answers = timed(lambda m, s: loop_decide(nodes, models, residency, m, s), base_queries)
    mismatches = sum(a != b for a, b in zip(fast_answers, base_answers))
    mismatches += sum(a != b for a, b in zip(fast_answers, loop_answers))
    return {"build_ms": build_ms, "fast_times": fast_times, "base_times": base_times, "loop_times": loop_times,
            "fast_times_on_base_queries": fast_times[:len(base_queries)], "compared": len(base_answers),
            "mismatches": mismatches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--baseline-decisions", type=int, default=200, help="the naive path is slow: fewer runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "nodes", "models")
    if not 2 <= args.baseline_decisions <= args.decisions:  # a p90 needs two times
        parser.error("--baseline-decisions must be at least 2 and at most --decisions")

    nodes, models, cache_entries = simulate(args.nodes, args.models, args.seed)
    rng = random.Random(args.seed + 1)
    queries = [(rng.choice(list(models)), rng.choice([1, 1, 1, 2, 4])) for _ in range(args.decisions)]
    result = compare(nodes, models, cache_entries, queries, args.baseline_decisions)
    build_ms, mismatches = result["build_ms"], result["mismatches"]
    fast_times, base_times, loop_times = result["fast_times"], result["base_times"], result["loop_times"]
    fast_median, base_median = statistics.median(fast_times), statistics.median(base_times)
    loop_median = statistics.median(loop_times)
    paired_median = statistics.median(result["fast_times_on_base_queries"])
    print(f"machine: {cpu_model()}; Python {platform.python_version()}; numpy {np.__version__}; "
          f"{platform.system()} {platform.machine()}")
    print(f"cluster: {args.nodes} nodes x {args.models} models, {len(cache_entries)} cache entries, "
          f"seed {args.seed}")
    print(f"build ClusterView once:       {build_ms:8.1f} ms")
    print(f"fast decision   ({len(fast_times):5d} runs): median {fast_median:.4f} ms, p90 {p90(fast_times):.4f} ms")
    print(f"naive decision  ({len(base_times):5d} runs): median {base_median:.4f} ms, p90 {p90(base_times):.4f} ms")
    print(f"loop decision   ({len(loop_times):5d} runs): median {loop_median:.4f} ms, p90 {p90(loop_times):.4f} ms"
          "  (per-node Python loop over the precomputed residency map)")
    print(f"speed-up vs naive: {base_median / paired_median:.1f}x; vs loop: {loop_median / paired_median:.1f}x "
          f"(medians over the same {result['compared']} decisions)")
    print(f"same node chosen by all three: {mismatches == 0} ({result['compared']} decisions compared)")
    ok = fast_median < TARGET_MEDIAN_MS and mismatches == 0
    print(f"{'PASS' if ok else 'FAIL'}: median {fast_median:.4f} ms vs target < {TARGET_MEDIAN_MS} ms"
          + ("" if mismatches == 0 else f"; {mismatches} decisions differ from the baseline"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
