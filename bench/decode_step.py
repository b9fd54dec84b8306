"""Where one decode step of hpcllm's engine spends its time, at N running requests (no HTTP, no gateway).

    PYTHONPATH=$PWD .venv/bin/python bench/decode_step.py [--requests 16] [--threads 2] [--profile]
                                                          [--fast-path on|off|fused|compare [--rounds 3]
                                                           [--modes off on]]

N requests from bench/serve.py's seeded prompt set run together in an Engine (paged batching) on the devmodels
"small" Llama (float32). Once all of them decode (every chunk one token), steps are timed: the whole engine step
(schedule, forward, sample, commit) in wall and in the engine thread's CPU time, the model forward, and inside it the paged attention function (KV writes,
context gathers, SDPA), summed over the layers. --profile also prints torch.profiler's top operators of a few
decode steps and their aten op count per step. Fast-path modes (hpcllm/worker/fastpath.py): `on` (the default:
fused q/k/v and gate/up, oneDNN-packed linears, and the lean step, the forward as one plain loop), `fused` (the
same model, stepped through transformers' modules), `off`, `fresh-gather` (`on`, but each layer's decode keys and
values gathered into a fresh tensor instead of the pool's kept buffers). --fast-path compare runs two modes (--modes,
default off on), alternating, each on a freshly loaded model, and prints the ratio of the medians (same run, same
load). --context LO HI gives the requests seeded random prompts of LO..HI tokens instead of the serve bench's prompt
set (whose contexts are mostly short): long contexts make the decode attention's gathers large.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402

PROFILED_STEPS = 5
MODES = ("on", "fused", "off", "fresh-gather")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--fast-path", choices=(*MODES, "compare"), default="on",
                        help="the paged runner's CPU fast path: on (fused, oneDNN-packed projections, lean step), "
                             "fused (without the lean step), off; compare: --rounds runs of two --modes, "
                             "alternating, and the ratio")
    parser.add_argument("--modes", nargs=2, choices=MODES, default=["off", "on"], help="what --fast-path compare "
                        "compares: the baseline, then the candidate")
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode with --fast-path compare")
    parser.add_argument("--context", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                        help="prompt lengths drawn uniformly from LO..HI (seeded) instead of the serve prompt set")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "requests", "threads", "steps", "rounds", "context")

    import torch

    torch.set_num_threads(args.threads)
    if args.fast_path != "compare":
        print_result(measure(args, args.fast_path), args)
        return 0
    baseline, candidate = args.modes
    results: dict[str, list[dict]] = {baseline: [], candidate: []}
    for round_ in range(args.rounds):
        for mode in (args.modes if round_ % 2 == 0 else args.modes[::-1]):  # alternate who goes first
            results[mode].append(measure(args, mode))
            print(f"round {round_ + 1}, fast path {mode}: "
                  f"step {results[mode][-1]['step_ms']:.1f} ms, CPU {results[mode][-1]['cpu_ms']:.1f} ms", flush=True)
    summary = {mode: {key: statistics.median(r[key] for r in runs) for key in runs[0] if key.endswith("_ms")}
               for mode, runs in results.items()}
    for mode in args.modes:
        print_result({**results[mode][0], **summary[mode]}, args, f"fast path {mode}, "
                                                                  f"median of {args.rounds} runs' medians")
    print(f"fast path {candidate} / {baseline}, same run: engine step "
          f"{summary[baseline]['step_ms'] / summary[candidate]['step_ms']:.2f}x faster, step CPU "
          f"{summary[baseline]['cpu_ms'] / summary[candidate]['cpu_ms']:.2f}x less")
    return 0


def measure(args, mode: str) -> dict:
    """One engine on a freshly loaded model (fast-path mode: MODES): the medians of its all-decode steps (and a
    profile if asked)."""
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from bench import coldstart
    from bench.serve import prompt_set
    from hpcllm.worker import runner as runner_module
    from hpcllm.worker.engine import Engine
    from hpcllm.worker.protocol import GenerateRequest

    coldstart.checkpoint("small")
    hf_dir = coldstart.WORK / "llama-small-hf"
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)

    attention_seconds = [0.0]
    paged = runner_module._paged_attention

    def timed_attention(*a, **kw):
        began = time.perf_counter()
        try:
            return paged(*a, **kw)
        finally:
            attention_seconds[0] += time.perf_counter() - began

    AttentionInterface.register(runner_module.PAGED_ATTENTION, timed_attention)

    engine = Engine(model, tokenizer, max_running_requests=args.requests, batching="paged", fast_path=mode != "off")
    if mode == "fused":
        engine.runner.lean_step, engine.runner.fast_path.lean_step = None, "turned off (--fast-path fused)"
    if mode == "fresh-gather":
        engine.runner.pool.keep_gather_buffers = False
    if engine.runner.lean_step is not None:  # it calls the attention function itself
        engine.runner.lean_step.attention = timed_attention
    samples: list[tuple[float, float, float, float]] = []  # (step, forward, attention, step CPU) of all-decode steps
    forward, step = engine._forward, engine._step
    current: dict = {}
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile else None

    def timed_forward(batch):
        attention_seconds[0] = 0.0
        began = time.perf_counter()
        out = forward(batch)
        current["forward"] = time.perf_counter() - began
        current["decode"] = len(batch.chunks) == args.requests and all(len(c.token_ids) == 1 for c in batch.chunks)
        current["attention"] = attention_seconds[0]
        return out

    profiled = [0]

    def timed_step(active):  # runs on the engine thread, where the profiler must start and stop too
        current.clear()
        began, began_cpu = time.perf_counter(), time.thread_time()
        step(active)
        if not current.get("decode"):
            return
        if len(samples) < args.steps:
            samples.append((time.perf_counter() - began, current["forward"], current["attention"],
                            time.thread_time() - began_cpu))
            if profiler is not None and len(samples) == args.steps:
                profiler.start()  # profile 5 more decode steps, after the timed ones
        elif profiler is not None and profiled[0] < PROFILED_STEPS:
            profiled[0] += 1
            if profiled[0] == PROFILED_STEPS:
                profiler.stop()

    engine._forward, engine._step = timed_forward, timed_step
    engine.start()
    try:
        prompts = prompt_set(args.requests, model.config.vocab_size, seed=0,
                             lengths=tuple(args.context) if args.context else None)
        with engine._lock:  # submit all before the first step, as concurrent clients that arrive together
            streams = [engine.submit(GenerateRequest(request_id=f"p{i}", prompt_token_ids=p.token_ids,
                                                     max_tokens=args.steps + 30, temperature=0, ignore_eos=True))
                       for i, p in enumerate(prompts)]
        for stream in streams:
            list(stream.events())
    finally:
        engine.shutdown()
        AttentionInterface.register(runner_module.PAGED_ATTENTION, paged)

    if not samples:
        raise SystemExit("no step ran all requests as decodes")
    step_ms, forward_ms, attention_ms, cpu_ms = (1000 * statistics.median(column) for column in zip(*samples))
    result = {"fast_path": engine.runner.fast_path, "samples": len(samples), "step_ms": step_ms, "cpu_ms": cpu_ms,
              "forward_ms": forward_ms, "attention_ms": attention_ms}
    if profiler is not None and profiled[0] == PROFILED_STEPS:
        averages = profiler.key_averages()
        result["aten_ops_per_step"] = sum(e.count for e in averages if e.key.startswith("aten::")) / PROFILED_STEPS
        result["profile"] = averages.table(sort_by="self_cpu_time_total", row_limit=20)
    return result


def print_result(result: dict, args, title: str | None = None) -> None:
    step_ms, forward_ms, attention_ms = result["step_ms"], result["forward_ms"], result["attention_ms"]
    print(title or f"median of {result['samples']} steps", f"({result['fast_path']}):")
    print(f"{args.requests} requests decoding, {args.threads} threads:")
    print(f"  engine step   {step_ms:6.1f} ms  ({args.requests / step_ms * 1000:.0f} tokens/s)")
    print(f"  step CPU time {result['cpu_ms']:6.1f} ms  (the engine thread's own; less sensitive to other load than "
          "wall time)")
    print(f"  forward       {forward_ms:6.1f} ms")
    print(f"  attention     {attention_ms:6.1f} ms  (all layers: KV write, gather, SDPA)")
    print(f"  rest of fwd   {forward_ms - attention_ms:6.1f} ms  (embeddings, norms, projections, MLP, lm_head)")
    print(f"  outside fwd   {step_ms - forward_ms:6.1f} ms  (schedule, sample, commit, stream events)")
    if "aten_ops_per_step" in result:
        print(f"  aten ops      {result['aten_ops_per_step']:6.0f} per decode step (torch.profiler)")
    if "profile" in result:
        print(f"torch.profiler, {PROFILED_STEPS} decode steps:")
        print(result["profile"])


if __name__ == "__main__":
    sys.exit(main())
