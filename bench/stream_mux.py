"""Would multiplexing a worker's streams on one connection cut the gateway hop's CPU? (issue 13)

    .venv/bin/python bench/stream_mux.py [--streams 16 64] [--steps 2000] [--rounds 3] [--step-ms 0.5]

The gateway hop's extra cost per token is one send by the worker, one receive and one thread wake-up in the
gateway, per token and stream (the send to the client, vLLM's own server makes too). This models the hop with
three processes on loopback TCP: a "worker" that emits one line per stream every engine step, a "gateway" that
relays every line to its stream's client, and the clients. Three ways for the gateway:

- per-stream: a connection and a thread per stream (hpcllm today): the worker sends each line, the thread
  receives it and sends it on.
- muxed: one connection per worker carrying every stream (a stream tag per line), the worker sends one buffer a
  step; a reader thread receives it and hands each line to its stream's thread (a SimpleQueue), which sends it on.
- muxed-relay: the same connection, and the reader thread sends each line to its client itself (no thread per
  stream on the path).

Per round (the ways interleaved, the first rotating) the gateway's and the worker's CPU per relayed line
(time.process_time of each process, all its threads), then medians over rounds and each way's ratio to
per-stream. The machine is shared: compare ratios within a run, not absolute numbers across runs. Linux or macOS.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchkit import require_at_least  # noqa: E402

LINE = b'{"token_id":1234,"text":" hello","logprobs":null}\n'  # about a token line's size
WAYS = ("per-stream", "muxed", "muxed-relay")
TAG_BASE = 65  # the stream tag is one byte, never b"\n"


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    return sock


def no_delay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def worker(port: int, streams: int, steps: int, step_s: float, muxed: bool, go, cpu) -> None:
    conns = [no_delay(socket.create_connection(("127.0.0.1", port))) for _ in range(1 if muxed else streams)]
    step_buffer = b"".join(bytes([TAG_BASE + i]) + LINE for i in range(streams))
    go.wait()
    started = time.process_time()
    for _ in range(steps):
        if muxed:
            conns[0].sendall(step_buffer)
        else:
            for conn in conns:
                conn.sendall(LINE)
        time.sleep(step_s)  # the engine's forward
    cpu.value = time.process_time() - started
    for conn in conns:
        conn.close()


def clients(port: int, streams: int, steps: int) -> None:
    def read(conn: socket.socket) -> None:
        lines = 0
        while lines < steps:
            data = conn.recv(65536)
            if not data:
                return
            lines += data.count(b"\n")

    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    readers = [threading.Thread(target=read, args=(c,)) for c in conns]
    for t in readers:
        t.start()
    for t in readers:
        t.join()


def relay_per_stream(upstreams, downstreams) -> list[threading.Thread]:
    def relay(up: socket.socket, down: socket.socket) -> None:
        while data := up.recv(65536):
            down.sendall(data)
    return [threading.Thread(target=relay, args=pair) for pair in zip(upstreams, downstreams)]


def split_lines(up: socket.socket):
    """Yield (stream index, line) for every tagged line the muxed connection carries."""
    rest = b""
    while data := up.recv(1 << 20):
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            yield line[0] - TAG_BASE, line[1:] + b"\n"


def relay_muxed(upstreams, downstreams) -> list[threading.Thread]:
    import queue
    queues = [queue.SimpleQueue() for _ in downstreams]

    def read() -> None:
        for index, line in split_lines(upstreams[0]):
            queues[index].put(line)
        for q in queues:
            q.put(None)

    def send(q, down: socket.socket) -> None:
        while (line := q.get()) is not None:
            down.sendall(line)

    return [threading.Thread(target=read)] + [threading.Thread(target=send, args=pair)
                                              for pair in zip(queues, downstreams)]


def relay_muxed_relay(upstreams, downstreams) -> list[threading.Thread]:
    def read_and_send() -> None:
        for index, line in split_lines(upstreams[0]):
            downstreams[index].sendall(line)
    return [threading.Thread(target=read_and_send)]


RELAYS = {"per-stream": relay_per_stream, "muxed": relay_muxed, "muxed-relay": relay_muxed_relay}


def measure(way: str, streams: int, steps: int, step_s: float) -> tuple[float, float]:
    """(gateway, worker) CPU microseconds per relayed line."""
    up, down = listener(), listener()
    go, worker_cpu = mp.Event(), mp.Value("d", 0.0)
    muxed = way != "per-stream"
    worker_proc = mp.Process(target=worker, args=(up.getsockname()[1], streams, steps, step_s, muxed, go, worker_cpu))
    client_proc = mp.Process(target=clients, args=(down.getsockname()[1], streams, steps))
    worker_proc.start()
    client_proc.start()
    upstreams = [up.accept()[0] for _ in range(1 if muxed else streams)]
    downstreams = [no_delay(down.accept()[0]) for _ in range(streams)]
    threads = RELAYS[way](upstreams, downstreams)
    for t in threads:
        t.start()
    started = time.process_time()
    go.set()
    for t in threads:
        t.join()
    gateway_cpu = time.process_time() - started
    for sock in (*upstreams, *downstreams, up, down):
        sock.close()
    worker_proc.join()
    client_proc.join()
    lines = streams * steps
    return gateway_cpu / lines * 1e6, worker_cpu.value / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=0.5, help="the engine step between a stream's lines")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "streams", "steps", "rounds")
    if max(args.streams) > 256 - TAG_BASE:  # the one-byte stream tag
        parser.error(f"--streams 1..{256 - TAG_BASE}, not {max(args.streams)}")
    for streams in args.streams:
        results = {way: [] for way in WAYS}
        for r in range(args.rounds):
            order = WAYS[r % len(WAYS):] + WAYS[: r % len(WAYS)]
            for way in order:
                results[way].append(measure(way, streams, args.steps, args.step_ms / 1000))
            print(f"{streams} streams, round {r + 1}: " + ", ".join(
                f"{way} {results[way][-1][0]:.1f}/{results[way][-1][1]:.1f}" for way in WAYS) +
                " us gateway/worker CPU per line", flush=True)
        base_gw = statistics.median(g for g, _ in results["per-stream"])
        base_wk = statistics.median(w for _, w in results["per-stream"])
        print(f"\n{streams} streams, {args.steps} steps, median of {args.rounds} rounds:")
        header = ("way", "gateway us/line", "vs per-stream", "worker us/line", "vs per-stream")
        print("  {:12s} {:>16s} {:>14s} {:>15s} {:>14s}".format(*header))
        for way in WAYS:
            gw = statistics.median(g for g, _ in results[way])
            wk = statistics.median(w for _, w in results[way])
            print(f"  {way:12s} {gw:16.1f} {gw / base_gw:13.2f}x {wk:15.1f} {wk / base_wk:13.2f}x")
        print(flush=True)


if __name__ == "__main__":
    main()
