"""Serving throughput and latency under concurrent clients: hpcllm's engine, vLLM behind hpcllm, vLLM direct.

    PYTHONPATH=$PWD .venv/bin/python bench/serve.py [--concurrency 1 4 16 64] [--requests-per-client 2]
        [--targets hpcllm vllm-behind-hpcllm vllm-direct] [--threads N] [--spare-runs 2] [--rounds N]
        [--baseline REV] [--worker-setting KEY=VALUE ...] [--isolate-engine] [--sampling JSON]

One model (devmodels "small" Llama: 384 hidden, 6 layers, head size 64, float32 everywhere), one seeded prompt set
with a realistic length spread (prompt lengths log-normal around ~60 tokens, 8..400; output lengths 16..128, EOS
ignored so every target generates the same tokens), greedy. Every target is measured the same way, the way users
reach it: C client threads (C = 1, 4, 16, 64) stream `/v1/completions` (prompt as token ids, stream_options
include_usage) back to back, requests-per-client each. Per level: output tokens/s (usage tokens of all requests /
wall time of the level), time to first token and inter-token latency p50/p99 (client-side arrival times of SSE
chunks carrying text).

Targets (each started once; TARGETS below):
- hpcllm: `hpcllm worker` (hpcllm's engine, continuous batching, paged KV, the forward in a model process: the CPU
  default) behind `hpcllm gateway`.
- hpcllm-sequential: the same with `batching = "sequential"` (one forward per request per step; not by default).
- hpcllm-in-process: the same with `model_process = false` (the forward in the worker process, as before the model
  process became the CPU default).
- hpcllm-sync: the same with `async_scheduling = false` (each step scheduled once the previous one's tokens are
  committed, as before asynchronous scheduling).
- vllm-behind-hpcllm: `hpcllm worker --engine vllm` (vLLM in the worker, weights via hpcllm's loader) behind
  `hpcllm gateway`.
- vllm-direct: vLLM's own OpenAI server on the Hugging Face folder (the anchor); ratios are printed against it.
Workers are started as the node agent starts them (hpcllm.worker.vllm_launch.start_worker); both engines get the
same CPUs (--threads; vLLM's OpenMP threads bound to the same cores via VLLM_CPU_OMP_THREADS_BIND).

Engine start times: each target's process start -> ready (fresh, model load included; vLLM's is its whole engine
start), and hpcllm's engine from a fresh worker process vs a spare worker through the node agent's WorkerManager
(bench/coldstart.py's measurement, --spare-runs rounds).

Per level also the CPU seconds each target process spent (worker, gateway or vLLM's server, children such as vLLM's
engine core included), the worker's or vLLM server's process alone (HTTP and vLLM's front end, without vLLM's
engine-core and model-runner processes) and the client threads: on a shared machine whose load drifts, CPU time per
generated token says where a target's cost lies better than wall time. --rounds N interleaves the targets (all up at
once). --baseline REV adds each hpcllm target as run by revision REV's hpcllm ("<target>@<commit>") and prints this
tree's throughput against it: a change's effect measured under the same load, which two separate runs cannot show
on a shared machine (vLLM direct alone moved 1381-1735 tok/s between runs of one hour). --worker-setting KEY=VALUE
sets a [worker] config key of this tree's hpcllm targets only (not the baseline's, which may not know the key): a
setting's effect against the baseline's default, in the same run. --isolate-engine (with
--rounds; hpcllm, vllm-behind-hpcllm, vllm-direct and their baselines) gives the processes that run the forward
passes (vLLM's model-runner worker, hpcllm's model process) the first --threads CPUs to themselves and every other
process (gateways, hpcllm workers, vLLM's API server and engine-core scheduler, the clients) the rest: a front's CPU
(a gateway hop, an API server) then no longer comes out of the engine's, as on a node whose engine has cores (or a
GPU) of its own.

Output: a table on stdout, bench/results/serve-<time>.json (+ serve-latest.json) and a PNG plot next to each.
On the shared 2-core dev machine targets, gateway and client threads share the cores; these are small-model CPU
numbers, and the machine's load average is recorded with them.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import coldstart  # noqa: E402
from bench.benchkit import new_result_stem, require_at_least  # noqa: E402
from bench.clients import run_clients  # noqa: E402
from bench.revisions import export_revision  # noqa: E402
from hpcllm.config import load_config  # noqa: E402
from hpcllm.errors import ConfigError  # noqa: E402
from hpcllm.worker.vllm_launch import StartedServer, start_vllm_openai_server, start_worker, vllm_python  # noqa: E402

SECRET = "bench-serve-secret"
MODEL = "small-llama"
RESULTS = REPO / "bench" / "results"
ANCHOR = "vllm-direct"


# ---- the prompt set ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    max_tokens: int
    sampling: dict = field(default_factory=dict)  # --sampling: OpenAI parameters added to the request


MAX_OUTPUT_TOKENS = 128  # a prompt's output length is drawn from 16..this


def prompt_set(count: int, vocab_size: int, seed: int, lengths: tuple[int, int] | None = None,
               sampling: dict | None = None) -> list[Prompt]:
    """Seeded prompts: lengths log-normal (median ~60 tokens, clipped 8..400), or uniform in `lengths` (long-context
    runs); outputs uniform 16..MAX_OUTPUT_TOKENS."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        length = (rng.randint(*lengths) if lengths else int(min(400, max(8, rng.lognormvariate(4.1, 0.8)))))
        ids = [rng.randrange(3, vocab_size) for _ in range(length)]
        prompts.append(Prompt(ids, rng.randint(16, MAX_OUTPUT_TOKENS), dict(sampling or {})))
    return prompts


# ---- targets -----------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    checkpoint: Path  # converted (hpcllm's format): what hpcllm's workers load
    hf_dir: Path  # the same model as a Hugging Face folder: what vLLM's own server loads
    max_running: int
    threads: int
    work: Path
    vllm_python: str  # the interpreter with vllm (docs/vllm.md)
    engine_cpus: list[int]  # the first --threads CPUs of the bench's own
    front_cpus: list[int] | None = None  # --isolate-engine: every other process's CPUs (None: all CPUs)
    worker_settings: dict = field(default_factory=dict)  # --worker-setting: this tree's hpcllm workers only

    def cpu_env(self) -> dict:
        """vLLM binds its OpenMP threads itself (auto may reserve a core): the same cores as hpcllm's threads."""
        return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, self.engine_cpus))}


def engine_and_front_cpus(threads: int) -> tuple[list[int], list[int]]:
    """--isolate-engine: the first `threads` CPUs for the engines, the rest for everything else (a clear error when
    none are left)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) <= threads:
        raise ConfigError(f"--isolate-engine needs more CPUs than the engine's {threads} (lower --threads)")
    return cpus[:threads], cpus[threads:]


def children_of(pid: int) -> list[int]:
    """The children of pid, started by any of its threads (vLLM's engine core is a child of the worker or server)."""
    return [int(k) for task in Path(f"/proc/{pid}/task").iterdir() for k in (task / "children").read_text().split()]


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants alive now."""
    try:
        kids = children_of(pid)
    except OSError:  # gone
        return []
    return [pid] + [p for kid in kids for p in process_tree(kid)]


def is_engine_process(pid: int) -> bool:
    """Where the forward passes run: vLLM's model-runner worker (it names itself VLLM::Worker; its engine core,
    VLLM::EngineCore, schedules and stays with the front, as vLLM's own CPU binding reserves a core for it) or
    hpcllm's model process (a multiprocessing child spawned by the worker)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return comm.startswith("VLLM::Worker") or b"spawn_main" in cmdline


def pin_process(pid: int, cpus: list[int]) -> None:
    """Every thread of pid on cpus (threads started later inherit their starter's CPUs); a thread that ended
    meanwhile is skipped, any other refusal raises. Checked on the process's main thread."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)
    if sorted(os.sched_getaffinity(pid)) != sorted(cpus):
        raise RuntimeError(f"--isolate-engine: process {pid} did not move to CPUs {cpus}")


def isolate_engines(roots: dict[str, list[int]], engine_cpus: list[int],
                    front_cpus: list[int]) -> dict[str, list[str]]:
    """--isolate-engine, once the targets serve: their engine processes (and every thread of them) on engine_cpus,
    their other processes and this one (the client threads) on front_cpus, so a front's CPU no longer comes out of
    an engine's. Started unpinned, vLLM binds its OpenMP threads itself (VLLM_CPU_OMP_THREADS_BIND); a process
    restricted before it started would not be allowed to. roots: per target, its processes' pids. Returns, per
    target, its processes as 'pid:engine' or 'pid:front'."""
    placed: dict[str, list[str]] = {}
    for name, pids in roots.items():
        tree = [pid for root in pids for pid in process_tree(root)]
        engines = [pid for pid in tree if is_engine_process(pid)]
        if not engines:
            raise RuntimeError(f"--isolate-engine: found no engine process under {name} (pids {pids})")
        for pid in tree:
            pin_process(pid, engine_cpus if pid in engines else front_cpus)
        placed[name] = [f"{pid}:{'engine' if pid in engines else 'front'}" for pid in tree]
    pin_process(os.getpid(), front_cpus)
    return placed


class Target(abc.ABC):
    """start() -> the OpenAI base URL (ending in /v1); start_seconds: the engine's process start -> ready."""

    name = ""
    start_seconds = 0.0

    @abc.abstractmethod
    def start(self) -> str:
        """Start the target's processes; the OpenAI base URL once it serves."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop every process start() started."""

    @abc.abstractmethod
    def processes(self) -> dict[str, int]:
        """Role -> pid of the target's processes (their children count with them: vLLM's engine core)."""

    # Roles whose process alone is also reported ("<role> alone": HTTP and vLLM's front end, without the engine-core
    # and model-runner processes under it): where hpcllm's layer and vLLM's own server differ.
    alone = ("worker", "server")


class BehindGateway(Target):
    """A worker (engine hpcllm or vllm) started as the node agent starts it, behind `hpcllm gateway`."""

    def __init__(self, name: str, engine: str, setup: Setup, batching: str = "auto",
                 model_process: bool | str = "auto", async_scheduling: bool = True):
        self.name, self.engine, self.setup, self.batching = name, engine, setup, batching
        self.model_process, self.async_scheduling = model_process, async_scheduling
        self.tree = REPO  # whose hpcllm the worker and the gateway run (--baseline: another revision's)
        self.worker: StartedServer | None = None
        self.gateway: StartedServer | None = None

    def start(self) -> str:
        s = self.setup
        settings = {"max_running_requests": s.max_running, "max_waiting_requests": 1024, "batching": self.batching,
                    "model_process": self.model_process, "async_scheduling": self.async_scheduling,
                    "vllm_max_num_seqs": s.max_running, "vllm_kv_cache_gb": 1.0, "keepalive_seconds": 1.0}
        if self.tree == REPO:
            settings.update(s.worker_settings)
        self.worker = start_worker(s.checkpoint, engine=self.engine, name=MODEL, secret=SECRET,
                                   python=s.vllm_python if self.engine == "vllm" else None, threads=s.threads,
                                   worker_settings=settings, env=s.cpu_env(), log_dir=make_dir(s.work / self.name),
                                   source_tree=self.tree)
        self.start_seconds = self.worker.start_seconds
        self.gateway = start_gateway(self.worker.url, s.checkpoint, s.max_running, s.work / f"{self.name}-gateway",
                                     self.tree, self.engine)
        return self.gateway.url + "/v1"

    def stop(self) -> None:
        for server in (self.gateway, self.worker):
            if server is not None:
                server.stop()

    def processes(self) -> dict[str, int]:
        return {"worker": self.worker.process.pid, "gateway": self.gateway.process.pid}


class VllmDirect(Target):
    """vLLM's own OpenAI server (the anchor), same dtype, eager mode, max_num_seqs, KV size and cores."""

    name = ANCHOR

    def __init__(self, setup: Setup):
        self.setup = setup
        self.server: StartedServer | None = None

    def start(self) -> str:
        s = self.setup
        self.server = start_vllm_openai_server(s.hf_dir, name=MODEL, max_num_seqs=s.max_running, kv_cache_gb=1.0,
                                               python=s.vllm_python, env=s.cpu_env(),
                                               log_dir=make_dir(s.work / self.name))
        self.start_seconds = self.server.start_seconds
        return self.server.url + "/v1"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def processes(self) -> dict[str, int]:
        return {"server": self.server.process.pid}


# Targets whose forward passes run in processes of their own (vLLM's model runner, hpcllm's model process).
ISOLATABLE = ("hpcllm", "vllm-behind-hpcllm", ANCHOR)

TARGETS = {
    "hpcllm": lambda setup: BehindGateway("hpcllm", "hpcllm", setup),
    "hpcllm-sequential": lambda setup: BehindGateway("hpcllm-sequential", "hpcllm", setup, batching="sequential"),
    "hpcllm-in-process": lambda setup: BehindGateway("hpcllm-in-process", "hpcllm", setup, model_process=False),
    "hpcllm-sync": lambda setup: BehindGateway("hpcllm-sync", "hpcllm", setup, async_scheduling=False),
    "vllm-behind-hpcllm": lambda setup: BehindGateway("vllm-behind-hpcllm", "vllm", setup),
    ANCHOR: VllmDirect,
}


def start_gateway(worker_url: str, source: Path, max_running: int, work: Path, tree: Path = REPO,
                  engine: str = "hpcllm") -> StartedServer:
    """`hpcllm gateway` (gunicorn, one process, a thread per stream) with the worker as a static model; tree: the
    folder whose hpcllm it runs; engine: the worker's (its `engine` setting, given to this tree's gateway only: a
    baseline's may not know the key, and the completions measured here go to the one model either way)."""
    work = make_dir(work)
    port = free_port()
    config = work / "gateway.toml"
    config.write_text(
        # dev = true: a local measurement on loopback, with an open API (no keys) and a bench-only secret
        f'[paths]\nstate_dir = "{work / "state"}"\n[cluster]\ndev = true\nshared_secret = "{SECRET}"\n'
        f'[gateway]\nhost = "127.0.0.1"\nport = {port}\nworkers = 1\nthreads = {2 * max_running + 8}\n'
        f'[gateway.static_models.{MODEL}]\nworker_url = "{worker_url}"\nsource = "{source}"\n'
        + (f'engine = "{engine}"\n' if tree == REPO else ""))
    config.chmod(0o600)
    log_path = work / "gateway.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "hpcllm.cli.main", "gateway", "--config", str(config)],
                                   env={**os.environ, "PYTHONPATH": str(tree)}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = started + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return StartedServer(process, url, log_path, time.monotonic() - started)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the gateway was not ready after 120 s; log: {log_path}")


def make_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- clients -----------------------------------------------------------------------------------------------------


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process role during the level

    def summary(self) -> dict:
        return {
            "cpu_seconds": {role: round(seconds, 2) for role, seconds in self.cpu.items()},
            "concurrency": self.concurrency, "requests": self.requests, "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 3), "output_tokens_per_s": round(self.output_tokens / self.seconds, 1),
            "ttft_p50_ms": round(1000 * percentile(self.ttft, 50), 1),
            "ttft_p99_ms": round(1000 * percentile(self.ttft, 99), 1),
            "itl_p50_ms": round(1000 * percentile(self.itl, 50), 1),
            "itl_p99_ms": round(1000 * percentile(self.itl, 99), 1),
        }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def sse_chunks(http: httpx.Client, url: str, body: dict):
    """The JSON chunks of one streamed OpenAI completion (SSE `data:` lines, `[DONE]` left out), as they arrive."""
    with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def stream_completion(http: httpx.Client, base_url: str, prompt: Prompt) -> tuple[float, list[float], int]:
    """One streamed greedy completion: (send time, arrival times of chunks carrying text, usage completion tokens)."""
    body = {"model": MODEL, "prompt": prompt.token_ids, "max_tokens": prompt.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **prompt.sampling}
    sent = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    for chunk in sse_chunks(http, f"{base_url}/completions", body):
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            arrivals.append(time.perf_counter())
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    if tokens != prompt.max_tokens or not arrivals:
        raise RuntimeError(f"got {tokens} tokens ({len(arrivals)} text chunks), asked for {prompt.max_tokens}")
    return sent, arrivals, tokens


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU time of a process (threads that ended included) and, with children, of all its
    descendants alive now."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        kids = children_of(pid) if children else []
    except OSError:  # gone
        return 0.0
    return total + sum(cpu_seconds(kid) for kid in kids)


def measured_level(target: Target, url: str, prompts: list[Prompt], concurrency: int, per_client: int) -> LevelResult:
    """run_level, plus the CPU seconds each of the target's processes (and the client threads, i.e. this process
    without its children, the targets) spent on it."""
    pids = target.processes()

    def sample() -> dict[str, float]:
        return {**{role: cpu_seconds(pid) for role, pid in pids.items()},
                **{f"{role} alone": cpu_seconds(pid, children=False) for role, pid in pids.items()
                   if role in target.alone},
                "client": cpu_seconds(os.getpid(), children=False)}

    before = sample()
    level = run_level(url, prompts, concurrency, per_client)
    after = sample()
    level.cpu = {role: after[role] - before[role] for role in before}
    return level


def run_level(base_url: str, prompts: list[Prompt], concurrency: int, per_client: int) -> LevelResult:
    result = LevelResult(concurrency, concurrency * per_client, 0, 0.0)
    lock = threading.Lock()
    errors: list[str] = []

    def client(index: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(600, connect=30)) as http:
            for k in range(per_client):
                try:
                    sent, arrivals, tokens = stream_completion(http, base_url,
                                                               prompts[(index * per_client + k) % len(prompts)])
                except (RuntimeError, httpx.HTTPError) as exc:
                    errors.append(f"client {index} request {k}: {exc}")
                    return
                with lock:
                    result.output_tokens += tokens
                    result.ttft.append(arrivals[0] - sent)
                    result.itl.extend(b - a for a, b in zip(arrivals, arrivals[1:]))

    result.seconds = run_clients(client, concurrency)
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return result


# ---- report ------------------------------------------------------------------------------------------------------


def print_table(report: dict) -> None:
    targets = report["targets"]
    print(f"\n{'target':<20} {'ready s (fresh process)':>24}")
    for name, data in targets.items():
        print(f"{name:<20} {data['start_seconds']:>24.2f}")
    if "hpcllm_engine_start" in report:
        start = report["hpcllm_engine_start"]
        print(f"hpcllm engine via the node agent, median of {start['runs']}: fresh worker {start['fresh_median_s']:.2f}"
              f" s, spare worker {start['spare_median_s']:.2f} s (target <= 0.5 s)")
    header = (f"{'target':<20} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
              f"{'ITL p99':>8}")
    print("\n" + header + "   (latencies in ms; CPU seconds per process during the level)")
    for name, data in targets.items():
        for level in data["levels"]:
            cpu = ", ".join(f"{role} {seconds:.1f}" for role, seconds in level.get("cpu_seconds", {}).items())
            print(f"{name:<20} {level['concurrency']:>7} {level['output_tokens_per_s']:>8.1f} "
                  f"{level['ttft_p50_ms']:>9.1f} {level['ttft_p99_ms']:>9.1f} {level['itl_p50_ms']:>8.1f} "
                  f"{level['itl_p99_ms']:>8.1f}   {cpu} (wall {level['seconds']:.1f})")
    for name, ratios in report.get("throughput_vs_anchor", {}).items():
        print(f"throughput {name} / {ANCHOR}: " + ", ".join(f"{c} clients {r:.2f}x" for c, r in ratios.items()))
    for pair, ratios in report.get("throughput_vs_baseline", {}).items():
        print(f"throughput {pair}: " + ", ".join(f"{c} clients {r:.2f}x" for c, r in ratios.items()))


def add_baseline_targets(names: list[str], tree: Path, commit: str) -> list[str]:
    """For each hpcllm target (worker and gateway from this tree), the same target running `tree`'s hpcllm, named
    "<target>@<commit>"; returns the names to measure, each baseline after its target."""
    measured = []
    for name in names:
        measured.append(name)
        if name == ANCHOR:
            continue
        baseline = f"{name}@{commit}"

        def make(setup: Setup, name=name, baseline=baseline) -> Target:
            target = TARGETS[name](setup)
            target.name, target.tree = baseline, tree
            return target

        TARGETS[baseline] = make
        measured.append(baseline)
    return measured


def baseline_ratios(targets: dict) -> dict:
    """Per target with a baseline twin ("<target>@<commit>"), output tokens/s / the twin's at each concurrency."""
    ratios = {}
    for name, data in targets.items():
        twin = next((other for other in targets if other.startswith(name + "@")), None)
        if twin is None:
            continue
        base = {lv["concurrency"]: lv["output_tokens_per_s"] for lv in targets[twin]["levels"]}
        ratios[f"{name} / {twin}"] = {lv["concurrency"]: round(lv["output_tokens_per_s"] / base[lv["concurrency"]], 3)
                                      for lv in data["levels"] if lv["concurrency"] in base}
    return ratios


def throughput_ratios(targets: dict) -> dict:
    """Per target, output tokens/s / the anchor's at each concurrency (same run)."""
    if ANCHOR not in targets:
        return {}
    anchor = {lv["concurrency"]: lv["output_tokens_per_s"] for lv in targets[ANCHOR]["levels"]}
    return {name: {lv["concurrency"]: round(lv["output_tokens_per_s"] / anchor[lv["concurrency"]], 3)
                   for lv in data["levels"] if lv["concurrency"] in anchor}
            for name, data in targets.items() if name != ANCHOR}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for index, (name, data) in enumerate(report["targets"].items()):
        levels, color = data["levels"], f"C{index}"
        clients = [lv["concurrency"] for lv in levels]
        axes[0].plot(clients, [lv["output_tokens_per_s"] for lv in levels], marker="o", color=color, label=name)
        for ax, metric in ((axes[1], "ttft"), (axes[2], "itl")):
            ax.plot(clients, [lv[f"{metric}_p50_ms"] for lv in levels], marker="o", color=color, label=f"{name} p50")
            ax.plot(clients, [lv[f"{metric}_p99_ms"] for lv in levels], marker="x", linestyle="--", color=color,
                    label=f"{name} p99")
    for ax, title in zip(axes, ("output tokens/s", "time to first token (ms)", "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(f"bench/serve.py: {report['model']} ({report['dtype']}) on {report['host']['cpus']} shared CPUs, "
                 f"{report['threads']} thread(s) per engine, load avg {report['host']['load_average_at_start'][0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def engine_start(runs: int) -> dict:
    """hpcllm's engine from a fresh worker process vs a spare one, through the node agent (bench/coldstart.py)."""
    times, loads = coldstart.measure(coldstart.checkpoint("small"), "nvme", runs)
    return {"runs": runs, "tier": "nvme", "fresh_s": times["fresh"], "spare_s": times["spare"],
            "fresh_median_s": round(statistics.median(times["fresh"]), 3),
            "spare_median_s": round(statistics.median(times["spare"]), 3)}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def start(name: str, target: Target, prompts: list[Prompt]) -> str:
    print(f"{name}: starting", flush=True)
    url = target.start()
    print(f"{name}: ready after {target.start_seconds:.1f} s", flush=True)
    run_level(url, prompts, 1, 1)  # first-call costs out of the measurement
    return url


def measure_interleaved(setup: Setup, args, report: dict, prompt_sets: list[list[Prompt]]) -> dict:
    """All targets up at once; per concurrency level, `rounds` rounds, each running the level on every target in
    turn (round r with prompt set r, so prefix caches do not serve a repeated prompt). On a machine whose load
    drifts (other users), every target then sees the same load mix. A target's level pools its rounds: tokens and
    seconds summed, TTFT and ITL samples together."""
    targets = {name: TARGETS[name](setup) for name in args.targets}
    urls: dict[str, str] = {}
    try:
        for name, target in targets.items():
            urls[name] = start(name, target, prompt_sets[0])
        if setup.front_cpus is not None:
            placed = isolate_engines({name: list(target.processes().values()) for name, target in targets.items()},
                                     setup.engine_cpus, setup.front_cpus)
            report["isolate_engine"] = {"engine_cpus": setup.engine_cpus, "front_cpus": setup.front_cpus,
                                        "processes": placed}
            print(f"isolated: engines on CPUs {setup.engine_cpus}, the rest on {setup.front_cpus}: {placed}",
                  flush=True)
        results: dict[str, list[dict]] = {name: [] for name in targets}
        for concurrency in args.concurrency:
            pooled = {name: LevelResult(concurrency, 0, 0, 0.0) for name in targets}
            loads = []
            for round_index in range(args.rounds):
                order = list(targets) if round_index % 2 == 0 else list(reversed(targets))  # no fixed first place
                for name in order:
                    loads.append(load_average())
                    level = measured_level(targets[name], urls[name], prompt_sets[round_index], concurrency,
                                           args.requests_per_client)
                    total = pooled[name]
                    for role, seconds in level.cpu.items():
                        total.cpu[role] = total.cpu.get(role, 0.0) + seconds
                    total.requests += level.requests
                    total.output_tokens += level.output_tokens
                    total.seconds += level.seconds
                    total.ttft += level.ttft
                    total.itl += level.itl
                    print(f"{name} round {round_index + 1}: {level.summary()}", flush=True)
            for name, total in pooled.items():
                results[name].append({**total.summary(), "load_averages": loads})
                print(f"{name}: {results[name][-1]['output_tokens_per_s']} tok/s over {args.rounds} rounds", flush=True)
        return {name: {"start_seconds": round(targets[name].start_seconds, 2), "levels": results[name]}
                for name in targets}
    finally:
        for target in targets.values():
            target.stop()


def parse_worker_settings(pairs: list[str]) -> dict:
    """--worker-setting KEY=VALUE pairs as [worker] settings: VALUE as JSON where it parses (128, true, "auto"),
    else the string."""
    settings = {}
    for setting in pairs:
        key, equals, value = setting.partition("=")
        if not equals or not key:
            raise ValueError(f"--worker-setting takes KEY=VALUE, not {setting!r}")
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
        settings[key] = value
    return settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1,
                        help="compute threads of every target's engine, on the same cores (default 1: on the shared "
                        "2-core box two OpenMP threads against other load made hpcllm's decode step ~8x slower)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=["hpcllm", "vllm-behind-hpcllm", ANCHOR],
                        choices=list(TARGETS))
    parser.add_argument("--spare-runs", type=int, default=2,
                        help="fresh/spare start rounds of hpcllm's engine through the node agent (0: skip)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="start all targets at once and run each level this many times per target, the targets "
                        "taking turns (fairer ratios while other users' load drifts; needs the memory of all targets "
                        "together). 0 (default): one target after the other, each level once")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also run each hpcllm target from git revision REV (worker and gateway, exported with "
                        "git archive), named <target>@<commit>, and print this tree's throughput against it; best "
                        "with --rounds, so both see the same load")
    parser.add_argument("--worker-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a [worker] config key for this tree's hpcllm targets (not --baseline's), VALUE as JSON "
                        "where it parses (else a string); repeatable, e.g. --worker-setting prefill_chunk_tokens=128")
    parser.add_argument("--isolate-engine", action="store_true",
                        help="with --rounds: the processes running the forward passes (vLLM's model runner, hpcllm's "
                        "model process) get the first --threads CPUs to themselves, every other process (gateways, "
                        "workers, vLLM's API server and scheduler, the clients) the others, as a CPU node set up for "
                        "serving would (default: all processes on all CPUs, the engines' OpenMP threads bound to the "
                        "first --threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=None,
                        help="hpcllm config whose worker.vllm_python names the vLLM interpreter (default: "
                        "$HPCLLM_CONFIG, else <checkout>/.venv-vllm)")
    parser.add_argument("--vllm-python", default=None, help="the vLLM interpreter (overrides the config's)")
    parser.add_argument("--sampling", type=json.loads, default={}, metavar="JSON",
                        help="OpenAI parameters added to every request, e.g. '{\"frequency_penalty\": 0.5}' (requests "
                        "stay greedy: temperature 0)")
    parser.add_argument("--prompt-lengths", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                        help="prompt lengths uniform in LO..HI tokens (long-context runs) instead of the default "
                        "log-normal set (median ~60)")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "threads", "concurrency", "requests_per_client")
    require_at_least(parser, args, 0, "spare_runs", "rounds")
    if args.isolate_engine:
        if not args.rounds:
            parser.error("--isolate-engine needs --rounds (the targets start unpinned, all before the first level)")
        if not set(args.targets) <= set(ISOLATABLE):
            parser.error(f"--isolate-engine takes {', '.join(ISOLATABLE)}: targets whose forward passes run in a "
                         "process of their own")
        engine_cpus, front_cpus = engine_and_front_cpus(args.threads)
    else:
        engine_cpus, front_cpus = sorted(os.sched_getaffinity(0))[:args.threads], None
    try:
        worker_settings = parse_worker_settings(args.worker_setting)
    except ValueError as exc:
        parser.error(str(exc))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the started servers on the way out

    vllm_interpreter = args.vllm_python
    if any(name.startswith("vllm") for name in args.targets) and not vllm_interpreter:
        vllm_interpreter = vllm_python(load_config(args.config))  # a clear error when there is none
    checkpoint = coldstart.checkpoint("small")  # converted; its Hugging Face folder lies beside it
    hf_dir = coldstart.WORK / "llama-small-hf"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    lengths = tuple(args.prompt_lengths) if args.prompt_lengths else None
    longest_prompt = config.max_position_embeddings - MAX_OUTPUT_TOKENS
    if lengths and not 1 <= lengths[0] <= lengths[1] <= longest_prompt:
        parser.error(f"--prompt-lengths must be 1 <= LO <= HI <= {longest_prompt} (the model's context less the "
                     "longest output)")
    if not isinstance(args.sampling, dict):
        parser.error("--sampling takes a JSON object of OpenAI request parameters")
    prompts = prompt_set(max(args.concurrency) * args.requests_per_client, config.vocab_size, args.seed, lengths,
                         args.sampling)
    report = {
        "model": MODEL, "dtype": str(config.dtype), "prompts": len(prompts), "seed": args.seed,
        "prompt_tokens_median": statistics.median(len(p.token_ids) for p in prompts),
        "requests_per_client": args.requests_per_client, "threads": args.threads, "sampling": args.sampling,
        "worker_settings": worker_settings,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                 "load_average_at_start": load_average()},
        "targets": {},
    }
    if args.spare_runs:
        report["hpcllm_engine_start"] = engine_start(args.spare_runs)
    with tempfile.TemporaryDirectory(prefix="hpcllm-bench-serve-") as tmp:
        if args.baseline:
            commit = export_revision(args.baseline, Path(tmp) / "baseline")
            args.targets = add_baseline_targets(args.targets, Path(tmp) / "baseline", commit)
            report["baseline"] = commit
        setup = Setup(checkpoint, hf_dir, max(args.concurrency), args.threads, Path(tmp), vllm_interpreter,
                      engine_cpus, front_cpus, worker_settings)
        if args.rounds:
            report["rounds"] = args.rounds
            report["targets"] = measure_interleaved(setup, args, report, [prompts] + [
                prompt_set(len(prompts), config.vocab_size, args.seed + r, lengths, args.sampling)
                for r in range(1, args.rounds)])
        else:
            for name in args.targets:
                target = TARGETS[name](setup)
                url = start(name, target, prompts)
                try:
                    levels = []
                    for concurrency in args.concurrency:
                        before = load_average()
                        level = measured_level(target, url, prompts, concurrency, args.requests_per_client)
                        levels.append({**level.summary(), "load_average_before": before})
                        print(f"{name}: {levels[-1]}", flush=True)
                    report["targets"][name] = {"start_seconds": round(target.start_seconds, 2), "levels": levels}
                finally:
                    target.stop()
    report["throughput_vs_anchor"] = throughput_ratios(report["targets"])
    if args.baseline:
        report["throughput_vs_baseline"] = baseline_ratios(report["targets"])
    report["host"]["load_average_at_end"] = load_average()
    print_table(report)
    run_stem = new_result_stem(RESULTS, "serve")
    for stem in (run_stem, RESULTS / "serve-latest"):
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
        plot(report, stem.with_suffix(".png"))
    print(f"\nwrote {run_stem}.json and .png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
