"""Checkpoint -> ready model: hpcllm's tiers against the usual loaders, with the machine's limits measured in the
same run.

    .venv/bin/python bench/load.py [--quick] [--runs 3] [--cold fadvise|drop_caches] [--methods a,b,...]

Builds (or reuses) a ~2 GB Llama-style bf16 checkpoint with hpcllm.devmodels (--quick: the "small" size), converts
it, puts it in the DRAM tier and saves a torch .bin copy. Every measurement runs in a FRESH Python process that
imports torch / transformers and builds one model skeleton first (import costs are the same for every loader and
are excluded; the skeleton is built without hpcllm's per-process template cache, so hpcllm's timed load builds its
own from scratch), then makes the method's files cold or warm, then times the load.

Cold and warm, the same for every method (the method's own input folder: HF folder, converted checkpoint or .bin):
  cold  --cold fadvise (default): fsync + posix_fadvise(POSIX_FADV_DONTNEED) on every file of the folder - the
        kernel drops those pages and nothing else, so other processes on this shared machine are not disturbed and
        lazy imports inside a loader do not hit the disk. --cold drop_caches: sync + echo 3 >
        /proc/sys/vm/drop_caches (root), the whole guest page cache. Either way the sampled page-cache residency
        of the files (mincore) is measured right before the timer starts and reported; a run whose files are not
        cold is flagged and left out of the row's median (and of the targets, when no run of the row was cold).
        The hypervisor's own cache is outside the guest's control: the read limit below is
        measured in every round under the same conditions.
  warm  the parent reads the method's files once (page cache) before starting the child.
Methods run round-robin, the order rotated every round, so slow phases of the shared machine hit all of them;
speed-ups are also computed per round (paired) to cancel slow drifts of the shared disk.

The read limit is swept, as fio does with jobs x block size: first every (mode, threads, block size) of
hpcllm.store.tuning's sweep - O_DIRECT, buffered and mapped (MADV_POPULATE_READ) reads; 1-16 threads; 1-16 MiB
blocks; into per-thread block buffers already faulted in and backed by huge pages, as the reserved pool is, so a
direct read is not split into small requests - over the first --sweep-bytes of the checkpoint's data files, each from a
cold page cache; then, at the start and the end of every round, the three fastest configurations read the whole
checkpoint and the round's limit is the best of them. Every loader is reported as x of that limit, and a loader
run faster than its round's limit is listed (it would mean the sweep missed a faster way to read).

hpcllm's loads use the read settings the node agent's probe would pick on this disk (hpcllm.node.probes with
--probe-bytes, saved as <workdir>/read-tuning.json, measured once before the rounds), like a worker started by an
agent; `hpcllm_disk_default` loads with the fixed tier defaults instead (no probe). `hpcllm_disk_pool` is the
production path - a spare worker the agent keeps warm, which reserved and faulted in its host pool (sized by the
agent from the checkpoints it caches: here this checkpoint) before the timer, as hpcllm.worker.spare does at
start-up - and the targets are checked on it when it runs (else on hpcllm_disk). The mapped (mmap) configurations
of the sweep read one byte of every page after populating it, as a mapped load does (and fio's mmap engine reads
every byte): populating alone leaves pages the CPU has not yet accessed.

Two times per run: `ready` (the loader returned a usable model; on a GPU after torch.cuda.synchronize()) and
`resident` (CPU: additionally every weight page has been read once, which is when lazy mmap-based loaders have
really loaded). Ratios use `resident`. Where CUDA is available the GPU methods and the pinned host-to-device limit
run too. Results: a table on stdout, bench/results/load-<time>.json and .png (and load-latest.*).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402

RESULTS = REPO / "bench" / "results"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
COLD_THRESHOLD = 0.01  # a "cold" run whose files are more than 1% in the page cache is flagged

METHODS = {
    # name: (label, input folder (what cold evicts / warm pre-reads), states, device)
    "hpcllm_disk": ("hpcllm disk (probe's read settings)", "ckpt", ("cold", "warm"), "cpu"),
    "hpcllm_disk_default": ("hpcllm disk, tier defaults (no probe)", "ckpt", ("cold",), "cpu"),
    "hpcllm_disk_verify": ("hpcllm disk, verify=True (re-hash all)", "ckpt", ("cold", "warm"), "cpu"),
    "hpcllm_disk_pool": ("hpcllm disk, agent's spare worker (reserved host pool)", "ckpt", ("cold", "warm"), "cpu"),
    "hpcllm_disk_pool_odirect": ("hpcllm disk, reserved host pool, O_DIRECT forced", "ckpt", ("cold",), "cpu"),
    "hpcllm_sharedfs": ("hpcllm shared-FS settings (buffered)", "ckpt", ("cold", "warm"), "cpu"),
    "hpcllm_dram": ("hpcllm DRAM tier (/dev/shm)", None, ("shm",), "cpu"),
    "hpcllm_dram_repeat": ("hpcllm DRAM tier, 3rd load in the process", None, ("shm",), "cpu"),
    "safetensors": ("safetensors load_file + load_state_dict", "hf", ("cold", "warm"), "cpu"),
    "from_pretrained": ("transformers from_pretrained", "hf", ("cold", "warm"), "cpu"),
    "torch_load": ("torch.load", "bin", ("cold", "warm"), "cpu"),
    "torch_load_mmap": ("torch.load(mmap=True)", "bin", ("cold", "warm"), "cpu"),
    "runai": ("runai-model-streamer", "hf", ("cold", "warm"), "cpu"),
    "fastsafetensors": ("fastsafetensors (nogds)", "hf", ("cold", "warm"), "cpu"),
    # where CUDA is available
    "hpcllm_gpu_disk": ("hpcllm disk -> cuda:0 (pinned ring)", "ckpt", ("cold", "warm"), "cuda"),
    "hpcllm_gpu_dram": ("hpcllm DRAM tier -> cuda:0", None, ("shm",), "cuda"),
    # Not production choices: the questions of the first GPU run (docs/gpu-checks.md). Does the limit sweep's best
    # O_DIRECT configuration (not the node probe's pick) bring the cold GPU load to the disk's limit? How much did
    # the DRAM tier -> GPU gain from copying with a thread per CPU (up to 8) instead of the 2 it had?
    "hpcllm_gpu_disk_sweep": ("hpcllm disk -> cuda:0, the sweep's best O_DIRECT", "ckpt", ("cold",), "cuda"),
    "hpcllm_gpu_dram_2threads": ("hpcllm DRAM tier -> cuda:0, 2 copying threads (before)", None, ("shm",), "cuda"),
    "safetensors_gpu": ("safetensors load_file(device=cuda:0) + load_state_dict", "hf", ("cold", "warm"), "cuda"),
    "from_pretrained_gpu": ("transformers from_pretrained(device_map=cuda:0)", "hf", ("cold", "warm"), "cuda"),
}
# The variant a worker started by the node agent loads with: a spare that reserved its host pool
# ($HPCLLM_HOST_POOL_BYTES, sized by the agent from the checkpoints it caches) and the probe's read settings.
# The targets are checked on it when it ran, else on hpcllm_disk.
PRODUCTION = "hpcllm_disk_pool"
PEERS = ["safetensors", "from_pretrained", "torch_load", "torch_load_mmap", "runai", "fastsafetensors"]
GPU_PEERS = ["safetensors_gpu", "from_pretrained_gpu"]
LIMITS = {"limit_read": "read limit: best of the sweep's top configurations",
          "limit_read_odirect": "O_DIRECT read limit: the sweep's best O_DIRECT configuration",
          "limit_memcpy": "memcpy into touched memory",
          "limit_first_touch": "first touch of fresh memory (page faults)",
          "limit_h2d": "host-to-device copy from pinned memory (cuda:0)"}
END_OF_ROUND_LIMITS = ["limit_read", "limit_read_odirect"]  # the disk drifts: measured again after the round's loads
TOP_CONFIGS = 3  # configurations of the sweep re-measured over the whole checkpoint in every round
TUNING_FILE = "read-tuning.json"


# ---------------------------------------------------------------------------------------------------- the parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model (tens of MB), 1 run: a smoke test")
    parser.add_argument("--runs", type=int, default=None, help="fresh processes per method and state (default 3)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/hpcllm-bench"),
                        help="where the models live (must be on the real disk, not tmpfs)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of methods")
    parser.add_argument("--states", default=None,
                        help="comma-separated subset of the states to run (cold, warm, shm; default: all the "
                             "chosen methods have)")
    parser.add_argument("--cold", choices=["fadvise", "drop_caches"], default="fadvise",
                        help="how cold runs evict the files (see the description above)")
    parser.add_argument("--keep-dram", action="store_true", help="leave the model in /dev/shm afterwards")
    parser.add_argument("--sweep-bytes", type=int, default=256, help="MiB read per configuration of the limit sweep")
    parser.add_argument("--probe-bytes", type=int, default=128,
                        help="MiB of the node probe's file (node.probe_bytes) for hpcllm's read settings")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "small" if args.quick else "bench"
    workdir = args.workdir / size
    if args.child:
        return child(args.child, args.state, workdir, args.cold, args)

    require_at_least(parser, args, 1, "runs")
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods {args.methods!r}: choose from {', '.join(METHODS)}")
    # A misspelt state, or one none of the chosen methods has, silently ran none of its loads.
    known_states = sorted({state for method in methods for state in METHODS[method][2]})
    states = known_states if args.states is None else [s for s in args.states.split(",") if s]
    if not states or set(states) - set(known_states):
        parser.error(f"--states {args.states!r}: the chosen methods' states are {', '.join(known_states)}")
    can_cold = args.cold == "fadvise" or (os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK))
    cuda = cuda_available()
    print(f"hpcllm load benchmark: {size} model, {runs} run(s) per method and state, each in a fresh process; "
          f"CUDA {'available' if cuda else 'not available (GPU methods skipped)'}")
    print(f"cold = {COLD_DESCRIPTION[args.cold]}" if can_cold else
          "cold runs SKIPPED: --cold drop_caches needs root (or use --cold fadvise)")
    paths = prepare(workdir, size)
    skipped = {m: reason for m in methods if (reason := method_missing(m, cuda))}
    for method, reason in skipped.items():
        print(f"  skipping {method}: {reason}")
    methods = [m for m in methods if m not in skipped]
    limit_names = [name for name in LIMITS if name != "limit_h2d" or cuda]

    raw: dict[str, dict[str, list[dict]]] = {}
    limits: dict[str, list[dict]] = {name: [] for name in limit_names}
    started = time.time()
    tuning = spawn("probe_tuning", "cold", workdir, args.cold, args)
    print(f"hpcllm read settings from the node probe ({args.probe_bytes} MiB probe file): "
          f"{tuning['best'] if tuning else 'probe FAILED, hpcllm uses its defaults'}", flush=True)
    sweep = spawn("limit_sweep", "cold", workdir, args.cold, args)
    if sweep:
        print(f"limit sweep ({len(sweep['configs'])} configurations, {args.sweep_bytes} MiB each), fastest: "
              + ", ".join(f"{c['label']} {c['gbps']:.2f} GB/s" for c in sweep["top"]), flush=True)
        (workdir / "limit-top.json").write_text(json.dumps(sweep["top"]))
        (workdir / "limit-odirect.json").write_text(json.dumps(sweep["top_odirect"]))
    try:
        for run in range(runs):
            for name in limit_names:
                measure_limit_in_child(name, run, workdir, args.cold, limits, args)
            shift = run % max(1, len(methods))
            for method in methods[shift:] + methods[:shift]:
                for state in METHODS[method][2]:
                    if state not in states:
                        continue
                    if state == "cold" and not can_cold:
                        continue
                    if state == "warm":
                        warm_up(paths, METHODS[method][1])
                    result = spawn(method, state, workdir, args.cold, args)
                    if result:
                        result["round"] = run
                        raw.setdefault(method, {}).setdefault(state, []).append(result)
                        print(f"  run {run + 1}/{runs} {method:20s} {state:4s} ready {result['ready']:7.3f} s  "
                              f"resident {result['resident']:7.3f} s  {result.get('note', '')}", flush=True)
            for name in END_OF_ROUND_LIMITS:
                measure_limit_in_child(name, run, workdir, args.cold, limits, args)
    finally:
        if not args.keep_dram:
            from hpcllm.store.dram import DramTier

            DramTier("bench").remove(dram_model_id(size))
    report = summarize(raw, limits, paths, size, runs, can_cold, args.cold, skipped, time.time() - started)
    report["limit_sweep"] = sweep
    report["hpcllm_read_tuning"] = tuning
    print_table(report)
    write_outputs(report)
    return 0


COLD_DESCRIPTION = {
    "fadvise": "fsync + posix_fadvise(DONTNEED) on every file of the method's input folder, residency checked "
               "with mincore before the timer starts",
    "drop_caches": "sync; echo 3 > /proc/sys/vm/drop_caches (whole guest page cache), residency checked with "
                   "mincore before the timer starts",
}


def cuda_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == "True"


def measure_limit_in_child(name: str, run: int, workdir: Path, cold: str, limits: dict, args) -> None:
    result = spawn(name, "cold", workdir, cold, args)
    if result:
        result["round"] = run
        limits[name].append(result)
        best = f" ({result['config']})" if result.get("config") else ""
        print(f"  run {run + 1} {LIMITS[name]}: {result['gbps']:.2f} GB/s{best}", flush=True)


def prepare(workdir: Path, size: str) -> dict[str, Path]:
    """The HF folder, the converted checkpoint, a .bin copy, and the DRAM-tier copy (built once, reused)."""
    from hpcllm.checkpoint import convert
    from hpcllm.devmodels import make_model
    from hpcllm.store.dram import DramTier

    hf, ckpt, binary = workdir / "hf", workdir / "ckpt", workdir / "bin"
    workdir.mkdir(parents=True, exist_ok=True)
    if not (hf / "config.json").is_file():
        print(f"building the {size} llama model in {hf} (once)...", flush=True)
        make_model("llama", hf, size=size, dtype="bfloat16", overwrite=True)
    if not (ckpt / "manifest.json").is_file():
        print(f"converting to {ckpt} (once)...", flush=True)
        convert(hf, ckpt, overwrite=True)
    if not (binary / "pytorch_model.bin").is_file():
        print(f"writing a torch .bin copy to {binary} (once)...", flush=True)
        _write_bin(hf, binary)
    tier, model_id = DramTier("bench"), dram_model_id(size)
    manifest = (ckpt / "manifest.json").read_bytes()
    if tier.has(model_id) and (tier.open(model_id) / "manifest.json").read_bytes() != manifest:
        tier.remove(model_id)  # left by an older build of the model
    if not tier.has(model_id):
        entry = tier.put(ckpt, model_id)
        print(f"DRAM tier filled in {entry.fill_seconds:.2f} s ({entry.bytes / 1e9:.2f} GB)", flush=True)
    return {"hf": hf, "ckpt": ckpt, "bin": binary}


def dram_model_id(size: str) -> str:
    return f"bench-llama-{size}"


def _write_bin(hf: Path, binary: Path) -> None:
    script = (
        "import sys, shutil, torch\n"
        "from pathlib import Path\n"
        "from safetensors.torch import load_file\n"
        "hf, out = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "state = {}\n"
        "for f in sorted(hf.glob('*.safetensors')):\n"
        "    state.update(load_file(f))\n"
        "torch.save(state, out / 'pytorch_model.bin.partial')\n"
        "(out / 'pytorch_model.bin.partial').rename(out / 'pytorch_model.bin')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(hf), str(binary)], check=True)


def method_missing(method: str, cuda: bool) -> str | None:
    if METHODS[method][3] == "cuda" and not cuda:
        return "needs CUDA (torch.cuda.is_available() is False here)"
    module = {"runai": "runai_model_streamer", "fastsafetensors": "fastsafetensors"}.get(method)
    if module is None:
        return None
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"`import {module}` failed ({last}); `make venv` (the `bench` extra) installs it"
    return None


def folder_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file())


def warm_up(paths: dict[str, Path], which: str | None) -> None:
    if which is None:
        return
    for path in folder_files(paths[which]):
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


def _where_time_went(stats) -> str:
    """A read load's time split (LoadStats.pipeline, per reader thread on average), where the GPU load's gap to the
    disk limit would show: readers in the read calls (disk-bound) or waiting for staging slots (copy- or
    consumer-bound), the one consumer thread's checksums and copy submissions."""
    pipe = stats.pipeline
    if not pipe or not pipe["units"]:
        return ""
    per_thread = max(1, pipe["threads"])
    return (f"; read phase {pipe['read_seconds']:.3f} s: per reader io {pipe['io_thread_seconds'] / per_thread:.3f}, "
            f"slot waits {pipe['acquire_thread_seconds'] / per_thread:.3f}; consumer verify "
            f"{pipe['verify_seconds']:.3f}, commit {pipe['commit_seconds']:.3f}, "
            f"idle {pipe['consumer_idle_seconds']:.3f}"
            f"; skeleton {stats.phases.get('skeleton', 0):.3f} s, attach {stats.phases.get('attach', 0):.3f} s")


def spawn(method: str, state: str, workdir: Path, cold: str, args) -> dict | None:
    env = dict(os.environ)
    env.pop("HPCLLM_READ_TUNING", None)  # hpcllm's methods name their read settings themselves
    if method == "runai":
        env["NUMPY_MADVISE_HUGEPAGE"] = "0"  # its default (THP) is very slow on these VMs (see docs/loader.md)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--state", state,
           "--workdir", str(workdir.parent), "--cold", cold, "--sweep-bytes", str(args.sweep_bytes),
           "--probe-bytes", str(args.probe_bytes)]
    if workdir.name == "small":
        cmd.append("--quick")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        print(f"  {method} {state}: timed out after 900 s")
        return None
    if done.returncode != 0:
        tail = "\n    ".join(done.stderr.strip().splitlines()[-6:])
        print(f"  {method} {state}: failed (exit {done.returncode}):\n    {tail}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- the measurement


def child(method: str, state: str, workdir: Path, cold: str, args) -> int:
    if method == "probe_tuning":
        print(json.dumps(probe_tuning(workdir, args.probe_bytes << 20)))
        return 0
    if method == "limit_sweep":
        print(json.dumps(limit_sweep(workdir, args.sweep_bytes << 20)))
        return 0
    import torch
    from transformers import AutoConfig

    from hpcllm.store.skeleton import build_skeleton

    hf = workdir / "hf"
    if method.startswith("limit_"):
        print(json.dumps(measure_limit(method, workdir, cold)))
        return 0
    config = AutoConfig.from_pretrained(hf)
    build_skeleton(config, torch.bfloat16)  # imports the model code; every method pays the same imports before
    device = METHODS[method][3]
    if device == "cuda":
        torch.empty(1, device="cuda:0")  # CUDA context creation, excluded for every GPU method alike
        torch.cuda.synchronize()
    loader = prepare_method(method, workdir, config)
    folder = METHODS[method][1]
    files = folder_files(workdir / folder) if folder else []
    if state == "cold":
        make_cold(files, cold)
    residency = max((file_residency(f) for f in files), default=None)
    load_average = os.getloadavg()[0]
    started = time.perf_counter()
    model, note = loader()
    if device == "cuda":
        torch.cuda.synchronize()
    ready = time.perf_counter() - started
    if device == "cpu":
        touch_every_page(model)
    resident = time.perf_counter() - started
    if state == "cold" and residency is not None and residency > COLD_THRESHOLD:
        note = f"{note}; NOT COLD: {residency:.0%} of the files were in the page cache".lstrip("; ")
    params = [p for p in model.parameters()]
    fingerprint = weights_fingerprint(model)
    nbytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())
    print(json.dumps({"method": method, "state": state, "ready": ready, "resident": resident, "bytes": nbytes,
                      "fingerprint": fingerprint, "note": note, "residency_before": residency,
                      "load_average": load_average}))
    return 0


def weights_fingerprint(model) -> str:
    """A hash of every parameter's name, dtype, shape and bytes: two loads have the same fingerprint only if they
    loaded exactly the same weights (a loader that changed a dtype or a value does not pass)."""
    import hashlib

    import torch

    digest = hashlib.blake2b(digest_size=16)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        tensor = param.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def make_cold(files: list[Path], how: str) -> None:
    if how == "drop_caches":
        os.sync()
        DROP_CACHES.write_text("3\n")
        return
    from hpcllm.store.readers import evict_from_page_cache

    evict_from_page_cache(files)


def file_residency(path: Path) -> float:
    from hpcllm.store.readers import cached_fraction

    return cached_fraction(path, samples=64) if path.stat().st_size >= 1 << 20 else 0.0


def touch_every_page(model) -> None:
    import torch

    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            flat = tensor.detach().reshape(-1).view(torch.uint8) if tensor.numel() else None
            if flat is not None:
                flat[::4096].sum()


def _assign(model, state: dict, device: str = "cpu") -> object:
    """What a loader built on load_state_dict must do to get a usable model (and what hpcllm's attach does)."""
    from hpcllm.store.skeleton import materialize_missing_buffers, move_buffers

    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    materialize_missing_buffers(model)  # rotary inv_freq: not in checkpoints, left on meta by assign=True
    if device != "cpu":
        move_buffers(model, lambda name: device)
    return model.eval()


def prepare_method(method: str, workdir: Path, config):
    """Imports and setup outside the timed region; returns the timed callable -> (model, note)."""
    import torch

    from hpcllm.store.skeleton import build_skeleton

    hf, ckpt, binary = workdir / "hf", workdir / "ckpt", workdir / "bin"
    safetensors_files = sorted(str(f) for f in hf.glob("*.safetensors"))

    if method.startswith("hpcllm"):
        from hpcllm.store.loader import load_model
        from hpcllm.store.memory import HostBufferPool

        pool = HostBufferPool()
        if method in ("hpcllm_disk_pool", "hpcllm_disk_pool_odirect"):
            # What a spare worker does at start-up (hpcllm.worker.spare): reserve and fault in the host pool the
            # agent sized from the checkpoints it caches (this one), on the process-wide pool its load then uses.
            from hpcllm.checkpoint import read_checkpoint
            from hpcllm.store.memory import HOST_POOL_ENV, default_pool, reserve_from_environment

            os.environ[HOST_POOL_ENV] = str(read_checkpoint(ckpt).total_bytes)
            reserve_from_environment()
            pool = default_pool()
        kwargs = {"device": "cuda:0"} if METHODS[method][3] == "cuda" else {}
        if method in ("hpcllm_dram", "hpcllm_dram_repeat", "hpcllm_gpu_dram", "hpcllm_gpu_dram_2threads"):
            from hpcllm.store.dram import DramTier

            path = DramTier("bench").open(dram_model_id(workdir.name))
        else:
            path = ckpt
            kwargs["tier"] = "sharedfs" if method == "hpcllm_sharedfs" else "disk"
        if method == "hpcllm_disk_verify":
            kwargs["verify"] = True
        if METHODS[method][1] == "ckpt" and method != "hpcllm_disk_default":
            kwargs["read_tuning"] = workdir / TUNING_FILE  # what an agent's worker on this disk would use
        if method == "hpcllm_disk_pool_odirect":  # not a production choice: the pool's effect whatever the probe
            kwargs["read_tuning"] = _only_mode(workdir / TUNING_FILE, "odirect")
        if method == "hpcllm_gpu_disk_sweep":
            kwargs.update(_sweep_best_odirect(workdir))
        if method == "hpcllm_gpu_dram_2threads":
            kwargs["threads"] = 2
        if method == "hpcllm_dram_repeat":  # a process that loaded this model before: its skeleton is cloned
            import threading

            for _ in range(2):
                load_model(path, tokenizer=False, pool=pool, **kwargs).release()
            for thread in threading.enumerate():  # the earlier loads' background page mapping
                if thread.name == "hpcllm-populate":
                    thread.join()

        def run():
            loaded = load_model(path, tokenizer=False, pool=pool, **kwargs)
            s = loaded.stats
            checked = "verified" if s.verified else "verified earlier" if s.verified_earlier else "not verified"
            reason = f" ({s.fallback_reason})" if s.fallback_reason else ""
            plan = f", {s.threads} threads x {s.request_bytes >> 10} KiB" if s.request_bytes else ""
            return loaded.model, f"{s.reader_mode}{plan}, {checked}{reason}{_where_time_went(s)}"
        return run

    if method in ("safetensors", "safetensors_gpu"):
        from safetensors.torch import load_file

        device = "cuda:0" if method.endswith("_gpu") else "cpu"

        def run():
            model = build_skeleton(config, torch.bfloat16)
            state = {}
            for f in safetensors_files:
                state.update(load_file(f, device=device))
            return _assign(model, state, device), ""
        return run

    if method in ("from_pretrained", "from_pretrained_gpu"):
        from transformers import AutoModelForCausalLM

        kwargs = {"device_map": "cuda:0"} if method.endswith("_gpu") else {}

        def run():
            return AutoModelForCausalLM.from_pretrained(hf, **kwargs).eval(), ""
        return run

    if method in ("torch_load", "torch_load_mmap"):
        mmap = method == "torch_load_mmap"

        def run():
            model = build_skeleton(config, torch.bfloat16)
            state = torch.load(binary / "pytorch_model.bin", weights_only=True, mmap=mmap)
            return _assign(model, state), ""
        return run

    if method == "runai":
        from runai_model_streamer import SafetensorsStreamer

        def run():
            model = build_skeleton(config, torch.bfloat16)
            state = {}
            with SafetensorsStreamer() as streamer:
                streamer.stream_files(safetensors_files)
                for name, tensor in streamer.get_tensors():
                    state[name] = tensor
            return _assign(model, state), "NUMPY_MADVISE_HUGEPAGE=0"
        return run

    if method == "fastsafetensors":
        from fastsafetensors import fastsafe_open

        def run():
            model = build_skeleton(config, torch.bfloat16)
            with fastsafe_open(safetensors_files, nogds=True, device="cpu") as f:
                state = {name: f.get_tensor(name) for name in f.keys()}
            return _assign(model, state), ""
        return run

    raise SystemExit(f"unknown method {method}")


def _sweep_best_odirect(workdir: Path) -> dict:
    """load_model's threads / unit_bytes from the limit sweep's fastest O_DIRECT configuration (limit-odirect.json)."""
    best = json.loads((workdir / "limit-odirect.json").read_text())
    if not best:
        raise RuntimeError("the limit sweep measured no O_DIRECT configuration")
    return {"threads": best[0]["threads"], "unit_bytes": best[0]["block_bytes"]}


def _only_mode(path: Path, mode: str):
    """The probe's tuning with only `mode`'s best configuration left (the loader then has to use it)."""
    from hpcllm.store.tuning import ReadTuning

    tuning = ReadTuning.load(path)
    for tier in tuning.tiers.values():
        tier.best = {m: c for m, c in tier.best.items() if m == mode}
    return tuning


def measure_limit(name: str, workdir: Path, cold: str) -> dict:
    import numpy as np

    from hpcllm.store.memory import HostBuffer

    if name in ("limit_read", "limit_read_odirect"):
        return measure_read_limit(workdir, name)
    if name == "limit_h2d":
        return measure_h2d()
    size = 1 << 30
    if name == "limit_memcpy":
        src, dst = np.ones(size, dtype=np.uint8), np.ones(size, dtype=np.uint8)  # both written: touched
        started = time.perf_counter()
        np.copyto(dst, src)
        seconds = time.perf_counter() - started
    else:  # limit_first_touch
        buffer = HostBuffer(size)
        started = time.perf_counter()
        buffer.populate()
        seconds = time.perf_counter() - started
    return {"name": name, "bytes": size, "seconds": seconds, "gbps": size / seconds / 1e9}


def probe_tuning(workdir: Path, probe_bytes: int) -> dict:
    """The node agent's start-up probe on this disk (hpcllm.node.probes): its read tuning, saved for hpcllm."""
    from hpcllm.node.probes import probe_folder
    from hpcllm.store.readers import ODIRECT
    from hpcllm.store.tuning import ReadTuning

    tuning = ReadTuning()
    probe_folder(workdir / "probe", probe_bytes, ODIRECT, "disk", tuning)
    tuning.save(workdir / TUNING_FILE)
    return {"file": str(workdir / TUNING_FILE), "probe_bytes": probe_bytes,
            "best": {mode: f"{c.label()} {c.gbps:.2f} GB/s" for mode, c in tuning.tiers["disk"].best.items()}}


def _data_files(workdir: Path) -> list[Path]:
    return sorted((workdir / "ckpt").glob("data-*.h5"))


def limit_sweep(workdir: Path, sweep_bytes: int) -> dict:
    """Every configuration of the sweep over the first sweep_bytes of the data files; the fastest TOP_CONFIGS."""
    from hpcllm.store.tuning import sweep_read

    configs = sweep_read(_data_files(workdir), max_bytes=sweep_bytes)
    rows = [{"mode": c.mode, "threads": c.threads, "block_bytes": c.block_bytes, "gbps": c.gbps, "label": c.label()}
            for c in sorted(configs, key=lambda c: -c.gbps)]
    return {"bytes_per_config": sweep_bytes, "configs": rows, "top": rows[:TOP_CONFIGS],
            "top_odirect": [r for r in rows if r["mode"] == "odirect"][:1]}


def measure_read_limit(workdir: Path, name: str = "limit_read") -> dict:
    """The sweep's fastest configurations, each over the whole checkpoint from a cold page cache; the best wins.

    limit_read_odirect: only the sweep's best O_DIRECT configuration. The page-cache modes can set limit_read with
    reads into a small reused buffer, a rate not deliverable into model-sized memory here (docs/loader.md); O_DIRECT
    into faulted memory is, at any size: this one says how close a loader reading O_DIRECT gets to the disk."""
    from hpcllm.store.tuning import sweep_read

    files = _data_files(workdir)
    total = sum(f.stat().st_size for f in files)
    top_file = workdir / ("limit-odirect.json" if name == "limit_read_odirect" else "limit-top.json")
    top = (json.loads(top_file.read_text()) if top_file.is_file() else []) or \
        [{"mode": "odirect", "threads": 4, "block_bytes": 16 << 20}]  # no sweep: the former fixed limit
    measured = []
    for c in top:
        measured += sweep_read(files, modes=(c["mode"],), threads=(c["threads"],), blocks=(c["block_bytes"],))
    best = max(measured, key=lambda c: c.gbps)
    return {"name": name, "bytes": total, "seconds": total / best.gbps / 1e9, "gbps": best.gbps,
            "config": best.label(), "all": {c.label(): round(c.gbps, 3) for c in measured}}


def measure_h2d() -> dict:
    """Pinned host memory -> cuda:0 with copy_(non_blocking=True) on one stream: what the staging ring can reach."""
    import torch

    block, repeats = 256 << 20, 8
    src = torch.ones(block, dtype=torch.uint8).pin_memory()
    dst = torch.empty(block, dtype=torch.uint8, device="cuda:0")
    dst.copy_(src, non_blocking=True)  # first copy: lazy CUDA initialisation, not measured
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"name": "limit_h2d", "bytes": block * repeats, "seconds": seconds,
            "gbps": block * repeats / seconds / 1e9}


# ---------------------------------------------------------------------------------------------------- reporting


def was_cold(run) -> bool:
    """Whether a run's files were out of the page cache before it (at most COLD_THRESHOLD in it)."""
    return (run.get("residency_before") or 0) <= COLD_THRESHOLD


def summarize(raw, limits, paths, size, runs, can_cold, cold, skipped, wall) -> dict:
    from hpcllm.checkpoint import read_checkpoint

    total = read_checkpoint(paths["ckpt"]).total_bytes
    rows = []
    for method, states in raw.items():
        for state, results in states.items():
            # A "cold" run that found its files in the page cache timed a warm load: left out of the cold median
            # (and the ratios and targets built on it); with no cold run at all the row says so and check_targets
            # builds no cold target on it.
            cold_runs = [r for r in results if was_cold(r)] if state == "cold" else results
            in_median = cold_runs or results
            ready = statistics.median(r["ready"] for r in in_median)
            resident = statistics.median(r["resident"] for r in in_median)
            residencies = [r.get("residency_before") for r in results if r.get("residency_before") is not None]
            note = results[-1].get("note", "")
            warm_runs = [r for r in results if not was_cold(r)]
            if state == "cold" and warm_runs:  # say so on the row, not only in one run's note
                note = (f"NOT COLD in {len(warm_runs)} of {len(results)} runs (up to "
                        f"{max(r['residency_before'] for r in warm_runs):.0%} in the page cache), "
                        + ("left out of the median" if cold_runs else "no cold run: the median is of these")
                        + f"; {note}").rstrip("; ")
            rows.append({"method": method, "label": METHODS[method][0], "state": state, "device": METHODS[method][3],
                         "runs": len(results), "ready_s": ready, "resident_s": resident,
                         "gbps": total / resident / 1e9,
                         "all_ready_s": [r["ready"] for r in results],
                         "all_resident_s": [r["resident"] for r in results],
                         "rounds": [r["round"] for r in results],
                         "max_residency_before": max(residencies) if residencies else None,
                         "runs_in_median": len(in_median),
                         "max_residency_in_median": max((r.get("residency_before") or 0 for r in in_median)),
                         "fingerprints": sorted({r["fingerprint"] for r in results}),
                         "note": note})
    limit_rows = {name: {"label": LIMITS[name], "median_gbps": statistics.median(r["gbps"] for r in v),
                         "all_gbps": [r["gbps"] for r in v], "rounds": [r["round"] for r in v]}
                  for name, v in limits.items() if v}
    fingerprints = {fp for row in rows for fp in row["fingerprints"]}
    report = {"model": str(paths["hf"]), "size": size, "checkpoint_bytes": total, "runs": runs,
              "cold_available": can_cold, "cold_method": cold if can_cold else None,
              "methodology": {"cold": COLD_DESCRIPTION[cold], "warm": "the parent read every file of the method's "
                              "input folder once before starting the child",
                              "order": "round-robin, rotated every round; read limit (the sweep's fastest "
                                       "configurations over the whole checkpoint) at the start and the end of every "
                                       "round",
                              "imports": "excluded for every method: each child imports torch / transformers and "
                                         "builds one skeleton (without hpcllm's template cache) before the timer"},
              "skipped": skipped, "wall_seconds": wall, "rows": rows, "raw": raw, "limits": limit_rows,
              "same_weights_everywhere": len(fingerprints) <= 1,
              "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(),
                          "load_average_1min_during_runs": _load_averages(raw)}}
    limit = limit_rows.get("limit_read")
    for row in rows:
        row["x_limit"] = row["gbps"] / limit["median_gbps"] if limit else None
    report["targets"] = check_targets(report)
    report["beat_the_limit"] = runs_beating_the_limit(report)
    return report


def _load_averages(raw) -> dict:
    values = [r["load_average"] for states in raw.values() for results in states.values() for r in results
              if r.get("load_average") is not None]
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def runs_beating_the_limit(report) -> list[str]:
    """Cold runs (file tiers) faster than their round's read limit: each would mean the sweep missed a faster way
    to read the disk (or the disk sped up between the limit's measurements)."""
    total, by_round = report["checkpoint_bytes"], _round_limit(report, "limit_read")
    beaten = []
    for method, states in report["raw"].items():
        for r in filter(was_cold, states.get("cold", [])):
            limit = by_round.get(r["round"])
            if limit and total / r["resident"] / 1e9 > limit:
                beaten.append(f"{method} round {r['round'] + 1}: {total / r['resident'] / 1e9:.2f} GB/s > "
                              f"{limit:.2f}")
    return beaten


def _row(report, method, state):
    return next((r for r in report["rows"] if r["method"] == method and r["state"] == state), None)


def _measured(row) -> bool:
    """False for a cold row none of whose runs was cold: no target is built on a warm load's time."""
    return row["state"] != "cold" or (row.get("max_residency_in_median") or 0) <= COLD_THRESHOLD


def _measured_row(report, method, state):
    row = _row(report, method, state)
    return row if row and _measured(row) else None


def _per_round(report, method, state) -> dict[int, float]:
    results = report["raw"].get(method, {}).get(state, [])
    return {r["round"]: r["resident"] for r in results if state != "cold" or was_cold(r)}


def _round_limit(report, name: str) -> dict[int, float]:
    limit = report["limits"].get(name)
    if not limit:
        return {}
    by_round: dict[int, list[float]] = {}
    for gbps, run in zip(limit["all_gbps"], limit["rounds"]):
        by_round.setdefault(run, []).append(gbps)
    return {run: max(values) for run, values in by_round.items()}  # the best the disk did in that round


def _hpcllm_base(report) -> str:
    return PRODUCTION if _row(report, PRODUCTION, "cold") else "hpcllm_disk"


def check_targets(report) -> dict:
    targets = {}
    total = report["checkpoint_bytes"]
    odirect = report["limits"].get("limit_read")
    base = _hpcllm_base(report)
    report["targets_on"] = base
    disk = _measured_row(report, base, "cold")
    if disk and odirect:
        ratio = disk["gbps"] / odirect["median_gbps"]
        limit_by_round = _round_limit(report, "limit_read")
        paired = [total / s / 1e9 / limit_by_round[run] for run, s in _per_round(report, base, "cold").items()
                  if run in limit_by_round]
        targets[f"cold disk ({base}) >= 0.9x swept read limit"] = {
            "value": round(ratio, 2), "per_round": [round(v, 2) for v in paired], "met": ratio >= 0.9}
    odirect_only = report["limits"].get("limit_read_odirect")
    if disk and odirect_only:  # informational: against the deliverable part of the sweep
        by_round = _round_limit(report, "limit_read_odirect")
        targets[f"cold disk ({base}) >= 0.9x O_DIRECT read limit"] = {
            "value": round(disk["gbps"] / odirect_only["median_gbps"], 2),
            "per_round": [round(total / s / 1e9 / by_round[run], 2)
                          for run, s in _per_round(report, base, "cold").items() if run in by_round],
            "met": disk["gbps"] / odirect_only["median_gbps"] >= 0.9}
    for state in ("cold", "warm"):
        mine = _measured_row(report, base, state)
        peers = [r for r in report["rows"] if r["method"] in PEERS and r["state"] == state and _measured(r)]
        if mine and peers:
            fastest = min(peers, key=lambda r: r["resident_s"])
            targets[f"{state}: faster than every peer"] = {
                "value": f"{mine['resident_s']:.3f} s vs {fastest['method']} {fastest['resident_s']:.3f} s",
                "met": mine["resident_s"] < fastest["resident_s"]}
    for peer in PEERS:
        mine, other = _measured_row(report, base, "cold"), _measured_row(report, peer, "cold")
        if mine and other:
            by_round = _per_round(report, peer, "cold")
            targets[f"cold: faster than {peer}"] = {
                "value": round(other["resident_s"] / mine["resident_s"], 2),
                "per_round": [round(by_round[run] / s, 2) for run, s in _per_round(report, base, "cold").items()
                              if run in by_round],
                "met": mine["resident_s"] < other["resident_s"]}
    for peer in ("safetensors", "from_pretrained"):
        mine, other = _measured_row(report, base, "cold"), _measured_row(report, peer, "cold")
        if not (mine and other):
            continue
        speedup = other["resident_s"] / mine["resident_s"]
        mine_by_round, other_by_round = _per_round(report, base, "cold"), _per_round(report, peer, "cold")
        paired = [other_by_round[run] / mine_by_round[run] for run in mine_by_round if run in other_by_round]
        target = {"value": round(speedup, 2), "per_round": [round(v, 2) for v in paired], "met": speedup >= 2}
        if odirect:
            # What a loader reading at exactly the measured disk limit (and doing nothing else) would reach.
            ceiling = other["resident_s"] / (total / odirect["median_gbps"] / 1e9)
            target["ceiling_at_disk_limit"] = round(ceiling, 2)
            if ceiling < 2:
                target["why"] = (f"out of reach in this run: even a loader at the swept read limit "
                                 f"({odirect['median_gbps']:.2f} GB/s) would be only {ceiling:.2f}x faster than "
                                 f"{peer}, whose own cold load is mostly the same disk reads")
        targets[f"cold: >= 2x faster than {peer}"] = target
    dram = _measured_row(report, "hpcllm_dram", "shm")
    if dram:
        targets["DRAM tier ready <= 50 ms"] = {"value": f"{dram['ready_s'] * 1000:.1f} ms",
                                               "per_run_ms": [round(v * 1000, 1) for v in dram["all_ready_s"]],
                                               "met": dram["ready_s"] <= 0.05}
    mine = _measured_row(report, "hpcllm_gpu_disk", "cold")
    gpu_peers = [r for r in report["rows"] if r["method"] in GPU_PEERS and r["state"] == "cold" and _measured(r)]
    if mine and gpu_peers:
        fastest = min(gpu_peers, key=lambda r: r["resident_s"])
        targets["GPU cold: faster than every GPU peer"] = {
            "value": f"{mine['resident_s']:.3f} s vs {fastest['method']} {fastest['resident_s']:.3f} s",
            "met": mine["resident_s"] < fastest["resident_s"]}
    h2d = report["limits"].get("limit_h2d")
    for method, state in (("hpcllm_gpu_dram", "shm"), ("hpcllm_gpu_disk", "warm")):
        gpu = _measured_row(report, method, state)
        if gpu and h2d:
            ratio = gpu["gbps"] / h2d["median_gbps"]
            targets[f"GPU {method} ({state}) >= 0.8x host-to-device"] = {"value": round(ratio, 2),
                                                                          "met": ratio >= 0.8}
    return targets


def print_table(report) -> None:
    total = report["checkpoint_bytes"]
    print(f"\ncheckpoint {total / 1e9:.2f} GB ({report['size']}), median of {report['runs']} fresh process(es); "
          f"load average at the end {report['machine']['load_average'][0]:.1f} on {report['machine']['cpus']} CPUs")
    if report["cold_method"]:
        print(f"cold: {report['methodology']['cold']}")
    header = (f"{'method':56s} {'state':5s} {'ready s':>8s} {'resident s':>10s} {'GB/s':>6s} {'x limit':>7s} "
              f"{'vs hpcllm':>9s}")
    print(header + "\n" + "-" * len(header))
    for row in sorted(report["rows"], key=lambda r: (r["device"], r["state"], r["resident_s"])):
        base = "hpcllm_gpu_disk" if row["device"] == "cuda" else _hpcllm_base(report)
        mine = _row(report, base, row["state"]) or _row(report, base, "cold") or _row(report, base, "warm")
        ratio = row["resident_s"] / mine["resident_s"] if mine else float("nan")
        x_limit = f"{row['x_limit']:7.2f}" if row.get("x_limit") is not None else f"{'-':>7s}"
        print(f"{row['label']:56s} {row['state']:5s} {row['ready_s']:8.3f} {row['resident_s']:10.3f} "
              f"{row['gbps']:6.2f} {x_limit} {ratio:8.2f}x  {row['note']}")
    print("\nmachine limits (median GB/s, same run):")
    for name, limit in report["limits"].items():
        print(f"  {limit['label']:48s} {limit['median_gbps']:6.2f}  (runs: "
              f"{', '.join(f'{v:.2f}' for v in limit['all_gbps'])})")
        if name == "limit_read":
            print(f"  {'-> time to read the checkpoint at that rate':48s} {total / limit['median_gbps'] / 1e9:6.2f} s")
    print("\ntargets:")
    for name, target in report["targets"].items():
        extra = f" (per round: {target['per_round']})" if target.get("per_round") else ""
        if "ceiling_at_disk_limit" in target:
            extra += f"; at the disk limit: {target['ceiling_at_disk_limit']}x"
        print(f"  [{'met' if target['met'] else 'MISSED'}] {name}: {target['value']}{extra}")
        if target.get("why"):
            print(f"        {target['why']}")
    beaten = report.get("beat_the_limit") or []
    print(f"  cold runs faster than their round's read limit: {'; '.join(beaten) if beaten else 'none'}")
    loads = report["machine"].get("load_average_1min_during_runs")
    if loads:
        print(f"  load average (1 min) when the runs started: min {loads['min']:.1f}, median {loads['median']:.1f}, "
              f"max {loads['max']:.1f} on {report['machine']['cpus']} CPUs (the machine is shared)")
    if not report["same_weights_everywhere"]:
        print("  WARNING: methods loaded different weights (fingerprints differ)")
    for method, reason in report["skipped"].items():
        print(f"  skipped {method}: {reason}")


def write_outputs(report) -> None:
    from bench.benchkit import new_result_stem

    stem = new_result_stem(RESULTS, "load")
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=1))
    shutil.copyfile(json_path, RESULTS / "load-latest.json")
    png_path = stem.with_suffix(".png")
    plot(report, png_path)
    shutil.copyfile(png_path, RESULTS / "load-latest.png")
    print(f"\nwrote {json_path} and {png_path}")


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["rows"], key=lambda r: list(METHODS).index(r["method"]))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    states = ["cold", "warm", "shm"]
    colors = {"cold": "#4c72b0", "warm": "#dd8452", "shm": "#55a868"}
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(labels) + 1.8))
    height = 0.27
    for i, state in enumerate(states):
        ys, xs = [], []
        for j, label in enumerate(labels):
            row = next((r for r in rows if r["label"] == label and r["state"] == state), None)
            if row:
                ys.append(j + (i - 1) * height)
                xs.append(row["resident_s"])
        if xs:
            ax.barh(ys, xs, height=height, color=colors[state], label=state)
            for y, x in zip(ys, xs):
                ax.text(x, y, f" {x:.3f}" if x < 0.1 else f" {x:.2f}", va="center", fontsize=7)
    odirect = report["limits"].get("limit_read")
    if odirect:
        limit_s = report["checkpoint_bytes"] / odirect["median_gbps"] / 1e9
        ax.axvline(limit_s, color="black", linestyle="--", linewidth=1, label=f"read limit {limit_s:.2f} s")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds to a ready model with every weight resident (median, fresh processes)")
    ax.set_title(f"Loading a {report['checkpoint_bytes'] / 1e9:.1f} GB checkpoint (cold: {report['cold_method']})")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
