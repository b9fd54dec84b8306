"""The gateway's CPU per streamed token: this tree's gateway against a baseline revision's, or this tree's under
two gunicorn worker classes, in the same run.

    PYTHONPATH=$PWD .venv/bin/python bench/gateway_stream.py [--clients 16 64] [--rounds 3] [--baseline REV]
        [--compare-worker-class OLD NEW] [--tokens 128] [--requests-per-client 2] [--interval-ms 20] [--seed 0]

A fake worker (a real HTTP server speaking the worker's generate protocol: NDJSON token lines then a final line,
HTTP chunked, served by cheroot as the worker is; lines that came due while its stream thread waited go out in
one write, as the worker's do) feeds every stream a token every --interval-ms (0: as fast as it can). Two gateways
run against it at once, both `hpcllm gateway` (gunicorn, one worker process): this tree's ("new") and the
--baseline revision's ("old", exported with `git archive`; default: where this branch left main), each with its
default worker class; or, with --compare-worker-class OLD NEW (gthread, gevent), both from this tree, "old" with
gateway.worker_class = OLD and "new" with NEW. C client
threads stream `/v1/completions` through one of them (prompt as seeded token ids, include_usage), the two taking
turns level by level, --rounds times, so both see the same machine load. Per level: the gateway process's CPU
seconds (user + system, /proc) divided by the output tokens its clients received, and new/old.

Everything the clients get is checked: every request's usage says --tokens tokens, and the streamed text is
exactly the fake worker's tokens in order (so merging tokens into fewer SSE events shows, losing one fails).
The fake worker and the clients run in other processes/threads; only the gateway process is measured. On the
shared 2-core dev machine the numbers move with the other engineers' load: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402
from bench.clients import run_clients  # noqa: E402
from bench.revisions import default_baseline, export_revision  # noqa: E402
from bench.serve import sse_chunks  # noqa: E402
from hpcllm.worker.vllm_launch import wait_until_ready  # noqa: E402

SECRET = "bench-gateway-stream-secret"
MODEL = "fake-model"


# ---- the fake worker ---------------------------------------------------------------------------------------------


def token_text(request_id: str, index: int) -> str:
    """What the fake worker generates: distinct, checkable text per request and position."""
    return f" t{index}" if index % 7 else f" {request_id[-6:]}/{index}"


def fake_worker_app(interval_s: float):
    """A Flask app answering the worker's generate endpoint: max_tokens token lines, one per interval (those that
    came due while the thread waited in one write), then the final line."""
    from flask import Flask, Response, request

    from hpcllm.worker.protocol import (GENERATE_PATH, NDJSON_MEDIA_TYPE, FinalLine, TokenLine, Usage,
                                        stream_line_json)

    app = Flask("fake-worker")

    @app.get("/ready")
    def ready():
        return {"status": "ready", "model": MODEL}

    @app.post(GENERATE_PATH)
    def generate():
        body = request.get_json()
        prompt_tokens, max_tokens, request_id = len(body["prompt_token_ids"]), body["max_tokens"], body["request_id"]

        def lines():
            started = time.monotonic()
            sent = 0
            while sent < max_tokens:
                due = max_tokens if interval_s <= 0 else min(max_tokens, int((time.monotonic() - started) / interval_s) + 1)
                if due > sent:
                    yield b"".join(stream_line_json(TokenLine(index=i, token_id=1000 + i, text=token_text(request_id, i)))
                                   + b"\n" for i in range(sent, due))
                    sent = due
                if sent < max_tokens and interval_s > 0:
                    time.sleep(max(0.0, started + sent * interval_s - time.monotonic()))
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=max_tokens,
                          total_tokens=prompt_tokens + max_tokens)
            yield stream_line_json(FinalLine(finish_reason="length", usage=usage)) + b"\n"

        return Response(lines(), mimetype=NDJSON_MEDIA_TYPE)

    return app


def serve_fake_worker(port: int, interval_s: float, threads: int) -> None:
    from hpcllm.config import InternalHttpConfig
    from hpcllm.httpkit.server import InternalServer

    server = InternalServer(fake_worker_app(interval_s), "127.0.0.1", port, http=InternalHttpConfig(),
                            threads=threads, name="fake-worker")
    server.serve_forever()


# ---- the gateways ------------------------------------------------------------------------------------------------


@dataclass
class Gateway:
    name: str
    process: subprocess.Popen
    url: str
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gateway(name: str, code: Path, worker_url: str, source: Path, threads: int, work: Path,
                  worker_class: str | None = None) -> Gateway:
    """`hpcllm gateway` from the tree at `code` (one gunicorn worker process; worker_class None: the tree's default),
    the fake worker a static model."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = work / "gateway.toml"
    worker_class_line = f'worker_class = "{worker_class}"\n' if worker_class else ""
    config.write_text(
        f'[paths]\nstate_dir = "{work / "state"}"\n[cluster]\ndev = true\nshared_secret = "{SECRET}"\n'
        f'[gateway]\nhost = "127.0.0.1"\nport = {port}\nworkers = 1\nthreads = {threads}\n{worker_class_line}'
        f'[gateway.static_models.{MODEL}]\nworker_url = "{worker_url}"\nsource = "{source}"\n')
    config.chmod(0o600)
    log = work / "gateway.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "hpcllm.cli.main", "gateway", "--config", str(config)],
                                   env={**os.environ, "PYTHONPATH": str(code)}, cwd=code, stdout=out,
                                   stderr=subprocess.STDOUT)
    gateway = Gateway(name, process, f"http://127.0.0.1:{port}", log)
    wait_until_ready(process, log, lambda: gateway.url, "/ready")
    return gateway


def gunicorn_worker_pid(gateway: Gateway) -> int:
    """The gunicorn worker process (gunicorn's arbiter only supervises)."""
    pid = gateway.process.pid
    children = [kid for task in Path(f"/proc/{pid}/task").iterdir() for kid in (task / "children").read_text().split()]
    if len(children) != 1:
        raise RuntimeError(f"the {gateway.name} gateway has {len(children)} worker processes, expected 1")
    return int(children[0])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


# ---- the clients -------------------------------------------------------------------------------------------------


def stream_one(http: httpx.Client, url: str, prompt: list[int], tokens: int) -> tuple[int, int]:
    """One streamed completion; checks the text is the fake worker's, in order. Returns (tokens, text events)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    text, events, usage, response_id = [], 0, None, None
    for chunk in sse_chunks(http, f"{url}/v1/completions", body):
        response_id = chunk["id"]
        if chunk.get("choices") and chunk["choices"][0]["text"]:
            text.append(chunk["choices"][0]["text"])
            events += 1
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
    request_id = f"{response_id}-0-0"
    expected = "".join(token_text(request_id, i) for i in range(tokens))
    if usage != tokens or "".join(text) != expected:
        raise RuntimeError(f"request {response_id}: usage {usage} of {tokens} tokens, text "
                           f"{'as sent' if ''.join(text) == expected else 'NOT what the worker sent'}")
    return tokens, events


def run_level(gateway: Gateway, clients: int, per_client: int, tokens: int, rng: random.Random) -> dict:
    prompts = [[rng.randrange(10, 200) for _ in range(rng.randrange(8, 64))] for _ in range(clients * per_client)]
    pid = gunicorn_worker_pid(gateway)
    totals = {"tokens": 0, "events": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            with httpx.Client(timeout=120) as http:
                for k in range(per_client):
                    got, events = stream_one(http, gateway.url, prompts[index * per_client + k], tokens)
                    with lock:
                        totals["tokens"] += got
                        totals["events"] += events
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    cpu_before = cpu_seconds(pid)
    seconds = run_clients(client, clients)
    cpu_after = cpu_seconds(pid)
    if errors:
        raise RuntimeError(f"the {gateway.name} gateway: {errors[0]}") from errors[0]
    user, system = (after - before for after, before in zip(cpu_after, cpu_before))
    return {"cpu_s": user + system, "system_s": system, "tokens": totals["tokens"], "events": totals["events"],
            "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request (at most 440: the "
                        "tiny model's context is 512)")
    parser.add_argument("--interval-ms", type=float, default=20.0,
                        help="the fake worker's time between a stream's tokens (0: as fast as it can)")
    parser.add_argument("--baseline", default=None, help="git revision of the old gateway (default: merge-base "
                        "of HEAD and main)")
    parser.add_argument("--compare-worker-class", nargs=2, metavar=("OLD", "NEW"), default=None,
                        choices=["gthread", "gevent"], help="instead of a baseline revision: this tree's gateway "
                        "under two gateway.worker_class values, e.g. gthread gevent")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    require_at_least(parser, args, 1, "clients", "rounds", "requests_per_client", "tokens")
    if args.compare_worker_class and args.baseline:
        parser.error("--baseline and --compare-worker-class are two different comparisons: give one")

    from hpcllm.devmodels import make_model

    rng = random.Random(args.seed)
    max_clients = max(args.clients)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-stream-") as tmp:
        work = Path(tmp)
        source = make_model("llama", work / "model")  # the gateway reads the tokenizer (checks prompt token ids)
        if args.compare_worker_class:
            old_tree, (old_class, new_class) = REPO, args.compare_worker_class
            baseline = f"this tree, worker_class {old_class}; new = worker_class {new_class}"
        else:
            old_tree, old_class, new_class = work / "old", None, None
            old_tree.mkdir()
            baseline = export_revision(args.baseline or default_baseline(), old_tree)
        worker_port = free_port()
        worker_log = work / "worker.log"
        with open(worker_log, "wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); from bench.gateway_stream "
                 f"import serve_fake_worker; serve_fake_worker({worker_port}, {args.interval_ms / 1000}, "
                 f"{max_clients + 8})"], stdout=out, stderr=subprocess.STDOUT)
        gateways: list[Gateway] = []
        try:
            worker_url = f"http://127.0.0.1:{worker_port}"
            wait_until_ready(worker, worker_log, lambda: worker_url, "/ready")
            threads = max_clients + 8
            gateways = [start_gateway("old", old_tree, worker_url, source, threads, work / "gw-old", old_class),
                        start_gateway("new", REPO, worker_url, source, threads, work / "gw-new", new_class)]
            for gateway in gateways:  # warm up: imports, tokenizer load, connection pools
                run_level(gateway, 4, 1, 16, rng)
            results: dict[tuple[str, int], list[dict]] = {}
            loads = []
            for round_ in range(args.rounds):
                for clients in args.clients:
                    order = gateways if round_ % 2 == 0 else gateways[::-1]
                    for gateway in order:
                        loads.append(os.getloadavg()[0])
                        level = run_level(gateway, clients, args.requests_per_client, args.tokens, rng)
                        results.setdefault((gateway.name, clients), []).append(level)
                        print(f"round {round_ + 1} {gateway.name:>3} C={clients:<3} "
                              f"{1000 * level['cpu_s'] / level['tokens']:.3f} ms CPU/token "
                              f"({100 * level['system_s'] / level['cpu_s']:.0f}% system), "
                              f"{level['tokens'] / level['events']:.2f} tokens/event, {level['seconds']:.1f} s, "
                              f"load {loads[-1]:.1f}", flush=True)
        finally:
            for gateway in gateways:
                gateway.process.terminate()
            worker.terminate()
            for process in [*(g.process for g in gateways), worker]:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    print_table(results, args, baseline, loads)
    return 0


def print_table(results: dict, args, baseline: str, loads: list[float]) -> None:
    new = "" if args.compare_worker_class else ", new = this tree"
    print(f"\ngateway CPU per output token, old = {baseline}{new}; fake worker every "
          f"{args.interval_ms:g} ms, {args.tokens} tokens/request, {args.requests_per_client} requests/client, "
          f"{args.rounds} rounds; load average {min(loads):.1f}-{max(loads):.1f}")
    print("| clients | old ms/token (rounds) | new ms/token (rounds) | new/old of the medians (per round) "
          "| system share old, new "
          "| tokens/SSE event old, new |")
    print("|---:|---|---|---:|---|---|")
    for clients in args.clients:
        per = {}
        for name in ("old", "new"):
            levels = results[(name, clients)]
            per[name] = ([1000 * lv["cpu_s"] / lv["tokens"] for lv in levels],
                         sum(lv["system_s"] for lv in levels) / sum(lv["cpu_s"] for lv in levels),
                         sum(lv["tokens"] for lv in levels) / sum(lv["events"] for lv in levels))
        (old, old_system, old_merge), (new, new_system, new_merge) = per["old"], per["new"]
        ratio = statistics.median(new) / statistics.median(old)
        per_round = ", ".join(f"{n / o:.2f}" for n, o in zip(new, old))
        print(f"| {clients} | {statistics.median(old):.3f} ({', '.join(f'{v:.3f}' for v in old)}) | "
              f"{statistics.median(new):.3f} ({', '.join(f'{v:.3f}' for v in new)}) | {ratio:.2f}x ({per_round}) | "
              f"{100 * old_system:.0f}%, {100 * new_system:.0f}% | {old_merge:.2f}, {new_merge:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
