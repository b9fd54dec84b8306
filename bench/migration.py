"""Client-visible pause of live migration vs stop-and-resume from tokens, through the gateway.

    .venv/bin/python bench/migration.py [--runs 3] [--prompt-tokens 900] [--device cpu|cuda]

Setup (real HTTP): two hpcllm workers A and B, each its own process pinned to its own half of the CPUs (standing in
for two nodes; in one process their forwards would fight over the GIL and torch's thread pool), serving the same
devmodels "small" Llama (384 hidden, 6 layers, 1024 positions); a gateway in this process with a router that sends
new requests to A and re-routed ones to B; and a streaming client reading the gateway's SSE. Each run streams one greedy completion of a
long prompt from A; after `--trigger-after` events the request is moved to B by one of two methods:

- stop_and_resume (what the gateway did before live migration, and still does when a worker dies): cancel the
  request on A; A's stream ends with "abort"; the gateway routes again and asks B to generate with
  resume_token_ids = the tokens delivered, so B prefills the whole context before its next token.
- live: POST /v1/internal/requests/<id>/migrate on A with B as destination: B prefills the context in rounds while
  A keeps decoding; at the hand-over A pauses, B prefills the last couple of tokens, A's stream ends with
  "migrated", and the gateway attaches to B, which samples the next token from its cache.

The pause is what the client sees: the longest gap between two SSE events from the trigger on (the gap that holds
the hand-over, or a slow step while the workers share the machine). The typical gap between events before the
trigger, and for live runs the gateway's own hand-over gap (hpcllm_migration_pause_seconds: last token from A to
first from B) are recorded too. Methods alternate run by run;
one unmeasured run of each method comes first (first-call costs of both code paths). The medians, their ratio,
and whether every run's text equals an uninterrupted run are printed and written to
bench/results/migration-<time>.json (and, for a passing run - every move done, every text equal - to
migration-latest.json, which bench/simulate.py reads).

On the 2-core dev machine each worker gets one core, shared with whatever else runs there; these are small-model
CPU numbers. The ratio grows with the context (a re-prefill is O(context), the hand-over is not).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from bench.benchkit import new_result_stem, require_at_least  # noqa: E402
from hpcllm.config import parse_config  # noqa: E402
from hpcllm.gateway.errors import ModelNotFound  # noqa: E402
from hpcllm.gateway.routing import Endpoint, ModelCard, Router  # noqa: E402
from hpcllm.procs import stop_process  # noqa: E402
from hpcllm.worker.client import WorkerClient, WorkerError  # noqa: E402
from hpcllm.worker.migration import ticketed_request  # noqa: E402

RESULTS = REPO / "bench" / "results"
MODEL = "small-llama"
SECRET = "bench-migration-secret"
METHODS = ("live", "stop_and_resume")


class SwitchRouter(Router):
    """Sends every request to `url`; the bench points it at B before moving a request, so re-routing lands there."""

    def __init__(self, source: Path, max_model_len: int, url: str):
        self.card = ModelCard(name=MODEL, source=source, max_model_len=max_model_len, created=0)
        self.url = url

    def list_models(self):
        return [self.card]

    def resolve(self, model, wait_s):
        if model != MODEL:
            raise ModelNotFound(model, [MODEL])
        return Endpoint(model=model, instance_id=self.url, worker_url=self.url)

    def check_ready(self):
        return None


class WorkerProcess:
    """`bench/migration.py --serve-worker`: one worker in its own process, pinned to `cpus`."""

    def __init__(self, model_dir: Path, device: str, cpus: set[int], work: Path, name: str):
        url_file = work / f"{name}.url"
        command = [sys.executable, __file__, "--serve-worker", "--model-dir", str(model_dir), "--device", device,
                   "--url-file", str(url_file), "--threads", str(len(cpus))]
        self.process = subprocess.Popen(command, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        deadline = time.monotonic() + 300
        while not url_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker {name} did not start (exit code {self.process.returncode})")
            time.sleep(0.1)
        self.url = url_file.read_text().strip()
        with WorkerClient(self.url, SECRET) as client:
            while client.ready() is None:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"worker {name} did not load the model")
                time.sleep(0.1)
            self.max_model_len = client.ready()["max_model_len"]

    def stop(self) -> None:
        stop_process(self.process)


def serve_worker(model_dir: Path, device: str, url_file: Path, threads: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.worker.server import ModelForServing, WorkerService, serve

    torch.set_num_threads(threads)

    def load() -> ModelForServing:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval().to(device)
        return ModelForServing(model, AutoTokenizer.from_pretrained(model_dir), tier="dram")

    # No prefix caching: B keeps the prompt's KV blocks from every earlier run, so a resume would prefill only the
    # context's uncached tail, not the whole context that stop-and-resume pays on a node that never served it.
    serve(WorkerService(MODEL, secret=SECRET, keepalive_seconds=1.0, prefix_caching=False), load, url_file=url_file)
    return 0


def split_cpus() -> tuple[set[int], set[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:2 * half])


class Server:
    def __init__(self, app):
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def long_prompt(model_dir: Path, tokens: int) -> list[int]:
    """The first `tokens` token ids of the devmodels corpus, repeated as needed."""
    from transformers import AutoTokenizer

    corpus = (REPO / "hpcllm" / "devmodels" / "corpus.txt").read_text()
    ids = AutoTokenizer.from_pretrained(model_dir)(corpus)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def stream_completion(gateway_url: str, body: dict, on_event=None) -> list[tuple[float, str]]:
    """(arrival time, text) of every SSE event of a streamed completion; on_event(count, response id) after each."""
    events = []
    with httpx.stream("POST", f"{gateway_url}/v1/completions", json={**body, "stream": True}, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"gateway answered {r.status_code}: {r.text}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(f"stream failed: {event['error']}")
            events.append((time.perf_counter(), event["choices"][0]["text"]))
            if on_event is not None:
                on_event(len(events), event["id"])
    return events


def gateway_handover_sum(gateway_url: str) -> float:
    """hpcllm_migration_pause_seconds_sum of the gateway (0 before the first migration)."""
    text = httpx.get(f"{gateway_url}/metrics").text
    match = re.search(r'^hpcllm_migration_pause_seconds_sum\{model_name="%s"\} (\S+)$' % MODEL, text, re.M)
    return float(match.group(1)) if match else 0.0


def one_run(method: str, gateway_url: str, router: SwitchRouter, a: WorkerProcess, b: WorkerProcess, body: dict,
            trigger_after: int) -> dict:
    router.url = a.url
    outcome: dict = {}
    handover_before = gateway_handover_sum(gateway_url)

    def move(request_id: str) -> None:
        with WorkerClient(a.url, SECRET, read_timeout=600) as client:
            started = time.perf_counter()
            try:
                if method == "live":
                    result = client.migrate(request_id, ticketed_request(b.url, model=MODEL, key=SECRET))
                    outcome["migration"] = result.model_dump()
                else:
                    client.cancel(request_id)
            except WorkerError as exc:  # e.g. the generation ended before the hand-over: no pause was measured
                outcome["error"] = str(exc)
                return
            outcome["trigger_call_seconds"] = time.perf_counter() - started

    mover: list[threading.Thread] = []

    def on_event(count: int, response_id: str) -> None:
        if count != trigger_after:
            return
        router.url = b.url  # a re-routed (resumed) request goes to B
        # The gateway's worker request id: <response id>-<choice>-<attempt>.
        thread = threading.Thread(target=move, args=(f"{response_id}-0-0",))
        thread.start()
        mover.append(thread)

    events = stream_completion(gateway_url, body, on_event)
    for thread in mover:
        thread.join()
    times = [t for t, _ in events]
    if len(times) <= trigger_after:
        raise RuntimeError(f"the stream ended after {len(times)} events, before the move at {trigger_after}")
    before = [times[i + 1] - times[i] for i in range(trigger_after - 1)]
    after = [times[i + 1] - times[i] for i in range(trigger_after - 1, len(times) - 1)]
    return {
        "method": method,
        "pause_seconds": max(after),
        "typical_gap_seconds": statistics.median(before),
        "events": len(events),
        "text": "".join(text for _, text in events),
        **outcome,
        **({"gateway_handover_gap_seconds": gateway_handover_sum(gateway_url) - handover_before}
           if method == "live" else {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per method (median reported), >= 3")
    parser.add_argument("--prompt-tokens", type=int, default=900, help="context length before generation")
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--trigger-after", type=int, default=8, help="SSE events before the request is moved")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model-dir", type=Path, help="an existing devmodels small llama (default: built in a temp dir)")
    parser.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_worker:
        return serve_worker(args.model_dir, args.device, args.url_file, args.threads)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log lines between the results
    if args.runs < 3:
        parser.error("--runs must be at least 3 (a median of fewer says little)")
    if args.trigger_after < 2 or args.trigger_after >= args.max_tokens:
        parser.error("--trigger-after must be between 2 and --max-tokens - 1")
    require_at_least(parser, args, 1, "prompt_tokens")

    import torch

    # Now, not as a worker's traceback once the model is built and the workers are starting.
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device!r}: use cpu, cuda or cuda:N")
    if args.device.startswith("cuda"):
        from hpcllm.store.cuda import CudaUnavailable, require_cuda

        try:
            require_cuda(torch.device(args.device))
        except (CudaUnavailable, RuntimeError) as exc:  # RuntimeError: torch's own words for a malformed cuda:N
            parser.error(f"--device {args.device}: {exc}")

    from hpcllm.devmodels import make_model
    from hpcllm.gateway.app import create_app, gateway_of

    work = Path(tempfile.mkdtemp(prefix="hpcllm-bench-migration-"))
    model_dir = args.model_dir or make_model("llama", work / MODEL, size="small")
    cpus_a, cpus_b = split_cpus()
    a = WorkerProcess(model_dir, args.device, cpus_a, work, "a")
    try:
        b = WorkerProcess(model_dir, args.device, cpus_b, work, "b")
    except BaseException:
        a.stop()
        raise
    max_model_len = a.max_model_len
    if args.prompt_tokens + args.max_tokens > max_model_len:
        a.stop(), b.stop()
        parser.error(f"--prompt-tokens + --max-tokens must fit the model's {max_model_len} positions")
    router = SwitchRouter(model_dir, max_model_len, a.url)
    config = parse_config({"paths": {"state_dir": str(work / "state")}, "cluster": {"shared_secret": SECRET}})
    gateway_app = create_app(config, router=router)
    gateway = Server(gateway_app)
    body = {"model": MODEL, "prompt": long_prompt(model_dir, args.prompt_tokens), "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True}
    try:
        router.url = a.url
        reference = "".join(text for _, text in stream_completion(gateway.url, body))
        for method in METHODS:  # warm-up: first-call costs of both code paths out of the timings
            one_run(method, gateway.url, router, a, b, body, args.trigger_after)
        runs = []
        for round_number in range(args.runs):
            order = METHODS if round_number % 2 == 0 else METHODS[::-1]
            for method in order:
                run = one_run(method, gateway.url, router, a, b, body, args.trigger_after)
                run["round"] = round_number
                run["text_matches_uninterrupted"] = run.pop("text") == reference
                runs.append(run)
                if "error" in run:
                    print(f"round {round_number} {method:16s} FAILED: {run['error']}", flush=True)
                    continue
                print(f"round {round_number} {method:16s} pause {run['pause_seconds'] * 1000:8.1f} ms  "
                      f"(typical gap {run['typical_gap_seconds'] * 1000:.1f} ms)"
                      + (f"  rounds {run['migration']['tokens_per_round']}, gateway hand-over gap "
                         f"{run['gateway_handover_gap_seconds'] * 1000:.1f} ms" if "migration" in run else ""),
                      flush=True)
    finally:
        gateway.stop()
        gateway_of(gateway_app).close()
        a.stop()
        b.stop()

    measured = [r for r in runs if "error" not in r]
    failed = len(runs) - len(measured)
    if any(not any(r["method"] == m for r in measured) for m in METHODS):
        print(f"no successful run of some method ({failed} failed): nothing to compare", file=sys.stderr)
        return 1
    medians = {m: statistics.median(r["pause_seconds"] for r in measured if r["method"] == m) for m in METHODS}
    ratio = medians["stop_and_resume"] / medians["live"]
    handover_gap = statistics.median(r["gateway_handover_gap_seconds"] for r in measured if r["method"] == "live")
    all_match = all(r["text_matches_uninterrupted"] for r in runs)
    live_rounds = [r["migration"]["rounds"] for r in measured if r["method"] == "live"]
    print(f"\ncontext {args.prompt_tokens} prompt tokens, move after {args.trigger_after} events, "
          f"{args.runs} runs per method, device {args.device}")
    print(f"median client-visible pause: live {medians['live'] * 1000:.1f} ms, stop-and-resume "
          f"{medians['stop_and_resume'] * 1000:.1f} ms -> stop-and-resume / live = {ratio:.1f}x")
    print(f"median hand-over gap the gateway measured for live runs (last token from A to first from B): "
          f"{handover_gap * 1000:.1f} ms")
    print(f"live migration rounds per run: {live_rounds}; failed runs (not in the medians): {failed}")
    print(f"every run's text equals the uninterrupted run: {all_match}")

    result = {
        "benchmark": "migration",
        "config": {"model": "devmodels llama size=small", "prompt_tokens": args.prompt_tokens,
                   "max_tokens": args.max_tokens, "trigger_after_events": args.trigger_after, "runs": args.runs,
                   "device": args.device},
        "host": {"cpus": os.cpu_count(), "torch_threads_per_worker": len(cpus_a), "python": platform.python_version(),
                 "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
        "median_pause_seconds": medians,
        "ratio_stop_and_resume_over_live": ratio,
        "median_gateway_handover_gap_seconds_live": handover_gap,
        "cpus_per_worker": [sorted(cpus_a), sorted(cpus_b)],
        "all_texts_match_uninterrupted": all_match,
        "failed_runs": failed,
        "runs": runs,
    }
    return 0 if write_result(result) else 1


def write_result(result: dict) -> bool:
    """Writes the run's JSON; migration-latest.json (which bench/simulate.py takes its live-migration pause from)
    only for a passing run: every run measured and every text equal to the uninterrupted one. Returns whether the
    run passed. Its "time" is the one in the file's name (migration-<time>.json)."""
    passed = result["all_texts_match_uninterrupted"] and not result["failed_runs"]
    stem = new_result_stem(RESULTS, "migration")
    result = {**result, "time": stem.name.removeprefix("migration-"), "passed": passed}
    names = [stem.name + ".json"] + (["migration-latest.json"] if passed else [])
    for name in names:
        tmp = RESULTS / f".{name}.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(RESULTS / name)
    print(f"wrote {RESULTS / names[0]}" + ("" if passed else " (FAILED run: migration-latest.json left as it was)"))
    return passed


if __name__ == "__main__":
    sys.exit(main())
