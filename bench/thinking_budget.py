"""Greedy decoding with a thinking budget (vLLM's thinking_token_budget, no grammar) against the same requests
without one, in the same run.

    PYTHONPATH=$PWD .venv/bin/python bench/thinking_budget.py [--size small] [--requests 8] [--max-tokens 64]
                                                              [--rounds 5] [--threads 1] [--model-process on|off]
                                                              [--clock wall|cpu]
                                                              [--speculate K --prompt-tokens N]

A tiny reasoning model (devmodels' Llama with Qwen3's <think> template) thinks from its first token: each request's
prompt opened the thinking, and the budget (twice max_tokens) is never spent, so both runs generate the same greedy
tokens (checked). What differs is how the engine chooses them. A budget used to send its request down the per-row
path for its whole thinking (its logits row adjusted and sampled alone: a vocab row copied per token, no step-wide
argmax); since the end marker replaces the chosen token once a budget is spent (sampling.forced_or), a budget-only
greedy request takes the step's argmax like any other. Each round runs both (the order alternating) and prints
output tokens/s and the ratio budget / plain; the end the median ratio and its range. A ratio near 1.00 is the
point; --clock cpu times each run by the CPU time of this process and its model process (with --model-process
on), steadier on a shared machine.

--speculate K turns n-gram speculation on (speculative_ngram_tokens = K, both runs) on the model rewired to copy
(hpcllm/worker/tests/copying_model.py), with --prompt-tokens N long prompts: random tokens, then the stretch of the
copy cycle the output follows with every 4th token changed (the spec_decode bench's partial workload: proposals
accepted up to a changed token, so speculative and plain steps alternate), then the end marker, whose successor
starts the output (it thinks from its first token and never reaches the marker again). What the budget costs there
is its per-step bookkeeping of the thinking: with a model process (--model-process on) the engine had the model
process rebuild the request's TokenState from all its ids (prompt included) after each speculative step, and each
speculative commit scanned the whole output again for its ThinkingState, O(prompt + output) per step (until
ec9745d: now a seed per request, then the tokens taken; docs/serving-bench.md session 32). The ids/tok column
counts the token ids the budget run sent the model process for its TokenStates (seeds and StepBatch.state_tokens)
per output token.
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

from bench.benchkit import require_at_least  # noqa: E402

PROMPT = "Think about the question, then answer it: what is the capital of France, and why is it there?"


def count_state_ids(engine) -> list[int]:
    """[the token ids steps sent the model process for TokenStates so far] (a list to read as it grows)."""
    sent = [0]
    launch = engine.runner.launch

    def counting(batch) -> None:
        sent[0] += (sum(len(seed.prompt_ids) + len(seed.output_ids) for seed in batch.state_seeds.values())
                    + sum(map(len, batch.state_tokens.values())))
        launch(batch)

    engine.runner.launch = counting
    return sent


def run(engine, prompts: list[list[int]], max_tokens: int, thinking, tag: str, clock) -> tuple[float, list]:
    """Seconds (of `clock`) for the requests, submitted together, to finish; their outputs."""
    from hpcllm.worker.protocol import GenerateRequest

    began = clock()
    with engine._lock:
        streams = [engine.submit(GenerateRequest(request_id=f"{tag}-{i}", prompt_token_ids=ids, max_tokens=max_tokens,
                                                 temperature=0, ignore_eos=True, thinking=thinking))
                   for i, ids in enumerate(prompts)]
    outputs = [[e.token_id for e in list(stream.events())[:-1]] for stream in streams]
    return clock() - began, outputs


def copy_prompts(successor: list[int], end: int, count: int, length: int, max_tokens: int) -> list[list[int]]:
    """--speculate's prompts: `length` tokens each, random (never the end marker), then the max_tokens of the cycle
    the output follows with every 4th changed, then the end marker (the output starts at its successor)."""
    rng = random.Random(0)

    def other() -> int:
        return next(t for t in iter(lambda: rng.randrange(len(successor)), None) if t != end)

    made = []
    for _ in range(count):
        stretch, token = [], end
        for i in range(max_tokens):
            token = successor[token]
            stretch.append(other() if i % 4 == 3 else token)
        made.append([other() for _ in range(length - len(stretch) - 1)] + stretch + [end])
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="devmodels size (tiny, small, ...)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-process", choices=("on", "off"), default="off")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--speculate", type=int, default=0,
                        help="speculative_ngram_tokens (0: none); the model copies, the prompts are --prompt-tokens")
    parser.add_argument("--prompt-tokens", type=int, help="with --speculate: each prompt's length (default 4096)")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "requests", "max_tokens", "rounds", "threads")
    if args.speculate < 0:
        parser.error("--speculate must be 0 (off) or the tokens proposed per step")
    if args.prompt_tokens is not None and not args.speculate:
        parser.error("--prompt-tokens needs --speculate K (only a speculating run has long prompts)")
    if args.prompt_tokens is None:
        args.prompt_tokens = 4096
    if args.speculate and args.prompt_tokens <= args.max_tokens:
        parser.error("--prompt-tokens must exceed --max-tokens (the prompt holds the stretch the output copies)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.gateway_stream import cpu_seconds
    from hpcllm.devmodels import make_model
    from hpcllm.worker.engine import Engine
    from hpcllm.worker.protocol import Thinking
    from hpcllm.worker.tests.copying_model import rewire_to_copy

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = make_model("llama", Path(folder) / "thinker", size=args.size, dtype="float32",
                          chat_template="qwen3-think")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        end = tokenizer.convert_tokens_to_ids("</think>")
        budget = Thinking(end_token_id=end, budget=2 * args.max_tokens)  # never spent: the same tokens as without
        if args.speculate:
            successor = rewire_to_copy(model)
            if args.max_tokens >= len(successor) - 1:
                parser.error(f"--max-tokens must be below {len(successor) - 1} with --speculate (the output would "
                             "reach the end marker again in the copy cycle)")
            prompts = copy_prompts(successor, end, args.requests, args.prompt_tokens, args.max_tokens)
            # Rotary positions beyond the devmodel's 512-2048 (computed per position, nothing trained on them).
            context = max(model.config.max_position_embeddings, args.prompt_tokens + args.max_tokens + 16)
            model.config.max_position_embeddings = tokenizer.model_max_length = context
        else:
            # Prompts of different lengths (a word more each), each opening the thinking as a chat template would.
            words = PROMPT.split()
            prompts = [tokenizer(" ".join(words[:len(words) - i % 4]) + "\n<think>\n")["input_ids"]
                       for i in range(args.requests)]
            context = None
        ratios = []
        with Engine(model, tokenizer, model_name="thinker", max_running_requests=args.requests,
                    model_process=args.model_process == "on", speculative_ngram_tokens=args.speculate,
                    max_model_len=context) as engine:
            clock = time.perf_counter
            if args.clock == "cpu":
                child = engine.model_process_pid
                clock = time.process_time if child is None else lambda: time.process_time() + sum(cpu_seconds(child))
            sent = count_state_ids(engine) if args.model_process == "on" else [0]
            run(engine, prompts, 4, None, "warm", clock)
            print(f"{'round':>5} {'plain tok/s':>11} {'budget tok/s':>12} {'ratio':>6} {'ids/tok':>7}")
            for round_ in range(args.rounds):
                order = [(None, "plain"), (budget, "budget")]
                results, ids = {}, {}
                for thinking, tag in order if round_ % 2 == 0 else order[::-1]:
                    before = sent[0]
                    results[tag] = run(engine, prompts, args.max_tokens, thinking, f"{tag}{round_}", clock)
                    ids[tag] = sent[0] - before
                if results["plain"][1] != results["budget"][1]:
                    print("outputs differ between the runs: the budget changed the tokens", file=sys.stderr)
                    return 1
                tokens = args.requests * args.max_tokens
                plain, with_budget = tokens / results["plain"][0], tokens / results["budget"][0]
                ratios.append(with_budget / plain)
                print(f"{round_:>5} {plain:>11.1f} {with_budget:>12.1f} {ratios[-1]:>6.2f} "
                      f"{ids['budget'] / tokens:>7.1f}")
    print(f"budget / plain: median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}) "
          f"over {args.rounds} rounds, {args.requests} requests of {args.max_tokens} tokens, {args.threads} "
          f"thread(s), model process {args.model_process}, {args.clock} clock"
          + (f", speculating {args.speculate} tokens on {args.prompt_tokens}-token prompts" if args.speculate else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
