"""One CPU step of the paged runner with large activations, with glibc's defaults and with hpcllm's kept heap.

    PYTHONPATH=$PWD .venv/bin/python bench/step_memory.py [--decodes 55] [--context 20 500] [--prefill 500]
                                                          [--rounds 3] [--steps 30]

A step of D decoding sequences (contexts drawn from LO..HI, seeded) and one P-token prefill chunk on the devmodels
"small" Llama (float32, 1 thread), the shape of a busy step with long contexts, timed --steps times after a warm-up
(median). The allocator's thresholds are process-wide, so each measurement runs in a fresh process: "kept" builds
the runner as the engine does (PagedRunner calls hpcllm.worker.cpumem.keep_freed_memory: freed activations stay on
the heap); "default" replaces that call by a no-op first, so glibc frees and maps large blocks as it does by default.
The two alternate, --rounds times each, and the ratio of the medians is printed (same run, same load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402

MODES = ("default", "kept")


def measure(args) -> float:
    """Median milliseconds of the step, in this process, the allocator set up as args.child says."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from bench import coldstart
    from hpcllm.worker import cpumem
    from hpcllm.worker.runner import PagedRunner, SequenceChunk, StepBatch

    if args.child == "default":
        cpumem.keep_freed_memory = lambda: "left as it is (bench baseline)"
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(coldstart.WORK / "llama-small-hf").eval()  # checkpoint("small")'s
    rng = random.Random(0)
    chunks, next_block = [], 0
    for seq in range(args.decodes):
        context = rng.randint(*args.context)
        blocks = context // 16 + 1
        chunks.append(SequenceChunk(seq, [5], context, list(range(next_block, next_block + blocks))))
        next_block += blocks
    if args.prefill:
        blocks = args.prefill // 16 + 1
        chunks.append(SequenceChunk(args.decodes, [7] * args.prefill, 0, list(range(next_block, next_block + blocks))))
        next_block += blocks
    runner = PagedRunner(model, num_blocks=next_block, block_size=16)
    batch = StepBatch(chunks)
    times = []
    with torch.inference_mode():
        for _ in range(5):
            runner.step(batch)
        for _ in range(args.steps):
            began = time.perf_counter()
            runner.step(batch)
            times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decodes", type=int, default=55)
    parser.add_argument("--context", type=int, nargs=2, metavar=("LO", "HI"), default=[20, 500])
    parser.add_argument("--prefill", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    require_at_least(parser, args, 1, "context", "rounds", "steps")
    require_at_least(parser, args, 0, "decodes", "prefill")  # 0: a prefill-only or a decode-only step
    if not args.decodes and not args.prefill:
        parser.error("--decodes 0 with --prefill 0 is an empty step: give at least one decode or a prefill")
    if args.child:
        print(json.dumps({"step_ms": measure(args)}))
        return 0
    from bench import coldstart

    coldstart.checkpoint("small")  # build it once, before the timed processes
    passed = [f"--decodes={args.decodes}", "--context", *map(str, args.context), f"--prefill={args.prefill}",
              f"--steps={args.steps}"]
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
            out = subprocess.run([sys.executable, __file__, *passed, f"--child={mode}"], capture_output=True,
                                 text=True, check=True, cwd=REPO).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1])["step_ms"])
            print(f"round {round_ + 1}, {mode}: step {results[mode][-1]:.1f} ms", flush=True)
    medians = {mode: statistics.median(times) for mode, times in results.items()}
    print(f"{args.decodes} decodes (contexts {args.context[0]}..{args.context[1]}) + a {args.prefill}-token prefill, "
          f"median of {args.rounds} processes each: default {medians['default']:.1f} ms, kept heap "
          f"{medians['kept']:.1f} ms: {medians['default'] / medians['kept']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
