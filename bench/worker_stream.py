"""The worker process's CPU per streamed token, the engine's front as it is against the front before (issue 13).

    PYTHONPATH=$PWD .venv/bin/python bench/worker_stream.py [--clients 32] [--rounds 4] [--max-tokens 128]
        [--requests-per-client 2] [--size tiny]

Two worker processes serve the same devmodels Llama (tiny by default: its forward is cheap, so what is measured
is mostly the front - detokenizing, stream hand-over, NDJSON lines, cheroot's writes), each on
hpcllm.worker.server's app and server (cheroot) like a real worker:
- old: the front before issue 13 - the window detokenizer (two decodes per token), token lines built by
  model_construct and dumped by pydantic, a queue.Queue per stream;
- new: the front as it is (DecodeStream, validated token lines, filled into a byte template, a SimpleQueue per
  stream).
This process runs C concurrent streaming clients (plain http.client, greedy, ignore_eos) against one worker, then
the other, alternating which goes first each round. Per round and worker: output tokens, the worker process's CPU
(all its threads, /proc/PID/stat) and its engine thread's (/proc/PID/task/TID/schedstat), per token. At the end:
the per-token CPU of each, summed over the rounds, and old / new. Linux only. The machine is shared: the load
average is printed with each round; compare ratios, not absolute numbers, across runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402
from bench.clients import run_clients  # noqa: E402

WORK = Path("/var/tmp/hpcllm-bench/worker-stream")
SECRET = "bench-secret"
MODES = ("old", "new")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


# ---- the worker processes -----------------------------------------------------------------------------------------


def use_old_front() -> None:
    """The front before issue 13, patched in (this process only)."""
    import queue

    from hpcllm.worker import requests, server
    from hpcllm.worker.protocol import TokenLine, stream_line_json

    requests.decode_streams = lambda tokenizer, lock: None  # the window scheme alone
    server.stream_line_bytes = lambda line: stream_line_json(line) + b"\n"  # every line through pydantic
    # Token lines built by model_construct (what the engine's _accept called; only it uses this name here).
    requests.TokenLine = TokenLine.model_construct
    prepare = requests.EngineBase._prepare

    def prepare_with_queue(self, request):
        req = prepare(self, request)
        req.events = queue.Queue()
        return req

    requests.EngineBase._prepare = prepare_with_queue


def count_forward_cpu(counter_file: Path) -> None:
    """The engine thread's CPU seconds in the model's forward, kept in counter_file (8 bytes, mapped) for the
    bench to subtract: what is left is the engine's front (scheduling, sampling, detokenizing, events)."""
    import mmap

    from hpcllm.worker.engine import Engine

    counter_file.write_bytes(bytes(8))
    with open(counter_file, "r+b") as f:
        counter = mmap.mmap(f.fileno(), 8)
    spent = [0.0]
    forward = Engine._forward

    def timed_forward(self, batch):
        began = time.thread_time()
        try:
            return forward(self, batch)
        finally:
            spent[0] += time.thread_time() - began
            struct.pack_into("d", counter, 0, spent[0])

    Engine._forward = timed_forward


def serve(mode: str, model_dir: Path, ready_file: Path, clients: int, threads: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.config import InternalHttpConfig
    from hpcllm.httpkit.server import InternalServer
    from hpcllm.worker.server import CONTROL_THREADS, ModelForServing, WorkerService, create_app

    import logging

    logging.basicConfig(level=logging.INFO, format=f"[{mode} worker] %(name)s: %(message)s")
    if mode == "old":
        use_old_front()
    count_forward_cpu(ready_file.with_suffix(".forward"))
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    service = WorkerService("bench", SECRET, max_running_requests=clients, max_waiting_requests=clients)
    engine = service.attach(ModelForServing(model, tokenizer))
    server = InternalServer(create_app(service), "127.0.0.1", 0, http=InternalHttpConfig(),
                            threads=service.stream_capacity() + CONTROL_THREADS, name="worker")
    server.start()
    tmp = ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": server.port, "engine_tid": engine._thread.native_id}))
    tmp.replace(ready_file)
    threading.Event().wait()


class Worker:
    def __init__(self, mode: str, model_dir: Path, clients: int, threads: int, scratch: Path) -> None:
        self.mode = mode
        ready = scratch / f"{mode}.json"
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", mode, "--model", str(model_dir), "--ready-file", str(ready),
             "--clients", str(clients), "--threads", str(threads)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + 300
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {mode} worker did not start (exit code {self.process.poll()})")
            time.sleep(0.2)
        info = json.loads(ready.read_text())
        self.port, self.engine_tid = info["port"], info["engine_tid"]
        self.forward_file = ready.with_suffix(".forward")

    def cpu(self) -> tuple[float, float, float]:
        """(seconds of CPU of the whole process, of its engine thread, of the engine thread in the model's forward)
        so far."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        process = (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # utime, stime
        with open(f"/proc/{self.process.pid}/task/{self.engine_tid}/schedstat") as f:
            engine = int(f.read().split()[0]) / 1e9
        forward = struct.unpack("d", self.forward_file.read_bytes())[0]
        return process, engine, forward

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


# ---- the detokenizer alone ---------------------------------------------------------------------------------------


def detokenizer_cost(model_dir: Path, rounds: int = 10) -> dict[str, float]:
    """CPU us per token of the window scheme alone (old) and the DecodeStream (new) on the served model's
    tokenizer, over the devmodels corpus tokenized, alternating; on this thread, as on the engine thread."""
    import threading as threads_module

    from transformers import AutoTokenizer

    from hpcllm.devmodels.tokenizer import CORPUS_PATH
    from hpcllm.worker.detokenizer import IncrementalDetokenizer, decode_streams, text_decoder

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(CORPUS_PATH.read_text(encoding="utf-8")[:20000], add_special_tokens=False)["input_ids"]
    decode, new_stream = text_decoder(tokenizer), decode_streams(tokenizer, threads_module.Lock())
    spent = {"old": 0.0, "new": 0.0}
    for round_index in range(rounds):
        for mode in MODES if round_index % 2 == 0 else tuple(reversed(MODES)):
            detok = IncrementalDetokenizer(decode, stream=new_stream() if mode == "new" else None)
            began = time.thread_time()
            for token in ids:
                detok.add(token)
            spent[mode] += time.thread_time() - began
    return {mode: seconds / (rounds * len(ids)) * 1e6 for mode, seconds in spent.items()}


# ---- the clients ----------------------------------------------------------------------------------------------------


def stream_one(port: int, body: bytes) -> int:
    """One streamed generation; the number of token lines it brought."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/v1/internal/generate", body=body,
                       headers={"Content-Type": "application/json", "X-Hpcllm-Secret": SECRET})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"generate answered {response.status}: {response.read()[:300]!r}")
    tokens = 0
    for line in response:
        if line.startswith(b'{"type":"token"'):
            tokens += 1
        elif line.startswith(b'{"type":"final"'):
            final = json.loads(line)
            if final["finish_reason"] != "length":
                raise RuntimeError(f"a stream ended with {final}")
    connection.close()
    return tokens


def run_round(worker: Worker, clients: int, per_client: int, max_tokens: int, round_index: int) -> dict:
    tokens = [0] * clients
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            for number in range(per_client):
                prompt = [5 + (index * 7 + number * 3 + k) % 200 for k in range(8 + index % 8)]
                body = json.dumps({"request_id": f"r{round_index}-c{index}-{number}", "prompt_token_ids": prompt,
                                   "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
                tokens[index] += stream_one(worker.port, body)
        except BaseException as exc:  # reported after the round
            errors.append(exc)

    before = worker.cpu()
    wall = run_clients(client, clients)
    process, engine, forward = (after - before for after, before in zip(worker.cpu(), before))
    if errors:
        raise SystemExit(f"{worker.mode} worker: {errors[0]!r}")
    # front: everything but the model's forward (the engine thread's bookkeeping and every other thread)
    return {"tokens": sum(tokens), "wall": wall, "process": process, "front": process - forward,
            "engine_front": engine - forward, "streams": process - engine}


PARTS = {"process": "worker process", "front": "front (all but the forward)",
         "engine_front": "engine thread's front", "streams": "stream threads and the rest"}


def token_rate(totals: dict) -> float:
    return totals["tokens"] / totals["wall"]


def row(result: dict) -> str:
    """A round's (or the totals') tokens/s and CPU per token, in ms."""
    per_token = ", ".join(f"{PARTS[part]} {result[part] / result['tokens'] * 1e3:.4f}" for part in PARTS)
    return f"{token_rate(result):6.0f} tokens/s, CPU ms/token: {per_token}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--size", default="tiny", help="devmodels size of the Llama served (default tiny)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each worker")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    require_at_least(parser, args, 1, "clients", "rounds", "requests_per_client", "max_tokens", "threads")
    if args.serve:
        serve(args.serve, args.model, args.ready_file, args.clients, args.threads)
        return 0

    from hpcllm.devmodels import make_model

    model_dir = WORK / f"llama-{args.size}"
    if not model_dir.exists():
        make_model("llama", model_dir, size=args.size)
    detok = detokenizer_cost(model_dir)
    print(f"detokenizer alone: old (window scheme) {detok['old']:.2f} us/token, new (DecodeStream) "
          f"{detok['new']:.2f} us/token, old / new {detok['old'] / detok['new']:.2f}x", flush=True)
    with tempfile.TemporaryDirectory(prefix="worker-stream-") as scratch:
        workers = {mode: Worker(mode, model_dir, args.clients, args.threads, Path(scratch)) for mode in MODES}
        try:
            for worker in workers.values():  # warm-up: first requests pay for lazy imports and allocations
                run_round(worker, min(4, args.clients), 1, 16, -1)
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {args.clients} clients x {args.requests_per_client} "
                  f"requests x {args.max_tokens} tokens, llama-{args.size}, {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
            totals = {mode: dict.fromkeys(("tokens", "wall", *PARTS), 0) for mode in MODES}
            for round_index in range(args.rounds):
                for mode in MODES if round_index % 2 == 0 else tuple(reversed(MODES)):
                    result = run_round(workers[mode], args.clients, args.requests_per_client, args.max_tokens,
                                       round_index)
                    for key in totals[mode]:
                        totals[mode][key] += result[key]
                    print(f"round {round_index + 1} {mode}: {row(result)}, load {os.getloadavg()[0]:.2f}", flush=True)
        finally:
            for worker in workers.values():
                worker.stop()
    for mode in MODES:
        print(f"{mode}: {row(totals[mode])}")
    old, new = totals["old"], totals["new"]
    ratios = ", ".join(f"{PARTS[part]} {(old[part] / old['tokens']) / (new[part] / new['tokens']):.2f}x"
                       for part in PARTS)
    print(f"old / new CPU per token: {ratios}; tokens/s new / old {token_rate(new) / token_rate(old):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
