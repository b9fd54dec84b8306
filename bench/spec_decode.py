"""N-gram speculative decoding ([worker] speculative_ngram_tokens) against plain decoding, in the same run.

    PYTHONPATH=$PWD .venv/bin/python bench/spec_decode.py [--size small] [--tokens 4] [--requests 1 8]
                                                          [--rounds 3] [--max-tokens 128] [--threads 2]
                                                          [--model-process on|off] [--fixed] [--clock wall|cpu]
    PYTHONPATH=$PWD .venv/bin/python bench/spec_decode.py --step-cost [--rounds 50] [--context 330] [--threads 1]

Random weights never copy their prompt, so the model is the devmodels Llama rewired to copy
(hpcllm/worker/tests/copying_model.py: its greedy successor of each token is fixed, every layer still computed):
its output reproduces any stretch of one token cycle that its prompt holds. Three workloads, N greedy requests
submitted together, each on its own prompt:

- copy: a 256-token stretch of the cycle, 16 other tokens, then the stretch's first token: the output copies the
  stretch (every proposal accepted: the best case, summaries/edits/RAG that quote their input).
- partial: the same with every 4th token of the stretch replaced: proposals are accepted up to a replaced token.
- none: 256 random tokens: the output matches nothing (no proposals: the worst case, the lookup and, with a model
  process, the steps not sent ahead).

Two engines on two copies of the model, one plain and one speculating, run each workload in turn, the order
rotating per round; each round prints both output tokens/s and their ratio (spec / plain), plus the acceptance
(accepted / proposed tokens) and the tokens per step of the speculating engine, and each workload the median ratio
of its rounds and their range. --fixed adds a third engine that speculates with the adaptive rule off (every lookup
proposes k, as before ngram.SpeculationRecord): its tokens/s and ratio to plain close each line. Outputs are checked
equal. --clock cpu times each run by this process's CPU time instead of the wall clock (in process only): on a
machine shared with other load, a run's wall time swings with the cores others take, its CPU time much less.
--step-cost measures instead what one verification adds to a step's forward (step_cost), the cost ngram.py's rule
weighs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DOCUMENT_TOKENS = 256
WORKLOADS = ("copy", "partial", "none")
# --step-cost: 16 sequences of --context +- CONTEXT_SPREAD tokens, each in its own BLOCKS_PER_SEQUENCE blocks of
# BLOCK_SIZE, verifying up to max(PROPOSED) tokens.
SEQUENCES, CONTEXT_SPREAD, BLOCKS_PER_SEQUENCE, BLOCK_SIZE, PROPOSED = 16, 20, 100, 16, (1, 3, 5)
# The --context that fits: every sequence at least 1 token, the longest with its verification in its blocks.
CONTEXTS = range(CONTEXT_SPREAD + 1, BLOCKS_PER_SEQUENCE * BLOCK_SIZE - CONTEXT_SPREAD - max(PROPOSED))


def always_propose_k():
    """The engine class with the adaptive rule off: every request looks up a proposal at every decode and proposes
    k whatever its acceptance (the engine as it was before ngram.SpeculationRecord)."""
    from hpcllm.worker.engine import Engine
    from hpcllm.worker.ngram import SpeculationRecord

    class AlwaysPropose(SpeculationRecord):
        """The rule off: a lookup at every step and k proposed at every match (the rate and back-off it still keeps
        are read only by these two)."""

        def due(self, step: int) -> bool:
            return True

        def length(self, tokens: int, decodes: int) -> int:
            return tokens

    class FixedK(Engine):
        def _speculate(self, work):
            for w in work:
                if not isinstance(w.req.speculation, AlwaysPropose):
                    w.req.speculation = AlwaysPropose()
            return super()._speculate(work)

    return FixedK


def prompts(workload: str, successor: list[int], count: int, rng: random.Random) -> list[list[int]]:
    from hpcllm.worker.tests.copying_model import cycle_from

    vocab = len(successor)
    made = []
    for _ in range(count):
        if workload == "none":
            made.append([rng.randrange(4, vocab) for _ in range(DOCUMENT_TOKENS)])
            continue
        document = cycle_from(successor, rng.randrange(4, vocab), DOCUMENT_TOKENS)
        if workload == "partial":
            document = [rng.randrange(4, vocab) if i % 4 == 3 else t for i, t in enumerate(document)]
        made.append(document + [rng.randrange(4, vocab) for _ in range(16)] + document[:1])
    return made


def run(engine, batch: list[list[int]], max_tokens: int, tag: str, clock=time.perf_counter
        ) -> tuple[float, list[list[int]]]:
    """Seconds (of `clock`) for the batch's requests, submitted together, to finish; their outputs."""
    from hpcllm.worker.protocol import GenerateRequest

    began = clock()
    with engine._lock:
        streams = [engine.submit(GenerateRequest(request_id=f"{tag}-{i}", prompt_token_ids=ids, max_tokens=max_tokens,
                                                 temperature=0, ignore_eos=True)) for i, ids in enumerate(batch)]
    outputs = [[e.token_id for e in list(stream.events())[:-1]] for stream in streams]
    return clock() - began, outputs


def summary(ratios: list[float]) -> str:
    """The median of a workload's ratios and their range."""
    return f"{statistics.median(ratios):>6.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def counts(engine) -> tuple[float, float]:
    return engine.metrics.spec_proposed_tokens._value.get(), engine.metrics.spec_accepted_tokens._value.get()


def step_cost(args, path: Path) -> None:
    """--step-cost: what a verification of k proposed tokens adds to a step of d decodes, in output tokens of the
    step (d x added time / step time, the unit of ngram.py's costs), by the forward's CPU time (the paged runner
    alone, thread_time: load on the machine adds little), the chunk in the decodes' grouped call ("grouped") and
    attended on its own ("alone", PagedRunner.max_grouped_tokens = 1); per rep the three steps in rotating order,
    median and quartiles of the reps' paired ratios."""
    import torch
    from transformers import AutoModelForCausalLM

    from hpcllm.worker.runner import MAX_GROUPED_TOKENS, PagedRunner, SequenceChunk, StepBatch

    runner = PagedRunner(AutoModelForCausalLM.from_pretrained(path).eval(),
                         num_blocks=SEQUENCES * BLOCKS_PER_SEQUENCE, block_size=BLOCK_SIZE)
    rng = random.Random(0)
    contexts = [args.context + rng.randrange(-CONTEXT_SPREAD, CONTEXT_SPREAD) for _ in range(SEQUENCES)]
    tables = [list(range(BLOCKS_PER_SEQUENCE * n, BLOCKS_PER_SEQUENCE * (n + 1))) for n in range(SEQUENCES)]

    def step(decodes: int, proposed: int = 0) -> StepBatch:  # the first decode verifies `proposed` tokens
        return StepBatch([SequenceChunk(n, [5] * (1 + (proposed if n == 0 else 0)), contexts[n], tables[n],
                                        logits_positions=1 + (proposed if n == 0 else 0)) for n in range(decodes)])

    print(f"llama {args.size}, contexts ~{args.context}, {args.threads} threads: a verification's cost in tokens "
          f"of the step, median (quartiles) of {args.rounds} reps")
    with torch.inference_mode():
        for n, context in enumerate(contexts):
            runner.step(StepBatch([SequenceChunk(n, [rng.randrange(1000) for _ in range(context)], 0, tables[n])]))
        for decodes in (1, 4, 8, SEQUENCES):
            for proposed in PROPOSED:
                batches = {"base": step(decodes), "grouped": step(decodes, proposed), "alone": step(decodes, proposed)}
                costs: dict[str, list[float]] = {"grouped": [], "alone": []}
                for rep in range(args.rounds):
                    seconds, names = {}, list(batches)
                    for name in names[rep % 3:] + names[:rep % 3]:
                        runner.max_grouped_tokens = 1 if name == "alone" else MAX_GROUPED_TOKENS
                        began = time.thread_time()
                        runner.step(batches[name])
                        seconds[name] = time.thread_time() - began
                    for name, paid in costs.items():
                        paid.append(decodes * (seconds[name] - seconds["base"]) / seconds["base"])
                print(f"d={decodes:>2} k={proposed}: " + "  ".join(
                    f"{name} {statistics.median(paid):5.2f} ({quartiles[0]:.2f}..{quartiles[2]:.2f})"
                    for name, paid in costs.items() for quartiles in [statistics.quantiles(paid, n=4)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=("tiny", "small", "bench"))
    parser.add_argument("--tokens", type=int, default=4, help="speculative_ngram_tokens of the speculating engine")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-process", choices=("on", "off"), default="on",
                        help="on: as CPU workers run (forward in a child process, asynchronous scheduling)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--fixed", action="store_true",
                        help="also run an engine speculating with the adaptive rule off (k proposed at every match)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: tokens per second of this process's CPU time (the engines run one at a time; on a "
                             "loaded machine the time waiting for a core is left out), with --model-process off")
    parser.add_argument("--step-cost", action="store_true",
                        help="measure what a verification adds to a step of 1-16 decodes (grouped and alone) instead "
                             "of the engines; --rounds reps, --context tokens per sequence")
    parser.add_argument("--context", type=int, default=330, help="--step-cost: the sequences' context length")
    args = parser.parse_args()
    if args.rounds < 1 or (args.step_cost and args.rounds < 2):
        parser.error("--rounds must be >= 1, and >= 2 with --step-cost (its quartiles need two reps)")
    if args.step_cost and args.context not in CONTEXTS:
        parser.error(f"--context must be {CONTEXTS.start} to {CONTEXTS.stop - 1} (the sequences are --context +- "
                     f"{CONTEXT_SPREAD} tokens in {BLOCKS_PER_SEQUENCE} blocks of {BLOCK_SIZE})")
    if args.clock == "cpu" and args.model_process == "on":
        parser.error("--clock cpu counts this process's CPU time: use it with --model-process off")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.devmodels import make_model
    from hpcllm.worker.engine import Engine
    from hpcllm.worker.tests.copying_model import rewire_to_copy

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = make_model("llama", Path(folder) / "llama", size=args.size, dtype="float32")
        if args.step_cost:
            step_cost(args, path)
            return 0
        tokenizer = AutoTokenizer.from_pretrained(path)

        def engine(tokens: int, kind=Engine) -> Engine:
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            rewire_to_copy(model)
            return kind(model, tokenizer, speculative_ngram_tokens=tokens, max_running_requests=max(args.requests),
                          model_process=args.model_process == "on",
                          model_process_threads=args.threads).start()

        successor = rewire_to_copy(AutoModelForCausalLM.from_pretrained(path))
        engines = {"plain": engine(0), "spec": engine(args.tokens)}
        if args.fixed:
            engines["fixed"] = engine(args.tokens, always_propose_k())
        try:
            for name, warming in engines.items():  # first steps (allocations, oneDNN primitives) are not timed
                run(warming, prompts("copy", successor, max(args.requests), random.Random(0)), 16, f"warm-{name}")
            print(f"llama {args.size}, k={args.tokens}, model process {args.model_process}, {args.threads} threads, "
                  f"{args.max_tokens} tokens per request, {args.clock} clock")
            print(f"{'workload':8} {'N':>3} {'round':>5} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} "
                  f"{'accepted':>8} {'tok/step':>8}" + (f" {'fixed tok/s':>11} {'ratio':>6}" if args.fixed else ""))
            for workload in args.workloads:
                for count in args.requests:
                    ratios, fixed_ratios = [], []
                    for round_ in range(args.rounds):
                        batch = prompts(workload, successor, count, random.Random(f"{workload}{count}{round_}"))
                        names = list(engines)
                        order = names[round_ % len(names):] + names[:round_ % len(names)]
                        seconds, outputs = {}, {}
                        before = counts(engines["spec"])
                        for name in order:
                            seconds[name], outputs[name] = run(engines[name], batch, args.max_tokens,
                                                               f"{name}-{workload}-{count}-{round_}", clock)
                        if any(outputs[name] != outputs["plain"] for name in names):
                            raise SystemExit(f"{workload} N={count} round {round_}: outputs differ")
                        proposed, accepted = (after - was for after, was in zip(counts(engines["spec"]), before))
                        tokens = sum(len(o) for o in outputs["spec"])
                        rate = {name: tokens / seconds[name] for name in seconds}
                        # Per request, a step emits its accepted tokens and one more (the prefill's token aside).
                        per_step = tokens / max(1.0, tokens - accepted)
                        ratios.append(rate["spec"] / rate["plain"])
                        fixed = ""
                        if args.fixed:
                            fixed_ratios.append(rate["fixed"] / rate["plain"])
                            fixed = f" {rate['fixed']:>11.1f} {fixed_ratios[-1]:>6.2f}"
                        print(f"{workload:8} {count:>3} {round_:>5} {rate['plain']:>11.1f} {rate['spec']:>10.1f} "
                              f"{ratios[-1]:>6.2f} {(f'{accepted / proposed:.0%}' if proposed else '-'):>8} "
                              f"{per_step:>8.2f}{fixed}")
                    print(f"{workload:8} {count:>3} {'median':>5} {'':>11} {'':>10} {summary(ratios)}"
                          + (f" fixed {summary(fixed_ratios)}" if args.fixed else ""))
        finally:
            for running in engines.values():
                running.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
