"""Simulation inputs measured by a bench/replay.py run: what each step of a cold start and each token cost in the
environment the replay ran in. These are costs, never outcomes: no TTFT or end-to-end latency the simulation is
compared with goes in (bench/simulate.py --calibrate-from RESULT.json simulates the same trace with them and prints
both side by side).

From each policy's raw measurements (the replay JSON's "raw"; all policies pooled, they ran on the same cluster):

- queue waits: Slurm's submit -> start of every allocation (the controller's status);
- agent starts: job start -> its agent first seen registered (status sampled every second);
- instance starts: a cold start on a registered agent, request -> ready, less the weights' load time (the worker
  process start, imports and engine set-up: on the dev cluster this is most of a cold start, as every worker
  shares the host's cores); starts at once share the CPU (processor sharing: fit_start_capacity), so each start's
  time alone is derived from its duration and the starts running beside it;
- decode: per dev size, the seconds per output token of each request against the number of requests decoding on
  the whole host meanwhile (every dev "node" shares the same cores), fitted as tpot = base + per_request * (n - 1);
- prefill: per dev size, prompt tokens / TTFT of requests that arrived once an instance of their model was ready
  (median: the batching and contention they met included).

The simulation draws each queue wait, agent start and instance start from the measured lists (seeded), so the
spread of the measurements (not only their means) reaches the simulated percentiles.
"""

from __future__ import annotations

import numpy as np

DECODE_SAMPLES = 5  # points along a request's decode at which the host's decoding requests are counted


def queue_waits(allocations: dict[str, dict]) -> list[float]:
    return [a["started_at"] - a["submitted_at"] for a in allocations.values()
            if a.get("started_at") is not None and a.get("submitted_at") is not None]


def agent_starts(allocations: dict[str, dict], agents_seen: dict[str, float]) -> list[float]:
    return [agents_seen[j] - a["started_at"] for j, a in allocations.items()
            if a.get("started_at") is not None and j in agents_seen and agents_seen[j] >= a["started_at"]]


def instance_starts(cold_starts: list[dict]) -> list[tuple[float, float]]:
    """(seconds, starts in progress on the host meanwhile (mean over it)) of each cold start of one replay."""
    done = [c for c in cold_starts if c.get("ready_at") is not None]
    spans = [(c["requested_at"], c["ready_at"]) for c in done]
    out = []
    for c, (start, end) in zip(done, spans):
        moments = np.linspace(start, end, DECODE_SAMPLES, endpoint=False) if end > start else [start]
        concurrent = float(np.mean([max(1, sum(1 for a, b in spans if a <= t < b)) for t in moments]))
        out.append((max(0.0, end - start - (c.get("load_seconds") or 0.0)), concurrent))
    return out


def fit_start_capacity(starts: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """Processor sharing of the host's CPU by instance starts: a start that needs w seconds alone takes
    w * max(1, k / capacity) with k starting at once. The capacity (in starts at full pace) that best explains the
    measured (seconds, k) pairs (least squares of the log durations around their own median), and each start's
    time alone under it: the simulation draws from those."""
    seconds = np.array([s for s, _ in starts], dtype=float)
    k = np.array([c for _, c in starts], dtype=float)
    best = None
    for capacity in np.arange(1.0, 8.01, 0.05):  # at least one start runs at its own pace
        alone = seconds / np.maximum(1.0, k / capacity)
        logs = np.log(np.maximum(alone, 0.05))
        spread = float(np.sum((logs - np.median(logs)) ** 2))
        if best is None or spread < best[0] - 1e-9:
            best = (spread, float(capacity), alone)
    return round(best[1], 2), sorted(round(float(a), 3) for a in best[2])


def decode_points(records: list[dict]) -> list[tuple[str, float, float]]:
    """(model, requests decoding on the host meanwhile (mean over the decode), seconds per output token) of each
    served request with more than one token; records of one replay (their t is seconds into that replay)."""
    served = [r for r in records if r.get("error") is None and r.get("tokens", 0) > 1]
    spans = [(r["t"] + r["ttft"], r["t"] + r["e2e"]) for r in served]
    points = []
    for r, (start, end) in zip(served, spans):
        if end <= start:
            continue
        moments = np.linspace(start, end, DECODE_SAMPLES, endpoint=False)
        concurrent = float(np.mean([sum(1 for a, b in spans if a <= t < b) for t in moments]))
        points.append((r["model"], concurrent, (r["e2e"] - r["ttft"]) / (r["tokens"] - 1)))
    return points


def fit_decode(points: list[tuple[float, float]]) -> dict:
    """tpot = base + per_request * (n - 1), least squares over (n, tpot); a flat median when n does not vary."""
    n = np.array([p[0] for p in points], dtype=float)
    tpot = np.array([p[1] for p in points], dtype=float)
    if len(points) < 3 or np.ptp(n) < 1.0:
        return {"base": float(np.median(tpot)), "per_request": 0.0, "points": len(points)}
    slope, intercept = np.polyfit(n - 1.0, tpot, 1)
    slope = max(0.0, float(slope))
    base = max(1e-4, float(np.median(tpot - slope * (n - 1.0))))  # robust intercept for the clipped slope
    return {"base": base, "per_request": slope, "points": len(points)}


def warm_prefill_rates(records: list[dict], cold_starts: list[dict], t0_epoch: float) -> list[tuple[str, float]]:
    """(model, prompt tokens / TTFT) of requests that arrived after an instance of their model was ready."""
    first_ready: dict[str, float] = {}
    for c in cold_starts:
        if c.get("ready_at") is not None:
            first_ready[c["model"]] = min(first_ready.get(c["model"], np.inf), c["ready_at"] - t0_epoch)
    return [(r["model"], r["prompt_tokens"] / max(r["ttft"], 1e-3)) for r in records
            if r.get("error") is None and r["model"] in first_ready and r["t"] > first_ready[r["model"]]]


def calibrate(raw: dict[str, dict], size_class: dict[str, str]) -> dict:
    """The simulation's inputs from a replay's raw measurements ({policy: {records, cold_starts, allocations,
    agents_seen, t0_epoch}}): see the module docstring. Raises ValueError when a replay lacks what is needed."""
    waits, agents, starts, decode, prefill = [], [], [], [], []
    for policy, m in raw.items():
        missing = [k for k in ("records", "cold_starts", "allocations", "agents_seen", "t0_epoch") if k not in m]
        if missing:
            raise ValueError(f"the replay's {policy} measurements lack {', '.join(missing)} (a replay from before "
                             f"bench/replay.py recorded cold-start phases: run it again)")
        waits += queue_waits(m["allocations"])
        agents += agent_starts(m["allocations"], m["agents_seen"])
        starts += instance_starts(m["cold_starts"])
        decode += decode_points(m["records"])
        prefill += warm_prefill_rates(m["records"], m["cold_starts"], m["t0_epoch"])
    for name, values in (("allocation queue waits", waits), ("agent starts", agents),
                         ("instance starts", starts)):
        if not values:
            raise ValueError(f"the replay measured no {name}")
    service = {}
    for size in sorted(set(size_class.values())):
        points = [(n, tpot) for model, n, tpot in decode if size_class.get(model) == size]
        rates = [rate for model, rate in prefill if size_class.get(model) == size]
        if not points:
            continue
        service[size] = {"prefill_tokens_per_second": float(np.median(rates)) if rates else 1000.0,
                         "decode": fit_decode(points)}
    capacity, alone = fit_start_capacity(starts)
    return {"queue_waits": sorted(round(w, 3) for w in waits), "agent_starts": sorted(round(a, 3) for a in agents),
            "instance_starts": sorted(round(s, 3) for s, _ in starts), "start_capacity": capacity,
            "instance_starts_alone": alone, "service": service}


def summary(cal: dict) -> list[str]:
    """Lines saying what was measured (printed by the simulation next to its comparison)."""
    def dist(values):
        return (f"median {np.median(values):.1f} s, range {min(values):.1f}-{max(values):.1f} s "
                f"({len(values)} measured)")
    lines = [f"allocation queue wait: {dist(cal['queue_waits'])}",
             f"job start to registered agent: {dist(cal['agent_starts'])}",
             f"instance start besides the weights: {dist(cal['instance_starts'])}; alone (the host's CPU shared by "
             f"{cal['start_capacity']:g} starts at full pace): {dist(cal['instance_starts_alone'])}"]
    for size, s in cal["service"].items():
        d = s["decode"]
        lines.append(f"{size}: prefill {s['prefill_tokens_per_second']:.0f} tokens/s (warm requests), decode "
                     f"{1000 * d['base']:.0f} ms/token + {1000 * d['per_request']:.1f} ms per other request "
                     f"decoding on the host ({d['points']} requests)")
    return lines
