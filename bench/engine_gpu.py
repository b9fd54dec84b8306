"""hpcllm's engine on a GPU: output tokens/s of continuous batching against transformers' static batching.

    PYTHONPATH=$PWD python bench/engine_gpu.py [--model-dir HF_DIR] [--device cuda] [--concurrency 1 16 64]
                                               [--rounds 2]

C requests from bench/serve.py's seeded prompt set (prompt lengths log-normal, median ~60 tokens; outputs 16..128
tokens) arrive together, greedy, every request running to its own max_tokens. Two ways to serve them, alternating
per round on the same loaded model (no HTTP, no gateway):
- hpcllm: hpcllm's Engine (paged KV blocks, one forward per step over every running request, chunked prefill,
  requests leave the batch as they finish);
- generate: transformers' `generate` over all C prompts at once (left padding, as many new tokens as the longest
  request wants): the static batch a plain script would run. Only the tokens each request asked for count. It runs
  under the attention kernels hpcllm's steps use on CUDA (flash / memory-efficient / math, not cuDNN, whose
  per-shape planning would otherwise tax whichever side meets a shape first).
Prints output tokens/s per C for both and hpcllm's ratio to `generate` in the same run. The model is the HF folder
given (bench/gpu_check.sh passes bench/load.py's ~2 GB bf16 Llama), else the devmodels "small" Llama in float32.

On CPU the load and every run happen in a thread of their own that ends with them, as a worker loads in a thread
that ends and then computes only on its engine thread: each thread that runs a parallel torch op keeps an OpenMP
pool while it lives, and with two pools libgomp's idle workers sleep instead of spinning (more managed threads
than CPUs), so every parallel op of either pays a wake-up. Measured on the 2-core VM with 2 torch threads: a packed
linear 35 us alone, 120 us while another thread held a pool; the engine at 1 request 237 tok/s after `generate` had
run on the main thread, 357-378 tok/s otherwise (docs/worker.md, "One OpenMP pool per process").
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402
from bench.serve import Prompt, prompt_set  # noqa: E402

TARGETS = ("hpcllm", "generate")
GRAPHS = "hpcllm-graphs"  # --cuda-graphs: hpcllm's engine with [worker] cuda_graphs
_request_ids = itertools.count()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="a Hugging Face model folder (default: the small dev Llama)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-output", type=int, default=128, help="cap on each request's output tokens")
    parser.add_argument("--padding-allowance", type=float,
                        help="the paged runner's padding allowance (how much padding lets decodes share one "
                             "attention call; inf: one call per layer for every decode, the GPU default)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help=f"also {GRAPHS}: decode steps replayed from CUDA graphs (one engine per level, its graphs "
                             "captured in the warm-up; on a CPU the same static steps run uncaptured)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: profile hpcllm's engine steps at each C (cProfile of the engine thread's "
                             "steps, then torch.profiler's top operators and CUDA runtime calls of a few steps)")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "concurrency", "rounds", "max_output")
    if args.model_dir is not None and not (args.model_dir / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir} is not a Hugging Face model folder (no config.json)")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device!r}: use cpu, cuda or cuda:N")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.worker import runner

    if args.padding_allowance is not None:
        runner.CPU_PADDING_ALLOWANCE = runner.GPU_PADDING_ALLOWANCE = args.padding_allowance
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: torch sees no CUDA device (run with --device cpu to try it here)")
        return 0
    model_dir = args.model_dir or small_model()
    began = time.perf_counter()
    model = in_own_thread(
        lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(args.device).eval())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"engine bench: {model_dir} ({model.dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters) on {args.device}, loaded in {time.perf_counter() - began:.1f} s; {describe(args.device)}; "
          f"padding allowance {runner.padding_allowance_for(torch.device(args.device))}",
          flush=True)

    if args.profile:
        for concurrency in args.concurrency:
            profile_engine(model, tokenizer, [Prompt(p.token_ids, min(p.max_tokens, args.max_output))
                                              for p in prompt_set(concurrency, model.config.vocab_size, seed=0)],
                           concurrency)
        return 0
    targets = TARGETS[:1] + (GRAPHS,) + TARGETS[1:] if args.cuda_graphs else TARGETS
    rates: dict[tuple[str, int], list[float]] = {}
    for concurrency in args.concurrency:
        prompts = [Prompt(p.token_ids, min(p.max_tokens, args.max_output))
                   for p in prompt_set(concurrency, model.config.vocab_size, seed=0)]
        runs = dict(RUNS)
        graphs_engine = None
        if args.cuda_graphs and args.device.startswith("cuda"):
            # One engine for the level: a worker captures each shape once; its warm-up serves the whole prompt set,
            # so the rounds replay graphs captured before them.
            graphs_engine = start_engine(model, tokenizer, concurrency, True)
            serve_all(graphs_engine, prompts)
            runs[GRAPHS] = lambda model, tokenizer, prompts, concurrency: serve_all(graphs_engine, prompts)
        elif args.cuda_graphs:  # on a CPU the static steps, uncaptured, each run on a fresh engine (no idle pool)
            runs[GRAPHS] = lambda model, tokenizer, prompts, concurrency: run_hpcllm(
                model, tokenizer, prompts, concurrency, cuda_graphs="eager")
        for run in (run_hpcllm, run_generate):  # warm-up: kernels, the allocator, the KV pool
            in_own_thread(run, model, tokenizer, prompts[:2], concurrency)
        for round_index in range(args.rounds):
            order = targets if round_index % 2 == 0 else targets[::-1]
            for target in order:
                seconds = in_own_thread(runs[target], model, tokenizer, prompts, concurrency)
                tokens = sum(p.max_tokens for p in prompts)
                rates.setdefault((target, concurrency), []).append(tokens / seconds)
                print(f"  C={concurrency:3d} round {round_index + 1} {target:13s} {tokens:6d} tokens in "
                      f"{seconds:6.2f} s = {tokens / seconds:8.1f} tok/s", flush=True)
        if graphs_engine is not None:
            graphs = graphs_engine.runner.decode_graphs
            print(f"  C={concurrency:3d} {GRAPHS}: {len(graphs.steps)} shapes, {graphs.captures} captured, "
                  f"{graphs.eager_steps} decode steps eager", flush=True)
            graphs_engine.shutdown()
    print_table(rates, args.concurrency, targets)
    return 0


def in_own_thread(function, *args):
    """function(*args) on a new thread, which ends with it (and its OpenMP pool with it, see the module's doc)."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # re-raised on the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name=f"bench-{getattr(function, '__name__', 'run')}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def small_model() -> Path:
    from bench import coldstart

    coldstart.checkpoint("small")
    return coldstart.WORK / "llama-small-hf"


def describe(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def start_engine(model, tokenizer, concurrency: int, cuda_graphs: bool | str = False):
    from hpcllm.worker.engine import Engine

    return Engine(model, tokenizer, max_running_requests=concurrency, batching="paged",
                  cuda_graphs=cuda_graphs).start()


def run_hpcllm(model, tokenizer, prompts: list[Prompt], concurrency: int, cuda_graphs: bool | str = False) -> float:
    """A fresh engine serving the prompts (serve_all)."""
    engine = start_engine(model, tokenizer, concurrency, cuda_graphs)
    try:
        return serve_all(engine, prompts)
    finally:
        engine.shutdown()


def serve_all(engine, prompts: list[Prompt]) -> float:
    """All requests submitted before the first step, as clients arriving together; seconds until the last is done."""
    from hpcllm.worker.protocol import GenerateRequest

    began = time.perf_counter()
    with engine._lock:
        streams = [engine.submit(GenerateRequest(request_id=f"r{next(_request_ids)}", prompt_token_ids=p.token_ids,
                                                 max_tokens=p.max_tokens, temperature=0, ignore_eos=True))
                   for p in prompts]
    for stream, prompt in zip(streams, prompts):
        produced = sum(1 for _ in stream.events()) - 1  # token lines, then the final line
        if produced != prompt.max_tokens:
            raise SystemExit(f"hpcllm produced {produced} tokens for a request of max_tokens {prompt.max_tokens}")
    return time.perf_counter() - began


def run_generate(model, tokenizer, prompts: list[Prompt], concurrency: int) -> float:
    """One generate call over every prompt (concurrency is the batch: all of them)."""
    import torch

    from hpcllm.worker.runner import attention_kernels

    device = model.get_input_embeddings().weight.device
    longest = max(len(p.token_ids) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (longest - len(p.token_ids)) + p.token_ids for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p.token_ids)) + [1] * len(p.token_ids) for p in prompts], device=device)
    new_tokens = max(p.max_tokens for p in prompts)
    began = time.perf_counter()
    with torch.no_grad(), attention_kernels(device):  # the kernels hpcllm's steps use (no cuDNN planning per shape)
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    if out.shape[1] != longest + new_tokens:
        raise SystemExit(f"generate produced {out.shape[1] - longest} new tokens, not {new_tokens}")
    return seconds


def profile_engine(model, tokenizer, prompts: list[Prompt], concurrency: int) -> None:
    """Where the engine thread's step time goes: Python functions (blocking calls such as a GPU sync show up as
    their tottime) and torch operators with the CUDA runtime calls (cudaStreamSynchronize, cudaMemcpy...)."""
    import cProfile
    import io
    import pstats

    import torch

    from hpcllm.worker.engine import Engine

    in_own_thread(run_hpcllm, model, tokenizer, prompts, concurrency)  # warm-up
    python_profile = cProfile.Profile()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    torch_profile = torch.profiler.profile(activities=activities)
    steps = [0]
    original = Engine._step

    def profiled_step(engine, active):  # on the engine thread, where the profilers must run
        steps[0] += 1
        if steps[0] == 20:
            torch_profile.start()
        python_profile.enable()
        try:
            return original(engine, active)
        finally:
            python_profile.disable()
            if steps[0] == 25:
                torch_profile.stop()

    Engine._step = profiled_step
    try:
        seconds = run_hpcllm(model, tokenizer, prompts, concurrency)
    finally:
        Engine._step = original
    print(f"\n==== C={concurrency}: {steps[0]} steps in {seconds:.2f} s ({1000 * seconds / steps[0]:.1f} ms/step); "
          f"torch.profiler over steps 20-25", flush=True)
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(python_profile, stream=text).sort_stats(order).print_stats(25)
        print(text.getvalue()[-6000:], flush=True)
    if steps[0] >= 25:
        print(torch_profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=48),
              flush=True)


RUNS = {"hpcllm": run_hpcllm, "generate": run_generate}


def print_table(rates: dict[tuple[str, int], list[float]], concurrency: list[int], targets=TARGETS) -> None:
    print("\noutput tok/s (median of rounds) | " + " | ".join(f"C={c}" for c in concurrency))
    for target in targets:
        print(f"{target:31s} | " + " | ".join(f"{statistics.median(rates[target, c]):8.1f}" for c in concurrency))
    for target in targets[:-1]:  # every hpcllm target against generate (the last)
        print(f"{target + ' / generate':31s} | " + " | ".join(
            f"{statistics.median(rates[target, c]) / statistics.median(rates['generate', c]):7.2f}x"
            for c in concurrency))


if __name__ == "__main__":
    sys.exit(main())
