"""Checkpoint -> ready CPU model: hpcllm's tiers against the usual loaders, with the machine's limits measured in
the same run.

    .venv/bin/python bench/load.py [--quick] [--runs 3] [--workdir /var/tmp/hpcllm-bench]

Builds (or reuses) a ~2 GB Llama-style bf16 checkpoint with hpcllm.devmodels (--quick: the "small" size), converts
it, puts it in the DRAM tier and saves a torch .bin copy. Every measurement runs in a FRESH Python process: the
process imports torch / transformers and builds the model skeleton once (import costs are the same for every
loader and are excluded), then, for "cold", drops the guest page cache (`echo 3 > /proc/sys/vm/drop_caches`,
needs root; otherwise cold runs are skipped and the report says so), then times the load. "warm" runs read the
files into the page cache first. Methods run round-robin so slow phases of the shared machine hit all of them.

Two times per run: `ready` (the loader returned a usable model) and `resident` (additionally every weight page has
been read once, which is when lazy mmap-based loaders have really loaded). Ratios use `resident`.
Results: a table on stdout, bench/results/load-<time>.json and .png (and load-latest.*).
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
RESULTS = REPO / "bench" / "results"
MODEL_ID = "bench-llama"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")

METHODS = {
    # name: (label, which files a warm run pre-reads, runs in states)
    "hpcllm_disk": ("hpcllm disk (O_DIRECT)", "ckpt", ("cold", "warm")),
    "hpcllm_disk_verify": ("hpcllm disk, verify=True (re-hash all)", "ckpt", ("cold", "warm")),
    "hpcllm_disk_pool": ("hpcllm disk, warm worker pool", "ckpt", ("cold", "warm")),
    "hpcllm_sharedfs": ("hpcllm shared-FS settings (buffered)", "ckpt", ("cold", "warm")),
    "hpcllm_dram": ("hpcllm DRAM tier (/dev/shm)", None, ("shm",)),
    "safetensors": ("safetensors load_file + load_state_dict", "hf", ("cold", "warm")),
    "from_pretrained": ("transformers from_pretrained", "hf", ("cold", "warm")),
    "torch_load": ("torch.load", "bin", ("cold", "warm")),
    "torch_load_mmap": ("torch.load(mmap=True)", "bin", ("cold", "warm")),
    "runai": ("runai-model-streamer", "hf", ("cold", "warm")),
    "fastsafetensors": ("fastsafetensors (nogds)", "hf", ("cold", "warm")),
}
PEERS = ["safetensors", "from_pretrained", "torch_load", "torch_load_mmap", "runai", "fastsafetensors"]
LIMITS = {"limit_odirect": "O_DIRECT sequential read, 16 MiB blocks, QD 4", "limit_memcpy": "memcpy into touched memory",
          "limit_first_touch": "first touch of fresh memory (page faults)"}


# ---------------------------------------------------------------------------------------------------- the parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model (tens of MB), 1 run: a smoke test")
    parser.add_argument("--runs", type=int, default=None, help="fresh processes per method and state (default 3)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/hpcllm-bench"),
                        help="where the models live (must be on the real disk, not tmpfs)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of methods")
    parser.add_argument("--keep-dram", action="store_true", help="leave the model in /dev/shm afterwards")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "small" if args.quick else "bench"
    workdir = args.workdir / size
    if args.child:
        return child(args.child, args.state, workdir)

    runs = args.runs or (1 if args.quick else 3)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    can_drop = os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)
    print(f"hpcllm load benchmark: {size} model, {runs} run(s) per method and state, each in a fresh process")
    print("cold = guest page cache dropped (echo 3 > /proc/sys/vm/drop_caches)" if can_drop else
          "cold runs SKIPPED: dropping the page cache needs root (run as root for cold numbers)")
    paths = prepare(workdir, size)
    skipped = {m: reason for m in methods if (reason := peer_missing(m))}
    for method, reason in skipped.items():
        print(f"  skipping {method}: {reason}")
    methods = [m for m in methods if m not in skipped]

    raw: dict[str, dict[str, list[dict]]] = {}
    limits: dict[str, list[float]] = {name: [] for name in LIMITS}
    started = time.time()
    try:
        for run in range(runs):
            for name in LIMITS:
                result = spawn(name, "cold" if can_drop else "warm", workdir)
                if result:
                    limits[name].append(result["gbps"])
            for method in methods:
                for state in METHODS[method][2]:
                    if state == "cold" and not can_drop:
                        continue
                    if state == "warm":
                        warm_up(paths, METHODS[method][1])
                    result = spawn(method, state, workdir)
                    if result:
                        raw.setdefault(method, {}).setdefault(state, []).append(result)
                        print(f"  run {run + 1}/{runs} {method:18s} {state:4s} ready {result['ready']:7.3f} s  "
                              f"resident {result['resident']:7.3f} s  {result.get('note', '')}", flush=True)
    finally:
        if not args.keep_dram:
            from hpcllm.store.dram import DramTier

            DramTier("bench").remove(MODEL_ID)
    report = summarize(raw, limits, paths, size, runs, can_drop, skipped, time.time() - started)
    print_table(report)
    write_outputs(report)
    return 0


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
    tier = DramTier("bench")
    if not tier.has(MODEL_ID):
        entry = tier.put(ckpt, MODEL_ID)
        print(f"DRAM tier filled in {entry.fill_seconds:.2f} s ({entry.bytes / 1e9:.2f} GB)", flush=True)
    return {"hf": hf, "ckpt": ckpt, "bin": binary}


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


def peer_missing(method: str) -> str | None:
    module = {"runai": "runai_model_streamer", "fastsafetensors": "fastsafetensors"}.get(method)
    if module is None:
        return None
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"`import {module}` failed ({last}); `.venv/bin/pip install {module.replace('_', '-')}` to include it"
    return None


def warm_up(paths: dict[str, Path], which: str | None) -> None:
    if which is None:
        return
    for path in sorted(paths[which].iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(16 << 20):
                    pass


def spawn(method: str, state: str, workdir: Path) -> dict | None:
    env = dict(os.environ)
    if method == "runai":
        env["NUMPY_MADVISE_HUGEPAGE"] = "0"  # its default (THP) is very slow on these VMs (see docs/loader.md)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--state", state,
           "--workdir", str(workdir.parent)]
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


def child(method: str, state: str, workdir: Path) -> int:
    import torch
    from transformers import AutoConfig

    from hpcllm.store.skeleton import build_skeleton

    hf, ckpt = workdir / "hf", workdir / "ckpt"
    if method.startswith("limit_"):
        print(json.dumps(measure_limit(method, ckpt, state)))
        return 0
    config = AutoConfig.from_pretrained(hf)
    build_skeleton(config, torch.bfloat16)  # imports the model code; every method pays the same imports before
    loader = prepare_method(method, workdir, config)
    if state == "cold":
        drop_page_cache()
    started = time.perf_counter()
    model, note = loader()
    ready = time.perf_counter() - started
    touch_every_page(model)
    resident = time.perf_counter() - started
    params = [p for p in model.parameters()]
    fingerprint = float(sum(p.detach().reshape(-1)[:: max(1, p.numel() // 64)].float().sum() for p in params))
    nbytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())
    print(json.dumps({"method": method, "state": state, "ready": ready, "resident": resident, "bytes": nbytes,
                      "fingerprint": fingerprint, "note": note}))
    return 0


def drop_page_cache() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def touch_every_page(model) -> None:
    import torch

    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            flat = tensor.detach().reshape(-1).view(torch.uint8) if tensor.numel() else None
            if flat is not None:
                flat[::4096].sum()


def _assign(model, state: dict) -> object:
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
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
        if method == "hpcllm_disk_pool":  # a worker that reserved (pre-faulted) its buffers when it started
            from hpcllm.checkpoint import read_checkpoint

            pool.reserve([p.size for p in read_checkpoint(ckpt).partitions])
        if method == "hpcllm_dram":
            from hpcllm.store.dram import DramTier

            path, kwargs = DramTier("bench").open(MODEL_ID), {}
        else:
            path, kwargs = ckpt, {"tier": "sharedfs" if method == "hpcllm_sharedfs" else "disk"}
        if method == "hpcllm_disk_verify":
            kwargs["verify"] = True

        def run():
            loaded = load_model(path, tokenizer=False, pool=pool, **kwargs)
            s = loaded.stats
            checked = "verified" if s.verified else "verified earlier" if s.verified_earlier else "not verified"
            reason = f" ({s.fallback_reason})" if s.fallback_reason else ""
            return loaded.model, f"{s.reader_mode}, {checked}{reason}"
        return run

    if method == "safetensors":
        from safetensors.torch import load_file

        def run():
            model = build_skeleton(config, torch.bfloat16)
            state = {}
            for f in safetensors_files:
                state.update(load_file(f))
            return _assign(model, state), ""
        return run

    if method == "from_pretrained":
        from transformers import AutoModelForCausalLM

        def run():
            return AutoModelForCausalLM.from_pretrained(hf).eval(), ""
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


def measure_limit(name: str, ckpt: Path, state: str) -> dict:
    import threading

    import numpy as np

    from hpcllm.store.memory import HostBuffer

    if name == "limit_odirect":
        files = sorted(ckpt.glob("data-*.h5"))
        total = sum(f.stat().st_size for f in files)
        block = 16 << 20
        buffers = [HostBuffer(block) for _ in range(4)]
        for b in buffers:
            b.populate()
        jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, block)]
        fds = {f: os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files}
        lock = threading.Lock()
        if state == "cold":
            drop_page_cache()

        def worker(buffer):
            while True:
                with lock:
                    if not jobs:
                        return
                    f, off = jobs.pop(0)
                os.preadv(fds[f], [buffer.view()], off)

        started = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(b,)) for b in buffers]  # queue depth 4
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        return {"name": name, "bytes": total, "seconds": seconds, "gbps": total / seconds / 1e9}
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


# ---------------------------------------------------------------------------------------------------- reporting


def summarize(raw, limits, paths, size, runs, can_drop, skipped, wall) -> dict:
    from hpcllm.checkpoint import read_checkpoint

    total = read_checkpoint(paths["ckpt"]).total_bytes
    rows = []
    for method, states in raw.items():
        for state, results in states.items():
            ready = statistics.median(r["ready"] for r in results)
            resident = statistics.median(r["resident"] for r in results)
            rows.append({"method": method, "label": METHODS[method][0], "state": state, "runs": len(results),
                         "ready_s": ready, "resident_s": resident, "gbps": total / resident / 1e9,
                         "all_resident_s": [r["resident"] for r in results],
                         "fingerprints": sorted({round(r["fingerprint"], 3) for r in results}),
                         "note": results[-1].get("note", "")})
    limit_rows = {name: {"label": LIMITS[name], "median_gbps": statistics.median(v), "all_gbps": v}
                  for name, v in limits.items() if v}
    fingerprints = {fp for row in rows for fp in row["fingerprints"]}
    report = {"model": str(paths["hf"]), "size": size, "checkpoint_bytes": total, "runs": runs,
              "cold_available": can_drop, "skipped": skipped, "wall_seconds": wall, "rows": rows,
              "limits": limit_rows, "same_weights_everywhere": len(fingerprints) <= 1,
              "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}}
    report["targets"] = check_targets(report)
    return report


def _row(report, method, state):
    return next((r for r in report["rows"] if r["method"] == method and r["state"] == state), None)


def check_targets(report) -> dict:
    targets = {}
    odirect = report["limits"].get("limit_odirect")
    disk = _row(report, "hpcllm_disk", "cold")
    if disk and odirect:
        ratio = disk["gbps"] / odirect["median_gbps"]
        targets["cold disk >= 0.9x O_DIRECT limit"] = {"value": round(ratio, 2), "met": ratio >= 0.9}
    for state in ("cold", "warm"):
        mine = _row(report, "hpcllm_disk", state)
        peers = [r for r in report["rows"] if r["method"] in PEERS and r["state"] == state]
        if mine and peers:
            fastest = min(peers, key=lambda r: r["resident_s"])
            targets[f"{state}: faster than every peer"] = {
                "value": f"{mine['resident_s']:.3f} s vs {fastest['method']} {fastest['resident_s']:.3f} s",
                "met": mine["resident_s"] < fastest["resident_s"]}
    for peer in ("safetensors", "from_pretrained"):
        mine, other = _row(report, "hpcllm_disk", "cold"), _row(report, peer, "cold")
        if mine and other:
            speedup = other["resident_s"] / mine["resident_s"]
            targets[f"cold: >= 2x faster than {peer}"] = {"value": round(speedup, 2), "met": speedup >= 2}
    dram = _row(report, "hpcllm_dram", "shm")
    if dram:
        targets["DRAM tier ready <= 50 ms"] = {"value": f"{dram['ready_s'] * 1000:.1f} ms",
                                               "met": dram["ready_s"] <= 0.05}
    return targets


def print_table(report) -> None:
    total = report["checkpoint_bytes"]
    base = _row(report, "hpcllm_disk", "cold") or _row(report, "hpcllm_disk", "warm")
    print(f"\ncheckpoint {total / 1e9:.2f} GB ({report['size']}), median of {report['runs']} fresh process(es); "
          f"load average at the end {report['machine']['load_average'][0]:.1f} on {report['machine']['cpus']} CPUs")
    header = f"{'method':42s} {'state':5s} {'ready s':>8s} {'resident s':>10s} {'GB/s':>6s} {'vs hpcllm':>9s}"
    print(header + "\n" + "-" * len(header))
    for row in sorted(report["rows"], key=lambda r: (r["state"], r["resident_s"])):
        mine = _row(report, "hpcllm_disk", row["state"]) or base
        ratio = row["resident_s"] / mine["resident_s"] if mine else float("nan")
        print(f"{row['label']:42s} {row['state']:5s} {row['ready_s']:8.3f} {row['resident_s']:10.3f} "
              f"{row['gbps']:6.2f} {ratio:8.2f}x  {row['note']}")
    print("\nmachine limits (median GB/s, same run):")
    for name, limit in report["limits"].items():
        print(f"  {limit['label']:48s} {limit['median_gbps']:6.2f}  (runs: "
              f"{', '.join(f'{v:.2f}' for v in limit['all_gbps'])})")
        if name == "limit_odirect":
            print(f"  {'-> time to read the checkpoint at that rate':48s} {total / limit['median_gbps'] / 1e9:6.2f} s")
    print("\ntargets:")
    for name, target in report["targets"].items():
        print(f"  [{'met' if target['met'] else 'MISSED'}] {name}: {target['value']}")
    if not report["same_weights_everywhere"]:
        print("  WARNING: methods loaded different weights (fingerprints differ)")
    for method, reason in report["skipped"].items():
        print(f"  skipped {method}: {reason}")


def write_outputs(report) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = RESULTS / f"load-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1))
    shutil.copyfile(json_path, RESULTS / "load-latest.json")
    png_path = RESULTS / f"load-{stamp}.png"
    plot(report, png_path)
    shutil.copyfile(png_path, RESULTS / "load-latest.png")
    print(f"\nwrote {json_path} and {png_path}")


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["rows"], key=lambda r: (r["method"] not in METHODS, list(METHODS).index(r["method"])))
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
                ax.text(x, y, f" {x:.2f}", va="center", fontsize=7)
    odirect = report["limits"].get("limit_odirect")
    if odirect:
        limit_s = report["checkpoint_bytes"] / odirect["median_gbps"] / 1e9
        ax.axvline(limit_s, color="black", linestyle="--", linewidth=1, label=f"O_DIRECT limit {limit_s:.2f} s")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds to a ready model with every weight resident (median, fresh processes)")
    ax.set_title(f"Loading a {report['checkpoint_bytes'] / 1e9:.1f} GB checkpoint into a CPU model")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
