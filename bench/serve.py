"""Serving throughput and latency under concurrent clients: hpcllm's batched engine vs a baseline, same run.

    .venv/bin/python bench/serve.py [--concurrency 1 4 16 64] [--requests-per-client 2] [--targets batched sequential]

One model (devmodels "small" Llama: 384 hidden, 6 layers, 15.6M parameters, float32), one seeded prompt set with a
realistic length spread (prompt lengths log-normal around ~60 tokens, 8..400; output lengths 16..128, EOS ignored so
every target generates the same number of tokens). For each target a worker is started in its own process (the
real HTTP worker, `--serve-worker`), and for each concurrency level C, C client threads stream requests from the
prompt set back to back (requests-per-client each) through WorkerClient. Per level: output tokens/s (all tokens /
wall time of the level), time to first token and inter-token latency p50/p99 (client-side arrival times of token
lines). Per target: ready seconds (process start to /ready: imports, model load, engine start; a fresh start).

Targets (TARGETS below; add one by writing a class with start() -> url, stream(...), stop()):
- batched: hpcllm's engine as configured by default (continuous batching, paged KV: one forward per step).
- sequential: the same engine with `batching = "sequential"`: one forward per request per step (the engine before
  continuous batching), the baseline measured in the same run.
A vLLM target (engine="vllm" behind hpcllm, or vLLM's own server) fits the same interface.

Output: a table on stdout, bench/results/serve-<time>.json (+ serve-latest.json) and a PNG plot next to it.
On the 2-core dev machine both targets share the cores with the client threads; these are small-model CPU numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpcllm.procs import stop_process  # noqa: E402
from hpcllm.worker.client import WorkerClient  # noqa: E402
from hpcllm.worker.protocol import GenerateRequest, TokenLine  # noqa: E402

SECRET = "bench-serve-secret"
MODEL = "small-llama"
RESULTS = REPO / "bench" / "results"


# ---- the prompt set ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    max_tokens: int


def prompt_set(count: int, vocab_size: int, seed: int) -> list[Prompt]:
    """Seeded prompts: lengths log-normal (median ~60 tokens, clipped 8..400), outputs uniform 16..128."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        length = int(min(400, max(8, rng.lognormvariate(4.1, 0.8))))
        ids = [rng.randrange(3, vocab_size) for _ in range(length)]
        prompts.append(Prompt(ids, rng.randint(16, 128)))
    return prompts


# ---- targets -----------------------------------------------------------------------------------------------------


class WorkerTarget:
    """hpcllm's worker in its own process, with the given [worker] batching mode."""

    def __init__(self, name: str, batching: str, model_dir: Path, max_running: int, work: Path, threads: int):
        self.name, self.batching, self.model_dir, self.work = name, batching, model_dir, work
        self.max_running, self.threads = max_running, threads
        self.process: subprocess.Popen | None = None
        self.ready_seconds = 0.0

    def start(self) -> str:
        url_file = self.work / f"{self.name}.url"
        started = time.monotonic()
        self.process = subprocess.Popen([
            sys.executable, __file__, "--serve-worker", "--model-dir", str(self.model_dir), "--url-file",
            str(url_file), "--batching", self.batching, "--max-running", str(self.max_running),
            "--threads", str(self.threads),
        ])
        deadline = started + 300
        while not url_file.exists():
            self._check_alive(deadline)
            time.sleep(0.02)
        url = url_file.read_text().strip()
        with WorkerClient(url, SECRET) as client:
            while client.ready() is None:
                self._check_alive(deadline)
                time.sleep(0.02)
        self.ready_seconds = time.monotonic() - started
        return url

    def _check_alive(self, deadline: float) -> None:
        if self.process.poll() is not None or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"target {self.name} did not start (exit code {self.process.returncode})")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


TARGETS = {
    "batched": lambda model_dir, max_running, work, threads: WorkerTarget(
        "batched", "auto", model_dir, max_running, work, threads),
    "sequential": lambda model_dir, max_running, work, threads: WorkerTarget(
        "sequential", "sequential", model_dir, max_running, work, threads),
}


def serve_worker(model_dir: Path, url_file: Path, batching: str, max_running: int, threads: int) -> int:
    import logging

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.worker.server import ModelForServing, WorkerService, serve

    torch.set_num_threads(threads)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access-log line per request

    def load() -> ModelForServing:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        return ModelForServing(model, AutoTokenizer.from_pretrained(model_dir), tier="dram")

    service = WorkerService(MODEL, secret=SECRET, keepalive_seconds=1.0, batching=batching,
                            max_running_requests=max_running, max_waiting_requests=1024)
    serve(service, load, url_file=url_file)
    return 0


# ---- clients -----------------------------------------------------------------------------------------------------


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {
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


def run_level(url: str, prompts: list[Prompt], concurrency: int, per_client: int, tag: str) -> LevelResult:
    result = LevelResult(concurrency, concurrency * per_client, 0, 0.0)
    lock = threading.Lock()
    errors: list[str] = []

    def client(index: int) -> None:
        with WorkerClient(url, SECRET, read_timeout=600) as worker:
            for k in range(per_client):
                prompt = prompts[(index * per_client + k) % len(prompts)]
                body = GenerateRequest(request_id=f"{tag}-{index}-{k}", prompt_token_ids=prompt.token_ids,
                                       max_tokens=prompt.max_tokens, temperature=0, ignore_eos=True)
                sent = time.perf_counter()
                arrivals = []
                with worker.generate(body) as stream:
                    for line in stream:
                        if isinstance(line, TokenLine):
                            arrivals.append(time.perf_counter())
                    if stream.final.finish_reason != "length":
                        errors.append(f"{body.request_id}: {stream.final.finish_reason} {stream.final.error}")
                with lock:
                    result.output_tokens += len(arrivals)
                    result.ttft.append(arrivals[0] - sent)
                    result.itl.extend(b - a for a, b in zip(arrivals, arrivals[1:]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return result


# ---- report ------------------------------------------------------------------------------------------------------


def print_table(report: dict) -> None:
    targets = report["targets"]
    print(f"\n{'target':<12} {'ready s':>8}")
    for name, data in targets.items():
        print(f"{name:<12} {data['ready_seconds']:>8.2f}")
    header = f"{'target':<12} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"
    print("\n" + header + "   (latencies in ms)")
    for name, data in targets.items():
        for level in data["levels"]:
            print(f"{name:<12} {level['concurrency']:>7} {level['output_tokens_per_s']:>8.1f} "
                  f"{level['ttft_p50_ms']:>9.1f} {level['ttft_p99_ms']:>9.1f} {level['itl_p50_ms']:>8.1f} "
                  f"{level['itl_p99_ms']:>8.1f}")
    if "batched" in targets and "sequential" in targets:
        print("\nthroughput batched / sequential:", ", ".join(
            f"{b['concurrency']} clients {b['output_tokens_per_s'] / s['output_tokens_per_s']:.2f}x"
            for b, s in zip(targets["batched"]["levels"], targets["sequential"]["levels"])))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, data in report["targets"].items():
        levels = data["levels"]
        clients = [lv["concurrency"] for lv in levels]
        axes[0].plot(clients, [lv["output_tokens_per_s"] for lv in levels], marker="o", label=name)
        axes[1].plot(clients, [lv["ttft_p50_ms"] for lv in levels], marker="o", label=f"{name} p50")
        axes[1].plot(clients, [lv["ttft_p99_ms"] for lv in levels], marker="x", linestyle="--", label=f"{name} p99")
        axes[2].plot(clients, [lv["itl_p50_ms"] for lv in levels], marker="o", label=f"{name} p50")
        axes[2].plot(clients, [lv["itl_p99_ms"] for lv in levels], marker="x", linestyle="--", label=f"{name} p99")
    for ax, title in zip(axes, ("output tokens/s", "time to first token (ms)", "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(f"bench/serve.py: {report['model']} on {report['host']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batching", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--max-running", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each target's worker (default 1: on a shared 2-core box more threads "
                        "than free cores make OpenMP spin and every step slower)")
    parser.add_argument("--model-dir", type=Path, default=None, help="a HF model folder (default: build devmodels "
                        "small llama in a temporary folder)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.serve_worker:
        return serve_worker(args.model_dir, args.url_file, args.batching, args.max_running, args.threads)

    with tempfile.TemporaryDirectory(prefix="hpcllm-bench-serve-") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            from hpcllm.devmodels import make_model

            model_dir = make_model("llama", work / "small-llama", size="small")
        from transformers import AutoConfig

        vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
        prompts = prompt_set(max(args.concurrency) * args.requests_per_client, vocab_size, args.seed)
        max_running = max(args.concurrency)
        report = {
            "model": MODEL, "prompts": len(prompts), "seed": args.seed,
            "requests_per_client": args.requests_per_client, "threads": args.threads,
            "host": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
            "targets": {},
        }
        for name in args.targets:
            target = TARGETS[name](model_dir, max_running, work, args.threads)
            url = target.start()
            try:
                run_level(url, prompts, 1, 1, f"{name}-warmup")  # first-call costs out of the measurement
                levels = []
                for concurrency in args.concurrency:
                    level = run_level(url, prompts, concurrency, args.requests_per_client, f"{name}-c{concurrency}")
                    levels.append(level.summary())
                    print(f"{name}: {levels[-1]}", flush=True)
                report["targets"][name] = {"ready_seconds": round(target.ready_seconds, 2), "levels": levels}
            finally:
                target.stop()
    print_table(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for stem in (f"serve-{stamp}", "serve-latest"):
        (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
        plot(report, RESULTS / f"{stem}.png")
    print(f"\nwrote {RESULTS / f'serve-{stamp}.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
