"""What cache on load costs the load it rides on: `load_model(origin)` vs `load_model(origin, tee_into=staging)`.

    .venv/bin/python bench/cache_on_load.py --source /var/tmp/hpcllm/models/tiny-llama [--runs 5] [--cold]

Both variants run alternately in one process (imports and skeleton cache warm), from the shared-FS tier settings
(buffered reads, verified). Default: the origin stays in the page cache, the worst case for the tee (the read is
almost free, so the extra write dominates). --cold drops the origin's pages (posix_fadvise DONTNEED) before every
load. Prints median seconds and the ratio tee / plain. A CPU load writes its copy from the model's buffers after
the model is ready, and the agent's commit (fsync + re-hash + rename) follows: both are timed separately, as they
do not delay the load (they compete with the first requests for CPU and disk).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402
from hpcllm.store.readers import evict_from_page_cache  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="converted checkpoint folder")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="drop the origin's page cache before each load")
    parser.add_argument("--work-dir", type=Path, default=None, help="where staging folders go (default: a temp dir)")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "runs")

    import hpcllm
    from hpcllm.checkpoint import CheckpointError, read_checkpoint

    try:
        read_checkpoint(args.source)
    except CheckpointError as exc:  # not a traceback once the bench has started
        parser.error(f"--source: {exc}")
    from hpcllm.node.cache import CacheManager

    work = Path(tempfile.mkdtemp(prefix="hpcllm-col-", dir=args.work_dir))
    try:
        hpcllm.load_model(args.source, tier="sharedfs", tokenizer=False).release()  # imports, skeleton, pool
        times: dict[str, list[float]] = {"plain": [], "tee": []}
        commits, writes = [], []
        for run in range(args.runs):
            for kind in ("plain", "tee"):
                cm = CacheManager(work / f"nvme-{run}-{kind}", 10**12, 10**12, None)
                fill = cm.begin_load_fill("m", args.source, ("nvme",)) if kind == "tee" else None
                if args.cold:
                    evict_from_page_cache(p for p in args.source.iterdir() if p.is_file())
                started = time.perf_counter()
                loaded = hpcllm.load_model(args.source, tier="sharedfs", tokenizer=False,
                                           tee_into=fill.staging if fill else None)
                times[kind].append(time.perf_counter() - started)
                started = time.perf_counter()
                loaded.wait_for_tee()
                if fill is not None:
                    writes.append(time.perf_counter() - started)
                loaded.release()
                if fill is not None:
                    started = time.perf_counter()
                    cm.commit_load_fill(fill)
                    commits.append(time.perf_counter() - started)
                shutil.rmtree(cm.nvme_dir)
        for kind, values in times.items():
            print(f"{kind:6s} load median {statistics.median(values):.3f} s  runs "
                  + ", ".join(f"{v:.3f}" for v in values))
        print(f"tee write after the model is ready (CPU loads) median {statistics.median(writes):.3f} s")
        print(f"commit (after ready: fsync + re-hash + rename) median {statistics.median(commits):.3f} s")
        print(f"ratio tee / plain: {statistics.median(times['tee']) / statistics.median(times['plain']):.2f}x "
              f"({'cold' if args.cold else 'origin in the page cache'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
