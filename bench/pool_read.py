"""Where a cold load into the reserved host pool spends its time: the loader against bare reads, in one process.

    .venv/bin/python bench/pool_read.py [--checkpoint DIR] [--reps 2] [--threads 8] [--block-mib 16]

One process reserves a pool as large as the checkpoint (as a spare worker does), imports torch / transformers and
builds the model code once, then alternates, each from a cold page cache (posix_fadvise DONTNEED on the data files):

  bare O_DIRECT, 4 KiB pages   os.preadv loop, threads x block, into a pre-faulted base-page arena
  bare O_DIRECT, huge pages    the same into a pre-faulted huge-page arena (what reserve_bytes makes)
  bare buffered, huge pages    the same loop without O_DIRECT: page cache -> the arena
  loader, O_DIRECT             hpcllm.load_model into the process-wide reserved pool, O_DIRECT with threads x block
  loader, buffered             the same, buffered into the pool

and prints GB/s, wall and CPU seconds of each, and each one's time over `bare O_DIRECT, huge pages` measured in the
same repetition (the loader's overhead over its own reads; what huge pages and buffered reads change). Default
checkpoint: the one bench/load.py builds. Nothing is written.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchkit import require_at_least  # noqa: E402

PAGE = 4096
BASELINE = "bare O_DIRECT, huge pages"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bare_read(files, arena, direct: bool, threads: int, block: int) -> None:
    """Every block of the files to its own offset of `arena` (partitions page-aligned), in `threads` threads."""
    jobs, base = [], 0
    for index, path in enumerate(files):
        size = path.stat().st_size
        jobs += [(index, offset, min(block, size - offset), base + offset) for offset in range(0, size, block)]
        base += -(-size // PAGE) * PAGE
    fds = [os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0)) for path in files]
    view, lock, position = arena.view(), threading.Lock(), [0]

    def loop():
        while True:
            with lock:
                if position[0] >= len(jobs):
                    return
                index, offset, length, target = jobs[position[0]]
                position[0] += 1
            want = -(-length // PAGE) * PAGE if direct else length
            os.preadv(fds[index], [view[target:target + want]], offset)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        for fd in fds:
            os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/var/tmp/hpcllm-bench/bench/ckpt"),
                        help="a converted checkpoint on the real disk (default: bench/load.py's)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of the whole alternation")
    parser.add_argument("--threads", type=int, default=8, help="reader threads")
    parser.add_argument("--block-mib", type=int, default=16, help="bytes per read request, MiB")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "reps", "threads", "block_mib")
    if not (args.checkpoint / "index.json").is_file():
        parser.error(f"{args.checkpoint} is not a converted checkpoint (run bench/load.py once to build it)")

    import transformers  # noqa: F401 - imports outside the timed region, as a warm worker has them

    from hpcllm.checkpoint import read_checkpoint
    from hpcllm.store.loader import load_model
    from hpcllm.store.memory import HostBuffer, default_pool
    from hpcllm.store.readers import evict_from_page_cache
    from hpcllm.store.tuning import ReadConfig, ReadTuning, TierTuning

    ckpt = read_checkpoint(args.checkpoint)
    files = [p.path for p in ckpt.partitions if p.size]
    total = ckpt.total_bytes
    block = args.block_mib << 20
    arena_bytes = sum(-(-p.size // PAGE) * PAGE for p in ckpt.partitions) + 64 * PAGE
    small_pages = HostBuffer(arena_bytes)
    small_pages.populate()
    started = time.perf_counter()
    default_pool().reserve_bytes(total)
    huge = default_pool()._arena
    print(f"{total / 1e9:.2f} GB in {len(files)} files; huge-page arena faulted in in "
          f"{time.perf_counter() - started:.1f} s, {huge.huge_page_bytes() >> 20} of {huge.capacity >> 20} MiB "
          f"in huge pages; {args.threads} threads x {args.block_mib} MiB; load average {os.getloadavg()[0]:.1f}")

    def tuning(mode):
        config = ReadConfig(mode, args.threads, block, 1.0)
        return ReadTuning({"disk": TierTuning(folder=str(args.checkpoint), device=os.stat(args.checkpoint).st_dev,
                                              best={mode: config})})

    def loader(mode):
        loaded = load_model(args.checkpoint, tier="disk", tokenizer=False, read_tuning=tuning(mode))
        note = f"{loaded.stats.reader_mode}, pool {loaded.stats.pool_reused_bytes >= total}"
        loaded.release()
        return note

    cases = {
        "bare O_DIRECT, 4 KiB pages": lambda: bare_read(files, small_pages, True, args.threads, block),
        BASELINE: lambda: bare_read(files, huge, True, args.threads, block),
        "bare buffered, huge pages": lambda: bare_read(files, huge, False, args.threads, block),
        "loader, O_DIRECT": lambda: loader("odirect"),
        "loader, buffered": lambda: loader("buffered"),
    }
    loader("odirect")  # the first load imports the model's code (seconds): not part of any measurement
    for rep in range(args.reps):
        times = {}
        for name, case in cases.items():
            evict_from_page_cache(files)
            cpu, wall = cpu_seconds(), time.perf_counter()
            note = case() or ""
            times[name] = (time.perf_counter() - wall, cpu_seconds() - cpu, note)
        print(f"repetition {rep + 1}/{args.reps} (load average {os.getloadavg()[0]:.1f}):")
        for name, (wall, cpu, note) in times.items():
            print(f"  {name:28s} {total / wall / 1e9:5.2f} GB/s  {wall:5.2f} s  CPU {cpu:5.2f} s  "
                  f"x{wall / times[BASELINE][0]:.2f} of {BASELINE}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
