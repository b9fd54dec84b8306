"""Where hpcllm's engine thread spends its wall time under concurrent streams (no HTTP, no gateway).

    PYTHONPATH=$PWD .venv/bin/python bench/engine_loop.py [--clients 16] [--rounds 2]
        [--modes outbox put-per-token model-process model-process-sync]

C reader threads (one per stream, like the worker's HTTP threads: each event turned into its JSON line) run the
seeded prompt set of bench/serve.py against an Engine on the devmodels "small" Llama, 2 requests per client back to
back, greedy. Modes, interleaved per round (order reversed every other round):
- outbox: the engine as it is (stream events handed over once per step, docs/worker.md);
- put-per-token: the same engine with each event put into its queue as it is produced (the engine before);
- model-process: `model_process=True` (the forward in a child process, with asynchronous scheduling: the next step
  is sent while one runs);
- model-process-sync: the same, each step scheduled after the previous one's tokens are committed (the engine
  before asynchronous scheduling).
Per mode: token lines per second and, from the engine thread's /proc/thread-self/schedstat read around each phase,
how its wall time splits into on-CPU, waiting for a CPU (run queue: other load) and blocked (the GIL, or the model
process's pipe), for the forward and for the rest of the step (sampling, detokenizing, events). Linux only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402
from bench.clients import run_clients  # noqa: E402

PHASES = ("forward", "rest of step")


def schedstat() -> tuple[float, float]:
    """(seconds on CPU, seconds runnable but waiting for a CPU) of the calling thread so far."""
    with open("/proc/thread-self/schedstat") as f:
        on_cpu, waiting, _ = f.read().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


class Split:
    def __init__(self) -> None:
        self.wall = self.cpu = self.queued = 0.0

    def add(self, wall: float, cpu: float, queued: float) -> None:
        self.wall += wall
        self.cpu += cpu
        self.queued += queued

    def row(self) -> str:
        blocked = max(0.0, self.wall - self.cpu - self.queued)
        return f"wall {self.wall:6.2f} s = on CPU {self.cpu:6.2f} + run queue {self.queued:6.2f} + blocked {blocked:5.2f}"


def instrumented_engine_class(mode: str):
    from hpcllm.worker.engine import Engine
    from hpcllm.worker.requests import EngineBase

    class TimedEngine(Engine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.splits = {phase: Split() for phase in PHASES}
            if self.async_scheduling:  # no _run_step: the wait for the model process is the collect
                self.runner.collect = self._timed(self.runner.collect)

        def _timed(self, collect):
            def timed():
                began, (cpu, queued) = time.perf_counter(), schedstat()
                try:
                    return collect()
                finally:
                    cpu_after, queued_after = schedstat()
                    self.splits["forward"].add(time.perf_counter() - began, cpu_after - cpu, queued_after - queued)
            return timed

        def _step(self, active) -> None:
            began, (cpu, queued) = time.perf_counter(), schedstat()
            forward_before = (self.splits["forward"].wall, self.splits["forward"].cpu, self.splits["forward"].queued)
            super()._step(active)
            (cpu_after, queued_after), wall = schedstat(), time.perf_counter() - began
            forward = self.splits["forward"]
            self.splits["rest of step"].add(wall - (forward.wall - forward_before[0]),
                                            cpu_after - cpu - (forward.cpu - forward_before[1]),
                                            queued_after - queued - (forward.queued - forward_before[2]))

        def _run_step(self, batch):
            began, (cpu, queued) = time.perf_counter(), schedstat()
            try:
                return super()._run_step(batch)
            finally:
                cpu_after, queued_after = schedstat()
                self.splits["forward"].add(time.perf_counter() - began, cpu_after - cpu, queued_after - queued)

        if mode == "put-per-token":
            _emit = EngineBase._emit

    return TimedEngine


def run(mode: str, model, tokenizer, prompts, clients: int) -> dict:
    from hpcllm.worker.protocol import GenerateRequest, stream_line_json

    engine = instrumented_engine_class(mode)(model, tokenizer, max_running_requests=clients, batching="paged",
                                             model_process=mode.startswith("model-process"),
                                             async_scheduling=mode != "model-process-sync").start()
    lines = [0]

    def client(index: int) -> None:
        for number, prompt in enumerate(prompts[index::clients]):
            request = GenerateRequest(request_id=f"c{index}-{number}", prompt_token_ids=prompt.token_ids,
                                      max_tokens=prompt.max_tokens, temperature=0, ignore_eos=True)
            for event in engine.submit(request).events():
                stream_line_json(event)
                lines[0] += 1

    cpu = time.process_time()
    wall = run_clients(client, clients)
    result = {"lines_per_s": lines[0] / wall, "process_cpu": time.process_time() - cpu, "splits": engine.splits}
    engine.shutdown()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=["outbox", "put-per-token", "model-process"],
                        choices=["outbox", "put-per-token", "model-process", "model-process-sync"])
    args = parser.parse_args()
    require_at_least(parser, args, 1, "clients", "rounds", "threads")

    import os

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bench import coldstart
    from bench.serve import prompt_set

    torch.set_num_threads(args.threads)
    coldstart.checkpoint("small")
    hf_dir = coldstart.WORK / "llama-small-hf"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = prompt_set(2 * args.clients, AutoConfig.from_pretrained(hf_dir).vocab_size, 0)
    print(f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    rates: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for round_index in range(args.rounds):
        for mode in args.modes if round_index % 2 == 0 else list(reversed(args.modes)):
            # A fresh model per engine: an in-process fast path packs it in place, a model process's takes the
            # weights it replaced from the worker's copy.
            model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
            result = run(mode, model, tokenizer, prompts, args.clients)
            rates[mode].append(result["lines_per_s"])
            print(f"round {round_index + 1} {mode}: {result['lines_per_s']:.1f} lines/s, worker-side CPU "
                  f"{result['process_cpu']:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
            for phase, split in result["splits"].items():
                print(f"    {phase:<13} {split.row()}", flush=True)
    for mode, values in rates.items():
        print(f"{mode}: {sum(values) / len(values):.1f} lines/s (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
