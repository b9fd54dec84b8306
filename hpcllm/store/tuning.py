"""Read settings measured on this node: how to read each tier fastest (mode, parallelism, block size).

The node agent (hpcllm/node/read_sweep.py) runs `sweep_read` over a probe file in each tier's folder (as fio does
with jobs x block size) in the background after it registered, keeps the best configuration of every read mode,
and writes them with `ReadTuning.save` into its run folder (and a copy that later agents on the node reuse);
workers find the file through $HPCLLM_READ_TUNING and `load_model` reads with `choose_read_plan`'s answer instead of
the fixed tier defaults (hpcllm/store/tiers.py).

Read modes, each measured into memory that is already faulted in (what the device can do, not page faults) and backed
by transparent huge pages where the kernel grants them, as the reserved host pool is (hpcllm.store.memory: a direct
read into 4 KiB pages is split into ~1 MiB requests on these virtio disks, into huge pages it is not):
  odirect   preadv with O_DIRECT into per-thread buffers (the disk tier's default reader)
  buffered  preadv through the page cache into per-thread buffers (the shared-FS reader)
  mmap      the file mapped read-only, threads madvise(MADV_POPULATE_READ) block-sized ranges of it: the kernel
            reads into the page cache and maps those pages, with no copy and no fresh anonymous memory to fault;
            then each thread reads one byte per page of its range (the first CPU access, which a mapped load makes
            too); a CPU model then uses views of the mapping (the path a warm disk-tier load already takes)

Each configuration starts from files evicted from the page cache (posix_fadvise DONTNEED after fsync).

Destination: per-thread block buffers by default (the device's rate: the bench's read limit), or with
`into_one_buffer` one buffer as large as the bytes read, every block at its own offset - what a load into the
reserved pool does. The node's probe measures that way: a buffered read's copy out of the page cache into
model-sized memory costs more than into a small buffer that stays in the CPU's caches (measured here: 1.3-1.6 vs
0.9-2.1 GB/s, in one process minutes apart), and the plan compares it with O_DIRECT into the pool.
"""

from __future__ import annotations

import json
import mmap
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpcllm.store.memory import HUGE_PAGE_SIZE, HostBuffer, populate_read, round_up
from hpcllm.store.readers import BUFFERED, ODIRECT, evict_from_page_cache
from hpcllm.store.tiers import MMAP

TUNING_ENV = "HPCLLM_READ_TUNING"
SWEEP_MODES = (ODIRECT, BUFFERED, MMAP)
SWEEP_THREADS = (1, 2, 4, 8, 16)
SWEEP_BLOCKS = (1 << 20, 4 << 20, 16 << 20)
PAGE = 4096
GB = 1e9


@dataclass(frozen=True)
class ReadConfig:
    """One measured configuration: `threads` requests of `block_bytes` in flight, in `mode`."""

    mode: str
    threads: int
    block_bytes: int
    gbps: float

    def label(self) -> str:
        size = f"{self.block_bytes >> 20} MiB" if self.block_bytes % (1 << 20) == 0 else f"{self.block_bytes >> 10} KiB"
        return f"{self.mode} {self.threads}x{size}"


@dataclass
class TierTuning:
    """The sweep of one tier's folder: the best configuration of each mode measured there."""

    folder: str
    device: int  # st_dev of the folder: a checkpoint on another filesystem does not use these settings
    best: dict[str, ReadConfig] = field(default_factory=dict)  # mode -> fastest configuration of that mode
    bytes_per_config: int = 0
    measured_at: float = 0.0

    def fastest(self, modes) -> ReadConfig | None:
        candidates = [self.best[m] for m in modes if m in self.best]
        return max(candidates, key=lambda c: c.gbps, default=None)


@dataclass
class ReadTuning:
    tiers: dict[str, TierTuning] = field(default_factory=dict)  # "disk" | "sharedfs" -> its sweep

    def to_dict(self) -> dict:
        return {"tiers": {name: asdict(t) for name, t in self.tiers.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ReadTuning":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> "ReadTuning":
        tiers = {}
        for name, t in data.get("tiers", {}).items():
            best = {mode: ReadConfig(**c) for mode, c in t.get("best", {}).items()}
            tiers[name] = TierTuning(folder=t["folder"], device=int(t["device"]), best=best,
                                     bytes_per_config=int(t.get("bytes_per_config", 0)),
                                     measured_at=float(t.get("measured_at", 0.0)))
        return cls(tiers)

    def save(self, path: Path) -> None:
        """Atomic: a worker reading it meanwhile sees the old file or the new one, never half of one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "ReadTuning | None":
        """None when the file is missing or unreadable: the loader then uses the tier defaults (and says so)."""
        try:
            return cls.from_json(Path(path).read_text())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


# ------------------------------------------------------------------------------------------------- the sweep


class SweepCancelled(Exception):
    """A gate stopped the sweep (its agent is draining): nothing measured is kept."""


class SweepGate:
    """How a sweep shares the node with loads. `wait()` runs before each configuration and blocks while something
    else reads (a worker loading), returning a token; `disturbed(token)` after it says whether something else
    read meanwhile, and the configuration is measured again. Either may raise SweepCancelled. This default never
    waits: a sweep alone on the node."""

    def wait(self) -> object:
        return None

    def disturbed(self, token: object) -> bool:
        return False


MEASURE_ATTEMPTS = 3  # a configuration disturbed this often keeps its last figure (too low: it just does not win)


def sweep_read(files: list[Path], modes=SWEEP_MODES, threads=SWEEP_THREADS, blocks=SWEEP_BLOCKS,
               max_bytes: int | None = None, evict: bool = True, gate: SweepGate | None = None,
               into_one_buffer: bool = False) -> list[ReadConfig]:
    """Measure every (mode, threads, block) over the first `max_bytes` of `files` (all by default), each from a
    cold page cache. Modes the filesystem refuses (EINVAL for O_DIRECT, no MADV_POPULATE_READ) are left out.
    into_one_buffer: read into one pre-faulted buffer of the bytes read (module docstring), else per-thread ones."""
    configs = [(mode, n, block) for mode in modes for n in threads for block in blocks]
    return _measure_all(files, configs, max_bytes, evict, gate, into_one_buffer)


def _measure_all(files, configs, max_bytes, evict: bool, gate: SweepGate | None,
                 into_one_buffer: bool) -> list[ReadConfig]:
    gate = gate or SweepGate()
    modes = {mode for mode, _, _ in configs}
    whole = _whole_destination(files, max_bytes) if into_one_buffer and modes - {MMAP} else None
    results, refused = [], set()
    for mode, n, block in configs:
        if mode in refused:
            continue
        try:
            results.append(_measure_config(files, mode, n, block, max_bytes, evict, gate, whole))
        except _ModeUnsupported:
            refused.add(mode)  # e.g. O_DIRECT refused by this filesystem: the other modes are still measured
    if evict:
        evict_from_page_cache(files)
    return results


def _whole_destination(files, max_bytes) -> HostBuffer:
    """One faulted-in buffer for every block of the largest job list (1 MiB blocks: the most page rounding)."""
    jobs = _jobs(files, min(SWEEP_BLOCKS), max_bytes)
    buffer = HostBuffer(sum(round_up(length, PAGE) for _, _, length in jobs), huge_pages=True)
    buffer.populate()
    return buffer


def _measure_config(files, mode, threads, block, max_bytes, evict: bool, gate: SweepGate,
                    whole: HostBuffer | None = None) -> ReadConfig:
    for _ in range(MEASURE_ATTEMPTS):
        token = gate.wait()
        if evict:
            evict_from_page_cache(files)
        seconds, nbytes = _timed_read(files, mode, threads, block, max_bytes, whole)
        if not gate.disturbed(token):
            break
    return ReadConfig(mode, threads, block, nbytes / max(seconds, 1e-9) / GB)


def best_per_mode(results: list[ReadConfig]) -> dict[str, ReadConfig]:
    best: dict[str, ReadConfig] = {}
    for r in results:
        if r.mode not in best or r.gbps > best[r.mode].gbps:
            best[r.mode] = r
    return best


class _ModeUnsupported(Exception):
    pass


def _jobs(files: list[Path], block: int, max_bytes: int | None) -> list[tuple[int, int, int]]:
    """(file index, offset, length) in file order, up to max_bytes in all."""
    jobs, budget = [], max_bytes if max_bytes is not None else float("inf")
    for i, path in enumerate(files):
        size = os.path.getsize(path)
        for offset in range(0, size, block):
            if budget <= 0:
                return jobs
            length = int(min(block, size - offset, budget))
            jobs.append((i, offset, length))
            budget -= length
    return jobs


def _timed_read(files, mode, threads, block, max_bytes, whole: HostBuffer | None = None) -> tuple[float, int]:
    jobs = _jobs(files, block, max_bytes)
    total = sum(length for _, _, length in jobs)
    if mode == MMAP:
        return _timed_populate(files, jobs, threads), total
    flags = os.O_RDONLY | (os.O_DIRECT if mode == ODIRECT else 0)
    try:
        fds = [os.open(path, flags) for path in files]
    except OSError as exc:
        raise _ModeUnsupported(str(exc)) from None
    workers = min(threads, max(1, len(jobs)))
    if whole is not None:  # each block at its own offset, as a load into the pool places it
        targets, at = [], 0
        for _, _, length in jobs:
            targets.append(at)
            at += round_up(length, PAGE)
        jobs = [job + (target,) for job, target in zip(jobs, targets)]
        per_thread = [whole] * workers
    else:
        per_thread = [HostBuffer(round_up(block, HUGE_PAGE_SIZE), huge_pages=True) for _ in range(workers)]
        for buffer in per_thread:
            buffer.populate()  # the device's rate, not page faults
    try:
        return _run(jobs, per_thread, lambda buf, job: _pread(fds, buf, job, mode)), total
    finally:
        for fd in fds:
            os.close(fd)


def _pread(fds, buffer: HostBuffer, job, mode) -> None:
    index, offset, length = job[:3]
    target = job[3] if len(job) > 3 else 0
    view = buffer.view()
    want = round_up(length, PAGE) if mode == ODIRECT else length
    try:
        os.preadv(fds[index], [view[target:target + want]], offset)
    except OSError as exc:
        raise _ModeUnsupported(str(exc)) from None
    finally:
        view.release()


def _timed_populate(files, jobs, threads) -> float:
    import numpy as np

    maps, arrays = [], []
    try:
        for path in files:
            with open(path, "rb") as f:
                maps.append(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
        addresses = [_address(m) for m in maps]

        arrays = [np.frombuffer(m, dtype=np.uint8) for m in maps]

        def populate(_, job):
            index, offset, length = job
            if not populate_read(addresses[index] + offset, length):
                raise _ModeUnsupported("madvise(MADV_POPULATE_READ) is not supported")
            # Read one byte per page, as a mapped load does (hpcllm.store.loader) and as fio's mmap engine reads
            # every byte: populating alone leaves the pages unread by the CPU, and on these VMs the first access to
            # freshly read page-cache pages can cost more than the read (docs/loader.md, measured 0.04-3.4 s for
            # 2 GB): a mode is only as fast as the bytes it makes usable.
            arrays[index][offset:offset + length:PAGE].sum()
        return _run(jobs, [None] * min(threads, max(1, len(jobs))), populate)
    finally:
        arrays = []
        for m in maps:
            m.close()


def _address(m: mmap.mmap) -> int:
    import numpy as np

    # a read-only mapping cannot export a writable buffer (ctypes): take the address from a numpy view

    array = np.frombuffer(m, dtype=np.uint8)
    address = array.ctypes.data
    del array
    return address


def _run(jobs, per_thread, work) -> float:
    """Run `work(thread_state, job)` over jobs in `len(per_thread)` threads; seconds taken. Re-raises errors."""
    lock, position, errors = threading.Lock(), [0], []

    def loop(state):
        while not errors:
            with lock:
                if position[0] >= len(jobs):
                    return
                job = jobs[position[0]]
                position[0] += 1
            try:
                work(state, job)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                errors.append(exc)
                return

    started = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(state,), daemon=True) for state in per_thread]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return seconds


CONFIRM_TOP = 3  # per mode, the fastest configurations of the sweep are measured again...
CONFIRM_ROUNDS = 2  # ...this many more times, alternating, and ranked by their median


def measure_tier(folder: Path, files: list[Path], modes, max_bytes: int | None = None, threads=SWEEP_THREADS,
                 blocks=SWEEP_BLOCKS, gate: SweepGate | None = None) -> TierTuning:
    """The node's probe: every configuration read into one model-sized buffer, as a load into the pool reads; then
    each mode's best configuration confirmed (confirmed_best)."""
    results = sweep_read(files, modes, threads, blocks, max_bytes, gate=gate, into_one_buffer=True)
    best = confirmed_best(files, results, max_bytes, gate)
    return TierTuning(folder=str(folder), device=os.stat(folder).st_dev, best=best,
                      bytes_per_config=max_bytes or sum(os.path.getsize(f) for f in files), measured_at=time.time())


def confirmed_best(files: list[Path], results: list[ReadConfig], max_bytes: int | None = None,
                   gate: SweepGate | None = None, top: int = CONFIRM_TOP,
                   rounds: int = CONFIRM_ROUNDS) -> dict[str, ReadConfig]:
    """Per mode, the configuration with the best median over its sweep figure and `rounds` more reads of each of
    the mode's `top` fastest configurations (alternating, so a slow minute of the disk hits them all).

    One read of a probe-sized file is noisy on a shared disk: a bench run's probe ranked O_DIRECT 1 thread x 4 MiB
    first at 2.24 GB/s (one request in flight), and the load it planned read the model at ~0.8x of what 16 x 4 MiB
    did in the same rounds. The figure kept is that median, so modes compare on like figures."""
    samples: dict[tuple, list[float]] = {}
    for mode in {r.mode for r in results}:
        for r in sorted((r for r in results if r.mode == mode), key=lambda r: -r.gbps)[:top]:
            samples[(r.mode, r.threads, r.block_bytes)] = [r.gbps]
    for _ in range(rounds):
        for again in _measure_all(files, list(samples), max_bytes, True, gate, into_one_buffer=True):
            samples[(again.mode, again.threads, again.block_bytes)].append(again.gbps)
    best: dict[str, ReadConfig] = {}
    for (mode, threads, block), figures in samples.items():
        config = ReadConfig(mode, threads, block, statistics.median(figures))
        if mode not in best or config.gbps > best[mode].gbps:
            best[mode] = config
    return best


# ------------------------------------------------------------------------------------------------ the choice


@dataclass(frozen=True)
class ReadPlan:
    """What the loader does for one load: reader mode, reader threads, bytes per read request, and why."""

    mode: str  # "odirect" | "buffered" | "mmap" (map the files, populate them in `threads` threads)
    threads: int
    block_bytes: int
    source: str  # "probe: odirect 8x4 MiB 1.21 GB/s (/var/tmp/nvme)" | "default: ..." | "arguments"


# Modes a load may use, per (tier, host target?). The shared FS keeps buffered reads into the model's own memory:
# a mapping of a file that another node replaces could change the weights under a running model.
ALLOWED_MODES = {
    ("disk", True): (ODIRECT, BUFFERED, MMAP),
    ("disk", False): (ODIRECT, BUFFERED),
    ("sharedfs", True): (BUFFERED,),
    ("sharedfs", False): (BUFFERED,),
}
# A host load into memory the pool holds faulted in reads into it: O_DIRECT, or buffered (page cache -> the pool)
# where the probe measured that faster. Into fresh memory: O_DIRECT where the probe measured it, else mapped (a
# buffered read into fresh memory pays the page faults O_DIRECT does, plus the page cache's copy).
INTO_POOL = (ODIRECT, BUFFERED)
INTO_FRESH_MEMORY = ((ODIRECT,), (MMAP,))


def load_tuning(source) -> tuple["ReadTuning | None", str | None]:
    """(tuning, where it came from): a ReadTuning, a path, or None for $HPCLLM_READ_TUNING."""
    if isinstance(source, ReadTuning):
        return source, "given"
    path = source if source is not None else os.environ.get(TUNING_ENV)
    if not path:
        return None, None
    return ReadTuning.load(Path(path)), str(path)


def choose_read_plan(tuning: "ReadTuning | None", tier: str, reader: str, threads: int, block_bytes: int,
                     host_target: bool, checkpoint_device: int | None, where: str | None = None,
                     prefaulted: bool = False) -> ReadPlan:
    """The probe's fastest configuration among the modes this tier and target may use; the tier's defaults
    (reader, threads, block_bytes) when there is no probe for that tier, it was measured on another filesystem,
    or it measured none of the allowed modes.

    `prefaulted`: a host target's destination memory is already faulted in (a worker's reserved pool). Then the
    load reads into it, with the faster of O_DIRECT and buffered as the probe measured them into one model-sized
    faulted buffer (measure_tier): buffered wins where the page cache's readahead reads this filesystem faster
    than direct requests, or where O_DIRECT is refused. Never mapped then: the mapped mode allocates the model's
    size in page cache during the load, which a 128 MiB probe does not show: measured here, mapped 2 GB loads took
    2.1-7.8 s across three bench runs where the probe promised ~1 s, O_DIRECT into the reserved pool 1.2-2.2 s
    (docs/loader.md, "Where the cold load lost time"). Without a pre-faulted pool the same holds: O_DIRECT into
    fresh memory (faulting it in as it goes) took 1.1-1.6 s where the probe's mapped plan took 3.2-4.1 s, in one
    quiet bench run; so a host load maps the files only where the probe measured no O_DIRECT (it was refused)."""
    allowed = ALLOWED_MODES.get((tier, host_target))
    measured_modes = tuning.tiers[tier].best if tuning is not None and tier in tuning.tiers else {}
    if host_target and allowed:
        for preferred in ((INTO_POOL,) if prefaulted else INTO_FRESH_MEMORY):
            usable = tuple(m for m in preferred if m in allowed)
            if any(m in measured_modes for m in usable):
                allowed = usable
                break
        else:
            allowed = tuple(m for m in allowed if m != BUFFERED) or allowed  # defaults; buffered never into fresh
    if allowed is None:
        return ReadPlan(reader, threads, block_bytes, f"default: tier {tier} is not read by threads")
    if tuning is None:
        why = f"no read tuning at {where}" if where else "no read tuning (no probe on this node)"
        return ReadPlan(reader, threads, block_bytes, f"default: {why}")
    measured = tuning.tiers.get(tier)
    if measured is None:
        return ReadPlan(reader, threads, block_bytes, f"default: the probe did not measure the {tier} tier")
    if checkpoint_device is not None and measured.device != checkpoint_device:
        return ReadPlan(reader, threads, block_bytes,
                        f"default: the probe measured another filesystem ({measured.folder})")
    best = measured.fastest(allowed)
    if best is None:
        return ReadPlan(reader, threads, block_bytes,
                        f"default: the probe measured none of {', '.join(allowed)} on {measured.folder}")
    into = " into the pre-faulted pool" if host_target and prefaulted and best.mode in INTO_POOL else ""
    return ReadPlan(best.mode, best.threads, best.block_bytes,
                    f"probe: {best.label()} {best.gbps:.2f} GB/s ({measured.folder}){into}")
