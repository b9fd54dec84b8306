"""Start-up measurements of this node's tiers, reported to the controller for placement (docs/node-agent.md).

- nvme: O_DIRECT sequential read of a probe file written once into the NVMe folder (hpcllm.store's FileReader,
  which falls back to buffered reads, with the reason, where the filesystem refuses O_DIRECT);
- sharedfs: buffered read of a probe file in the models folder (the origin of checkpoints), after asking the
  kernel to drop its pages (posix_fadvise DONTNEED) so the page cache does not flatter it; where the folder is
  read-only, the largest existing file there is read instead (a note says so);
- dram: memcpy between two pre-touched page-aligned buffers (what a DRAM-tier load costs per byte at best), timed
  in CPU time (not the time other processes held the CPU);
- h2d: pinned host -> GPU copy with torch.cuda (timed with CUDA events), only when GPUs were found and CUDA is
  available; in a child process, so the agent never holds a CUDA context.

Each probe reads/copies `size` bytes in 16 MiB requests and reports GB/s (1e9 bytes/s) of the best of a few
passes. Probe files are removed afterwards.

Read tuning (`sweep_read_settings`): probe files of the same size are read with every (mode, parallelism, block
size) of hpcllm.store.tuning's sweep - nvme in O_DIRECT, buffered and mapped (populated) mode, the shared FS
buffered - and the fastest configuration of each mode is kept per tier. About 60 reads of the probe size: the agent
runs it in the background after registering, or reuses a recent result (hpcllm/node/read_sweep.py).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from hpcllm.store.memory import HostBuffer, round_up
from hpcllm.store.readers import BUFFERED, ODIRECT, FileReader
from hpcllm.store.tiers import MMAP
from hpcllm.store.tuning import ReadTuning, SweepGate, TierTuning, measure_tier

log = logging.getLogger(__name__)

BLOCK = 16 * 1024 * 1024
PROBE_FORMAT = 1  # of the saved tier measurements (TierMeasurements.to_dict): bump when the probes measure differently
PAGE = 4096
GB = 1e9


@dataclass
class ProbeResult:
    read_gbps: float
    mode: str  # "odirect", "buffered", "memcpy", "pinned"
    bytes: int
    seconds: float
    note: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "ProbeResult":
        """A saved result; ValueError or TypeError for what no probe measured (a corrupt or edited file)."""
        numbers = [data["read_gbps"], data["seconds"], data["bytes"]]
        if any(isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) for n in numbers):
            raise ValueError(f"read_gbps, seconds and bytes are finite numbers, not {numbers}")
        if not data["read_gbps"] > 0 or not isinstance(data["mode"], str) or \
                not isinstance(data.get("note"), (str, type(None))):
            raise ValueError("a probe result has read_gbps > 0, a mode and a note that is text or null")
        return cls(float(data["read_gbps"]), data["mode"], int(data["bytes"]), float(data["seconds"]),
                   data.get("note"))


TIERS = ("nvme", "sharedfs", "dram", "h2d")


@dataclass
class TierMeasurements:
    nvme: ProbeResult | None = None
    sharedfs: ProbeResult | None = None
    dram: ProbeResult | None = None
    h2d: ProbeResult | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TierMeasurements":
        notes = data.get("notes", [])
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise ValueError("notes is a list of texts")
        return cls(**{t: ProbeResult.from_dict(data[t]) if data.get(t) is not None else None for t in TIERS},
                   notes=notes)

    def keeping(self, previous: "TierMeasurements") -> "TierMeasurements":
        """These figures, with `previous`'s where this measurement has none (a probe that failed or was skipped)."""
        return TierMeasurements(**{t: getattr(self, t) or getattr(previous, t) for t in TIERS}, notes=self.notes)


def _probe_name() -> str:
    return f".hpcllm-probe-{socket.gethostname()}-{os.getpid()}"


def _write_probe_file(path: Path, size: int) -> None:
    block = os.urandom(min(BLOCK, size))  # incompressible: some filesystems compress zeros away
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < size:
            written += os.write(fd, block[: min(len(block), size - written)])
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_from_page_cache(path: Path) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # advice only
    finally:
        os.close(fd)


def read_bandwidth(path: Path, mode: str, size: int | None = None) -> ProbeResult:
    """Sequential read of the first `size` bytes of `path` (whole file by default) into an aligned buffer."""
    size = os.path.getsize(path) if size is None else min(size, os.path.getsize(path))
    buffer = HostBuffer(BLOCK)
    buffer.populate()  # fault pages in first: the probe measures the disk, not page faults
    view = buffer.view()
    with FileReader(path, mode, expected_size=size, use_page_cache=False) as reader:
        start = time.perf_counter()
        offset = 0
        while offset < size:
            need = min(BLOCK, size - offset)
            length = round_up(need, PAGE) if reader.mode == ODIRECT else need
            reader.read_into(offset, view[:length], need)
            offset += need
        seconds = max(time.perf_counter() - start, 1e-9)
        result = ProbeResult(size / seconds / GB, reader.mode, size, seconds, reader.fallback_reason)
    view.release()
    return result


# Modes swept per tier: the ones a load of that tier may use (hpcllm.store.tuning.ALLOWED_MODES).
SWEEP_MODES = {"disk": (ODIRECT, BUFFERED, MMAP), "sharedfs": (BUFFERED,)}


@contextmanager
def probe_file(folder: Path, size: int):
    """A fresh file of `size` random bytes in folder, out of the page cache; removed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _probe_name()
    try:
        _write_probe_file(path, size)
        _drop_from_page_cache(path)
        yield path
    finally:
        path.unlink(missing_ok=True)


def probe_folder(folder: Path, size: int, mode: str, sweep_tier: str | None = None,
                 tuning: ReadTuning | None = None) -> ProbeResult:
    """Write a probe file of `size` bytes into folder, read it back with `mode`, remove it. With sweep_tier, also
    sweep the read configurations over the file and record the fastest ones in `tuning` under that tier."""
    with probe_file(folder, size) as path:
        result = read_bandwidth(path, mode)
        if sweep_tier is not None and tuning is not None:
            tuning.tiers[sweep_tier] = sweep_tier_folder(folder, [path], sweep_tier)
        return result


def sweep_tier_folder(folder: Path, files: list[Path], tier: str, max_bytes: int | None = None,
                      gate: SweepGate | None = None) -> TierTuning:
    tuned = measure_tier(folder, files, SWEEP_MODES[tier], max_bytes=max_bytes, gate=gate)
    log.info("read tuning of %s (%s): %s", folder, tier,
             ", ".join(f"{c.label()} {c.gbps:.2f} GB/s" for c in tuned.best.values()) or "nothing measured")
    return tuned


def _largest_file(folder: Path, limit: int = 10_000) -> Path | None:
    best: tuple[int, Path] | None = None
    for i, path in enumerate(folder.rglob("*")):
        if i >= limit:
            break
        try:
            if path.is_file() and (best is None or path.stat().st_size > best[0]):
                best = (path.stat().st_size, path)
        except OSError:
            continue
    return best[1] if best and best[0] > 0 else None


def probe_sharedfs(models_dir: Path, size: int) -> ProbeResult | None:
    """Buffered read bandwidth of the shared models folder; None when nothing there can be read."""
    try:
        return probe_folder(models_dir, size, BUFFERED)
    except OSError as exc:
        existing = _largest_file(models_dir) if models_dir.is_dir() else None
        if existing is None:
            log.warning("shared FS probe: cannot write to %s (%s) and it holds no file to read", models_dir, exc)
            return None
        _drop_from_page_cache(existing)
        result = read_bandwidth(existing, BUFFERED, size)
        result.note = f"{models_dir} is not writable ({exc.strerror}): read {existing.name} instead"
        return result


def sweep_read_settings(nvme_dir: Path, models_dir: Path, size: int, gate: SweepGate | None = None) -> ReadTuning:
    """The read sweep of both file tiers over fresh probe files of `size` bytes (a read-only models folder: its
    largest file, as probe_sharedfs does). A tier that cannot be measured is logged and left out (its loads use the
    tier defaults); SweepCancelled from the gate goes to the caller, with the probe files removed."""
    tuning, gate = ReadTuning(), gate or SweepGate()
    try:
        gate.wait()  # writing a probe file is disk traffic too: not while a load reads
        with probe_file(nvme_dir, size) as path:
            tuning.tiers["disk"] = sweep_tier_folder(nvme_dir, [path], "disk", gate=gate)
    except OSError as exc:
        log.warning("read sweep of the NVMe folder %s failed: %s", nvme_dir, exc)
    try:
        gate.wait()
        with probe_file(models_dir, size) as path:
            tuning.tiers["sharedfs"] = sweep_tier_folder(models_dir, [path], "sharedfs", gate=gate)
    except OSError as exc:
        existing = _largest_file(models_dir) if models_dir.is_dir() else None
        if existing is None:
            log.warning("read sweep of the shared FS %s failed (%s) and it holds no file to read", models_dir, exc)
        else:
            tuning.tiers["sharedfs"] = sweep_tier_folder(models_dir, [existing], "sharedfs", max_bytes=size,
                                                         gate=gate)
    return tuning


def memcpy_bandwidth(size: int, passes: int = 3) -> ProbeResult:
    """The copy's rate in this thread's CPU time: a copy is all CPU work, and wall time would also count the time
    other processes held the CPU. Beside busy processes (others' jobs on the node, the other agents of its job) the
    wall-clock best of 3 passes fell below 1 GB/s for 14 GB/s memory, and placement then counted the node's DRAM
    copies as slower than another node's shared FS (the start probes are not taken again)."""
    source, target = HostBuffer(size), HostBuffer(size)
    source.populate()
    target.populate()
    best = float("inf")
    for _ in range(passes):
        start = time.thread_time()
        ctypes.memmove(target.address, source.address, size)
        best = min(best, time.thread_time() - start)
    best = max(best, 1e-9)
    return ProbeResult(size / best / GB, "memcpy", size, best)


H2D_PROBE_TIMEOUT_S = 120.0


def h2d_bandwidth(size: int, passes: int = 3, device: str | None = None, timeout_s: float = H2D_PROBE_TIMEOUT_S,
                  preexec_fn: Callable[[], None] | None = None) -> ProbeResult | None:
    """Pinned host -> GPU copy bandwidth of one GPU, or None where CUDA is not available.

    Measured in a short-lived child process: a CUDA context (hundreds of MB of GPU memory, plus the caching
    allocators' device and pinned buffers) created in the agent would stay for the agent's whole life on a GPU its
    workers need, and on GPUs in EXCLUSIVE_PROCESS compute mode (common on HPC clusters) it would stop every worker
    from opening that GPU at all. `device` is the CUDA_VISIBLE_DEVICES entry of the GPU to measure (the agent's
    first GPU); None keeps the inherited environment (its first visible GPU). `preexec_fn` runs in the child before
    it starts (the agent's: slurm.base.ignore_drain_signal). Raises RuntimeError when the child fails (a broken
    driver): the caller notes it and goes on without the figure.
    """
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    code = ("import json, sys; from hpcllm.node.probes import h2d_bandwidth_in_this_process as probe; "
            "r = probe(int(sys.argv[1]), int(sys.argv[2])); print(json.dumps(r and r.__dict__))")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(size), str(passes)], env=env, capture_output=True,
                              text=True, timeout=timeout_s, preexec_fn=preexec_fn)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the host-to-device probe took more than {timeout_s:.0f} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"the host-to-device probe process exited with status {done.returncode}: {tail}")
    measured = json.loads(lines[-1])
    return ProbeResult(**measured) if measured else None


def h2d_bandwidth_in_this_process(size: int, passes: int = 3) -> ProbeResult | None:
    """h2d_bandwidth's measurement, in the calling process (which keeps a CUDA context afterwards)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)  # page-locked from the start: no extra copy
    target = torch.empty(size, dtype=torch.uint8, device="cuda")
    target.copy_(host, non_blocking=True)  # warm-up: context, first touch of the mapping
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(passes):
        start.record()
        target.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)  # GPU time of the copy alone, milliseconds -> seconds
    best = max(best, 1e-9)
    return ProbeResult(size / best / GB, "pinned", size, best)


def cuda_may_exist(gpu_count: int) -> bool:
    """Importing torch costs about a second: only try CUDA where GPUs were found."""
    return gpu_count > 0


def measure_tiers(nvme_dir: Path, models_dir: Path, probe_bytes: int, memcpy_bytes: int,
                  gpu_count: int = 0, gpu_device: str | None = None,
                  preexec_fn: Callable[[], None] | None = None) -> TierMeasurements:
    """Measure every tier; a probe that fails is logged and left out (the controller then uses its defaults).
    gpu_device: the CUDA_VISIBLE_DEVICES entry of the GPU whose host-to-device bandwidth is measured; preexec_fn:
    h2d_bandwidth's.
    The read sweep is separate (sweep_read_settings): it takes many times longer."""
    out = TierMeasurements()
    try:
        out.nvme = probe_folder(nvme_dir, probe_bytes, ODIRECT)
        if out.nvme.note:
            out.notes.append(f"nvme: {out.nvme.note}")
    except OSError as exc:
        out.notes.append(f"nvme probe in {nvme_dir} failed: {exc}")
    try:
        out.sharedfs = probe_sharedfs(models_dir, probe_bytes)
        if out.sharedfs and out.sharedfs.note:
            out.notes.append(f"sharedfs: {out.sharedfs.note}")
    except OSError as exc:
        out.notes.append(f"shared FS probe in {models_dir} failed: {exc}")
    out.dram = memcpy_bandwidth(memcpy_bytes)
    if cuda_may_exist(gpu_count):
        try:
            out.h2d = h2d_bandwidth(memcpy_bytes, device=gpu_device, preexec_fn=preexec_fn)
        except Exception as exc:  # a broken driver must not stop the agent from serving CPU models
            out.notes.append(f"host-to-device probe failed: {type(exc).__name__}: {exc}")
    for note in out.notes:
        log.warning("%s", note)
    return out
