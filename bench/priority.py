"""Does request priority keep interactive requests fast while a batch fills the worker? (docs/worker.md, Priority)

    PYTHONPATH=$PWD .venv/bin/python bench/priority.py [--size small] [--slots 4] [--batch 8] [--interactive 6]
        [--rounds 3] [--model-process on]

An Engine on a devmodels Llama (greedy, `--slots` running requests at most). Per round, three modes, interleaved
(their order rotating every round):
- alone: interactive requests only, the engine otherwise idle;
- batch-fifo: `--batch` long batch requests kept in flight (a new one as one ends, as the gateway's batch runner
  does with batch_concurrency) at priority 0, as interactive requests: the engine before priorities, or a gateway
  without gateway.batch_priority;
- batch-priority: the same batch at priority 10 (gateway.batch_priority's default).
In each, `--interactive` interactive requests one after another (each sent once the previous one ended), once every
slot is busy: the time to their first token (TTFT) and to their last (end to end), and the batch's tokens per second
meanwhile (what the batch still gets). Printed per mode: medians over every round's requests and their ratio to
alone's. The machine may be shared: compare the ratios within a run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402

MODES = ("alone", "batch-fifo", "batch-priority")
_ids = itertools.count()


def prompt(rng: random.Random, vocab: int, length: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(length)]


def batch_priority() -> int:
    """gateway.batch_priority's default: what the gateway's batch runner sends."""
    from hpcllm.config import GatewayConfig

    return GatewayConfig.model_fields["batch_priority"].default


class Batch:
    """`size` batch requests kept in flight by as many threads, each submitting its next as its last ends."""

    def __init__(self, engine, size: int, priority: int, args, rng: random.Random) -> None:
        from hpcllm.worker.protocol import FinalLine, GenerateRequest, TokenLine

        self.stop, self.tokens, self.failure = threading.Event(), 0, None
        self._lock = threading.Lock()
        prompts = [prompt(rng, engine.vocab_size, args.batch_prompt) for _ in range(size)]

        def run(ids: list[int]) -> None:
            while not self.stop.is_set():
                stream = engine.submit(GenerateRequest(request_id=f"batch{next(_ids)}", prompt_token_ids=ids,
                                                       max_tokens=args.batch_tokens, temperature=0, ignore_eos=True,
                                                       priority=priority))
                for event in stream.events():
                    if isinstance(event, TokenLine):
                        with self._lock:
                            self.tokens += 1
                    elif isinstance(event, FinalLine) and event.finish_reason != "length":
                        self.failure = event  # end() says so: a thread's exit would say nothing
                        return

        self.threads = [threading.Thread(target=run, args=(ids,), daemon=True) for ids in prompts]
        for thread in self.threads:
            thread.start()

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        if self.failure is not None:
            finished(self.failure)


def finished(final) -> None:
    """A request's final line: one that did not end by its length (an error, an abort) makes the run meaningless."""
    if getattr(final, "finish_reason", None) != "length":
        raise SystemExit(f"a request did not run to its max_tokens: {final!r}")


def run_mode(engine, mode: str, args, rng: random.Random) -> tuple[list[float], list[float], float | None]:
    """(TTFTs, end-to-end times, batch tokens per second) of one mode's interactive requests."""
    from hpcllm.worker.protocol import GenerateRequest

    batch = None
    if mode != "alone":
        batch = Batch(engine, args.batch, batch_priority() if mode == "batch-priority" else 0, args, rng)
        while engine.counts()[0] < engine.max_running_requests:  # every slot busy before the first measurement
            time.sleep(0.01)
    ttfts, e2es = [], []
    began, tokens_before = time.perf_counter(), batch.tokens if batch else 0
    for _ in range(args.interactive):
        ids = prompt(rng, engine.vocab_size, args.interactive_prompt)
        sent = time.perf_counter()
        stream = engine.submit(GenerateRequest(request_id=f"chat{next(_ids)}", prompt_token_ids=ids,
                                               max_tokens=args.interactive_tokens, temperature=0, ignore_eos=True))
        events = stream.events()
        next(events)
        ttfts.append(time.perf_counter() - sent)
        finished(list(events)[-1])  # the stream to its end: the final line
        e2es.append(time.perf_counter() - sent)
    rate = None
    if batch is not None:
        rate = (batch.tokens - tokens_before) / (time.perf_counter() - began)
        batch.end()
    return ttfts, e2es, rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small", "bench"))
    parser.add_argument("--slots", type=int, default=4, help="max_running_requests")
    parser.add_argument("--batch", type=int, default=8, help="batch requests kept in flight")
    parser.add_argument("--batch-prompt", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=96)
    parser.add_argument("--interactive", type=int, default=6, help="interactive requests per mode and round")
    parser.add_argument("--interactive-prompt", type=int, default=32)
    parser.add_argument("--interactive-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-process", choices=("on", "off"), default="on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    require_at_least(parser, args, 1, "slots", "batch_prompt", "batch_tokens", "interactive", "interactive_prompt",
                     "interactive_tokens", "rounds")
    require_at_least(parser, args, 0, "batch")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.devmodels import make_model
    from hpcllm.worker.engine import Engine

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    results = {mode: ([], [], []) for mode in MODES}
    with tempfile.TemporaryDirectory() as folder:
        path = make_model("llama", Path(folder) / "llama", size=args.size, dtype="float32")
        model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
        with Engine(model, tokenizer, model_name="bench", max_running_requests=args.slots,
                    model_process=args.model_process == "on") as engine:
            run_mode(engine, "alone", args, rng)  # warm-up, not counted
            for round_index in range(args.rounds):
                shift = round_index % len(MODES)
                for mode in MODES[shift:] + MODES[:shift]:
                    ttfts, e2es, rate = run_mode(engine, mode, args, rng)
                    results[mode][0].extend(ttfts)
                    results[mode][1].extend(e2es)
                    if rate is not None:
                        results[mode][2].append(rate)
                    print(f"round {round_index + 1} {mode:15} TTFT median {statistics.median(ttfts) * 1e3:8.1f} ms",
                          flush=True)
    alone_ttft, alone_e2e = statistics.median(results["alone"][0]), statistics.median(results["alone"][1])
    print(f"\n{args.size} model, {args.slots} slots, batch of {args.batch} in flight ({args.batch_prompt}+"
          f"{args.batch_tokens} tokens), interactive {args.interactive_prompt}+{args.interactive_tokens} tokens, "
          f"{args.rounds} rounds, model process {args.model_process}")
    print(f"{'mode':15} {'TTFT p50 ms':>12} {'x alone':>8} {'e2e p50 ms':>11} {'x alone':>8} {'batch tok/s':>12}")
    for mode, (ttfts, e2es, rates) in results.items():
        ttft, e2e = statistics.median(ttfts), statistics.median(e2es)
        rate = f"{statistics.median(rates):12.1f}" if rates else f"{'-':>12}"
        print(f"{mode:15} {ttft * 1e3:12.1f} {ttft / alone_ttft:8.2f} {e2e * 1e3:11.1f} {e2e / alone_e2e:8.2f} {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
