"""Greedy decoding with a thinking budget (vLLM's thinking_token_budget, no grammar) against the same requests
without one, in the same run.

    PYTHONPATH=$PWD .venv/bin/python bench/thinking_budget.py [--size small] [--requests 8] [--max-tokens 64]
                                                              [--rounds 5] [--threads 1] [--model-process on|off]
                                                              [--clock wall|cpu]

A tiny reasoning model (devmodels' Llama with Qwen3's <think> template) thinks from its first token: each request's
prompt opened the thinking, and the budget (twice max_tokens) is never spent, so both runs generate the same greedy
tokens (checked). What differs is how the engine chooses them. A budget used to send its request down the per-row
path for its whole thinking (its logits row adjusted and sampled alone: a vocab row copied per token, no step-wide
argmax); since the end marker replaces the chosen token once a budget is spent (sampling.forced_or), a budget-only
greedy request takes the step's argmax like any other. Each round runs both (the order alternating) and prints
output tokens/s and the ratio budget / plain; the end the median ratio and its range. A ratio near 1.00 is the
point; --clock cpu times each run by this process's CPU time (in process only), steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPT = "Think about the question, then answer it: what is the capital of France, and why is it there?"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="devmodels size (tiny, small, ...)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-process", choices=("on", "off"), default="off")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    for name in ("requests", "max_tokens", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.clock == "cpu" and args.model_process == "on":
        parser.error("--clock cpu times this process only: use it with --model-process off")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.devmodels import make_model
    from hpcllm.worker.engine import Engine
    from hpcllm.worker.protocol import Thinking

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as folder:
        path = make_model("llama", Path(folder) / "thinker", size=args.size, dtype="float32",
                          chat_template="qwen3-think")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        end = tokenizer.convert_tokens_to_ids("</think>")
        budget = Thinking(end_token_id=end, budget=2 * args.max_tokens)  # never spent: the same tokens as without
        # Prompts of different lengths (a word more each), each opening the thinking as a chat template would.
        words = PROMPT.split()
        prompts = [tokenizer(" ".join(words[:len(words) - i % 4]) + "\n<think>\n")["input_ids"]
                   for i in range(args.requests)]
        ratios = []
        with Engine(model, tokenizer, model_name="thinker", max_running_requests=args.requests,
                    model_process=args.model_process == "on") as engine:
            run(engine, prompts, 4, None, "warm", clock)
            print(f"{'round':>5} {'plain tok/s':>11} {'budget tok/s':>12} {'ratio':>6}")
            for round_ in range(args.rounds):
                order = [(None, "plain"), (budget, "budget")]
                results = {}
                for thinking, tag in order if round_ % 2 == 0 else order[::-1]:
                    results[tag] = run(engine, prompts, args.max_tokens, thinking, f"{tag}{round_}", clock)
                if results["plain"][1] != results["budget"][1]:
                    print("outputs differ between the runs: the budget changed the tokens", file=sys.stderr)
                    return 1
                tokens = args.requests * args.max_tokens
                plain, with_budget = tokens / results["plain"][0], tokens / results["budget"][0]
                ratios.append(with_budget / plain)
                print(f"{round_:>5} {plain:>11.1f} {with_budget:>12.1f} {ratios[-1]:>6.2f}")
    print(f"budget / plain: median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}) "
          f"over {args.rounds} rounds, {args.requests} requests of {args.max_tokens} tokens, {args.threads} "
          f"thread(s), model process {args.model_process}, {args.clock} clock")
    return 0


if __name__ == "__main__":
    sys.exit(main())
