"""Embeddings per second of hpcllm's engine: a piece of inputs per forward (batched) against one forward per input.

    PYTHONPATH=$PWD .venv/bin/python bench/embed.py [--passages 100] [--tokens 32 128 400] [--chunk N]
                                                    [--rounds 5] [--threads 1]

One Engine (in process, paged runner, CPU fast path) on the devmodels "small" Llama (float32) embeds --passages
seeded random token lists of L tokens each (every L of --tokens), as /v1/embeddings or /v1/rerank sends them, with
no stream running. Two modes, on the same engine and inputs, taking turns within each round (who goes first
alternates):

  one-at-a-time   prefill_chunk_tokens = L: every piece holds one input, one forward each (the engine before
                  batched pooling)
  batched         prefill_chunk_tokens = --chunk (default: the Engine's): as many inputs per forward as fit in it
                  once padded

Each mode's embed call is timed whole (the engine thread's pieces and the hand-off); it prints embeddings/s per
mode, the median and range over --rounds, and batched / one-at-a-time: the ratio of the medians and the range of
the per-round ratios.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402

MODES = ("one-at-a-time", "batched")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100, help="inputs per embed call")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 128, 400], help="tokens per input (each L)")
    parser.add_argument("--chunk", type=int, help="prefill_chunk_tokens of the batched mode (default: the Engine's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    require_at_least(parser, args, 1, "passages", "rounds", "chunk", "tokens")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench import coldstart
    from hpcllm.worker.engine import Engine

    if args.chunk is None:
        args.chunk = inspect.signature(Engine).parameters["prefill_chunk_tokens"].default
    torch.set_num_threads(args.threads)
    coldstart.checkpoint("small")
    hf_dir = coldstart.WORK / "llama-small-hf"
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(hf_dir), model_name="bench", batching="paged",
                    prefill_chunk_tokens=args.chunk).start()
    print(f"devmodels small llama, float32, {torch.get_num_threads()} thread(s), {args.passages} passages per call, "
          f"batched pieces of at most {args.chunk} padded tokens, {args.rounds} rounds", flush=True)
    try:
        too_long = [length for length in args.tokens if length > engine.max_model_len]
        if too_long:  # before any is measured
            parser.error(f"--tokens {too_long[0]} is longer than the model's {engine.max_model_len} tokens")
        for length in args.tokens:
            report(length, measure(engine, length, args))
    finally:
        engine.shutdown()
    return 0


def measure(engine, length: int, args) -> dict[str, list[float]]:
    """Embeddings/s of each mode per round, the modes taking turns (after one untimed call each)."""
    import torch

    generator = torch.Generator().manual_seed(length)
    inputs = [torch.randint(3, engine.vocab_size, (length,), generator=generator).tolist()
              for _ in range(args.passages)]
    chunk_of = {"one-at-a-time": length, "batched": args.chunk}

    def rate(mode: str) -> float:
        engine.prefill_chunk_tokens = chunk_of[mode]  # read by the engine thread per piece; no job is running
        began = time.perf_counter()
        engine.embed(inputs)
        return args.passages / (time.perf_counter() - began)

    for mode in MODES:
        rate(mode)
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
            rates[mode].append(rate(mode))
    return rates


def report(length: int, rates: dict[str, list[float]]) -> None:
    for mode, values in rates.items():
        print(f"L={length:4d} {mode:14s} {statistics.median(values):8.1f} embeddings/s "
              f"(range {min(values):.1f}-{max(values):.1f})")
    alone, batched = rates["one-at-a-time"], rates["batched"]
    ratios = [b / a for a, b in zip(alone, batched)]
    print(f"L={length:4d} batched / one-at-a-time: {statistics.median(batched) / statistics.median(alone):.2f}x "
          f"(per round {min(ratios):.2f}-{max(ratios):.2f}x)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
