"""Cold start of a model instance on a node agent: a fresh worker process vs a spare worker (imports done).

    .venv/bin/python bench/coldstart.py [--size small] [--tier nvme|dram|sharedfs] [--runs 5]

Both go through the node agent's WorkerManager, as a controller's start request does: from the start call until the
worker's /ready says the model serves (load included). "fresh" = node.spare_workers = 0, a new
`python -m hpcllm.cli.main worker` per instance (the agent before spares). "spare" = one spare started beforehand
and given time to finish its imports and its model process's (as on an agent that idled since its last cold start).
Rounds alternate the two, each instance is stopped before the next, and each starts once the spare manager's spare
(replaced after a spare start) has finished its imports; the printed ratio is fresh median / spare median of this
run.
The checkpoint is a dev model (hpcllm.devmodels) converted to hpcllm's format and cached in the chosen tier.
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

from bench.benchkit import require_at_least  # noqa: E402
from hpcllm.checkpoint.converter import convert  # noqa: E402
from hpcllm.config import parse_config  # noqa: E402
from hpcllm.devmodels.builder import make_model  # noqa: E402
from hpcllm.node.cache import CacheManager  # noqa: E402
from hpcllm.node.gpus import GpuInventory  # noqa: E402
from hpcllm.node.protocol import StartInstance  # noqa: E402
from hpcllm.node.workers import WorkerManager  # noqa: E402
from hpcllm.worker.spare import MODEL_PROCESS_READY  # noqa: E402

WORK = Path("/var/tmp/hpcllm-bench/coldstart")


def checkpoint(size: str) -> Path:
    converted = WORK / f"llama-{size}-converted"
    if not converted.exists():
        hf = make_model("llama", WORK / f"llama-{size}-hf", size=size, overwrite=True)
        convert(hf, converted, progress=False)
    return converted


def manager(root: Path, spares: int, cache: CacheManager, model_process: str = "auto") -> WorkerManager:
    """A node agent's worker manager; its workers read [worker] model_process from a config file it points them at."""
    setting = "false" if model_process == "false" else '"auto"'
    config_path = root / f"worker-{model_process}.toml"
    config_path.write_text(f"[worker]\nmodel_process = {setting}\n")
    config = parse_config({"paths": {"state_dir": str(root / "state")}, "cluster": {"shared_secret": "bench"},
                           "node": {"spare_workers": spares},
                           "worker": {"model_process": "auto" if model_process == "auto" else False}})
    return WorkerManager(config, root / f"run-{spares}", GpuInventory((), "bench"), cache, config_path=config_path,
                         poll_seconds=0.05)


def time_to_ready(workers: WorkerManager, model: Path) -> tuple[float, float | None]:
    started = time.perf_counter()
    inst = workers.start(StartInstance(model="bench", source=str(model), gpu_ids=[]))
    while inst.state == "loading":
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    if inst.state != "ready":
        raise SystemExit(f"the worker did not become ready: {inst.state} {inst.error}")
    load = inst.load_seconds
    workers.stop(inst.instance_id)
    return seconds, load


def wait_for_spare(workers: WorkerManager, timeout: float = 120) -> None:
    """Until the spare is as prepared as one that waited long: its imports done, and its model process's where CPU
    workers use one (worker.model_process)."""
    worker = workers.config.worker
    expected = ["spare worker ready"] + ([MODEL_PROCESS_READY] if worker.model_process_for(worker.device) else [])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spares = workers._spares
        if spares and all(line in spares[0].log_path.read_text(errors="replace") for line in expected):
            return
        time.sleep(0.1)
    raise SystemExit("the spare worker did not finish its imports")


def measure(model: Path, tier: str, runs: int,
            model_process: str = "auto") -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds from start request to ready, and the worker's own load seconds, per kind ("fresh", "spare").
    model_process: the workers' [worker] model_process ("auto": the CPU default, a model process; "false")."""
    with tempfile.TemporaryDirectory(prefix="coldstart-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        cache = CacheManager(root / "nvme", 10**12, 10**11, f"bench-coldstart-{root.name}", dram_root=root / "shm")
        if tier != "sharedfs":
            cache.warm("bench", model, tier)
        fresh, spare = manager(root, 0, cache, model_process), manager(root, 1, cache, model_process)
        times: dict[str, list[float]] = {"fresh": [], "spare": []}
        loads: dict[str, list[float]] = {"fresh": [], "spare": []}
        try:
            for run in range(runs):
                for kind in (("fresh", "spare") if run % 2 == 0 else ("spare", "fresh")):
                    workers = fresh if kind == "fresh" else spare
                    # Before either kind: the spare manager's spare prepared, the one a spare start consumed
                    # replaced and its imports done, so no spare's imports compete with the timed start (a fresh
                    # start right after a spare one ran beside its replacement's imports).
                    spare.ensure_spares()
                    wait_for_spare(spare)
                    seconds, load = time_to_ready(workers, model)
                    times[kind].append(seconds)
                    loads[kind].append(load or 0.0)
                    print(f"run {run + 1} {kind:5s}: ready after {seconds:.2f} s (worker's own load {load:.2f} s)",
                          flush=True)
        finally:
            for workers in (fresh, spare):
                workers.accepting = False
                workers.stop_all(timeout=10)
                workers.close()
            cache.evict("bench", tier) if tier != "sharedfs" else None
    return times, loads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small", "bench"))
    parser.add_argument("--tier", default="nvme", choices=("nvme", "dram", "sharedfs"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model-process", default="auto", choices=("auto", "false"),
                        help="the workers' [worker] model_process (auto: the CPU default, the forward in a child)")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "runs")

    model = checkpoint(args.size)
    times, loads = measure(model, args.tier, args.runs, args.model_process)

    f, s = statistics.median(times["fresh"]), statistics.median(times["spare"])
    print(f"\nmodel llama-{args.size} ({sum(p.stat().st_size for p in model.glob('data-*')) / 1e6:.0f} MB) from "
          f"{args.tier}, model_process {args.model_process}, {args.runs} runs each, median time from start request "
          f"to ready:")
    print(f"  fresh worker process: {f:.2f} s (load inside the worker {statistics.median(loads['fresh']):.2f} s)")
    print(f"  spare worker:         {s:.2f} s (load inside the worker {statistics.median(loads['spare']):.2f} s)")
    print(f"  spare is {f / s:.1f}x faster to ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
