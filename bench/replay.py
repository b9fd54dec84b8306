"""Replays a seeded bench/workload.py trace on the real dev Slurm cluster, once per policy, through the gateway.

    PYTHONPATH=$PWD .venv/bin/python bench/replay.py [--policies hpcllm,serverlessllm,no-locality,random,per-model]
        [--models 4] [--rate 0.5] [--duration 120] [--arrivals gamma --cv 2] [--seed 0] [--drain 180]
        [--preempt-at 60 --policies hpcllm,restart] [--no-compare]

For each policy (configuration of the real controller, docs/placement.md "Baseline policies"; the same table
bench/simulate.py uses): a fresh `hpcllm controller` + gunicorn `hpcllm gateway` on the dev cluster
(slurm/devcluster.sh, started if down, a lease held so test sessions do not stop it), fresh node caches (NVMe folder
and DRAM namespace per policy), the trace's models deployed as small seeded dev models (hpcllm.devmodels: the trace's
7B class as `tiny` llama, larger classes as `small`, converted once and shared), then every request of the trace sent
at its arrival time with the official `openai` client (streaming completion, temperature 0, ignore_eos so the output
has the trace's length). Measured per request: TTFT (send to first streamed text) and end-to-end latency; an error
or a stream that did not finish within --drain seconds after the last arrival counts as lost. Per policy: cold starts
by load tier (the controller's /v1/admin/status cold_starts), slot-seconds held (running time of the controller's
Slurm allocations, sampled every second from the status, times the node's 2 GPUs each holds), requests lost. Kept
for the simulation ("raw"): each allocation's submit and start, when its agent was first seen registered, each cold
start's request, ready and load times, the instances over time, every request's timings.

Then (unless --no-compare) bench/simulate.py runs the same trace at dev-cluster size (4 nodes, the same policies)
with the costs measured in this run (bench/calibration.py: queue waits, agent starts, instance starts sharing the
host's CPU, decode under contention, warm prefill; never the latencies compared) and prints simulated vs measured
side by side. `python bench/simulate.py --calibrate-from bench/results/replay-latest.json [--own-costs]` repeats
that comparison later.

Writes bench/results/replay-<time>.json (+ replay-latest.json), replay-<time>.png (TTFT and E2E CDFs, TTFT over
time) and the services' logs under replay-<time>-logs/<policy>/.
The dev cluster shares this host's 2 cores with whatever else runs: the load average is printed and recorded.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from bench.benchkit import new_result_stem  # noqa: E402
from calibration import calibrate  # noqa: E402
from workload import ModelInfo, Request, WorkloadParams, add_arguments, generate, params_from  # noqa: E402

RESULTS = REPO / "bench" / "results"
DEVCLUSTER = REPO / "slurm" / "devcluster.sh"
DEVCLUSTER_DIR = Path(os.environ.get("HPCLLM_DEVCLUSTER_DIR", "/var/tmp/hpcllm-devcluster"))
# The trace's size class -> the dev model size that stands for it (CPU-served, minutes of traffic on 2 cores).
DEV_SIZE = {"7b": "tiny", "13b": "small", "34b": "small", "70b": "small"}
# "restart" (node.on_preempt) differs from hpcllm only when a node is preempted: it needs --preempt-at.
REPLAY_POLICIES = ("hpcllm", "serverlessllm", "no-locality", "random", "per-model", "restart")
DEFAULT_POLICIES = REPLAY_POLICIES[:-1]
SECRET, ADMIN, USER_KEY = "replay-secret", "replay-admin", "replay-user"
SAMPLE_SECONDS = 1.0
AGENT_UP_MIN = 5.0  # s: a cold start longer than this waited for a new allocation's agent
MAX_INSTANCES = 2  # per model
GPUS_PER_NODE = 2  # of a dev cluster node: what each allocation holds (SBATCH_GRES below)
SEEDS = 5  # simulations per policy in the comparison (draws of the measured costs)


# ------------------------------------------------------------------------------------------ aggregation


def stats(values) -> dict:
    values = np.asarray(values, dtype=float)
    if not len(values):
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99))}


def slot_seconds(allocations: dict[str, dict], gpus_per_node: int) -> float:
    """Seconds allocations ran, times the GPU slots each holds: from each job's start to when it was last seen
    running (sampled), as recorded by AllocationTracker."""
    return sum(max(0.0, a["last_running"] - a["started_at"]) * gpus_per_node
               for a in allocations.values() if a.get("started_at") is not None and a.get("last_running"))


def summarize(policy: str, records: list[dict], cold_starts: list[dict], allocations: dict[str, dict],
              gpus_per_node: int) -> dict:
    """One policy's report, in the shape bench/simulate.py reports (so the two print and compare alike)."""
    served = [r for r in records if r["error"] is None]
    tiers = {t: sum(1 for c in cold_starts if c.get("tier") == t) for t in ("dram", "nvme", "sharedfs")}
    errors: dict[str, int] = {}
    for r in records:
        if r["error"] is not None:
            kind = r["error"].split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    return {
        "policy": policy,
        "requests": len(records),
        "served": len(served),
        "lost": len(records) - len(served),
        "errors": errors,
        "ttft": stats([r["ttft"] for r in served]),
        "e2e": stats([r["e2e"] for r in served]),
        "cold_starts": tiers,
        "slot_seconds": slot_seconds(allocations, gpus_per_node),
        "gpu_slot_hours": slot_seconds(allocations, gpus_per_node) / 3600.0,
        "allocations": len(allocations),
        "ttft_by_arrival": [[round(r["t"], 2), round(r["ttft"], 4)] for r in served],
        "e2e_by_arrival": [[round(r["t"], 2), round(r["e2e"], 4)] for r in served],
    }


def table(reports: list[dict]) -> str:
    head = (f"{'policy':14s} {'TTFT mean':>9s} {'p50':>7s} {'p99':>7s} | {'E2E mean':>8s} {'p50':>7s} {'p99':>7s} | "
            f"{'cold: dram':>10s} {'nvme':>5s} {'sharedfs':>8s} | {'slot-s held':>11s} | {'lost':>4s} {'served':>6s}")
    lines = [head, "-" * len(head)]
    for r in reports:
        t, e, c = r["ttft"], r["e2e"], r["cold_starts"]
        lines.append(f"{r['policy']:14s} {fmt(t['mean']):>9s} {fmt(t['p50']):>7s} {fmt(t['p99']):>7s} | "
                     f"{fmt(e['mean']):>8s} {fmt(e['p50']):>7s} {fmt(e['p99']):>7s} | {c['dram']:>10d} "
                     f"{c['nvme']:>5d} {c['sharedfs']:>8d} | {r['gpu_slot_hours'] * 3600:>11.0f} | {r['lost']:>4d} "
                     f"{r['served']:>6d}")
    return "\n".join(lines)


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


# ------------------------------------------------------------------------------------------ the dev cluster


def ensure_cluster() -> dict[str, str]:
    """The dev cluster up (started if down), a lease taken as a test session's (conftest.py) so no session stops
    it meanwhile; the environment with SLURM_CONF."""
    DEVCLUSTER_DIR.mkdir(parents=True, exist_ok=True)
    # Under the test sessions' lock (conftest.py _ClusterLeases): a session ending meanwhile must see this lease,
    # else it stops a cluster it started while the replay uses it.
    with open(DEVCLUSTER_DIR / "fixture.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if subprocess.run(["bash", str(DEVCLUSTER), "status"], capture_output=True, timeout=120).returncode:
                started = subprocess.run(["bash", str(DEVCLUSTER), "start"], capture_output=True, text=True,
                                         timeout=240)
                if started.returncode != 0:
                    raise SystemExit(f"error: slurm/devcluster.sh start failed:\n{started.stdout}{started.stderr}")
            (DEVCLUSTER_DIR / "leases").mkdir(exist_ok=True)
            (DEVCLUSTER_DIR / "leases" / str(os.getpid())).touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["SLURM_CONF"] = str(DEVCLUSTER_DIR / "conf" / "slurm.conf")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    return env


def release_cluster() -> None:
    (DEVCLUSTER_DIR / "leases" / str(os.getpid())).unlink(missing_ok=True)


def build_models(models: list[ModelInfo], folder: Path) -> dict[str, Path]:
    """Each trace model as a seeded dev llama of its DEV_SIZE, converted to hpcllm's format under folder."""
    from hpcllm.checkpoint.converter import convert
    from hpcllm.devmodels import make_model

    out = {}
    for i, m in enumerate(models):
        hf = folder / "hf" / m.name
        make_model("llama", hf, size=DEV_SIZE[m.size_class], seed=i)
        convert(hf, folder / m.name, progress=False)
        out[m.name] = folder / m.name
    return out


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prompts_for(requests: list[Request], tokenizer_json: Path) -> dict[int, str]:
    """A prompt of (about: BPE re-tokenizes the decoded text) each request's prompt_tokens, from the dev corpus."""
    from tokenizers import Tokenizer

    from hpcllm.devmodels import builder

    tok = Tokenizer.from_file(str(tokenizer_json))
    corpus = (Path(builder.__file__).with_name("corpus.txt")).read_text()
    ids = tok.encode(corpus).ids
    out = {}
    for r in requests:
        start = (r.id * 97) % max(1, len(ids) - r.prompt_tokens)
        out[r.id] = tok.decode(ids[start:start + r.prompt_tokens])
    return out


# ------------------------------------------------------------------------------------------------ one policy


class AllocationTracker(threading.Thread):
    """Samples the controller's status every SAMPLE_SECONDS: allocations (start, last seen running) and cold starts
    (the status shows recent ones only: kept by instance id)."""

    def __init__(self, controller_url: str):
        super().__init__(daemon=True)
        self.url = controller_url
        self.allocations: dict[str, dict] = {}
        self.cold_starts: dict[str, dict] = {}
        self.agents_seen: dict[str, float] = {}  # Slurm job id -> when its agent was first seen registered (epoch)
        # (epoch, instances ready, instances loading, requests running on ready instances): the host's load over time
        self.instance_samples: list[tuple[float, int, int, int]] = []
        self.stopped = threading.Event()

    def sample(self) -> None:
        import httpx

        from e2e_helpers import admin_status

        try:
            status = admin_status(self.url, ADMIN)
        except (httpx.HTTPError, ValueError):
            return
        now = time.time()
        for a in status.get("allocations", []):
            rec = self.allocations.setdefault(a["job_id"], {"submitted_at": a["submitted_at"], "started_at": None,
                                                            "last_running": None, "model": a.get("model")})
            if a.get("started_at") is not None:
                rec["started_at"] = a["started_at"]
            if a["state"] in ("running", "retiring", "draining") and a.get("started_at") is not None:
                rec["last_running"] = now
        for c in status.get("cold_starts", []):
            if c.get("ready_at") is not None:
                self.cold_starts[c["instance_id"]] = c
        for n in status.get("nodes", []):
            if n.get("slurm_job_id"):
                self.agents_seen.setdefault(n["slurm_job_id"], now)
        instances = status.get("instances", [])
        ready = [i for i in instances if i["state"] == "ready"]
        self.instance_samples.append((now, len(ready), sum(1 for i in instances if i["state"] == "loading"),
                                      sum(i["running_requests"] for i in ready)))

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_SECONDS):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)
        self.sample()


def preempt_busiest_node(controller_url: str, env: dict[str, str], own_jobs: list[str]) -> dict:
    """Slurm preemption as the dev cluster does it (docs/devcluster.md): a job in the `high` partition asking for
    both GPUs of the node whose instances run the most requests, so Slurm preempts the controller's allocation there
    (USR1 to its agent, which drains per node.on_preempt). Only a node that runs nothing but this replay's
    allocations is preempted: other users' jobs on the shared dev cluster are never touched."""
    from e2e_helpers import admin_status

    status = admin_status(controller_url, ADMIN)
    load: dict[str, int] = {}
    for inst in status["instances"]:
        if inst["state"] == "ready":
            load[inst["node_id"]] = load.get(inst["node_id"], 0) + inst["running_requests"]
    mine = {a["job_id"] for a in status["allocations"]}
    for node in sorted((n for n in load if load[n]), key=load.get, reverse=True):
        on_node = subprocess.run(["squeue", "-h", "-w", node, "-o", "%i"], capture_output=True, text=True,
                                 timeout=30, env=env).stdout.split()
        if on_node and set(on_node) <= mine:
            job = subprocess.run(["sbatch", "--parsable", "-p", "high", "-w", node, "--gres=gpu:2", "-t", "2",
                                  "-J", f"hpcllm-replay{os.getpid()}-preemptor", "-o", "/dev/null", "--wrap",
                                  "sleep 100"], capture_output=True, text=True, timeout=30, env=env)
            if job.returncode != 0:
                return {"node": node, "error": job.stderr.strip()}
            own_jobs.append(job.stdout.strip().split(";")[0])
            return {"node": node, "running_requests": load[node], "preemptor_job": own_jobs[-1],
                    "victims": on_node}
    return {"error": f"no node running requests runs only this replay's jobs (ready instances' requests by node: "
                     f"{load})"}


def send(client, req: Request, prompt: str, t0: float, deadline: float) -> dict:
    """One request at its arrival time: a streaming completion; TTFT and end-to-end seconds, or the error."""
    import openai

    time.sleep(max(0.0, t0 + req.t - time.monotonic()))
    sent, first, tokens = time.monotonic(), None, 0
    record = {"id": req.id, "t": req.t, "model": req.model, "prompt_tokens": req.prompt_tokens,
              "output_tokens": req.output_tokens, "error": None}
    try:
        stream = client.completions.create(model=req.model, prompt=prompt, max_tokens=req.output_tokens,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True},
                                           timeout=max(1.0, deadline - sent))
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                tokens += 1
                if first is None:
                    first = time.monotonic()
        if first is None:
            raise RuntimeError("the stream ended without text")
        done = time.monotonic()
        record.update(ttft=first - sent, e2e=done - sent, tokens=tokens)
    except (openai.OpenAIError, RuntimeError) as exc:
        record.update(error=f"{type(exc).__name__}: {str(exc)[:200]}", tokens=tokens)
    return record


def write_config(root: Path, policy: str, models_dir: Path, controller_port: int, gateway_port: int,
                 walltime: str) -> Path:
    from e2e_helpers import write_e2e_config
    from simulate import POLICIES

    overrides = POLICIES[policy]
    return write_e2e_config(
        root, secret=SECRET, admin=ADMIN, controller_port=controller_port, namespace=f"replay{os.getpid()}{policy}",
        gateway_port=gateway_port, user_key=USER_KEY, paths={"models_dir": str(models_dir)},
        slurm={"time": walltime, "gpus_per_node": GPUS_PER_NODE},
        node=overrides.get("node", {}),
        controller={"allocate_on_demand": True, "allocation_start_estimate_seconds": 5.0,
                    **overrides.get("controller", {})},
        gateway={"route_timeout_seconds": 600.0})


def replay_policy(policy: str, models: list[ModelInfo], requests: list[Request], sources: dict[str, Path],
                  prompts: dict[int, str], env: dict[str, str], drain: float, walltime: str,
                  logs: Path, preempt_at: float | None = None) -> tuple[dict, dict]:
    """A fresh stack, the trace replayed through its gateway (and, with preempt_at, one node preempted that many
    seconds into the trace); (report, raw measurements)."""
    import httpx
    import openai

    from e2e_helpers import clean_up_e2e, control_plane, free_port
    from simulate import POLICIES

    root = Path(tempfile.mkdtemp(prefix=f"hpcllm-replay-{policy}-", dir="/var/tmp"))
    root.chmod(0o755)
    logs = logs / policy
    logs.mkdir(parents=True, exist_ok=True)
    controller_port, gateway_port = free_port(), free_port()
    config_path = write_config(root, policy, next(iter(sources.values())).parent, controller_port, gateway_port,
                               walltime)
    # Each allocation holds its node's 2 (fake) GPUs, as on a GPU cluster, although the dev models are CPU-served
    # (gpus = 0, so the controller's jobs ask for no GPU): --preempt-at's `high` job asks for those GPUs, and only an
    # allocation holding them is preempted; slot-seconds count them. (Allocations submitted together no longer need
    # it to land on distinct nodes: the controller asks for distinct idle nodes by name.)
    env = {**env, "HPCLLM_CONFIG": str(config_path), "SBATCH_GRES": f"gpu:{GPUS_PER_NODE}"}
    model_fields = POLICIES[policy].get("model", {})
    tracker, preemption, preemptors = None, {}, []
    try:
        with control_plane(root, config_path, controller_port, gateway_port, env, ADMIN,
                           extra_jobs=lambda: preemptors) as (gateway_url, ctl_url):
            for m in models:
                deployed = httpx.post(f"{ctl_url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"},
                                      timeout=60, json={"name": m.name, "source": str(sources[m.name]), "gpus": 0,
                                                        "max_instances": MAX_INSTANCES, **model_fields})
                if deployed.status_code != 201:
                    raise SystemExit(f"error: deploying {m.name} for {policy}: {deployed.text}")
            tracker = AllocationTracker(ctl_url)
            tracker.start()
            last = max(r.t for r in requests)
            t0 = time.monotonic() + 1.0
            t0_epoch = time.time() + (t0 - time.monotonic())  # the controller's timestamps are epoch seconds
            deadline = t0 + last + drain
            with openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=USER_KEY, max_retries=0, timeout=600) as client:
                with ThreadPoolExecutor(min(256, len(requests))) as pool:
                    futures = [pool.submit(send, client, r, prompts[r.id], t0, deadline) for r in requests]
                    if preempt_at is not None:
                        time.sleep(max(0.0, t0 + preempt_at - time.monotonic()))
                        # No node serves anything yet (cold starts): try again until the last arrival.
                        while "error" in (preemption := preempt_busiest_node(ctl_url, env, preemptors)) \
                                and time.monotonic() < t0 + last:
                            time.sleep(SAMPLE_SECONDS)
                        preemption["at"] = round(time.monotonic() - t0, 1)
                        print(f"    preemption: {preemption}", flush=True)
                    records = [f.result() for f in futures]
            tracker.stop()
            ended = time.monotonic() - t0
    finally:
        if tracker is not None and tracker.is_alive():
            tracker.stop()
        clean_up_e2e(root, logs, f"replay{os.getpid()}{policy}")
    allocations = tracker.allocations if tracker else {}
    cold = list(tracker.cold_starts.values()) if tracker else []
    report = summarize(policy, records, cold, allocations, gpus_per_node=GPUS_PER_NODE)
    report["replay_seconds"] = round(ended, 1)
    report["preemption"] = preemption
    return report, {"records": records, "cold_starts": cold, "allocations": allocations, "t0_epoch": t0_epoch,
                    "agents_seen": tracker.agents_seen if tracker else {},
                    "instance_samples": tracker.instance_samples if tracker else []}


# --------------------------------------------------------------------------------------------------- output


def plot(reports: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for ax, key, label in ((axes[0], "ttft_by_arrival", "TTFT"), (axes[1], "e2e_by_arrival", "end-to-end latency")):
        for r in reports:
            values = np.sort([v for _, v in r[key]])
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=r["policy"])
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (s, log)")
        ax.set_ylabel("fraction of served requests")
        ax.set_title(f"{label} CDF")
        ax.legend(fontsize=8)
    over_time = axes[2]  # latency over the trace: when the cold starts hit, and how each policy recovers
    for r in reports:
        points = sorted(r["ttft_by_arrival"])
        if points:
            over_time.plot([t for t, _ in points], [v for _, v in points], marker=".", linewidth=0.8,
                           label=r["policy"])
    over_time.set_yscale("log")
    over_time.set_xlabel("arrival time in the trace (s)")
    over_time.set_ylabel("TTFT (s, log)")
    over_time.set_title("TTFT over time")
    over_time.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, WorkloadParams(models=4, rate=0.5, duration=120.0, arrivals="gamma", cv=2.0,
                                         lengths="dev", seed=0))
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                        help=f"comma-separated, of {', '.join(REPLAY_POLICIES)} (restart needs --preempt-at)")
    parser.add_argument("--preempt-at", type=float, help="seconds into the trace at which Slurm preempts the busiest "
                        "node (a `high` partition job), in every policy's replay")
    parser.add_argument("--drain", type=float, default=180.0, help="seconds after the last arrival before a request "
                        "that has not finished counts as lost")
    parser.add_argument("--walltime", default="00:30:00", help="Slurm time of the controller's allocations")
    parser.add_argument("--no-compare", action="store_true", help="skip the simulation at dev-cluster size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in REPLAY_POLICIES]
    if unknown or not policies:
        parser.error(f"--policies: unknown {unknown}; choose from {', '.join(REPLAY_POLICIES)}")
    if args.drain <= 0:
        parser.error("--drain must be positive")
    if "restart" in policies and args.preempt_at is None:
        parser.error("--policies restart differs from hpcllm only under preemption: add --preempt-at SECONDS")
    if args.preempt_at is not None and not 0 <= args.preempt_at < args.duration:
        parser.error("--preempt-at must be within the trace: 0 <= SECONDS < --duration")
    if args.lengths != "dev":
        parser.error("--lengths must be dev: the dev cluster's tiny CPU models have 512-1024 positions")
    try:
        wparams = params_from(args)
        models, requests = generate(wparams)
    except ValueError as exc:
        parser.error(f"workload: {exc}")
    if not requests:
        parser.error("the trace has no requests: raise --rate or --duration")

    load_before = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average "
          f"{load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}")
    print(f"workload: {len(requests)} requests over {wparams.duration:.0f} s, {len(models)} models "
          f"({', '.join(f'{m.name}={DEV_SIZE[m.size_class]}' for m in models)}), {wparams.arrivals} arrivals, "
          f"seed {wparams.seed}", flush=True)
    env = ensure_cluster()
    build = Path(tempfile.mkdtemp(prefix="hpcllm-replay-models-", dir="/var/tmp"))
    build.chmod(0o755)
    began = time.perf_counter()
    reports, raw = [], {}
    # Claimed now (creates <stem>.json): the logs folder <stem>-logs and the results are this run's alone.
    stem = new_result_stem(args.out, "replay")
    try:
        sources = build_models(models, build / "models")
        prompts = prompts_for(requests, build / "models" / "hf" / models[0].name / "tokenizer.json")
        shutil.rmtree(build / "models" / "hf")
        for policy in policies:
            t = time.perf_counter()
            report, raw[policy] = replay_policy(policy, models, requests, sources, prompts, env, args.drain,
                                                args.walltime, args.out / f"{stem.name}-logs", args.preempt_at)
            reports.append(report)
            print(f"  {policy}: {report['served']}/{report['requests']} served, {report['allocations']} allocations, "
                  f"errors {report['errors'] or 'none'}; {time.perf_counter() - t:.0f} s", flush=True)
        sizes = {m.name: folder_bytes(sources[m.name]) for m in models}
    except BaseException:
        stem.with_name(f"{stem.name}.json").unlink()  # the empty claim: no result (the logs stay)
        raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
        release_cluster()
    load_after = os.getloadavg()
    print()
    print(table(reports))
    print(f"\nreplay wall time {time.perf_counter() - began:.0f} s; load average after "
          f"{load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f}")

    size_class = {m.name: DEV_SIZE[m.size_class] for m in models}
    try:
        calibration = calibrate(raw, size_class)
    except ValueError as exc:  # e.g. every request lost: nothing to calibrate from; the measurements are kept
        print(f"no calibration for the simulation: {exc}")
        calibration, args.no_compare = None, True
    dev_models = [replace(m, size_class=size_class[m.name], size_bytes=sizes[m.name], gpus=0) for m in models]
    result = {"workload": asdict(wparams), "models": [asdict(m) for m in dev_models],
              "requests": [asdict(r) for r in requests], "reports": reports, "calibration": calibration,
              "walltime": args.walltime, "drain": args.drain, "max_instances": MAX_INSTANCES,
              "preempt_at": args.preempt_at,
              "load_average": {"before": load_before, "after": load_after},
              "raw": raw}
    if not args.no_compare:
        from simulate import compare_with_replay, comparison_table

        simulated = compare_with_replay(result, SEEDS, calibration)
        result["simulated"] = simulated
        print(f"\nsimulated (bench/simulate.py, 4 nodes, costs measured in this run, mean of {SEEDS} seeds) vs "
              f"measured:")
        print(comparison_table(reports, simulated))
    write_results(stem, result, f"dev cluster replay: {len(requests)} requests, {len(models)} models, "
                  f"{wparams.arrivals} arrivals (load average {load_before[0]:.1f})")
    return 0


def write_results(stem: Path, result: dict, title: str) -> None:
    """<stem>.json and <stem>.png (its plot), and those two files, no others, copied to replay-latest.*."""
    made = [stem.with_name(f"{stem.name}.json"), stem.with_name(f"{stem.name}.png")]
    made[0].write_text(json.dumps(result))
    plot(result["reports"], made[1], title)
    for path in made:
        shutil.copyfile(path, path.with_name(f"replay-latest{path.suffix}"))
    print(f"wrote {made[0]} and {made[1].name} (and replay-latest.json, .png)")


if __name__ == "__main__":
    sys.exit(main())
