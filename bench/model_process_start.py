"""How long handing a loaded model to its model process takes: a plain CPU load against a shared-memory load.

    PYTHONPATH=$PWD .venv/bin/python bench/model_process_start.py [--checkpoint /var/tmp/hpcllm-bench/bench/ckpt]
        [--rounds 2] [--no-fast-path]

Per round, each mode once (order reversed every other round): a ModelProcess is started and waited for (its imports
done, as a spare's or a worker's is by the time the load ends), the checkpoint is loaded into a fresh buffer pool
(`shared_memory` False / True), then ProcessRunner's init is timed: pickling the model down the pipe (a plain load's
weights are copied into new shm segments by `share_memory_()` first; a shared load's go by fd), the child
rebuilding it and building its runner (the fast path's fused, packed weights included unless --no-fast-path), until
its "ready". The load's own time is printed too (a plain load of files the page cache holds maps them; a shared one
reads them), and the median of load + init. Prints per-round times and the plain / shared ratio of the
medians measured in this run.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402

MODES = {"plain": False, "shared": True}


def one_start(checkpoint: Path, shared_memory: bool, fast_path: bool) -> tuple[float, str, float]:
    """(load seconds, its reader mode, ProcessRunner init seconds) for one fresh model process and one fresh load."""
    from hpcllm.store.loader import load_model
    from hpcllm.store.memory import HostBufferPool
    from hpcllm.worker.model_process import ModelProcess
    from hpcllm.worker.runner_process import ProcessRunner

    process = ModelProcess()
    if not process.wait_imported():
        raise SystemExit("the model process died while importing")
    loaded = load_model(checkpoint, tokenizer=False, pool=HostBufferPool(), shared_memory=shared_memory)
    started = time.perf_counter()
    runner = ProcessRunner(loaded.model, num_blocks=64, block_size=16, batching="paged", max_rows=16,
                           process=process, fast_path=fast_path)
    init = time.perf_counter() - started
    load_seconds, reader_mode = loaded.stats.seconds, loaded.stats.reader_mode
    runner.close()
    loaded.release()
    del loaded, runner
    gc.collect()
    return load_seconds, reader_mode, init


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("/var/tmp/hpcllm-bench/bench/ckpt"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-fast-path", action="store_true", help="the child skips packing the weights")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "rounds")
    if not (args.checkpoint / "index.json").is_file():
        print(f"{args.checkpoint} is not a converted checkpoint; pass --checkpoint", file=sys.stderr)
        return 2
    import torch  # noqa: F401  (imported before timing anything)

    inits: dict[str, list[float]] = {mode: [] for mode in MODES}
    totals: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_number in range(args.rounds):
        order = list(MODES) if round_number % 2 == 0 else list(reversed(MODES))
        for mode in order:
            load_seconds, reader_mode, init_seconds = one_start(args.checkpoint, MODES[mode], not args.no_fast_path)
            inits[mode].append(init_seconds)
            totals[mode].append(load_seconds + init_seconds)
            print(f"round {round_number + 1} {mode:6s}: load {load_seconds:5.2f} s ({reader_mode}), "
                  f"ProcessRunner init {init_seconds:6.2f} s", flush=True)
    for label, times in (("ProcessRunner init", inits), ("load + init", totals)):
        plain, shared = (statistics.median(times[mode]) for mode in MODES)
        print(f"median {label}: plain load {plain:.2f} s, shared-memory load {shared:.2f} s; "
              f"plain / shared = {plain / shared:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
